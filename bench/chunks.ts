/**
 * The chunk format's CPU cost on one core (docs/chunk-format.md, "Figures"): for 4 MiB chunks of random and of
 * compressible data, encode (zero check + keyed id + zstd probe/compress + AES-256-GCM) and decode (GCM + zstd +
 * id check), MiB/s, next to `zstd -1` and `sha256sum` of the same bytes measured in the same run, as ratios.
 *
 * In `npm run bench` as the group `chunks`; alone: node $BUILD/bench/chunks.js [--smoke] [--reps N]
 * (compile with `npx tsc -p bench/tsconfig.json --outDir $BUILD`, as bench/run.sh does).
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  chunkId,
  decodeObject,
  encodeObject,
  isAllZero,
  loadZstd,
  newMasterKeys,
  type ChunkCodec,
  type RepositoryConfig,
  type Zstd,
} from '../src/repository/chunks';
import { median, must } from './lib/measure';
import type { Sample } from './report';

const MiB = 1 << 20;
const CHUNK = 4 * MiB;

export interface ChunkBenchIo {
  smoke: boolean;
  reps: number;
  record(id: string, label: string, sample: Sample, extra?: Record<string, unknown>): void;
  log(line: string): void;
}

/** text-like data (a log): zstd -1 shrinks it to a few percent, like a guest's text files */
function compressible(bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  let n = 0;
  for (let off = 0; off < bytes; n++) off += b.write(`${n} host-${n % 97} kernel: event ${(n * 7919) % 100003}\n`, off);
  return b;
}

function codecFor(zstd: Zstd): ChunkCodec {
  const config: RepositoryConfig = {
    format: 'vmbackup-chunks',
    version: 1,
    repositoryId: '00'.repeat(32),
    chunkSize: CHUNK,
    idAlgorithm: 'hmac-sha256',
    compression: 'zstd',
    encryption: 'aes-256-gcm',
  };
  return { config, keys: newMasterKeys(), zstd, where: 'bench' };
}

function seconds(fn: () => void): number {
  const t = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t) / 1e9;
}

async function wallSeconds(file: string, args: string[]): Promise<number> {
  const t = process.hrtime.bigint();
  await must(file, args);
  return Number(process.hrtime.bigint() - t) / 1e9;
}

export async function chunkBench(io: ChunkBenchIo): Promise<void> {
  const total = (io.smoke ? 16 : 128) * MiB;
  const dir = await mkdtemp(join(tmpdir(), 'vmbt-bench-chunks-'));
  const zstds: Zstd[] = [await loadZstd('wasm')];
  const node = await loadZstd('node').catch(() => undefined);
  if (node) zstds.unshift(node);
  else io.log(`chunks: Node ${process.version} has no built-in zstd; measuring the WASM build only`);
  try {
    for (const [kind, data] of [
      ['random', randomBytes(total)],
      ['compressible', compressible(total)],
    ] as const) {
      const file = join(dir, kind);
      await writeFile(file, data);
      const chunks: Buffer[] = [];
      for (let off = 0; off < total; off += CHUNK) chunks.push(data.subarray(off, off + CHUNK));
      const mib = total / MiB;
      const rate = (s: number): number => Math.round(mib / s);
      // the peers, same bytes, one thread each, page cache warm (written just now)
      const zstdCli: number[] = [];
      const shaCli: number[] = [];
      for (let rep = 0; rep < io.reps; rep++) {
        zstdCli.push(await wallSeconds('zstd', ['-1', '-T1', '-q', '-f', '-o', '/dev/null', file]));
        shaCli.push(await wallSeconds('sha256sum', [file]));
      }
      const zstdRate = rate(median(zstdCli));
      const shaRate = rate(median(shaCli));
      io.record(`chunks/${kind}/zstd-cli`, `zstd -1 -T1 (${kind}, ${mib} MiB)`, { MiBps: zstdRate });
      io.record(`chunks/${kind}/sha256sum`, `sha256sum (${kind}, ${mib} MiB)`, { MiBps: shaRate });
      for (const zstd of zstds) {
        const codec = codecFor(zstd);
        const enc: number[] = [];
        const dec: number[] = [];
        const zonly: number[] = [];
        let stored = 0;
        for (let rep = 0; rep < io.reps; rep++) {
          const objects: Array<{ id: string; body: Buffer }> = [];
          enc.push(
            seconds(() => {
              for (const c of chunks) {
                if (isAllZero(c)) continue;
                const id = chunkId(codec, c);
                objects.push({ id, body: encodeObject(codec, 'chunk', id, c).body });
              }
            }),
          );
          stored = objects.reduce((n, o) => n + o.body.length, 0);
          dec.push(
            seconds(() => {
              for (const o of objects) decodeObject(codec, 'chunk', o.id, o.body);
            }),
          );
          zonly.push(
            seconds(() => {
              for (const c of chunks) zstd.compress(c, 1);
            }),
          );
        }
        const encRate = rate(median(enc));
        const decRate = rate(median(dec));
        const ratios = {
          encodeVsZstdCli: +(encRate / zstdRate).toFixed(2),
          encodeVsSha256sum: +(encRate / shaRate).toFixed(2),
          storedFraction: +(stored / total).toFixed(3),
        };
        io.record(
          `chunks/${kind}/encode-${zstd.implementation}`,
          `chunk encode: id + zstd + AES-GCM, ${zstd.implementation} zstd (${kind}, ${mib} MiB)`,
          { MiBps: encRate },
          ratios,
        );
        io.record(
          `chunks/${kind}/decode-${zstd.implementation}`,
          `chunk decode: AES-GCM + zstd + id check, ${zstd.implementation} zstd (${kind}, ${mib} MiB)`,
          { MiBps: decRate },
        );
        io.record(
          `chunks/${kind}/zstd-only-${zstd.implementation}`,
          `zstd level 1 of whole chunks alone, ${zstd.implementation} (${kind}, ${mib} MiB)`,
          { MiBps: rate(median(zonly)) },
        );
        io.log(
          `chunks ${kind} ${zstd.implementation}: encode ${encRate} MiB/s (${ratios.encodeVsZstdCli}x zstd -1, ` +
            `${ratios.encodeVsSha256sum}x sha256sum), decode ${decRate} MiB/s, zstd alone ${rate(median(zonly))} MiB/s; ` +
            `zstd -1 ${zstdRate}, sha256sum ${shaRate} MiB/s; stored ${ratios.storedFraction} of the input`,
        );
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

if (require.main === module) {
  const argv = process.argv.slice(2);
  const smoke = argv.includes('--smoke');
  const repsAt = argv.indexOf('--reps');
  const reps = repsAt >= 0 ? Math.max(1, Number(argv[repsAt + 1])) : 3;
  chunkBench({
    smoke,
    reps,
    record: () => undefined,
    log: (line) => console.log(line),
  }).catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
