/** The disk index (docs/chunk-format.md) and the ChunkStore's handling of zero chunks, on a local directory. */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import {
  CHUNKS_PREFIX,
  ChunkFormatError,
  ChunkStore,
  INDEXES_PREFIX,
  decodeDiskIndex,
  encodeDiskIndex,
  initRepository,
  type DiskIndex,
} from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

const MiB = 1 << 20;
const id = (n: number): string => n.toString(16).padStart(2, '0').repeat(32);

test('index round trip: zero and stored entries in offset order, a short last chunk', () => {
  const index: DiskIndex = {
    chunkSize: 4 * MiB,
    virtualSize: 5 * 4 * MiB + 512,
    entries: [id(1), 'zero', 'zero', id(2), id(1), id(3)],
  };
  const body = encodeDiskIndex(index);
  expect(body.length).toBe(21 + 6 + 4 * 32);
  expect(decodeDiskIndex(body)).toEqual(index);
  const empty: DiskIndex = { chunkSize: 4 * MiB, virtualSize: 0, entries: [] };
  expect(decodeDiskIndex(encodeDiskIndex(empty))).toEqual(empty);
});

test('an index whose entry count does not match its size, or that is cut short, is refused', () => {
  const index: DiskIndex = { chunkSize: 4 * MiB, virtualSize: 8 * MiB, entries: [id(1), id(2)] };
  const body = encodeDiskIndex(index);
  expect(() => decodeDiskIndex(body.subarray(0, body.length - 1))).toThrow(ChunkFormatError);
  expect(() => decodeDiskIndex(Buffer.concat([body, Buffer.from([0])]))).toThrow(ChunkFormatError);
  const lying = Buffer.from(body);
  lying.writeUInt32BE(0xffffffff, 17); // claims 4 billion entries: refused before anything is allocated for them
  expect(() => decodeDiskIndex(lying)).toThrow(/entry count/);
  expect(() => encodeDiskIndex({ ...index, entries: [id(1)] })).toThrow(ChunkFormatError);
});

describe('ChunkStore on a local directory', () => {
  let dir: string;
  let target: StorageTarget;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-index-'));
    target = openTarget(`file://${dir}`, { env: {} });
  });
  afterEach(async () => {
    await target.close();
    await rm(dir, { recursive: true, force: true });
  });

  async function keysUnder(prefix: string): Promise<string[]> {
    const keys: string[] = [];
    for await (const o of target.list(prefix)) keys.push(o.key);
    return keys;
  }

  test('all-zero chunks are never stored; the index says zero and reading gives back holes', async () => {
    const repo = await initRepository(target, { encryption: 'none', compression: 'zstd' });
    const store = new ChunkStore(repo);
    const data = Buffer.alloc(16 * MiB + 100);
    randomBytes(4 * MiB).copy(data, 4 * MiB); // chunk 1 has data, 0, 2, 3 and the short 4th are zero
    expect(await store.put(Buffer.alloc(4 * MiB))).toEqual({ id: 'zero', uploadedBytes: 0 });
    const { index, stats } = await store.storeDisk(Readable.from([data]), data.length);
    expect(index.entries.map((e) => (e === 'zero' ? 'zero' : 'id'))).toEqual(['zero', 'id', 'zero', 'zero', 'zero']);
    expect(stats).toMatchObject({ chunks: 5, zeroChunks: 4, uploadedChunks: 1 });
    expect(await keysUnder(CHUNKS_PREFIX)).toHaveLength(1);
    const written: number[] = [];
    await store.readDisk(index, async (offset, chunk) => {
      written.push(offset);
      expect(chunk.equals(data.subarray(offset, offset + chunk.length))).toBe(true);
    });
    expect(written).toEqual([4 * MiB]);
  });

  test('the index is stored encrypted and reads back equal', async () => {
    const repo = await initRepository(target, {
      encryption: 'aes-256-gcm',
      compression: 'zstd',
      password: 'pw',
      scrypt: { N: 2 ** 14, r: 8, p: 1 },
    });
    const store = new ChunkStore(repo);
    const index: DiskIndex = { chunkSize: 4 * MiB, virtualSize: 12 * MiB, entries: [id(7), 'zero', id(9)] };
    const indexId = await store.putIndex(index);
    expect(await keysUnder(INDEXES_PREFIX)).toEqual([`${INDEXES_PREFIX}${indexId}`]);
    const stored = await target.getBuffer(`${INDEXES_PREFIX}${indexId}`);
    expect(stored.includes(Buffer.from('VMBI'))).toBe(false);
    expect(stored.includes(Buffer.from(id(7), 'hex'))).toBe(false);
    expect(await store.getIndex(indexId)).toEqual(index);
    expect(await store.putIndex(index)).toBe(indexId); // idempotent
  });

  test('a disk shorter or longer than its size is refused', async () => {
    const repo = await initRepository(target, { encryption: 'none', compression: 'none' });
    const store = new ChunkStore(repo);
    const short = store.storeDisk(Readable.from([randomBytes(MiB)]), 2 * MiB);
    await expect(short).rejects.toThrow(/ended after 1048576 of its 2097152 bytes/);
    const long = store.storeDisk(Readable.from([randomBytes(2 * MiB)]), MiB);
    await expect(long).rejects.toThrow(/more than its 1048576 bytes/);
  });

  test('storeDisk keeps at most `concurrency` chunks uploading at once, and put refuses data under another id', async () => {
    const repo = await initRepository(target, { encryption: 'none', compression: 'none' });
    let inFlight = 0;
    let most = 0;
    // the real local target, with its puts counted (and slowed, 200 ms: longer than a chunk takes to hash and encode
    // on its codec thread on a loaded machine, so that puts always overlap)
    const counted = Object.create(target) as StorageTarget;
    counted.putBatched = async (key, body) => {
      most = Math.max(most, ++inFlight);
      try {
        await new Promise((r) => setTimeout(r, 200));
        await target.putBatched(key, body);
      } finally {
        inFlight--;
      }
    };
    const store = new ChunkStore({ ...repo, target: counted }, { concurrency: 2 });
    const disk = randomBytes(12 * 4 * MiB);
    const { stats } = await store.storeDisk(Readable.from([disk]), disk.length);
    expect(stats.uploadedChunks).toBe(12);
    expect(most).toBe(2);
    const err = await store.put(randomBytes(100), store.idOf(randomBytes(100)) as string).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChunkFormatError);
    expect((err as ChunkFormatError).kind).toBe('invalid-argument');
  });
});
