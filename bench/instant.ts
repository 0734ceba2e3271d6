/**
 * The `instant` group (issue #14's closing figures): on a 4 GiB qcow2 disk (a quarter random, the rest never
 * written; 64 MiB with --smoke) in a running TCG domain of its own, backed up once (push, to a local target):
 *
 * - `vmbackup restore <id> --instant NAME`: the time from the command's start to the domain running, as the command
 *   reports it (`startSeconds`), and the command's wall time; the domain is removed again after each repetition;
 * - `vmbackup restore <id> --to DIR` of the same backup: wall time and throughput (virtual disk bytes / s, and stored
 *   bytes / s).
 * Cold page cache before each. The ratio: the full restore's wall time / the instant start.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { FixtureDomain } from '../test/fixtures/domains';
import { dropCaches, must, run } from './lib/measure';
import { cli } from './lib/vmbackup';
import type { MeasuredBackup } from './lib/vmbackup';
import type { Sample } from './report';

const MiB = 1 << 20;

/** What the group needs from bench/main.ts. */
export interface InstantBench {
  work: string;
  stateDir: string;
  record(id: string, label: string, sample: Sample, extra?: Record<string, unknown>): void;
  log(line: string): void;
  backup(domain: string, args: string[]): Promise<MeasuredBackup>;
}

export class InstantGroup {
  private backupId: string | undefined;
  private storedBytes = 0;

  constructor(
    private readonly io: InstantBench,
    private readonly size: string,
    private readonly dom: FixtureDomain,
    private readonly diskMiB: number,
  ) {}

  private get target(): string {
    return `file://${join(this.io.work, 'instant-target')}`;
  }

  async run(rep: number): Promise<void> {
    if (!this.backupId) {
      const b = await this.io.backup(this.dom.name, ['--target', this.target, '--method', 'push']);
      this.backupId = b.backupId;
      const m = JSON.parse(
        await must('cat', [join(this.io.work, 'instant-target', this.dom.name, b.backupId, 'manifest.json')]),
      ) as { disks: Array<{ size: number }>; vm?: unknown };
      if (!m.vm) throw new Error(`backup ${b.backupId} stores no domain definition: --instant cannot start it`);
      this.storedBytes = m.disks.reduce((n, d) => n + d.size, 0);
    }
    const id = this.backupId;
    const name = `vmbt-bench-ins-${rep}-${Date.now().toString(16).slice(-6)}`;
    const dir = join(this.io.work, `instant-${rep}`);
    try {
      await dropCaches();
      const started = await cli(['restore', id, '--target', this.target, '--instant', name, '--to', dir, '--json']);
      const startSeconds = Number(started.json.startSeconds);
      this.io.record(
        `${this.size}/instant-start`,
        `restore --instant of a ${this.size} disk: command start to domain running`,
        {
          wallMs: startSeconds * 1000,
          commandMs: started.wallMs,
          cpuMs: started.cpuMs,
          peakRssMiB: started.peakRssMiB,
        },
      );
      this.io.log(`instant start (${this.size}): ${startSeconds.toFixed(2)} s`);
    } finally {
      await run('virsh', ['destroy', name]);
      await run('virsh', ['undefine', name, '--nvram', '--tpm']);
      await rm(dir, { recursive: true, force: true });
      await rm(join(this.io.stateDir, 'instant', `${name}.json`), { force: true });
    }

    const to = join(this.io.work, `full-restore-${rep}`);
    try {
      await dropCaches();
      const full = await cli(['restore', id, '--target', this.target, '--to', to, '--json']);
      const seconds = full.wallMs / 1000;
      const virtualMBps = (this.diskMiB * MiB) / 1e6 / seconds;
      this.io.record(`${this.size}/instant-full-restore`, `restore --to of the same ${this.size} backup`, {
        wallMs: full.wallMs,
        cpuMs: full.cpuMs,
        peakRssMiB: full.peakRssMiB,
        virtualMBps,
        storedMBps: this.storedBytes / 1e6 / seconds,
      });
      this.io.log(`full restore (${this.size}): ${seconds.toFixed(2)} s, ${virtualMBps.toFixed(0)} MB/s of disk`);
    } finally {
      await rm(to, { recursive: true, force: true });
    }
  }
}
