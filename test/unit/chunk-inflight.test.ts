/**
 * Two equal chunks in flight at once are uploaded once: the second waits for the first's upload instead of finding
 * the chunk missing and uploading it again (a disk holding the same 4 MiB at two offsets, chunks stored 4 at a time).
 * When the first upload fails, a waiting one uploads the chunk itself.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { CHUNKS_PREFIX, ChunkStore, initRepository } from '../../src/repository/chunks';
import type { PutResult } from '../../src/repository/chunks';
import type { PutBatchedOptions, StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

const CHUNK = 64 * 1024;

/** `target` whose chunk writes are held for `holdMs` (so that every caller is in flight at once); `fail` writes throw. */
function slowChunks(target: StorageTarget, holdMs: number, fail = 0) {
  const puts: string[] = [];
  let failures = fail;
  const wrapped = Object.assign(Object.create(target) as StorageTarget, {
    putBatched: async (key: string, body: Buffer, opts?: PutBatchedOptions) => {
      if (!key.startsWith(CHUNKS_PREFIX)) return target.putBatched(key, body, opts);
      puts.push(key);
      await new Promise((r) => setTimeout(r, holdMs));
      if (failures > 0) {
        failures--;
        throw new Error('injected write failure');
      }
      return target.putBatched(key, body, opts);
    },
  });
  return { wrapped, puts };
}

describe('equal chunks in flight at once', () => {
  let dir: string;
  let inner: StorageTarget;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-inflight-'));
    inner = openTarget(`file://${dir}`, { env: {} });
  });
  afterEach(async () => {
    await inner.close();
    await rm(dir, { recursive: true, force: true });
  });

  test('storeDisk of a disk holding one chunk 4 times (4 in flight) uploads it once and counts 3 known', async () => {
    const { wrapped, puts } = slowChunks(inner, 150);
    const repo = await initRepository(wrapped, { encryption: 'none', compression: 'zstd', chunkSize: CHUNK });
    const store = new ChunkStore(repo, { concurrency: 4 });
    const same = randomBytes(CHUNK);
    const other = randomBytes(CHUNK);
    const disk = [same, same, other, same, same].map((b) => Buffer.from(b));
    const { index, stats } = await store.storeDisk(Readable.from(disk), 5 * CHUNK);
    expect(stats).toMatchObject({ chunks: 5, zeroChunks: 0, uploadedChunks: 2, knownChunks: 3 });
    expect(puts).toHaveLength(2);
    expect(new Set(puts).size).toBe(2);
    expect(index.entries[1]).toBe(index.entries[0]);
    expect(index.entries[4]).toBe(index.entries[0]);
    expect((await store.get(index.entries[3] as string)).equals(same)).toBe(true);
  });

  test('put of one chunk by 4 callers at once uploads it once; all get its id', async () => {
    const { wrapped, puts } = slowChunks(inner, 150);
    const repo = await initRepository(wrapped, { encryption: 'none', compression: 'none', chunkSize: CHUNK });
    const store = new ChunkStore(repo);
    const same = randomBytes(CHUNK);
    const results = await Promise.all(
      [0, 1, 2, 3].map((i) => store.put(Buffer.from(same), undefined, { handOver: i % 2 === 0 })),
    );
    expect(puts).toHaveLength(1);
    expect(new Set(results.map((r) => r.id)).size).toBe(1);
    expect(results.filter((r) => r.uploadedBytes > 0)).toHaveLength(1);
    for (const r of results.filter((x) => x.data !== undefined)) expect(r.data?.equals(same)).toBe(true);
  });

  test('when the first upload fails, a caller that waited for it uploads the chunk itself', async () => {
    const { wrapped, puts } = slowChunks(inner, 100, 1);
    const repo = await initRepository(wrapped, { encryption: 'none', compression: 'none', chunkSize: CHUNK });
    const store = new ChunkStore(repo);
    const same = randomBytes(CHUNK);
    const results = await Promise.allSettled([0, 1, 2].map(() => store.put(Buffer.from(same))));
    // which caller leads depends on which codec thread hashes first: one fails with the write, the two waiters succeed
    expect(results.map((r) => r.status).sort()).toEqual(['fulfilled', 'fulfilled', 'rejected']);
    expect(puts).toHaveLength(2);
    const done = results.filter((r): r is PromiseFulfilledResult<PutResult> => r.status === 'fulfilled');
    expect(done.map((r) => r.value.uploadedBytes > 0).sort()).toEqual([false, true]);
    const id = done[0]!.value.id;
    expect(await store.has(id)).toBe(true);
    expect((await new ChunkStore(repo).get(id)).equals(same)).toBe(true);
  });
});
