/**
 * The per-disk index (docs/chunk-format.md, "Disk index"): for each aligned chunk of the disk, in offset order,
 * `zero` or the id of the stored chunk. Binary, 33 bytes per chunk, stored as an envelope object of type index.
 */
import { MAX_CHUNK_SIZE, MIN_CHUNK_SIZE } from './config';
import { MAX_INDEX_ENTRIES } from './codec';
import { ChunkFormatError } from './errors';

/** `zero`: the chunk is all zero bytes and not stored. */
export type IndexEntry = string | 'zero';

export interface DiskIndex {
  chunkSize: number;
  /** the disk's virtual size in bytes */
  virtualSize: number;
  /** entry i covers [i * chunkSize, min((i + 1) * chunkSize, virtualSize)) */
  entries: IndexEntry[];
}

const MAGIC = Buffer.from('VMBI');
const VERSION = 1;
const HEADER = 4 + 1 + 4 + 8 + 4;

export function entryCount(virtualSize: number, chunkSize: number): number {
  return Math.ceil(virtualSize / chunkSize);
}

/** Byte range of entry `i`. */
export function entryRange(index: DiskIndex, i: number): { offset: number; length: number } {
  const offset = i * index.chunkSize;
  return { offset, length: Math.min(index.chunkSize, index.virtualSize - offset) };
}

function invalid(why: string): ChunkFormatError {
  return new ChunkFormatError('corrupt', `A disk index is not valid (${why}).`);
}

function checkShape(index: DiskIndex): void {
  if (!Number.isSafeInteger(index.virtualSize) || index.virtualSize < 0) throw invalid('bad virtual size');
  if (!Number.isInteger(index.chunkSize) || index.chunkSize < MIN_CHUNK_SIZE || index.chunkSize > MAX_CHUNK_SIZE)
    throw invalid('bad chunk size');
  const count = entryCount(index.virtualSize, index.chunkSize);
  if (count > MAX_INDEX_ENTRIES) throw invalid(`more than ${MAX_INDEX_ENTRIES} chunks`);
  if (index.entries.length !== count) throw invalid(`${index.entries.length} entries for ${count} chunks`);
}

export function encodeDiskIndex(index: DiskIndex): Buffer {
  checkShape(index);
  const nonZero = index.entries.filter((e) => e !== 'zero').length;
  const out = Buffer.alloc(HEADER + index.entries.length + 32 * nonZero);
  MAGIC.copy(out, 0);
  out.writeUInt8(VERSION, 4);
  out.writeUInt32BE(index.chunkSize, 5);
  out.writeBigUInt64BE(BigInt(index.virtualSize), 9);
  out.writeUInt32BE(index.entries.length, 17);
  let pos = HEADER;
  for (const e of index.entries) {
    if (e === 'zero') {
      out[pos++] = 0;
      continue;
    }
    if (!/^[0-9a-f]{64}$/.test(e)) throw invalid(`${JSON.stringify(e)} is not a chunk id`);
    out[pos++] = 1;
    pos += out.write(e, pos, 'hex');
  }
  return out;
}

export function decodeDiskIndex(body: Buffer): DiskIndex {
  if (body.length < HEADER || !body.subarray(0, 4).equals(MAGIC)) throw invalid('no header');
  if (body[4] !== VERSION) throw invalid(`unknown version ${body[4]}`);
  const chunkSize = body.readUInt32BE(5);
  const big = body.readBigUInt64BE(9);
  if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid('bad virtual size');
  const virtualSize = Number(big);
  const count = body.readUInt32BE(17);
  const index: DiskIndex = { chunkSize, virtualSize, entries: [] };
  // count is checked against the size and against the bytes present before anything is allocated for it
  if (chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE) throw invalid('bad chunk size');
  if (count !== entryCount(virtualSize, chunkSize) || count > MAX_INDEX_ENTRIES) throw invalid('bad entry count');
  if (body.length < HEADER + count) throw invalid('truncated');
  let pos = HEADER;
  for (let i = 0; i < count; i++) {
    const tag = body[pos++];
    if (tag === 0) index.entries.push('zero');
    else if (tag === 1) {
      if (pos + 32 > body.length) throw invalid('truncated');
      index.entries.push(body.toString('hex', pos, pos + 32));
      pos += 32;
    } else throw invalid(`bad entry tag ${tag}`);
  }
  if (pos !== body.length) throw invalid('trailing bytes');
  checkShape(index);
  return index;
}
