/**
 * `vmbackup restore --finish NEWNAME`: the steps of the finishInstantRestore workflow. A block pull (`virsh
 * blockpull`) copies every cluster each disk still reads from the backup into its overlay while the VM runs; when
 * QEMU completes the job it writes "no backing file" into the overlay's header and libvirt drops the chain, so the
 * overlay is the standalone disk. The disk never changes file: at every moment the VM runs on its overlay, which is
 * complete together with its (read-only) backing chain, so a failed, aborted or lost pull leaves it running as it
 * was. (blockcopy + pivot would write a second file and switch to it: a pivot that fails half-way, or a copy that
 * is lost, is what this avoids.)
 *
 * Inputs come from whoever can start a workflow: the activities act only on a domain that `--instant` created on
 * this host (its record in the state dir, same UUID) and only on the disks the record names, running on the
 * recorded overlays with the recorded backup image below them.
 */
import { Context } from '@temporalio/activity';
import { HypervisorError } from '../hypervisor/errors';
import type { Hypervisor } from '../hypervisor/port';
import { imageInfo } from '../hypervisor/qemu-img';
import { parseDomainXml } from '../hypervisor/xml';
import { releaseInstantAccess, readInstantRecord, writeInstantRecord, type InstantRecord } from '../repository/instant';
import type { FinishInstantInput, FinishedDisk, InstantPullResult } from '../shared/activities';
import { ErrorType } from '../shared/errors';
import type { DiskInfo } from '../shared/types';
import { hypervisorFailure, permanent } from './failures';
import type { HostPaths } from './host-paths';
import { pollDelays } from './poll';

export interface InstantDeps {
  hypervisor: Hypervisor;
  /** where `--instant` wrote its records (the CLI's state dir on this host) */
  stateDir: string;
  paths: HostPaths;
  pollIntervalMs?: number;
}

/** What pullInstantDisks heartbeats. */
export interface PullHeartbeat {
  phase: 'pull';
  disks: Record<string, { cur: number; end: number }>;
  /** pulls started again after their job vanished with the disk still on the backup */
  restarts: number;
}

const BLOCK_PULL = 'Block Pull';
/** A pull whose job keeps vanishing before the chain is gone is retried by Temporal, not forever here. */
const MAX_RESTARTS = 3;

export function createInstantActivities(deps: InstantDeps) {
  const hv = deps.hypervisor;
  const pollMs = deps.pollIntervalMs ?? 200;

  /** The record and the live disks of an --instant domain, after checking that they belong together. */
  async function instantDomain(
    input: FinishInstantInput,
    activity: string,
  ): Promise<{ record: InstantRecord; live: Map<string, DiskInfo> }> {
    const domain = deps.paths.domainName(input?.domain, activity);
    const record = await readInstantRecord(deps.stateDir, domain).catch((err: unknown) => {
      throw permanent((err as Error).message, ErrorType.InvalidInput);
    });
    if (!record) {
      throw permanent(
        `${domain} was not created by \`vmbackup restore --instant\` on this host (no record in ${deps.stateDir}/instant); nothing was done`,
        ErrorType.InvalidInput,
      );
    }
    let uuid: string;
    let disks: DiskInfo[];
    try {
      uuid = parseDomainXml(await hv.domainXml(domain)).uuid;
      disks = await hv.disks(domain);
    } catch (err) {
      if (err instanceof HypervisorError && err.kind === 'not-found') {
        throw permanent(`${domain} does not exist on this host any more; nothing was done`, ErrorType.DomainGone);
      }
      hypervisorFailure(err);
    }
    if (uuid !== record.uuid) {
      throw permanent(
        `${domain} has the UUID ${uuid}, not ${record.uuid} that \`vmbackup restore --instant\` gave it: it is another domain of that name; nothing was done`,
        ErrorType.InvalidInput,
      );
    }
    const live = new Map(disks.map((d) => [d.name, d]));
    for (const r of record.disks) {
      const d = live.get(r.name);
      if (d?.source !== r.overlay) {
        throw permanent(
          `disk ${r.name} of ${domain} runs on ${d?.source ?? 'nothing'}, not on ${r.overlay} that --instant created; nothing was done`,
          ErrorType.UnsupportedDisk,
        );
      }
      if (d.backingChain.length > 0 && d.backingChain[0] !== r.backing) {
        throw permanent(
          `disk ${r.name} of ${domain} reads from ${d.backingChain[0]}, not from the backup image ${r.backing}: its chain was changed since --instant; nothing was done`,
          ErrorType.UnsupportedDisk,
        );
      }
    }
    return { record, live };
  }

  /**
   * Makes sure every recorded disk that still reads from the backup has a pull running (an earlier attempt's job,
   * still running in QEMU after a worker died, is attached to), and polls until no disk has a backing chain.
   */
  async function pullInstantDisks(input: FinishInstantInput): Promise<InstantPullResult> {
    const ctx = Context.current();
    const { record, live } = await instantDomain(input, 'pullInstantDisks');
    const domain = record.domain;
    const bandwidth = input.bandwidthMiB;
    if (bandwidth !== undefined && !(Number.isInteger(bandwidth) && bandwidth > 0 && bandwidth <= 1 << 20)) {
      throw permanent(`the pull bandwidth must be a whole number of MiB/s, not ${bandwidth}`, ErrorType.InvalidInput);
    }
    const pending = new Set(
      record.disks.filter((r) => (live.get(r.name)?.backingChain.length ?? 0) > 0).map((r) => r.name),
    );
    if (pending.size === 0) return { domain, alreadyStandalone: true };

    const state = await hv.state(domain).catch((err: unknown) => hypervisorFailure(err));
    if (state !== 'running' && state !== 'paused') {
      throw permanent(
        `${domain} is ${state}: its disks can be pulled from the backup only while it runs; start it and run --finish again (it still reads from backup ${record.backupId})`,
        ErrorType.DomainGone,
      );
    }
    const previous = ctx.info.heartbeatDetails as PullHeartbeat | undefined;
    const progress: PullHeartbeat = { phase: 'pull', disks: {}, restarts: previous?.restarts ?? 0 };
    if (previous) ctx.log.info('resuming the pull', { domain, disks: Object.keys(previous.disks) });
    for (const disk of pending) await ensurePull(domain, disk, bandwidth);

    const nextWait = pollDelays(pollMs);
    while (pending.size > 0) {
      for (const disk of [...pending]) {
        const job = await hv.blockJobInfo(domain, disk).catch((err: unknown) => hypervisorFailure(err));
        if (job.type === BLOCK_PULL) {
          progress.disks[disk] = { cur: job.cur, end: job.end };
          continue;
        }
        const d = (await hv.disks(domain).catch((err: unknown) => hypervisorFailure(err))).find((x) => x.name === disk);
        if (d && d.backingChain.length === 0) {
          pending.delete(disk);
          progress.disks[disk] = { cur: 1, end: 1 };
          continue;
        }
        if (job.type !== undefined) throw foreignJob(domain, disk, job.type);
        // The job ended and the disk still reads from the backup: it failed or was aborted (or QEMU restarted).
        if (++progress.restarts > MAX_RESTARTS) {
          throw new Error(
            `the pull of disk ${disk} of ${domain} ended ${MAX_RESTARTS} times without leaving it standalone; it still runs on its overlay`,
          );
        }
        ctx.log.warn('the pull job ended before the disk was standalone: starting it again', { domain, disk });
        await ensurePull(domain, disk, bandwidth);
      }
      ctx.heartbeat(progress);
      if (pending.size > 0) await ctx.sleep(nextWait());
    }
    return { domain, alreadyStandalone: false };
  }

  async function ensurePull(domain: string, disk: string, bandwidthMiB: number | undefined): Promise<void> {
    const job = await hv.blockJobInfo(domain, disk).catch((err: unknown) => hypervisorFailure(err));
    if (job.type === BLOCK_PULL) return; // ours, from an earlier attempt: attach
    if (job.type !== undefined) throw foreignJob(domain, disk, job.type);
    try {
      await hv.startBlockPull(domain, disk, bandwidthMiB !== undefined ? { bandwidthMiB } : {});
    } catch (err) {
      hypervisorFailure(err); // 'busy' ("already in active block job") stays retryable
    }
  }

  function foreignJob(domain: string, disk: string, type: string): Error {
    return permanent(
      `a ${type} job runs on disk ${disk} of ${domain}; let it end (or \`virsh blockjob ${domain} ${disk} --abort\`) and run --finish again; the VM still runs on its overlay`,
      ErrorType.PivotFailed,
    );
  }

  /**
   * Checks that no recorded disk has a backing file any more (libvirt's view and the image header), records it, and
   * puts back the modes of the target directories --instant opened and the owners of the backup's images.
   */
  async function completeInstantFinish(input: FinishInstantInput): Promise<FinishedDisk[]> {
    const { record, live } = await instantDomain(input, 'completeInstantFinish');
    const out: FinishedDisk[] = [];
    for (const r of record.disks) {
      const d = live.get(r.name);
      if (!d || d.backingChain.length > 0) {
        throw permanent(
          `disk ${r.name} of ${record.domain} still reads from ${d?.backingChain[0] ?? '?'} after the pull`,
          ErrorType.PivotFailed,
        );
      }
      const header = await imageInfo(r.overlay, { format: 'qcow2', forceShare: true }).catch((err: unknown) =>
        hypervisorFailure(err),
      );
      if (header.backingFile !== undefined) {
        throw permanent(
          `libvirt shows disk ${r.name} of ${record.domain} standalone, yet the header of ${r.overlay} still names ${header.backingFile}`,
          ErrorType.PivotFailed,
        );
      }
      out.push({ name: r.name, path: r.overlay });
    }
    if (!record.finishedAt)
      await writeInstantRecord(deps.stateDir, { ...record, finishedAt: new Date().toISOString() });
    // nothing reads from the backup any more: the target directories --instant opened for QEMU's user close again and
    // the images go back to their owners (unless another instant domain still runs on them); after finishedAt is on
    // record, so a retry does it too
    await releaseInstantAccess(deps.stateDir, record);
    return out;
  }

  return { pullInstantDisks, completeInstantFinish };
}
