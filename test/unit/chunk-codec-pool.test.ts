/**
 * The chunk codec's worker threads (codec-pool.ts): many chunks hashed, encoded and decoded in the threads equal what
 * the main thread's codec makes of them, and a thread that dies rejects its job with one sentence instead of hanging.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CodecPool,
  ChunkFormatError,
  chunkId,
  decodeObject,
  initRepository,
  maxObjectBytes,
} from '../../src/repository/chunks';
import type { OpenRepository } from '../../src/repository/chunks';
import { BufferPool } from '../../src/shared/buffer-pool';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

jest.setTimeout(120_000);

const CHUNK = 256 * 1024;

describe('chunk codec pool', () => {
  let dir: string;
  let target: StorageTarget;
  let repo: OpenRepository;
  const pool = new CodecPool(2, 4);

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-codec-pool-'));
    target = openTarget(`file://${dir}`, { env: {} });
    repo = await initRepository(target, {
      encryption: 'aes-256-gcm',
      compression: 'zstd',
      password: 'pool',
      chunkSize: CHUNK,
      scrypt: { N: 1024, r: 8, p: 1 },
    });
  });
  afterAll(async () => {
    await pool.close();
    await target.close();
    await rm(dir, { recursive: true, force: true });
  });

  test('64 chunks in and out through the threads equal their plaintext, ids as the main thread computes them', async () => {
    const chunks = Array.from({ length: 64 }, (_, i) =>
      i % 2 ? randomBytes(CHUNK) : Buffer.alloc(CHUNK, `compressible ${i} `),
    );
    const out = await Promise.all(
      chunks.map(async (plain) => {
        const copy = Buffer.from(plain);
        const { id, data } = await pool.id(repo, copy, true);
        expect(data.equals(plain)).toBe(true);
        const body = await pool.encode(repo, 'chunk', id, data, true);
        // what the threads stored, the main thread reads back (and the threads do too)
        expect(decodeObject(repo, 'chunk', id, body).equals(plain)).toBe(true);
        return { id, back: await pool.decode(repo, 'chunk', id, body) };
      }),
    );
    out.forEach(({ id, back }, i) => {
      expect(id).toBe(chunkId(repo, chunks[i]!));
      expect(back.equals(chunks[i]!)).toBe(true);
    });
  });

  test('encodeInto writes the object into the buffer given and hands both buffers back, for reuse', async () => {
    const room = maxObjectBytes(repo, 'chunk');
    let out = Buffer.allocUnsafeSlow(room);
    for (const plain of [randomBytes(CHUNK), Buffer.alloc(CHUNK, 'compressible ')]) {
      const mine = Buffer.allocUnsafeSlow(CHUNK);
      plain.copy(mine);
      const { id } = await pool.id(repo, plain);
      const r = await pool.encodeInto(repo, 'chunk', id, mine, out);
      // moved, not copied: the views given are empty now, the ones back hold the same memory's bytes
      expect(mine.length).toBe(0);
      expect(out.length).toBe(0);
      expect(r.plaintext.equals(plain)).toBe(true);
      expect(r.body.buffer.byteLength).toBe(room);
      expect(r.body.byteOffset).toBe(0);
      expect(decodeObject(repo, 'chunk', id, r.body).equals(plain)).toBe(true);
      // the same object as encode() makes, nonce aside: same length, header and compression flag
      const plainBody = await pool.encode(repo, 'chunk', id, plain);
      expect(r.body.length).toBe(plainBody.length);
      expect(r.body.subarray(0, 3).equals(plainBody.subarray(0, 3))).toBe(true);
      out = Buffer.from(r.body.buffer as ArrayBuffer);
    }
    const small = Buffer.allocUnsafeSlow(CHUNK / 2);
    const plain = randomBytes(CHUNK);
    const { id } = await pool.id(repo, plain);
    await expect(pool.encodeInto(repo, 'chunk', id, Buffer.from(plain), small)).rejects.toThrow(
      /does not fit the buffer given/,
    );
    await expect(pool.encodeInto(repo, 'chunk', id, plain, out.subarray(1))).rejects.toThrow(/whole buffer of its own/);
  });

  test('buffers over shared memory are lent, not moved: id, encodeInto and decodeInto hand back the very objects given', async () => {
    const plainPool = new BufferPool(CHUNK, 4, { shared: true });
    const bodyPool = new BufferPool(maxObjectBytes(repo, 'chunk'), 4, { shared: true });
    for (const source of [randomBytes(CHUNK), Buffer.alloc(CHUNK, 'compressible ')]) {
      const mine = plainPool.take();
      source.copy(mine);
      const hashed = await pool.id(repo, mine, true);
      expect(hashed.id).toBe(chunkId(repo, source));
      expect(hashed.data.buffer).toBe(mine.buffer); // the caller's object, not the thread's view of it
      expect(mine.length).toBe(CHUNK); // still usable here: nothing was detached
      const out = bodyPool.take();
      const r = await pool.encodeInto(repo, 'chunk', hashed.id, hashed.data, out);
      expect(r.plaintext.buffer).toBe(mine.buffer);
      expect(r.body.buffer).toBe(out.buffer);
      expect(decodeObject(repo, 'chunk', hashed.id, r.body).equals(source)).toBe(true);
      // back into the pools by identity: the next take is the same memory, nothing new is made
      plainPool.give(r.plaintext);
      bodyPool.give(r.body);
      const into = plainPool.take();
      expect(into.buffer).toBe(mine.buffer);
      into.fill(0);
      const back = await pool.decodeInto(repo, 'chunk', hashed.id, Buffer.from(r.body), into, { checkId: false });
      expect(back.buffer).toBe(into.buffer);
      expect(back.equals(source)).toBe(true);
      plainPool.give(back);
    }
    expect(plainPool.allocated).toBe(1);
    expect(bodyPool.allocated).toBe(1);
    // a shared buffer that is not handed over is copied: the thread never sees the caller's memory
    const lent = plainPool.take();
    randomBytes(CHUNK).copy(lent);
    const copied = await pool.id(repo, lent, false);
    expect(copied.data.buffer).not.toBe(lent.buffer);
    expect(copied.data.buffer).toBeInstanceOf(ArrayBuffer);
  });

  test('decodeInto writes the plaintext into the buffer given (compressed or not) and hands it back', async () => {
    for (const plain of [randomBytes(CHUNK), Buffer.alloc(CHUNK, 'compressible ')]) {
      const { id } = await pool.id(repo, plain);
      const body = await pool.encode(repo, 'chunk', id, plain);
      const out = Buffer.allocUnsafeSlow(CHUNK);
      const back = await pool.decodeInto(repo, 'chunk', id, Buffer.from(body), out, { checkId: false });
      expect(out.length).toBe(0); // moved there and back: this view is empty, `back` holds the memory
      expect(back.buffer.byteLength).toBe(CHUNK);
      expect(back.equals(plain)).toBe(true);
      // a damaged object still fails, and nothing comes back
      body[body.length - 1]! ^= 1;
      await expect(
        pool.decodeInto(repo, 'chunk', id, body, Buffer.allocUnsafeSlow(CHUNK), { checkId: false }),
      ).rejects.toThrow(/is damaged or not what the repository stored/);
    }
  });

  test('a damaged object fails in the thread with the codec sentence and its kind', async () => {
    const plain = randomBytes(CHUNK);
    const { id } = await pool.id(repo, plain);
    const body = await pool.encode(repo, 'chunk', id, plain);
    body[body.length - 1]! ^= 1;
    const err = await pool.decode(repo, 'chunk', id, body).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChunkFormatError);
    expect((err as ChunkFormatError).kind).toBe('corrupt');
    expect((err as ChunkFormatError).objectId).toBe(id);
    expect((err as Error).message).toMatch(/is damaged or not what the repository stored \(authentication failed\)/);
  });

  test('a thread that dies rejects the job it ran with one sentence; the next jobs still run', async () => {
    const big = randomBytes(256 * CHUNK); // 64 MiB: ~50 ms of hashing, far longer than terminate takes to arrive
    const small = new CodecPool(1, 2);
    const outcome = (p: Promise<unknown>) =>
      p.then(
        () => 'done',
        (e: Error) => e.message,
      );
    try {
      // warm the thread up, then kill it while it hashes: the job is posted synchronously by id(), and terminate is
      // asked for at once, long before 64 MiB are hashed (the other jobs are queued only after that)
      await small.id(repo, randomBytes(16));
      const first = outcome(small.id(repo, big));
      const stopped = small.running[0]!.terminate();
      const jobs = [first, outcome(small.id(repo, big)), outcome(small.id(repo, big))];
      await stopped;
      const outcomes = await Promise.all(jobs);
      expect(outcomes[0]).toMatch(
        /^The chunk codec thread stopped \(exit code 1\) while it hashed a chunk; the step is retried\.$/,
      );
      // the queued jobs went to a new thread
      expect(outcomes.slice(1)).toEqual(['done', 'done']);
    } finally {
      await small.close();
    }
  });
});
