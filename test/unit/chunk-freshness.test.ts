/**
 * ChunkStore freshness (PBS's rule, what gc's grace relies on): a stored chunk or index older than the freshness
 * window is touched before a backup is told it may reuse it; a fresh one is not; a seeded id is no exception. On a real
 * local directory, with mtimes set back by hand.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, stat, unlink, utimes } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import {
  ChunkStore,
  FRESH_SECONDS,
  chunkKey,
  indexKey,
  initRepository,
  type OpenRepository,
} from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

const MiB = 1 << 20;
const HOUR = 3600_000;

describe('ChunkStore freshness', () => {
  let dir: string;
  let target: StorageTarget;
  let repo: OpenRepository;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-fresh-'));
    target = openTarget(`file://${dir}`, { env: {} });
    repo = await initRepository(target, { encryption: 'none', compression: 'none', chunkSize: MiB });
  });
  afterEach(async () => {
    await target.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** Sets an object's mtime `ms` into the past, as if it had been stored then. */
  async function age(key: string, ms: number): Promise<void> {
    const when = new Date(Date.now() - ms);
    await utimes(join(dir, key), when, when);
  }
  async function mtime(key: string): Promise<number> {
    return (await stat(join(dir, key))).mtimeMs;
  }

  test('the default window is an hour', () => {
    expect(FRESH_SECONDS).toBe(3600);
    expect(new ChunkStore(repo).freshMs).toBe(HOUR);
  });

  test('has() touches a chunk older than the window before it answers true, and leaves a fresh one alone', async () => {
    const writer = new ChunkStore(repo);
    const old = randomBytes(1000);
    const recent = randomBytes(1000);
    const oldId = (await writer.put(old)).id as string;
    const recentId = (await writer.put(recent)).id as string;
    await age(chunkKey(oldId), 2 * HOUR);
    await age(chunkKey(recentId), HOUR / 2);
    const recentBefore = await mtime(chunkKey(recentId));

    const backup = new ChunkStore(repo);
    expect(await backup.has(oldId)).toBe(true);
    expect(Date.now() - (await mtime(chunkKey(oldId)))).toBeLessThan(60_000);
    expect(await backup.has(recentId)).toBe(true);
    expect(await mtime(chunkKey(recentId))).toBe(recentBefore);
    expect(backup.touched).toBe(1);
    // the answer is remembered: no second touch within the window
    await age(chunkKey(oldId), 2 * HOUR);
    expect(await backup.has(oldId)).toBe(true);
    expect(backup.touched).toBe(1);
  });

  test('a remembered answer expires after one window: then the chunk is checked (and touched) again', async () => {
    let now = Date.now();
    const writer = new ChunkStore(repo);
    const id = (await writer.put(randomBytes(1000))).id as string;
    const backup = new ChunkStore(repo, { now: () => now });
    expect(await backup.has(id)).toBe(true);
    expect(backup.touched).toBe(0);
    await age(chunkKey(id), 2 * HOUR);
    now += HOUR + 1;
    expect(await backup.has(id)).toBe(true);
    expect(backup.touched).toBe(1);
    expect(Date.now() - (await mtime(chunkKey(id)))).toBeLessThan(60_000);
  });

  test('seeded ids do not skip it: a chunk of the previous index that is old is touched when reused', async () => {
    const writer = new ChunkStore(repo);
    const disk = randomBytes(3 * MiB);
    const { index } = await writer.storeDisk(Readable.from([disk]), disk.length);
    for (const e of index.entries) await age(chunkKey(e), 3 * HOUR);
    const backup = new ChunkStore(repo);
    backup.seed(index);
    const again = await backup.storeDisk(Readable.from([disk]), disk.length);
    expect(again.stats).toMatchObject({ knownChunks: 3, uploadedChunks: 0 });
    expect(backup.touched).toBe(3);
    for (const e of index.entries) expect(Date.now() - (await mtime(chunkKey(e)))).toBeLessThan(60_000);
  });

  test('after loadKnown, an old listed chunk is touched and a fresh one answered from the listing', async () => {
    const writer = new ChunkStore(repo);
    const a = (await writer.put(randomBytes(1000))).id as string;
    const b = (await writer.put(randomBytes(1000))).id as string;
    await age(chunkKey(a), 5 * HOUR);
    const backup = new ChunkStore(repo);
    expect(await backup.loadKnown()).toBe(2);
    expect(await backup.has(a)).toBe(true);
    expect(await backup.has(b)).toBe(true);
    expect(await backup.has('00'.repeat(32))).toBe(false);
    expect(backup.touched).toBe(1);
    expect(Date.now() - (await mtime(chunkKey(a)))).toBeLessThan(60_000);
  });

  test('a chunk deleted (by a gc) between the listing and its touch is stored again', async () => {
    const writer = new ChunkStore(repo);
    const data = randomBytes(1000);
    const id = (await writer.put(data)).id as string;
    await age(chunkKey(id), 5 * HOUR);
    const backup = new ChunkStore(repo);
    await backup.loadKnown();
    await unlink(join(dir, chunkKey(id)));
    expect(await backup.has(id)).toBe(false);
    expect((await backup.put(data)).uploadedBytes).toBeGreaterThan(0);
    expect((await backup.get(id)).equals(data)).toBe(true);
  });

  test('putIndex of an index already stored (an unchanged disk) touches it when old', async () => {
    const writer = new ChunkStore(repo);
    const disk = randomBytes(2 * MiB);
    const { index } = await writer.storeDisk(Readable.from([disk]), disk.length);
    const indexId = await writer.putIndex(index);
    await age(indexKey(indexId), 4 * HOUR);
    const backup = new ChunkStore(repo);
    expect(await backup.putIndex(index)).toBe(indexId);
    expect(backup.touched).toBe(1);
    expect(Date.now() - (await mtime(indexKey(indexId)))).toBeLessThan(60_000);
  });
});
