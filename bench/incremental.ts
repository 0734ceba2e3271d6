/**
 * The `incremental` group (issue #12's benchmark), on a qcow2 disk half random, half never written, in a running TCG
 * domain of its own (the other groups' disks stay as they were):
 *
 * - vmbackup's incremental push backup against `virtnbdbackup -l inc` of the same change. Per repetition each tool
 *   builds its own chain: a full, CHANGED MiB written through the virtio device in scattered 1 MiB pieces, an
 *   increment (timed, cold page cache), more pieces, a second increment. Both tools get the same offsets. They cannot
 *   share one chain: virtnbdbackup 1.9.15 refuses any run while the domain has a checkpoint it did not create
 *   (bench/lib/checkpoints.ts), so vmbackup's checkpoints are deleted before each virtnbdbackup chain, right before
 *   its full. vmbackup leaves virtnbdbackup's checkpoints alone, and the bench checks that it does. Which tool goes
 *   first alternates per repetition. Stored bytes: st_blocks under the tool's output after the increment minus
 *   before (vmbackup: the backup's image and manifest; virtnbdbackup: its data file, checkpoint and config copies,
 *   log).
 * - restore of a chain: a full and 7 increments (each after scattered writes), then a full of the same disk at the
 *   same point; `vmbackup restore --format qcow2` of the 7th increment against that of the full, cold page cache,
 *   both into the bench's work directory. The two images must be equal (`qemu-img compare`) and standalone.
 */
import { mkdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { FixtureDomain } from '../test/fixtures/domains';
import { deleteCheckpoints, listCheckpoints } from './lib/checkpoints';
import { dirBytes, dropCaches, elapsed, must, run, timed } from './lib/measure';
import { cli } from './lib/vmbackup';
import type { MeasuredBackup } from './lib/vmbackup';
import type { Sample } from './report';

const MiB = 1 << 20;
const CHAIN_INCREMENTS = 7;

/** What the group needs from bench/main.ts. */
export interface IncrementalBench {
  work: string;
  smoke: boolean;
  record(id: string, label: string, sample: Sample, extra?: Record<string, unknown>): void;
  log(line: string): void;
  /** one `vmbackup backup DOMAIN --wait --json ARGS`, measured with its worker */
  backup(domain: string, args: string[]): Promise<MeasuredBackup>;
}

/**
 * COUNT distinct 1 MiB slots of a DISK_MIB disk, pseudo-random from SEED (mulberry32, partial Fisher-Yates), in the
 * order they are written: the same seed gives both tools the same change.
 */
export function scatteredOffsets(diskMiB: number, count: number, seed: number): number[] {
  if (!Number.isInteger(count) || count < 1 || count > diskMiB) {
    throw new Error(`${count} pieces of 1 MiB do not fit a ${diskMiB} MiB disk`);
  }
  let a = seed >>> 0;
  const next = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const slots = Array.from({ length: diskMiB }, (_, i) => i);
  for (let i = 0; i < count; i++) {
    const j = i + Math.floor(next() * (diskMiB - i));
    [slots[i], slots[j]] = [slots[j]!, slots[i]!];
  }
  return slots.slice(0, count);
}

/** Non-zero: a piece of zeroes could be kept as a hole by one tool and stored as data by the other. */
function patternByte(...parts: number[]): number {
  return 1 + (parts.reduce((n, p) => n * 31 + p, 7) % 255);
}

interface ChainJson {
  level?: string;
  parent?: string;
  reason?: string;
}

/** The level vmbackup says it took must be the one asked for: a silent full would time the wrong thing. */
function expectLevel(b: MeasuredBackup, level: 'full' | 'inc', parent?: string): void {
  const chain = b.json.chain as ChainJson | undefined;
  if (chain?.level === level && (parent === undefined || chain.parent === parent)) return;
  throw new Error(
    `backup ${b.backupId}: asked for ${level}${parent ? ` on ${parent}` : ''}, vmbackup took ${String(chain?.level)}${chain?.parent ? ` on ${chain.parent}` : ''} (${chain?.reason ?? 'no reason given'})`,
  );
}

export class IncrementalGroup {
  private chain?: { url: string; incId: string; fullId: string };

  constructor(
    private readonly b: IncrementalBench,
    private readonly sz: string,
    private readonly dom: FixtureDomain,
    private readonly diskMiB: number,
  ) {}

  /** CHANGED MiB of each timed increment, in chain order */
  private get changes(): number[] {
    return this.b.smoke ? [4, 16] : [64, 512];
  }

  async run(rep: number): Promise<void> {
    this.chain ??= await this.buildRestoreChain();
    const order = rep % 2 ? (['vmbackup', 'virtnbdbackup'] as const) : (['virtnbdbackup', 'vmbackup'] as const);
    for (const tool of order) {
      if (tool === 'vmbackup') await this.vmbackupChain(rep);
      else await this.virtnbdChain(rep);
    }
    await this.restores(rep);
  }

  private async write(offsets: number[], byte: number): Promise<number> {
    const { ms } = await elapsed(async () => {
      for (const off of offsets) await this.dom.writeThroughDevice('vda', byte, off, 1);
    });
    return ms;
  }

  private offsets(rep: number, i: number): number[] {
    return scatteredOffsets(this.diskMiB, this.changes[i]!, rep * 100 + i);
  }

  private async vmbackupChain(rep: number): Promise<void> {
    const { sz, dom } = this;
    const target = join(this.b.work, `inc-${sz}-r${rep}-vmbackup`);
    const url = `file://${target}`;
    const foreign = (await listCheckpoints(dom.name)).filter((n) => !n.startsWith('vmbackup.'));
    try {
      await dropCaches();
      const full = await this.b.backup(dom.name, ['--method', 'push', '--level', 'full', '--target', url]);
      expectLevel(full, 'full');
      this.b.record(`${sz}/inc-full-vmbackup`, `vmbackup full push, chain start (${sz})`, {
        ...full.sample,
        jobMs: full.jobMs,
        storedMiB: (await dirBytes(target)) / MiB,
      });
      let parent = full.backupId;
      for (const [i, mib] of this.changes.entries()) {
        const writeMs = await this.write(this.offsets(rep, i), patternByte(rep, i, 0));
        const before = await dirBytes(target);
        await dropCaches();
        const inc = await this.b.backup(dom.name, ['--method', 'push', '--level', 'inc', '--target', url]);
        expectLevel(inc, 'inc', parent);
        parent = inc.backupId;
        this.b.record(
          `${sz}/inc-${mib}m-vmbackup`,
          `vmbackup --level inc after ${mib} MiB in 1 MiB pieces (${sz})`,
          {
            ...inc.sample,
            jobMs: inc.jobMs,
            storedMiB: ((await dirBytes(target)) - before) / MiB,
            changedMiB: mib,
            writeMs,
          },
          { split: inc.split },
        );
      }
      const left = await listCheckpoints(dom.name);
      const gone = foreign.filter((n) => !left.includes(n));
      if (gone.length > 0) throw new Error(`vmbackup deleted checkpoints it did not create: ${gone.join(', ')}`);
      if (foreign.length > 0) this.b.log(`vmbackup left the other checkpoints alone: ${foreign.join(', ')}`);
    } finally {
      await rm(target, { recursive: true, force: true });
    }
  }

  private async virtnbdChain(rep: number): Promise<void> {
    const { sz, dom } = this;
    const out = join(this.b.work, `inc-${sz}-r${rep}-virtnbd`);
    const scratch = join(this.b.work, `inc-${sz}-r${rep}-virtnbd-scratch`);
    const virtnbdbackup = async (level: 'full' | 'inc') => {
      await mkdir(scratch, { recursive: true });
      return timed('sh', [
        '-c',
        'virtnbdbackup -d "$1" -l "$2" -o "$3" -n -S "$4" && sync -f "$3"',
        'sh',
        dom.name,
        level,
        out,
        scratch,
      ]);
    };
    try {
      // "Foreign checkpoint found: [vmbackup.…]": virtnbdbackup runs only beside checkpoints of its own
      await deleteCheckpoints(dom.name, 'vmbackup.');
      await dropCaches();
      const full = await virtnbdbackup('full');
      this.b.record(`${sz}/inc-full-virtnbd`, `virtnbdbackup -l full, chain start (${sz})`, {
        wallMs: full.wallMs,
        cpuMs: full.cpuMs,
        peakRssMiB: full.peakRssMiB,
        storedMiB: (await dirBytes(out)) / MiB,
      });
      for (const [i, mib] of this.changes.entries()) {
        const writeMs = await this.write(this.offsets(rep, i), patternByte(rep, i, 1));
        const before = await dirBytes(out);
        await dropCaches();
        const v = await virtnbdbackup('inc');
        // it names each increment's data file after its checkpoint: virtnbdbackup.1, .2, ...
        const data = join(out, `vda.inc.virtnbdbackup.${i + 1}.data`);
        if (!((await stat(data).catch(() => undefined))?.size ?? 0))
          throw new Error(`virtnbdbackup -l inc wrote no ${data}`);
        this.b.record(`${sz}/inc-${mib}m-virtnbd`, `virtnbdbackup -l inc after ${mib} MiB in 1 MiB pieces (${sz})`, {
          wallMs: v.wallMs,
          cpuMs: v.cpuMs,
          peakRssMiB: v.peakRssMiB,
          storedMiB: ((await dirBytes(out)) - before) / MiB,
          changedMiB: mib,
          writeMs,
        });
      }
    } finally {
      await rm(out, { recursive: true, force: true });
      await rm(scratch, { recursive: true, force: true });
    }
  }

  /** A full, 7 increments after scattered writes, and a full of the same disk at the 7th increment's point. */
  private async buildRestoreChain(): Promise<{ url: string; incId: string; fullId: string }> {
    const { sz, dom } = this;
    const url = `file://${join(this.b.work, `chain-${sz}`)}`;
    const pieces = this.b.smoke ? 2 : 64;
    this.b.log(`restore chain (${sz}): a full, ${CHAIN_INCREMENTS} increments after ${pieces} MiB each, a full`);
    const args = ['--method', 'push', '--target', url, '--level'];
    const first = await this.b.backup(dom.name, [...args, 'full']);
    expectLevel(first, 'full');
    let parent = first.backupId;
    for (let k = 1; k <= CHAIN_INCREMENTS; k++) {
      await this.write(scatteredOffsets(this.diskMiB, pieces, 10_000 + k), patternByte(10_000, k));
      const inc = await this.b.backup(dom.name, [...args, 'inc']);
      expectLevel(inc, 'inc', parent);
      parent = inc.backupId;
    }
    const full = await this.b.backup(dom.name, [...args, 'full']);
    expectLevel(full, 'full');
    return { url, incId: parent, fullId: full.backupId };
  }

  private async restores(rep: number): Promise<void> {
    const { sz } = this;
    const chain = this.chain!;
    const cases = {
      chain: {
        id: chain.incId,
        label: `vmbackup restore --format qcow2 of a full + ${CHAIN_INCREMENTS} increments (${sz})`,
      },
      full: { id: chain.fullId, label: `vmbackup restore --format qcow2 of one full, same disk and point (${sz})` },
    };
    const order = rep % 2 ? (['chain', 'full'] as const) : (['full', 'chain'] as const);
    const to = {
      chain: join(this.b.work, `restore-chain-r${rep}.qcow2`),
      full: join(this.b.work, `restore-full-r${rep}.qcow2`),
    };
    try {
      for (const which of order) {
        await dropCaches();
        const r = await cli([
          'restore',
          cases[which].id,
          '--target',
          chain.url,
          '--disk',
          'vda',
          '--format',
          'qcow2',
          '--to',
          to[which],
          '--json',
        ]);
        this.b.record(`${sz}/restore-${which}`, cases[which].label, {
          wallMs: r.wallMs,
          cpuMs: r.cpuMs,
          peakRssMiB: r.peakRssMiB,
        });
      }
      // the bench must not time a wrong restore: both standalone, both the same disk
      for (const f of Object.values(to)) {
        const info = JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', 'qcow2', f])) as Record<
          string,
          unknown
        >;
        if (info['backing-filename'] !== undefined) throw new Error(`${f} has a backing file: not standalone`);
      }
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', to.chain, to.full]);
      if (cmp.code !== 0) {
        throw new Error(
          `the restore of ${chain.incId} differs from that of ${chain.fullId}: ${(cmp.stdout + cmp.stderr).trim()}`,
        );
      }
    } finally {
      for (const f of Object.values(to)) await rm(f, { force: true });
    }
  }
}
