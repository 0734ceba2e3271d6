/**
 * A target that signs its payload's hash (S3 SigV4) gets each chunk's object with the SHA-256 of those very bytes,
 * taken in the codec thread that encoded it, so the main thread does not hash every upload again; other targets get
 * no hash to take (it would cost CPU for nothing).
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CHUNKS_PREFIX, ChunkStore, initRepository } from '../../src/repository/chunks';
import type { PutBatchedOptions, StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

const CHUNK = 64 * 1024;

/** `target` with signsPayloadHash as given; records each putBatched's body hash and the hash it was handed. */
function recording(target: StorageTarget, signs: boolean) {
  const puts: Array<{ key: string; actual: string; given?: string }> = [];
  const wrapped = Object.assign(Object.create(target) as StorageTarget, {
    capabilities: { ...target.capabilities, signsPayloadHash: signs },
    putBatched: (key: string, body: Buffer, opts?: PutBatchedOptions) => {
      puts.push({ key, actual: createHash('sha256').update(body).digest('hex'), given: opts?.sha256 });
      return target.putBatched(key, body, opts);
    },
  });
  return { wrapped, puts };
}

describe('the body hash of a chunk upload', () => {
  let dir: string;
  let inner: StorageTarget;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-payload-hash-'));
    inner = openTarget(`file://${dir}`, { env: {} });
  });
  afterEach(async () => {
    await inner.close();
    await rm(dir, { recursive: true, force: true });
  });

  for (const encryption of ['none', 'aes-256-gcm'] as const) {
    test(`a target that signs its payload gets each chunk's SHA-256 of the bytes it stores (${encryption})`, async () => {
      const { wrapped, puts } = recording(inner, true);
      const repo = await initRepository(wrapped, {
        encryption,
        compression: 'zstd',
        chunkSize: CHUNK,
        ...(encryption === 'none' ? {} : { password: 'p', scrypt: { N: 1 << 10, r: 8, p: 1 } }),
      });
      const store = new ChunkStore(repo);
      for (let i = 0; i < 6; i++) await store.put(randomBytes(CHUNK), undefined, { handOver: true });
      const chunks = puts.filter((p) => p.key.startsWith(CHUNKS_PREFIX));
      expect(chunks).toHaveLength(6);
      for (const p of chunks) expect(p.given).toBe(p.actual);
    });
  }

  test('a target that does not sign its payload is given no hash', async () => {
    const { wrapped, puts } = recording(inner, false);
    const repo = await initRepository(wrapped, { encryption: 'none', compression: 'zstd', chunkSize: CHUNK });
    const store = new ChunkStore(repo);
    for (let i = 0; i < 3; i++) await store.put(randomBytes(CHUNK));
    const chunks = puts.filter((p) => p.key.startsWith(CHUNKS_PREFIX));
    expect(chunks).toHaveLength(3);
    for (const p of chunks) expect(p.given).toBeUndefined();
  });
});
