/**
 * The chunk format's ChunkStore against the real local, NFS (ganesha) and S3 (radosgw) targets: what a user of an
 * encrypted repository checks: the data comes back equal, nothing of the plaintext is on the target, storing the
 * same disk again sends nothing, and damage or a swapped object is refused naming the chunk.
 */
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import {
  CHUNKS_PREFIX,
  ChunkFormatError,
  ChunkStore,
  REPOSITORY_ROOT,
  chunkKey,
  getSmallFile,
  initRepository,
  openRepository,
  putSmallFile,
  type DiskIndex,
} from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { requireNfs, requireS3 } from '../helpers/stack';
import type { ConformanceTarget } from '../storage/conformance';
import { localTarget, nfsTarget, s3Target } from '../storage/fixtures';

const MiB = 1 << 20;
const PASSWORD = 'chunk-store integration password';
const MARKER = 'VMBACKUP-MARKER-7f3a9c';

async function objects(target: StorageTarget, prefix = ''): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for await (const o of target.list(prefix)) out.set(o.key, o.size);
  return out;
}

/** a 64 MiB "disk": random, one zero chunk, one chunk of marker text, one repeated chunk */
function testDisk(): Buffer {
  const disk = randomBytes(64 * MiB);
  disk.fill(0, 8 * MiB, 12 * MiB);
  disk.fill(`${MARKER} guest data `, 20 * MiB, 24 * MiB);
  disk.copy(disk, 40 * MiB, 0, 4 * MiB); // chunk 10 = chunk 0: stored once
  return disk;
}

/** 1 MiB pieces, as a disk reader would hand them over */
function pieces(disk: Buffer): Readable {
  return Readable.from(
    (function* () {
      for (let off = 0; off < disk.length; off += MiB) yield disk.subarray(off, off + MiB);
    })(),
  );
}

async function readBack(store: ChunkStore, index: DiskIndex): Promise<Buffer> {
  const out = Buffer.alloc(index.virtualSize);
  await store.readDisk(index, async (offset, data) => {
    data.copy(out, offset);
  });
  return out;
}

const backends: Array<[string, () => Promise<void>, () => Promise<ConformanceTarget>]> = [
  ['local', async () => undefined, () => localTarget()],
  ['nfs', requireNfs, () => nfsTarget()],
  ['s3', requireS3, () => s3Target()],
];

describe.each(backends)('ChunkStore on %s', (_name, requireBackend, makeTarget) => {
  let t: ConformanceTarget;
  beforeAll(async () => {
    await requireBackend();
    t = await makeTarget();
  });
  afterAll(async () => {
    await t?.target.close();
    await t?.cleanup();
  });

  test('an encrypted repository: put/has/get, idempotent put, a 64 MiB disk back equal, no plaintext on the target, a second store sends nothing', async () => {
    const created = await initRepository(t.target, {
      encryption: 'aes-256-gcm',
      compression: 'zstd',
      password: PASSWORD,
    });
    const repo = await openRepository(t.target, PASSWORD);
    expect(repo.keyId).toBe(created.keyId);

    // put / has / get of one chunk, and a second put that sends nothing and leaves the stored object as it was
    const store = new ChunkStore(repo);
    const one = Buffer.from(`${MARKER} one chunk `.repeat(1000));
    const id = store.idOf(one);
    expect(await store.has(id as string)).toBe(false);
    const first = await store.put(one);
    expect(first.id).toBe(id);
    expect(first.uploadedBytes).toBeGreaterThan(0);
    expect(await store.has(id as string)).toBe(true);
    const storedOnce = await t.target.getBuffer(chunkKey(id as string));
    expect(await new ChunkStore(repo).put(one)).toEqual({ id, uploadedBytes: 0 });
    expect((await t.target.getBuffer(chunkKey(id as string))).equals(storedOnce)).toBe(true);
    expect((await new ChunkStore(repo).get(id as string)).equals(one)).toBe(true);

    // a 64 MiB disk, chunked, stored with 4 in flight, read back equal
    const disk = testDisk();
    const { index, stats } = await store.storeDisk(pieces(disk), disk.length);
    expect(index.entries).toHaveLength(16);
    expect(index.entries[2]).toBe('zero');
    expect(index.entries[10]).toBe(index.entries[0]);
    expect(stats).toMatchObject({ chunks: 16, zeroChunks: 1, uploadedChunks: 14, knownChunks: 1 });
    const indexId = await store.putIndex(index);
    const reopened = new ChunkStore(await openRepository(t.target, PASSWORD));
    const back = await readBack(reopened, await reopened.getIndex(indexId));
    expect(back.equals(disk)).toBe(true);

    // nothing stored anywhere under the repository holds the marker (compressible chunk and the raw one alike)
    const stored = await objects(t.target);
    expect([...stored.keys()].every((k) => k.startsWith(`${REPOSITORY_ROOT}/`))).toBe(true);
    for (const key of stored.keys()) {
      const body = await t.target.getBuffer(key);
      expect({ key, hasMarker: body.includes(Buffer.from(MARKER)) }).toEqual({ key, hasMarker: false });
    }

    // a second store of the same disk uploads nothing: from the previous index, from a listing, or by stat alone
    const before = await objects(t.target, CHUNKS_PREFIX);
    const seeded = new ChunkStore(repo);
    seeded.seed(index);
    const listed = new ChunkStore(repo);
    expect(await listed.loadKnown()).toBe(16 - 1 - 1 + 1); // 14 disk chunks + the single chunk above
    for (const again of [seeded, listed, new ChunkStore(repo)]) {
      const second = await again.storeDisk(pieces(disk), disk.length);
      expect(second.stats).toMatchObject({ uploadedChunks: 0, uploadedBytes: 0, knownChunks: 15, zeroChunks: 1 });
      expect(second.index).toEqual(index);
    }
    expect(await objects(t.target, CHUNKS_PREFIX)).toEqual(before);
  });

  test('a damaged chunk, and a valid chunk stored under another id, are refused naming the chunk', async () => {
    const repo = await openRepository(t.target, PASSWORD);
    const store = new ChunkStore(repo);
    const a = randomBytes(MiB);
    const b = randomBytes(MiB);
    const idA = (await store.put(a)).id as string;
    const idB = (await store.put(b)).id as string;

    // someone who can write the bucket copies A's object over B's: B is refused, not served as A's bytes
    await t.target.putManifest(chunkKey(idB), await t.target.getBuffer(chunkKey(idA)));
    const swapped = await store.get(idB).catch((e: unknown) => e);
    expect(swapped).toBeInstanceOf(ChunkFormatError);
    expect(swapped).toMatchObject({ kind: 'corrupt', objectId: idB });
    expect((swapped as Error).message).toContain(idB);

    // one flipped byte in the middle of A
    const body = await t.target.getBuffer(chunkKey(idA));
    const mid = body.length >> 1;
    body[mid] = (body[mid] as number) ^ 0x10;
    await t.target.putManifest(chunkKey(idA), body);
    const flipped = await store.get(idA).catch((e: unknown) => e);
    expect(flipped).toMatchObject({ kind: 'corrupt', objectId: idA });
    expect((flipped as Error).message).toBe(
      `The chunk ${idA} on ${t.target.displayUrl} is damaged or not what the repository stored (authentication failed).`,
    );

    // a missing chunk is 'missing', naming it
    await t.target.delete(chunkKey(idA));
    expect(await store.get(idA).catch((e: unknown) => e)).toMatchObject({ kind: 'missing', objectId: idA });
  });

  test('a small file (a whole-VM file) is stored as an index and read back verified; its size is checked', async () => {
    const repo = await openRepository(t.target, PASSWORD);
    const store = new ChunkStore(repo);
    const xml = Buffer.from(`<domain type='qemu'><name>${MARKER}</name></domain>\n`.repeat(100));
    const stored = await putSmallFile(store, xml);
    expect(stored.key).toBe(`@chunk-repo/indexes/${stored.sha256}`);
    expect(stored.size).toBe(xml.length);
    expect(await getSmallFile(new ChunkStore(repo), stored.sha256, xml.length, 1 << 20)).toEqual(xml);
    // the same file again stores nothing new
    expect((await putSmallFile(new ChunkStore(repo), xml)).stats.uploadedBytes).toBe(0);
    await expect(getSmallFile(store, stored.sha256, xml.length + 1, 1 << 20)).rejects.toMatchObject({
      kind: 'corrupt',
    });
    await expect(getSmallFile(store, stored.sha256, xml.length, 100)).rejects.toThrow(/larger than 100 bytes/);
  });
});
