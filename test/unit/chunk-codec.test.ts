/** Chunk ids and the object envelope (docs/chunk-format.md): round trips, tampering, swapped ids, compression. */
import { createHash, randomBytes } from 'node:crypto';
import {
  ChunkFormatError,
  chunkId,
  decodeObject,
  encodeObject,
  frameContentSize,
  isAllZero,
  loadZstd,
  newMasterKeys,
  type ChunkCodec,
  type RepositoryConfig,
  type Zstd,
} from '../../src/repository/chunks';

const MiB = 1 << 20;

function config(encrypted: boolean, compression: 'zstd' | 'none' = 'zstd'): RepositoryConfig {
  return {
    format: 'vmbackup-chunks',
    version: 1,
    repositoryId: 'ab'.repeat(32),
    chunkSize: 4 * MiB,
    idAlgorithm: encrypted ? 'hmac-sha256' : 'sha256',
    compression,
    encryption: encrypted ? 'aes-256-gcm' : 'none',
  };
}

let zstd: Zstd;
beforeAll(async () => {
  zstd = await loadZstd();
});

function codec(encrypted: boolean, compression: 'zstd' | 'none' = 'zstd'): ChunkCodec {
  return { config: config(encrypted, compression), keys: encrypted ? newMasterKeys() : undefined, zstd, where: 'test' };
}

/** 4 MiB of text-like data that zstd shrinks a lot */
function compressible(seed = 'x'): Buffer {
  const b = Buffer.alloc(4 * MiB);
  for (let off = 0, n = 0; off < b.length; n++) off += b.write(`${seed} line ${n} of a log file\n`, off);
  return b;
}

function expectCorrupt(fn: () => unknown, id: string): ChunkFormatError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(ChunkFormatError);
  const err = caught as ChunkFormatError;
  expect(err.kind).toBe('corrupt');
  expect(err.objectId).toBe(id);
  expect(err.message).toContain(id);
  expect(err.message.split('\n')).toHaveLength(1);
  return err;
}

describe.each([
  ['encrypted', true],
  ['unencrypted', false],
])('chunk codec, %s', (_name, encrypted) => {
  test.each([
    ['random', () => randomBytes(4 * MiB)],
    ['compressible', () => compressible()],
    ['short last chunk', () => randomBytes(12345)],
  ])('round trip of a %s chunk', (_kind, make) => {
    const c = codec(encrypted);
    const plain = make();
    const id = chunkId(c, plain);
    const { body } = encodeObject(c, 'chunk', id, plain);
    expect(decodeObject(c, 'chunk', id, body).equals(plain)).toBe(true);
  });

  test('a flipped byte anywhere in a chunk object is a typed error naming the chunk', () => {
    const c = codec(encrypted);
    const plain = compressible('flip');
    const id = chunkId(c, plain);
    const { body } = encodeObject(c, 'chunk', id, plain);
    // every byte of the header and envelope, and a spread of positions through the payload
    const positions = new Set<number>();
    for (let i = 0; i < Math.min(64, body.length); i++) positions.add(i);
    for (let i = 0; i < 200; i++) positions.add(Math.floor((i / 200) * body.length));
    for (let i = body.length - 32; i < body.length; i++) positions.add(i);
    for (const pos of positions) {
      const bad = Buffer.from(body);
      bad[pos] = (bad[pos] as number) ^ 0x01;
      expectCorrupt(() => decodeObject(c, 'chunk', id, bad), id);
      // restore's decode (no second hash of an encrypted chunk) finds it just the same
      expectCorrupt(() => decodeObject(c, 'chunk', id, bad, { checkId: false }), id);
    }
  });

  test('a valid chunk object stored under another id is refused', () => {
    const c = codec(encrypted);
    const a = randomBytes(64 * 1024);
    const b = randomBytes(64 * 1024);
    const idA = chunkId(c, a);
    const idB = chunkId(c, b);
    const objectOfA = encodeObject(c, 'chunk', idA, a).body;
    expectCorrupt(() => decodeObject(c, 'chunk', idB, objectOfA), idB);
    expectCorrupt(() => decodeObject(c, 'chunk', idB, objectOfA, { checkId: false }), idB);
  });

  test('checkId false: an encrypted chunk is trusted on its GCM tag (which covers its id), an unencrypted one never', () => {
    const c = codec(encrypted);
    const plain = compressible('bug');
    // what only a holder of the key can make: a valid object whose plaintext does not have the id it is stored under
    const otherId = chunkId(c, randomBytes(100));
    const { body } = encodeObject(c, 'chunk', otherId, plain);
    expectCorrupt(() => decodeObject(c, 'chunk', otherId, body), otherId);
    if (encrypted) expect(decodeObject(c, 'chunk', otherId, body, { checkId: false }).equals(plain)).toBe(true);
    else expectCorrupt(() => decodeObject(c, 'chunk', otherId, body, { checkId: false }), otherId);
  });

  test('a chunk object is not accepted as an index, nor the reverse', () => {
    const c = codec(encrypted);
    const plain = randomBytes(1000);
    const id = chunkId(c, plain);
    expectCorrupt(() => decodeObject(c, 'index', id, encodeObject(c, 'chunk', id, plain).body), id);
    expectCorrupt(() => decodeObject(c, 'chunk', id, encodeObject(c, 'index', id, plain).body), id);
  });

  test('compression is skipped when it does not help, used when it does', () => {
    const c = codec(encrypted);
    const random = randomBytes(4 * MiB);
    const r = encodeObject(c, 'chunk', chunkId(c, random), random);
    expect(r.compressed).toBe(false);
    expect(r.body.length).toBeLessThanOrEqual(random.length + 31);
    const text = compressible();
    const t = encodeObject(c, 'chunk', chunkId(c, text), text);
    expect(t.compressed).toBe(true);
    expect(t.body.length).toBeLessThan(text.length / 4);
  });
});

test('ids of an encrypted repository leak nothing: not the SHA-256 of the data, and differ between repositories', () => {
  const plain = compressible('leak');
  const sha = createHash('sha256').update(plain).digest('hex');
  const a = codec(true);
  const b = codec(true);
  expect(chunkId(a, plain)).not.toBe(sha);
  expect(chunkId(a, plain)).not.toBe(chunkId(b, plain));
  expect(chunkId(a, plain)).toBe(chunkId(a, Buffer.from(plain)));
  // an unencrypted repository's ids are plain SHA-256, as the spec says
  expect(chunkId(codec(false), plain)).toBe(sha);
});

test('an encrypted chunk object holds no byte run of its plaintext; the same chunk encrypts differently each time', () => {
  const c = codec(true, 'none');
  const plain = Buffer.alloc(256 * 1024, 'MARKER-vmbackup-chunk-');
  const id = chunkId(c, plain);
  const one = encodeObject(c, 'chunk', id, plain).body;
  const two = encodeObject(c, 'chunk', id, plain).body;
  expect(one.includes(Buffer.from('MARKER-vmbackup'))).toBe(false);
  expect(one.equals(two)).toBe(false);
  expect(decodeObject(c, 'chunk', id, two).equals(plain)).toBe(true);
});

test('an object encrypted with other keys is refused (a chunk from another repository)', () => {
  const a = codec(true);
  const b: ChunkCodec = { ...a, keys: newMasterKeys() };
  const plain = randomBytes(4096);
  const id = chunkId(a, plain);
  expectCorrupt(() => decodeObject(b, 'chunk', id, encodeObject(a, 'chunk', id, plain).body), id);
});

test('an unencrypted object cannot be slipped into an encrypted repository', () => {
  const enc = codec(true);
  const plain = randomBytes(4096);
  const id = chunkId(enc, plain);
  const clear = encodeObject(codec(false), 'chunk', id, plain).body;
  expectCorrupt(() => decodeObject(enc, 'chunk', id, clear), id);
});

test('a zstd frame that declares more than a chunk is refused before it is decompressed', () => {
  const c = codec(false);
  const huge = zstd.compress(Buffer.alloc(8 * MiB, 1), 1);
  expect(frameContentSize(huge)).toBe(8 * MiB);
  const id = 'cd'.repeat(32);
  const header = Buffer.from([1, 0x43, 1]);
  // a well-formed unencrypted object (its digest matches) whose frame declares 8 MiB in a 4 MiB-chunk repository
  const digest = createHash('sha256').update(header).update(Buffer.from(id, 'hex')).update(huge).digest();
  const body = Buffer.concat([header, huge, digest]);
  const err = expectCorrupt(() => decodeObject(c, 'chunk', id, body), id);
  expect(err.message).toMatch(/zstd/);
});

test('all-zero detection', () => {
  expect(isAllZero(Buffer.alloc(4 * MiB))).toBe(true);
  expect(isAllZero(Buffer.alloc(12345))).toBe(true);
  const one = Buffer.alloc(4 * MiB);
  one[4 * MiB - 1] = 1;
  expect(isAllZero(one)).toBe(false);
});

test('the node and wasm zstd read each other’s frames (when this Node has zstd built in)', async () => {
  const wasm = await loadZstd('wasm');
  const text = compressible('interop');
  expect(wasm.decompress(wasm.compress(text, 1), text.length).equals(text)).toBe(true);
  const node = await loadZstd('node').catch(() => undefined);
  if (!node) {
    // Node 20: no built-in zstd, the WASM build is the one in use
    expect(zstd.implementation).toBe('wasm');
    return;
  }
  expect(node.decompress(wasm.compress(text, 1), text.length).equals(text)).toBe(true);
  expect(wasm.decompress(node.compress(text, 1), text.length).equals(text)).toBe(true);
});
