/**
 * Chunk ids and the object envelope (docs/chunk-format.md): header, zstd when it helps, AES-256-GCM with the id
 * in the associated data. Decoding authenticates, decompresses with a bound, and checks the plaintext's id.
 */
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes } from 'node:crypto';
import type { RepositoryConfig } from './config';
import { ID_RE } from './config';
import { ChunkFormatError } from './errors';
import type { MasterKeys } from './keys';
import type { Zstd } from './zstd';

export const ENVELOPE_VERSION = 1;
export type ObjectType = 'chunk' | 'index';
const TYPE_BYTE: Record<ObjectType, number> = { chunk: 0x43, index: 0x49 };
const FLAG_ZSTD = 1;
const FLAG_ENCRYPTED = 2;
const HEADER_BYTES = 3;
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
/** what encodeObject encrypts at a time: below glibc's mmap threshold in the worker (128 KiB, bin/vmbackup) */
const CIPHER_SLICE = 64 * 1024;
/** an unencrypted compressed payload is followed by its SHA-256 */
const DIGEST_BYTES = 32;
export const ZSTD_LEVEL = 1;
/** the probe: four samples of this size must shrink by PROBE_GAIN for the whole chunk to be compressed */
const PROBE_BYTES = 16 * 1024;
const PROBE_GAIN = 0.97;

/** What encoding and decoding need: the config, the master keys when encrypted, a zstd. */
export interface ChunkCodec {
  readonly config: RepositoryConfig;
  readonly keys: MasterKeys | undefined;
  readonly zstd: Zstd;
  /** where the objects live, for error sentences (the target's displayUrl) */
  readonly where: string;
}

export function isEncrypted(codec: ChunkCodec): boolean {
  return codec.config.encryption === 'aes-256-gcm';
}

/** The id of `plaintext`: HMAC-SHA256 under the id key when encrypted, SHA-256 when not. */
export function chunkId(codec: ChunkCodec, plaintext: Uint8Array): string {
  if (isEncrypted(codec)) {
    if (!codec.keys) throw new ChunkFormatError('invalid-argument', 'An encrypted repository needs its master keys.');
    return createHmac('sha256', codec.keys.idKey).update(plaintext).digest('hex');
  }
  return createHash('sha256').update(plaintext).digest('hex');
}

const ZERO_PAGE = Buffer.alloc(64 * 1024);

/** True when every byte is 0 (such a chunk is never stored: the index says `zero`). */
export function isAllZero(data: Uint8Array): boolean {
  const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  for (let off = 0; off < b.length; off += ZERO_PAGE.length) {
    const end = Math.min(off + ZERO_PAGE.length, b.length);
    if (ZERO_PAGE.compare(b, off, end, 0, end - off) !== 0) return false;
  }
  return true;
}

/** Whether compressing the whole of `data` is worth a try: some sample of it compresses. */
export function worthCompressing(zstd: Zstd, data: Uint8Array): boolean {
  if (data.length <= 4 * PROBE_BYTES) return true;
  for (const at of [0, 0.25, 0.5, 0.75]) {
    const start = Math.floor((data.length * at) / PROBE_BYTES) * PROBE_BYTES;
    const sample = data.subarray(start, start + PROBE_BYTES);
    if (zstd.compress(sample, ZSTD_LEVEL).length < sample.length * PROBE_GAIN) return true;
  }
  return false;
}

function maxPlaintext(codec: ChunkCodec, type: ObjectType): number {
  // an index is 33 bytes per chunk plus 21 bytes of header; MAX_INDEX_ENTRIES bounds it
  return type === 'chunk' ? codec.config.chunkSize : 21 + 33 * MAX_INDEX_ENTRIES;
}

/**
 * 2^22 chunks: a 16 TiB disk at 4 MiB chunks. It also bounds what reading an index someone else wrote may hold in
 * memory: 138 MiB of plaintext at most.
 */
export const MAX_INDEX_ENTRIES = 2 ** 22;

/** Largest stored object of `type` (what getBuffer may read). */
export function maxObjectBytes(codec: ChunkCodec, type: ObjectType): number {
  return HEADER_BYTES + Math.max(NONCE_BYTES + TAG_BYTES, DIGEST_BYTES) + maxPlaintext(codec, type);
}

function payloadDigest(header: Buffer, id: string, payload: Uint8Array): Buffer {
  return createHash('sha256').update(header).update(Buffer.from(id, 'hex')).update(payload).digest();
}

function associatedData(header: Buffer, id: string): Buffer {
  return Buffer.concat([header, Buffer.from(id, 'hex')]);
}

export interface EncodedObject {
  body: Buffer;
  /** the payload was stored zstd-compressed */
  compressed: boolean;
}

/**
 * Builds the stored object for `plaintext`, whose id is `id` (the caller computed it with chunkId). `into`, when it
 * is large enough (maxObjectBytes), is where the object is written: the body is then a view of it.
 */
export function encodeObject(
  codec: ChunkCodec,
  type: ObjectType,
  id: string,
  plaintext: Uint8Array,
  into?: Buffer,
): EncodedObject {
  if (!ID_RE.test(id)) throw new ChunkFormatError('invalid-argument', `${JSON.stringify(id)} is not a chunk id.`);
  if (plaintext.length > maxPlaintext(codec, type))
    throw new ChunkFormatError(
      'invalid-argument',
      `A ${type} of ${plaintext.length} bytes is larger than the repository's ${maxPlaintext(codec, type)} bytes.`,
    );
  let payload: Uint8Array = plaintext;
  let flags = 0;
  if (codec.config.compression === 'zstd' && worthCompressing(codec.zstd, plaintext)) {
    const packed = codec.zstd.compress(plaintext, ZSTD_LEVEL);
    if (packed.length < plaintext.length) {
      payload = packed;
      flags |= FLAG_ZSTD;
    }
  }
  const encrypted = isEncrypted(codec);
  if (encrypted) flags |= FLAG_ENCRYPTED;
  const header = Buffer.from([ENVELOPE_VERSION, TYPE_BYTE[type], flags]);
  const bodyBytes =
    HEADER_BYTES +
    (encrypted ? NONCE_BYTES + payload.length + TAG_BYTES : payload.length + (flags & FLAG_ZSTD ? DIGEST_BYTES : 0));
  const out = into && into.length >= bodyBytes ? into.subarray(0, bodyBytes) : undefined;
  if (!encrypted) {
    // the plaintext's id covers every byte of a raw payload, but not the bytes of a zstd frame that do not change what
    // it decodes to (padding, header fields): a digest of the frame makes every flipped byte detectable
    const parts = [header, payload, ...(flags & FLAG_ZSTD ? [payloadDigest(header, id, payload)] : [])];
    return { body: out ? concatInto(out, parts) : Buffer.concat(parts), compressed: (flags & FLAG_ZSTD) !== 0 };
  }
  if (!codec.keys) throw new ChunkFormatError('invalid-argument', 'An encrypted repository needs its master keys.');
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', codec.keys.encKey, nonce);
  cipher.setAAD(associatedData(header, id));
  // the object is allocated once and the ciphertext copied in slice by slice: update() returns a new buffer, and
  // one as large as the payload, then concatenated, would be two fresh 4 MiB buffers per chunk (page faults each
  // in a worker that maps every large buffer on its own) where small slices reuse the same heap memory
  const body = out ?? Buffer.allocUnsafe(bodyBytes);
  header.copy(body, 0);
  nonce.copy(body, HEADER_BYTES);
  let at = HEADER_BYTES + NONCE_BYTES;
  for (let off = 0; off < payload.length; off += CIPHER_SLICE) {
    at += cipher.update(payload.subarray(off, Math.min(off + CIPHER_SLICE, payload.length))).copy(body, at);
  }
  at += cipher.final().copy(body, at);
  cipher.getAuthTag().copy(body, at);
  if (at + TAG_BYTES !== body.length) throw new Error('AES-256-GCM changed the payload length');
  return { body, compressed: (flags & FLAG_ZSTD) !== 0 };
}

function concatInto(out: Buffer, parts: Uint8Array[]): Buffer {
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export interface DecodeOptions {
  /**
   * false: an encrypted object is not hashed again to compare its plaintext with `id` (restore). Its GCM tag
   * under the repository's encryption key already authenticates the payload and, through the associated data, the
   * header and `id`: only a holder of the key can make an object that decodes under `id`, and the plaintext is the
   * one that holder stored under `id`. The id check then only guards against a key holder's own bug (data stored
   * under another chunk's id), which `verify --read-data` keeps checking (the default, true). An unencrypted object
   * is always checked against its id: nothing else authenticates it.
   */
  checkId?: boolean;
}

/**
 * The verified plaintext of a stored object fetched under `id` (written into `into` when given: a view of it). Any damage, a foreign object, or an object stored
 * under another id fails with ChunkFormatError 'corrupt' naming the id (see DecodeOptions for what `checkId: false`
 * trusts to the GCM tag).
 */
export function decodeObject(
  codec: ChunkCodec,
  type: ObjectType,
  id: string,
  body: Buffer,
  opts: DecodeOptions = {},
  into?: Buffer,
): Buffer {
  const corrupt = (why: string, cause?: unknown): ChunkFormatError =>
    new ChunkFormatError(
      'corrupt',
      `The ${type} ${id} on ${codec.where} is damaged or not what the repository stored (${why}).`,
      { objectId: id, cause },
    );
  if (body.length < HEADER_BYTES) throw corrupt('too short');
  if (body.length > maxObjectBytes(codec, type)) throw corrupt('too large');
  const [version, typeByte, flags] = [body[0], body[1], body[2]] as [number, number, number];
  if (version !== ENVELOPE_VERSION) throw corrupt(`unknown version ${version}`);
  if (typeByte !== TYPE_BYTE[type]) throw corrupt('wrong object type');
  if ((flags & ~(FLAG_ZSTD | FLAG_ENCRYPTED)) !== 0) throw corrupt('unknown flags');
  const encrypted = isEncrypted(codec);
  if (((flags & FLAG_ENCRYPTED) !== 0) !== encrypted)
    throw corrupt(encrypted ? 'not encrypted in an encrypted repository' : 'encrypted in an unencrypted repository');
  let payload: Buffer;
  if (encrypted) {
    if (!codec.keys) throw new ChunkFormatError('invalid-argument', 'An encrypted repository needs its master keys.');
    if (body.length < HEADER_BYTES + NONCE_BYTES + TAG_BYTES) throw corrupt('too short');
    const nonce = body.subarray(HEADER_BYTES, HEADER_BYTES + NONCE_BYTES);
    const decipher = createDecipheriv('aes-256-gcm', codec.keys.encKey, nonce);
    decipher.setAAD(associatedData(body.subarray(0, HEADER_BYTES), id));
    decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
    const sealed = body.subarray(HEADER_BYTES + NONCE_BYTES, body.length - TAG_BYTES);
    try {
      if (into && into.length >= sealed.length) {
        // into the caller's buffer slice by slice (as encodeObject); nothing of it is handed out before final()
        // has checked the tag
        let at = 0;
        for (let off = 0; off < sealed.length; off += CIPHER_SLICE)
          at += decipher.update(sealed.subarray(off, Math.min(off + CIPHER_SLICE, sealed.length))).copy(into, at);
        at += decipher.final().copy(into, at);
        payload = into.subarray(0, at);
      } else {
        // GCM is a stream mode: final() only checks the tag and returns no bytes, so update's output is the payload
        // (no second copy of a 4 MiB chunk)
        payload = decipher.update(sealed);
        const rest = decipher.final();
        if (rest.length > 0) payload = Buffer.concat([payload, rest]);
      }
    } catch (cause) {
      throw corrupt('authentication failed', cause);
    }
  } else if (flags & FLAG_ZSTD) {
    if (body.length < HEADER_BYTES + DIGEST_BYTES) throw corrupt('too short');
    payload = body.subarray(HEADER_BYTES, body.length - DIGEST_BYTES);
    const digest = payloadDigest(body.subarray(0, HEADER_BYTES), id, payload);
    if (!digest.equals(body.subarray(body.length - DIGEST_BYTES))) throw corrupt('digest does not match');
  } else {
    payload = body.subarray(HEADER_BYTES);
  }
  let plaintext: Buffer;
  if (flags & FLAG_ZSTD) {
    if (codec.config.compression !== 'zstd') throw corrupt('compressed in a repository without compression');
    try {
      plaintext = codec.zstd.decompress(payload, maxPlaintext(codec, type));
    } catch (cause) {
      throw corrupt('zstd data does not decompress', cause);
    }
  } else {
    plaintext = payload;
  }
  if (plaintext.length > maxPlaintext(codec, type)) throw corrupt('too large');
  if ((opts.checkId ?? true) || !encrypted) {
    if (chunkId(codec, plaintext) !== id) throw corrupt('content does not match its id');
  }
  if (!into || plaintext.buffer === into.buffer) return plaintext;
  if (plaintext.length > into.length)
    throw new ChunkFormatError('invalid-argument', `The ${type} ${id} does not fit the buffer given.`, {
      objectId: id,
    });
  return into.subarray(0, plaintext.copy(into));
}
