/**
 * The `nbd` group (issue #16: which NBD reader pull mode uses): a qcow2 half random, half never written, exported by
 * `qemu-nbd -r` over a Unix socket, read from a cold page cache by
 *   (a) src/nbd: base:allocation extents, then the data extents with readRanges, N requests in flight (1, 4, 8, 16),
 *       into nothing and into SHA-256 (in order, one pass);
 *   (b) libnbd's tools: `nbdcopy URI null:` (extent-aware, 4 connections by default, and with one),
 *       `nbdcopy URI - | sha256sum` (the only way to hash in one pass with it: the whole disk, zeros included), and
 *       `nbdinfo --map` (the map alone, against our extents() alone);
 *   (c) the baseline measured in the same run: `qemu-img convert -n -f qcow2 --target-image-opts SRC driver=null-co,...`
 *       (qemu-img reading the image itself, without NBD, into QEMU's discarding null-co driver).
 * Ratios against (c); the figures and the decision are in docs/nbd.md.
 *
 * In `npm run bench` as the group `nbd` (bench/main.ts), or alone (root, for drop_caches):
 *   npx tsc -p bench/tsconfig.json --outDir /tmp/b && NODE_PATH=$PWD/node_modules node /tmp/b/bench/nbd-read.js \
 *     [--size-mib 2048] [--reps 3] [--work DIR]
 */
import type { ChildProcess } from 'node:child_process';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { NbdClient, STATE_HOLE, STATE_ZERO, extents, rangesWhere, readRanges } from '../src/nbd';
import { dropCaches, median, must, timed } from './lib/measure';

const MiB = 1 << 20;
export const IN_FLIGHT = [1, 4, 8, 16] as const;

/** What the group needs from its runner (bench/main.ts, or main() below). */
export interface NbdReadBench {
  work: string;
  record(id: string, label: string, sample: Record<string, number>, extra?: Record<string, unknown>): void;
  log(line: string): void;
}

/** Ratios of the group, for bench/report.ts: every case against qemu-img convert of the same image. */
export function nbdReadRatioDefs(ids: string[]): Array<{ name: string; num: string; den: string; metric: string }> {
  const defs: Array<{ name: string; num: string; den: string; metric: string }> = [];
  for (const id of ids) {
    const m = /^(\d+[mg])\/nbd-(.+)$/.exec(id);
    if (!m || m[2] === 'qemu-img-convert' || m[2] === 'map-ours' || m[2] === 'map-nbdinfo') continue;
    defs.push({
      name: `pull read ${m[2]} / qemu-img convert (${m[1]})`,
      num: id,
      den: `${m[1]}/nbd-qemu-img-convert`,
      metric: 'wallMs',
    });
  }
  for (const sz of new Set(ids.map((id) => /^(\d+[mg])\/nbd-map-ours$/.exec(id)?.[1]).filter(Boolean))) {
    defs.push({
      name: `extents map: src/nbd / nbdinfo --map (${sz})`,
      num: `${sz}/nbd-map-ours`,
      den: `${sz}/nbd-map-nbdinfo`,
      metric: 'wallMs',
    });
  }
  return defs;
}

interface Server {
  socket: string;
  uri: string;
  stop(): Promise<void>;
}

async function startQemuNbd(image: string, socket: string): Promise<Server> {
  const child: ChildProcess = spawn(
    'qemu-nbd',
    ['-r', '-f', 'qcow2', '-k', socket, '--persistent', '--shared=8', '-x', 'vda', image],
    {
      stdio: 'ignore',
    },
  );
  const exit = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  for (let i = 0; ; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const s = connect({ path: socket });
      s.once('connect', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (up) break;
    if (i > 600 || child.exitCode !== null) throw new Error(`qemu-nbd did not listen on ${socket}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    socket,
    uri: `nbd+unix:///vda?socket=${socket}`,
    async stop() {
      child.kill('SIGTERM');
      await exit;
    },
  };
}

export class NbdReadGroup {
  private image = '';
  private dataMiB: number;

  constructor(
    private readonly io: NbdReadBench,
    private readonly size: string,
    private readonly sizeMiB: number,
  ) {
    this.dataMiB = Math.floor(sizeMiB / 2);
  }

  /** The image: the first half from /dev/urandom, the second never written (holes). */
  async prepare(): Promise<void> {
    await mkdir(this.io.work, { recursive: true });
    const raw = join(this.io.work, `nbd-${this.size}.raw`);
    this.image = join(this.io.work, `nbd-${this.size}.qcow2`);
    this.io.log(`nbd: a ${this.size} qcow2, ${this.dataMiB} MiB random then holes`);
    await must('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${this.dataMiB}`, 'status=none']);
    await must('truncate', ['-s', `${this.sizeMiB}M`, raw]);
    await must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, this.image]);
    await rm(raw);
  }

  async cleanup(): Promise<void> {
    if (this.image) await rm(this.image, { force: true });
  }

  /** One server per case, started before the caches are dropped: every case reads the image from disk. */
  private async withServer<T>(fn: (s: Server) => Promise<T>): Promise<T> {
    const dir = await mkdtemp(join(this.io.work, 'nbd-sock-'));
    const server = await startQemuNbd(this.image, join(dir, 'nbd.sock'));
    try {
      await dropCaches();
      return await fn(server);
    } finally {
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    }
  }

  private async ours(server: Server, inFlight: number, hash: boolean, requestSize?: number, connections = 1) {
    const started = process.hrtime.bigint();
    const cpu = process.cpuUsage();
    const connect = () =>
      NbdClient.connect({ socketPath: server.socket, exportName: 'vda', metaContexts: ['base:allocation'] });
    const clients = await Promise.all(Array.from({ length: connections }, connect));
    const client = clients[0]!;
    const data = rangesWhere(
      extents(client, { context: 'base:allocation' }),
      (f) => (f & (STATE_HOLE | STATE_ZERO)) === 0,
    );
    const sha = hash ? createHash('sha256') : undefined;
    let bytes = 0;
    for await (const piece of readRanges(clients, data, { inFlight, requestSize })) {
      sha?.update(piece.data);
      bytes += piece.data.length;
    }
    await Promise.all(clients.map((c) => c.disconnect()));
    const used = process.cpuUsage(cpu);
    return {
      wallMs: Number(process.hrtime.bigint() - started) / 1e6,
      cpuMs: (used.user + used.system) / 1000,
      readMiB: bytes / MiB,
      sha256: sha?.digest('hex'),
    };
  }

  async run(rep: number): Promise<void> {
    const sz = this.size;
    const rec = (id: string, label: string, s: Record<string, number>, extra?: Record<string, unknown>) =>
      this.io.record(`${sz}/nbd-${id}`, label, s, { rep, ...extra });
    // the baseline first and last: a drift of the machine's load during the repetition shows as two different values
    const baseline = async () => {
      await dropCaches();
      // /dev/null cannot take a raw image ("Cannot grow device files"); QEMU's null-co driver discards what it gets
      const target = `driver=null-co,size=${this.sizeMiB * MiB}`;
      const r = await timed('qemu-img', ['convert', '-n', '-f', 'qcow2', '--target-image-opts', this.image, target]);
      rec('qemu-img-convert', 'qemu-img convert to null-co (discarded)', { wallMs: r.wallMs, cpuMs: r.cpuMs });
    };
    await baseline();
    for (const n of IN_FLIGHT) {
      for (const hash of [false, true]) {
        const r = await this.withServer((s) => this.ours(s, n, hash));
        if (r.readMiB !== this.dataMiB) throw new Error(`src/nbd read ${r.readMiB} MiB of data, not ${this.dataMiB}`);
        const id = `ours-${hash ? 'sha256' : 'null'}-q${n}`;
        rec(id, `src/nbd, ${n} in flight, ${hash ? 'SHA-256' : 'discarded'}`, { wallMs: r.wallMs, cpuMs: r.cpuMs });
      }
    }
    // nbdcopy's pattern (256 KiB requests, 64 in flight) on one connection, and on 4 like nbdcopy's default
    for (const [conns, hash] of [
      [1, true],
      [4, false],
      [4, true],
    ] as const) {
      const r = await this.withServer((s) => this.ours(s, 64, hash, 256 * 1024, conns));
      const what = hash ? 'sha256' : 'null';
      rec(`ours-${what}-c${conns}-q64-256k`, `src/nbd, ${conns} connection(s), 64 in flight of 256 KiB, ${what}`, {
        wallMs: r.wallMs,
        cpuMs: r.cpuMs,
      });
    }
    await this.withServer(async (s) => {
      const r = await timed('nbdcopy', [s.uri, 'null:']);
      rec('nbdcopy-null', 'nbdcopy URI null: (default: 4 connections)', { wallMs: r.wallMs, cpuMs: r.cpuMs });
    });
    // one connection, as src/nbd uses: how much of nbdcopy's lead is multi-conn
    await this.withServer(async (s) => {
      const r = await timed('nbdcopy', ['--connections=1', s.uri, 'null:']);
      rec('nbdcopy-null-c1', 'nbdcopy --connections=1 URI null:', { wallMs: r.wallMs, cpuMs: r.cpuMs });
    });
    await this.withServer(async (s) => {
      const r = await timed('sh', ['-c', `nbdcopy '${s.uri}' - | sha256sum >/dev/null`]);
      rec('nbdcopy-sha256', 'nbdcopy URI - piped to sha256sum (whole disk)', { wallMs: r.wallMs, cpuMs: r.cpuMs });
    });
    await this.withServer(async (s) => {
      const r = await timed('nbdinfo', ['--map', s.uri]);
      rec('map-nbdinfo', 'nbdinfo --map', { wallMs: r.wallMs, cpuMs: r.cpuMs });
    });
    await this.withServer(async (s) => {
      const started = process.hrtime.bigint();
      const c = await NbdClient.connect({ socketPath: s.socket, exportName: 'vda', metaContexts: ['base:allocation'] });
      let n = 0;
      for await (const _ of extents(c, { context: 'base:allocation' })) n++;
      await c.disconnect();
      rec('map-ours', 'src/nbd extents()', { wallMs: Number(process.hrtime.bigint() - started) / 1e6, extents: n });
    });
    await baseline();
  }
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const arg = (name: string, fallback: string) => {
    const i = argv.indexOf(name);
    return i >= 0 ? (argv[i + 1] ?? fallback) : fallback;
  };
  const sizeMiB = Number(arg('--size-mib', '2048'));
  const reps = Number(arg('--reps', '3'));
  const work = await mkdtemp(join(arg('--work', '/var/tmp'), 'vmbt-bench-nbd-'));
  const samples = new Map<string, { label: string; wall: number[]; cpu: number[] }>();
  const log = (line: string) => process.stderr.write(`[nbd-read ${new Date().toISOString().slice(11, 19)}] ${line}\n`);
  const io: NbdReadBench = {
    work,
    log,
    record(id, label, s) {
      const e = samples.get(id) ?? { label, wall: [], cpu: [] };
      e.wall.push(s['wallMs'] ?? NaN);
      e.cpu.push(s['cpuMs'] ?? NaN);
      samples.set(id, e);
      log(`${id}: ${Math.round(s['wallMs'] ?? NaN)} ms`);
    },
  };
  const size = sizeMiB % 1024 === 0 ? `${sizeMiB / 1024}g` : `${sizeMiB}m`;
  const group = new NbdReadGroup(io, size, sizeMiB);
  try {
    await group.prepare();
    for (let rep = 1; rep <= reps; rep++) {
      log(`--- repetition ${rep}/${reps}`);
      await group.run(rep);
    }
  } finally {
    await group.cleanup();
    await rm(work, { recursive: true, force: true });
  }
  const base = median(samples.get(`${size}/nbd-qemu-img-convert`)?.wall ?? []);
  const rows = [...samples].map(([id, e]) => {
    const wall = median(e.wall);
    const ratio = id.endsWith('/nbd-map-ours')
      ? wall / median(samples.get(`${size}/nbd-map-nbdinfo`)?.wall ?? [])
      : wall / base;
    return `| ${e.label} | ${Math.round(wall)} | ${Number.isFinite(median(e.cpu)) ? Math.round(median(e.cpu)) : ''} | ${ratio.toFixed(2)} |`;
  });
  const load = (await must('cat', ['/proc/loadavg'])).split(' ').slice(0, 3).join(' ');
  process.stdout.write(
    [
      `${size} qcow2 (${sizeMiB / 2} MiB random, the rest never written), qemu-nbd -r over a Unix socket, cold page cache, median of ${reps}; load ${load}`,
      '',
      '| case | wall ms | CPU ms | / qemu-img convert (map: / nbdinfo --map) |',
      '|---|---|---|---|',
      ...rows,
      '',
    ].join('\n'),
  );
}

if (require.main === module) {
  main().catch((err: unknown) => {
    process.stderr.write(`nbd-read: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  });
}
