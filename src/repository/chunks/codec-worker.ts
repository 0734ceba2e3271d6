/**
 * The codec thread of CodecPool (codec-pool.ts): computes chunk ids, encodes and decodes objects with codec.ts, off
 * the main thread. Each job carries what its repository's codec needs (config, keys, which zstd); buffers come and go
 * as transfers. A failure goes back as its message (and ChunkFormatError's kind and object id).
 */
import { createHash } from 'node:crypto';
import { isArrayBuffer } from 'node:util/types';
import { parentPort } from 'node:worker_threads';
import { chunkId, decodeObject, encodeObject } from './codec';
import type { ChunkCodec } from './codec';
import { isChunkFormatError } from './errors';
import { loadZstd } from './zstd';
import type { Zstd } from './zstd';
import { movable } from '../../shared/buffer-pool';
import type { CodecJob, CodecReply } from './codec-pool';

const zstds = new Map<string, Promise<Zstd>>();

async function handle(job: CodecJob): Promise<{ reply: CodecReply; transfer: ArrayBuffer[] }> {
  let zstd = zstds.get(job.codec.zstd);
  if (!zstd) {
    zstd = loadZstd(job.codec.zstd);
    zstds.set(job.codec.zstd, zstd);
  }
  const codec: ChunkCodec = {
    config: job.codec.config,
    keys: job.codec.keys
      ? {
          encKey: Buffer.from(job.codec.keys.encKey),
          idKey: Buffer.from(job.codec.keys.idKey),
          authKey: Buffer.alloc(0),
        }
      : undefined,
    zstd: await zstd,
    where: job.codec.where,
  };
  const data = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
  switch (job.op) {
    case 'id':
      // the data goes back with its id: the caller encodes it next when the repository does not hold it
      return {
        reply: { seq: job.seq, id: chunkId(codec, data), data: job.data },
        transfer: movable([job.data]),
      };
    case 'encode': {
      if (job.out) {
        // encodeInto: the object goes into the caller's buffer, and both buffers go back
        const out = Buffer.from(job.out.buffer, job.out.byteOffset, job.out.byteLength);
        const { body } = encodeObject(codec, job.type, job.id, data, out);
        if (body.buffer !== out.buffer) throw new Error(`the ${job.type} ${job.id} does not fit the buffer given`);
        // the hash a target that signs its payload sends (S3 SigV4), taken here rather than on the main thread
        const bodySha256 = job.bodySha256 ? createHash('sha256').update(body).digest('hex') : undefined;
        return {
          reply: { seq: job.seq, data: job.data, body, ...(bodySha256 ? { bodySha256 } : {}) },
          transfer: movable([job.data, job.out]),
        };
      }
      const { body } = encodeObject(codec, job.type, job.id, data);
      return { reply: { seq: job.seq, data: body }, transfer: whole(body) };
    }
    case 'decode': {
      if (job.out) {
        // decodeInto: the plaintext goes into the caller's buffer, which goes back (the body stays here)
        const out = Buffer.from(job.out.buffer, job.out.byteOffset, job.out.byteLength);
        const plain = decodeObject(codec, job.type, job.id, data, { checkId: job.checkId }, out);
        if (plain.buffer !== out.buffer)
          throw new Error(`the ${job.type} ${job.id} was not decoded into the buffer given`);
        return { reply: { seq: job.seq, body: plain }, transfer: movable([job.out]) };
      }
      const plain = decodeObject(codec, job.type, job.id, data, { checkId: job.checkId });
      return { reply: { seq: job.seq, data: plain }, transfer: whole(plain) };
    }
  }
}

/** A buffer that is the whole of its (unshared) ArrayBuffer can be moved instead of copied. */
function whole(b: Uint8Array): ArrayBuffer[] {
  return b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && isArrayBuffer(b.buffer) ? [b.buffer] : [];
}

parentPort?.on('message', (job: CodecJob) => {
  handle(job).then(
    ({ reply, transfer }) => parentPort!.postMessage(reply, transfer),
    (err: unknown) =>
      parentPort!.postMessage({
        seq: job.seq,
        error: {
          message: err instanceof Error ? err.message : String(err),
          ...(isChunkFormatError(err) ? { kind: err.kind, objectId: err.objectId } : {}),
        },
      } satisfies CodecReply),
  );
});
