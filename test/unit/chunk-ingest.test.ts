/**
 * ingestDisk: a disk read from a source that says where its data is. What a backup relies on: ranges without data are
 * never read, the index equals what storeDisk makes of the same bytes, a second run finds every chunk stored and
 * uploads nothing, and a run that died half way is finished by sending only the chunks that are missing.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CHUNKS_PREFIX, ChunkStore, ingestDisk, initRepository, splitAtChunks } from '../../src/repository/chunks';
import type { ByteRange, DiskSource, OpenRepository } from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { BufferPool } from '../../src/shared/buffer-pool';
import { openTarget } from '../../src/storage/registry';

const CHUNK = 64 * 1024; // the smallest chunk size: small test disks, many chunks

async function* from<T>(items: T[]): AsyncGenerator<T> {
  for (const i of items) yield i;
}

/** A disk in memory whose data ranges are given; records every byte range read. */
function memorySource(disk: Buffer, data: ByteRange[]): DiskSource & { reads: ByteRange[] } {
  const reads: ByteRange[] = [];
  return {
    size: disk.length,
    reads,
    dataRanges: () => from(data),
    async *read(ranges) {
      for await (const r of ranges) {
        reads.push(r);
        // two pieces per range, as a reader with a small request size hands them out
        const half = Math.ceil(r.length / 2);
        yield { offset: r.offset, data: Buffer.from(disk.subarray(r.offset, r.offset + half)) };
        if (r.length > half)
          yield { offset: r.offset + half, data: Buffer.from(disk.subarray(r.offset + half, r.offset + r.length)) };
      }
    },
  };
}

async function chunkCount(target: StorageTarget): Promise<number> {
  let n = 0;
  for await (const _ of target.list(CHUNKS_PREFIX)) n++;
  return n;
}

describe('ingestDisk', () => {
  let dir: string;
  let target: StorageTarget;
  let repo: OpenRepository;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-ingest-'));
    target = openTarget(`file://${dir}`, { env: {} });
    repo = await initRepository(target, { encryption: 'none', compression: 'zstd', chunkSize: CHUNK });
  });
  afterEach(async () => {
    await target.close();
    await rm(dir, { recursive: true, force: true });
  });

  test('splitAtChunks cuts ranges at chunk boundaries and refuses overlapping ranges', async () => {
    const out: ByteRange[] = [];
    for await (const r of splitAtChunks(from([{ offset: 10, length: 200 }]), 64)) out.push(r);
    expect(out).toEqual([
      { offset: 10, length: 54 },
      { offset: 64, length: 64 },
      { offset: 128, length: 64 },
      { offset: 192, length: 18 },
    ]);
    const bad = splitAtChunks(
      from([
        { offset: 0, length: 100 },
        { offset: 50, length: 10 },
      ]),
      64,
    );
    await expect(
      (async () => {
        for await (const _ of bad);
      })(),
    ).rejects.toThrow('Data ranges overlap.');
  });

  test('reads only the data ranges and makes the index storeDisk makes of the same bytes', async () => {
    // 10 chunks and a short last one: data in chunks 1 (part), 2-3 (across the boundary), 9 and 10 (the tail)
    const size = 10 * CHUNK + 1000;
    const disk = Buffer.alloc(size);
    const data: ByteRange[] = [
      { offset: CHUNK + 100, length: 5000 },
      { offset: 2 * CHUNK + 7, length: CHUNK + 10 },
      { offset: 9 * CHUNK, length: CHUNK + 1000 },
    ];
    for (const r of data) randomBytes(r.length).copy(disk, r.offset);
    const source = memorySource(disk, data);
    const store = new ChunkStore(repo);
    const { index, stats } = await ingestDisk(store, source);
    const expected = await new ChunkStore(repo).storeDisk(from([disk]), size);
    expect(index).toEqual(expected.index);
    expect(stats).toMatchObject({ chunks: 11, zeroChunks: 6, uploadedChunks: 5, knownChunks: 0 });
    // nothing outside the data ranges was read
    const read = source.reads.reduce((n, r) => n + r.length, 0);
    expect(read).toBe(data.reduce((n, r) => n + r.length, 0));
    // and the bytes come back
    const back = Buffer.alloc(size);
    await store.readDisk(index, async (offset, chunk) => {
      chunk.copy(back, offset);
    });
    expect(back.equals(disk)).toBe(true);
  });

  test('a source that reuses buffers gets each one back once ingest is done with it, and the data stays right', async () => {
    // whole-chunk pieces from a BufferPool (as an NBD reader with a pool hands them out): a buffer released too early
    // would be overwritten by a later read while its chunk is still being hashed or stored
    const size = 24 * CHUNK;
    const disk = randomBytes(size);
    disk.fill(0, 5 * CHUNK, 6 * CHUNK); // a zero chunk: never sent to the store, released as it is
    const pool = new BufferPool(CHUNK);
    // the length of each buffer when released (a later chunk read into the same memory moves it to a codec thread,
    // which empties every older view of it)
    const released: number[] = [];
    const source: DiskSource = {
      size,
      dataRanges: () => from([{ offset: 0, length: size }]),
      async *read(ranges) {
        for await (const r of ranges) {
          const b = pool.take(r.length);
          disk.copy(b, 0, r.offset, r.offset + r.length);
          yield { offset: r.offset, data: b };
        }
      },
      release: (b) => {
        released.push(b.length);
        pool.give(b);
      },
    };
    for (const attempt of ['uploads', 'finds every chunk']) {
      released.length = 0;
      const store = new ChunkStore(repo, { concurrency: 4 });
      const { index, stats } = await ingestDisk(store, source);
      expect(released).toHaveLength(24);
      expect(released.every((n) => n === CHUNK)).toBe(true); // never an emptied (moved away) view
      expect(stats.zeroChunks).toBe(1);
      expect(stats.uploadedChunks + stats.knownChunks).toBe(23);
      if (attempt === 'uploads') expect(stats.uploadedChunks).toBe(23);
      // buffers were reused, so far fewer were made than chunks read
      expect(pool.allocated).toBeLessThan(24);
      const back = Buffer.alloc(size);
      await store.readDisk(index, async (offset, chunk) => {
        chunk.copy(back, offset);
      });
      expect(back.equals(disk)).toBe(true);
    }
  });

  test('a data range of zeros is a zero chunk; a second run uploads nothing', async () => {
    const size = 4 * CHUNK;
    const disk = Buffer.alloc(size);
    randomBytes(CHUNK).copy(disk, 3 * CHUNK);
    const data = [{ offset: 0, length: size }]; // allocated everywhere, zeros in chunks 0-2
    const first = await ingestDisk(new ChunkStore(repo), memorySource(disk, data));
    expect(first.index.entries.slice(0, 3)).toEqual(['zero', 'zero', 'zero']);
    expect(first.stats).toMatchObject({ zeroChunks: 3, uploadedChunks: 1 });
    const again = await ingestDisk(new ChunkStore(repo), memorySource(disk, data));
    expect(again.stats).toMatchObject({ uploadedChunks: 0, uploadedBytes: 0, knownChunks: 1 });
    expect(again.index).toEqual(first.index);
  });

  test('a run that failed half way is finished by sending only the missing chunks', async () => {
    const size = 12 * CHUNK;
    const disk = randomBytes(size);
    const data = [{ offset: 0, length: size }];
    const failing = memorySource(disk, data);
    const inner = failing.read.bind(failing);
    let pieces = 0;
    failing.read = async function* (ranges) {
      for await (const p of inner(ranges)) {
        // the worker dies after 5 chunks were read (two pieces per chunk)
        if (++pieces > 10) throw new Error('killed');
        yield p;
      }
    };
    await expect(ingestDisk(new ChunkStore(repo, { concurrency: 2 }), failing)).rejects.toThrow('killed');
    const stored = await chunkCount(target);
    expect(stored).toBeGreaterThan(0);
    expect(stored).toBeLessThan(12);
    const retry = await ingestDisk(new ChunkStore(repo), memorySource(disk, data));
    expect(retry.stats.knownChunks).toBe(stored);
    expect(retry.stats.uploadedChunks).toBe(12 - stored);
    expect(await chunkCount(target)).toBe(12);
  });

  test('an increment reads only the changed chunks; the others keep the previous entries, and the index is whole', async () => {
    const size = 8 * CHUNK;
    const disk = randomBytes(size);
    const all = [{ offset: 0, length: size }];
    const previous = await ingestDisk(new ChunkStore(repo), memorySource(disk, all));
    // chunks 2 and 5 change; chunk 6 is zeroed (dirty, no data left)
    randomBytes(100).copy(disk, 2 * CHUNK + 7);
    randomBytes(CHUNK).copy(disk, 5 * CHUNK);
    disk.fill(0, 6 * CHUNK, 7 * CHUNK);
    const changed = new Set([2, 5, 6]);
    const source = memorySource(disk, [
      { offset: 2 * CHUNK, length: CHUNK },
      { offset: 5 * CHUNK, length: CHUNK },
    ]);
    const inc = await ingestDisk(new ChunkStore(repo), source, {
      carry: { entries: previous.index.entries, changed: (n) => changed.has(n) },
    });
    expect(source.reads.reduce((n, r) => n + r.length, 0)).toBe(2 * CHUNK);
    expect(inc.stats.uploadedChunks).toBe(2);
    const full = await new ChunkStore(repo).storeDisk(from([disk]), size);
    expect(inc.index).toEqual(full.index);
    expect(inc.index.entries[6]).toBe('zero');
  });

  test('a resumed run starts after the settled prefix it is given and makes the same index', async () => {
    const size = 10 * CHUNK;
    const disk = randomBytes(size);
    const all = [{ offset: 0, length: size }];
    let settled = { chunks: 0, entries: [] as string[] };
    const failing = memorySource(disk, all);
    const inner = failing.read.bind(failing);
    let pieces = 0;
    failing.read = async function* (ranges) {
      for await (const p of inner(ranges)) {
        if (++pieces > 12) throw new Error('killed');
        yield p;
      }
    };
    await expect(
      ingestDisk(new ChunkStore(repo, { concurrency: 2 }), failing, {
        onProgress: (p) => (settled = { chunks: p.settledChunks, entries: p.entries.slice(0, p.settledChunks) }),
      }),
    ).rejects.toThrow('killed');
    expect(settled.chunks).toBeGreaterThan(0);
    expect(settled.chunks).toBeLessThan(10);
    const rest = memorySource(disk, [{ offset: settled.chunks * CHUNK, length: size - settled.chunks * CHUNK }]);
    const resumed = await ingestDisk(new ChunkStore(repo), rest, { resume: settled });
    expect(rest.reads[0]!.offset).toBe(settled.chunks * CHUNK);
    const full = await new ChunkStore(repo).storeDisk(from([disk]), size);
    expect(resumed.index).toEqual(full.index);
    // a piece before the resumed prefix's end is refused
    const early = memorySource(disk, [{ offset: 0, length: CHUNK }]);
    await expect(ingestDisk(new ChunkStore(repo), early, { resume: settled })).rejects.toThrow(/outside its chunk/);
  });

  test('a piece outside its chunk is refused', async () => {
    const source: DiskSource = {
      size: 2 * CHUNK,
      dataRanges: () => from([{ offset: 0, length: 2 * CHUNK }]),
      read: () => from([{ offset: CHUNK - 10, data: Buffer.alloc(20, 1) }]),
    };
    await expect(ingestDisk(new ChunkStore(repo), source)).rejects.toThrow(/outside its chunk/);
  });
});
