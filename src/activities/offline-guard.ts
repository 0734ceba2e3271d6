/**
 * What every read of a shut-off domain's disks relies on (the offline method): the disks are the ones libvirt has for
 * the domain now (a source path in an input is never read unless it is libvirt's), the domain stays shut off while
 * they are read (its state is watched, and a start aborts the read), and the source files did not change meanwhile
 * (size and mtime before and after). A start during the read discards what was read: one permanent sentence.
 */
import { stat } from 'node:fs/promises';
import type { Hypervisor } from '../hypervisor/port';
import type { OfflineCopyInput } from '../shared/activities';
import { ErrorType } from '../shared/errors';
import type { DiskInfo } from '../shared/types';
import { hypervisorFailure, permanent } from './failures';
import type { HostPaths } from './host-paths';

/** A read of a shut-off domain's disk in progress: `signal` aborts when the domain is no longer shut off. */
export interface ShutOffWatch {
  signal: AbortSignal;
  /** the domain was seen running (or in any state but shut off) during the read */
  started(): boolean;
  stop(): void;
}

export function offlineGuard(hv: Hypervisor, paths: HostPaths) {
  /**
   * The disks to read, as libvirt reports them for the domain now: a source path in the input is never read
   * unless it is the one libvirt has for that disk (an input naming /etc/shadow as a disk is refused).
   */
  async function disksOfDomain(
    input: Pick<OfflineCopyInput, 'domain' | 'disks'>,
    activity: string,
  ): Promise<DiskInfo[]> {
    if (!Array.isArray(input.disks) || input.disks.length === 0) {
      throw permanent(`${activity}: no disk of ${input.domain} to copy`, ErrorType.InvalidInput);
    }
    let live: DiskInfo[];
    try {
      live = await hv.disks(input.domain);
    } catch (err) {
      hypervisorFailure(err);
    }
    return input.disks.map((asked) => {
      const name = paths.diskName(asked.name, activity);
      const disk = live.find((d) => d.name === name);
      if (!disk || !disk.source || disk.source !== asked.source || disk.format !== asked.format) {
        throw permanent(
          `${activity}: ${input.domain} has no disk ${name} on ${asked.source} (${asked.format}) according to libvirt${disk?.source ? `, it uses ${disk.source} (${disk.format})` : ''}; refused`,
          ErrorType.InvalidInput,
        );
      }
      return disk;
    });
  }

  async function assertShutOff(domain: string): Promise<void> {
    let state: string;
    try {
      state = await hv.state(domain);
    } catch (err) {
      hypervisorFailure(err);
    }
    if (state !== 'shut off') throw startedDuringCopy(domain);
  }

  /** Polls the domain's state every 500 ms while a disk is read; `cancel` (the activity's) aborts too. */
  function watchShutOff(domain: string, cancel: AbortSignal): ShutOffWatch {
    const watch = new AbortController();
    const onCancel = () => watch.abort(cancel.reason);
    if (cancel.aborted) onCancel();
    else cancel.addEventListener('abort', onCancel, { once: true });
    let started = false;
    const timer = setInterval(() => {
      hv.state(domain).then(
        (s) => {
          if (s !== 'shut off') {
            started = true;
            watch.abort(startedDuringCopy(domain));
          }
        },
        () => undefined,
      );
    }, 500);
    return {
      signal: watch.signal,
      started: () => started,
      stop: () => {
        clearInterval(timer);
        cancel.removeEventListener('abort', onCancel);
      },
    };
  }

  return { disksOfDomain, assertShutOff, watchShutOff };
}

export function startedDuringCopy(domain: string) {
  return permanent(
    `${domain} was started during the offline copy, so the copy was discarded: run the backup again (a running domain is backed up live)`,
    ErrorType.DomainStarted,
  );
}

/** `size:mtimeMs` of a disk's source file: a write to it moves the mtime. */
export async function sourceStamp(path: string): Promise<string> {
  const s = await stat(path);
  return `${s.size}:${s.mtimeMs}`;
}
