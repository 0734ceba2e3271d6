/**
 * `--bwlimit`: every byte sent through a limited target is paced, the chunks of a chunk repository included (they go
 * through putBatched; only images were paced before, so a chunk backup to S3 ignored the limit).
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ChunkStore, initRepository } from '../../src/repository/chunks';
import { withBandwidthLimit } from '../../src/storage/bandwidth';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

const KiB = 1024;
const MiB = 1 << 20;

async function* from<T>(items: T[]): AsyncGenerator<T> {
  for (const i of items) yield i;
}

/** Counts the bytes each write method was handed, passing everything on to `target`. */
function counting(target: StorageTarget): StorageTarget & { sent: Record<string, number> } {
  const sent: Record<string, number> = { putBatched: 0, putManifest: 0 };
  return Object.assign(Object.create(target) as StorageTarget, {
    sent,
    putBatched: (key: string, body: Buffer) => {
      sent.putBatched! += body.length;
      return target.putBatched(key, body);
    },
    putManifest: (key: string, body: Buffer) => {
      sent.putManifest! += body.length;
      return target.putManifest(key, body);
    },
  });
}

describe('a bandwidth-limited target', () => {
  let dir: string;
  let inner: StorageTarget;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-bwlimit-'));
    inner = openTarget(`file://${dir}`, { env: {} });
  });
  afterEach(async () => {
    await inner.close();
    await rm(dir, { recursive: true, force: true });
  });

  test('paces small objects by their length: 2 MiB of chunks at 1 MiB/s take at least 1.75 s', async () => {
    const limited = withBandwidthLimit(inner, MiB);
    const t0 = Date.now();
    for (let i = 0; i < 8; i++) await limited.putBatched(`chunks/${i}`, randomBytes(256 * KiB));
    await limited.flush();
    // the first goes at once, each next one 0.25 s after the one before (a lower bound: a loaded machine only adds)
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1_750 - 20);
    const t1 = Date.now();
    await limited.putManifest('m', randomBytes(512 * KiB));
    await limited.putManifest('m2', Buffer.from('{}'));
    expect(Date.now() - t1).toBeGreaterThanOrEqual(250 - 20);
    for (let i = 0; i < 8; i++) expect((await inner.stat(`chunks/${i}`))?.size).toBe(256 * KiB);
  });

  test('a chunk repository on a limited target stores a 4 MiB disk no faster than the limit allows', async () => {
    const count = counting(inner);
    const limited = withBandwidthLimit(count, 2 * MiB);
    const repo = await initRepository(limited, { encryption: 'none', compression: 'none', chunkSize: 64 * KiB });
    const disk = randomBytes(4 * MiB);
    const t0 = Date.now();
    const { stats } = await new ChunkStore(repo).storeDisk(from([disk]), disk.length);
    const elapsed = Date.now() - t0;
    // every chunk went through the limited target, and 4 MiB at 2 MiB/s is 2 s (less the first chunk's 64 KiB)
    expect(count.sent.putBatched).toBeGreaterThanOrEqual(disk.length);
    expect(stats.uploadedChunks).toBe(64);
    expect(elapsed).toBeGreaterThanOrEqual(((4 * MiB - 64 * KiB) / (2 * MiB)) * 1000 - 50);
  });

  test('no limit (0): the target itself, unwrapped', () => {
    expect(withBandwidthLimit(inner, 0)).toBe(inner);
  });
});
