/**
 * writeChunkDisk (src/repository/chunk-read.ts) on a real local target: the restored raw file is the disk byte for
 * byte, including a last chunk that ends inside a 64 KiB block, and all-zero blocks inside a stored chunk are holes.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { ChunkStore, indexKey, initRepository } from '../../src/repository/chunks';
import { writeChunkDisk } from '../../src/repository/chunk-read';
import { buildManifest } from '../../src/repository/manifest';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

const KiB = 1024;
const CHUNK = 256 * KiB;
let dir: string;
let target: StorageTarget;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-restore-'));
  target = openTarget(`file://${dir}/repo`, { env: {} });
});
afterAll(async () => {
  await target?.close();
  await rm(dir, { recursive: true, force: true });
});

test('a disk whose size is no multiple of 64 KiB comes back equal, with its zero blocks as holes', async () => {
  // chunk 0: 64 KiB data, 64 KiB zero, 128 KiB data; chunk 1: zero; chunk 2: 70000 bytes of data (ends mid-block)
  const size = 2 * CHUNK + 70_000;
  const disk = Buffer.alloc(size);
  randomBytes(64 * KiB).copy(disk, 0);
  randomBytes(128 * KiB).copy(disk, 128 * KiB);
  randomBytes(70_000).copy(disk, 2 * CHUNK);
  const repo = await initRepository(target, { encryption: 'none', compression: 'zstd', chunkSize: CHUNK });
  const store = new ChunkStore(repo);
  const { index, stats } = await store.storeDisk(Readable.from([disk]), size);
  const id = await store.putIndex(index);
  const manifest = buildManifest({
    backupId: 'vm-20261130T000000Z-00000001',
    domain: 'vm',
    host: 'h',
    method: 'offline',
    startedAt: '2026-11-30T00:00:00Z',
    finishedAt: '2026-11-30T00:00:01Z',
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    disks: [
      {
        name: 'vda',
        format: 'chunks',
        virtualSize: size,
        size: stats.uploadedBytes,
        sha256: id,
        key: indexKey(id),
        chunks: { chunkSize: CHUNK, count: 3, zeroChunks: stats.zeroChunks, uploadedChunks: stats.uploadedChunks },
      },
    ],
    repository: { id: repo.config.repositoryId, chunkSize: CHUNK, encryption: 'none', compression: 'zstd' },
  });
  const out = join(dir, 'vda.raw');
  await writeChunkDisk(store, manifest, manifest.disks[0]!, out);
  const back = await readFile(out);
  expect(back.length).toBe(size);
  expect(back.equals(disk)).toBe(true);
  // 64 + 128 KiB + 70000 bytes of data; the zero block of chunk 0 and the zero chunk 1 are not allocated
  expect((await stat(out)).blocks * 512).toBeLessThanOrEqual(64 * KiB + 128 * KiB + 72 * KiB);
});
