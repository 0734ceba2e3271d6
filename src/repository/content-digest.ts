/**
 * The content digest of a disk image's guest data (docs/nbd.md, "Pull into an image tree"): what a pulled image's
 * manifest entry records instead of the SHA-256 of the qcow2 file, because it is computed from the bytes as they are
 * read from the pull export (one pass), never by reading the written file again.
 *
 * Definition (version 1): the virtual disk is cut into chunks of CHUNK bytes at aligned offsets (the last one may be
 * shorter). A chunk whose bytes are all zero is recorded as 32 zero bytes; any other chunk as the SHA-256 of its
 * bytes. The digest is SHA-256 over "vmbackup-content-v1\0", the virtual size (8 bytes, big endian), the chunk size
 * (4 bytes, big endian) and the chunk records in order. The result is the same however the data arrives (split
 * into any pieces, holes sent or not, zeros sent as data or not), so the writer and a reader of the stored image
 * compute it alike.
 */
import { createHash } from 'node:crypto';
import type { Hash } from 'node:crypto';

export const CONTENT_DIGEST_CHUNK = 4 << 20;
const MAGIC = Buffer.from('vmbackup-content-v1\0', 'latin1');
const ZERO_RECORD = Buffer.alloc(32);
const ZEROS = Buffer.alloc(1 << 20);

export interface ContentDigestResult {
  /** hex SHA-256 of the chunk records */
  sha256: string;
  chunkSize: number;
  /** ceil(virtualSize / chunkSize) */
  chunks: number;
  /** chunks whose bytes are all zero */
  zeroChunks: number;
}

/** True when every byte of BUF is zero. */
export function isAllZero(buf: Buffer): boolean {
  let o = 0;
  // compare 1 MiB at a time against a zero buffer (memcmp), the tail byte by byte is not needed: equals() takes lengths
  while (o < buf.length) {
    const n = Math.min(ZEROS.length, buf.length - o);
    if (!buf.subarray(o, o + n).equals(n === ZEROS.length ? ZEROS : ZEROS.subarray(0, n))) return false;
    o += n;
  }
  return true;
}

/**
 * Computes the content digest from data handed in increasing offset order; whatever is never handed in reads as
 * zero. Memory: one chunk's hash state.
 */
export class ContentDigest {
  private readonly outer: Hash;
  private chunk = 0;
  private inner: Hash | undefined;
  /** absolute offset up to which the current chunk's bytes went into `inner` */
  private hashedTo = 0;
  /** nothing before this offset may be handed in any more */
  private cursor = 0;
  private zeroChunks = 0;
  private finished = false;

  constructor(
    readonly virtualSize: number,
    readonly chunkSize = CONTENT_DIGEST_CHUNK,
  ) {
    if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) throw new RangeError(`virtual size ${virtualSize}`);
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new RangeError(`chunk size ${chunkSize}`);
    this.outer = createHash('sha256').update(MAGIC);
    const head = Buffer.alloc(12);
    head.writeBigUInt64BE(BigInt(virtualSize), 0);
    head.writeUInt32BE(chunkSize, 8);
    this.outer.update(head);
  }

  /** How far the digest has been fed: the next data must start at or after this offset. */
  get offset(): number {
    return this.cursor;
  }

  /** The guest's bytes at OFFSET (at or after the end of what was handed in before). */
  update(offset: number, data: Buffer): void {
    if (this.finished) throw new Error('the content digest is finished');
    if (offset < this.cursor) throw new RangeError(`data at ${offset} after data up to ${this.cursor}`);
    if (offset + data.length > this.virtualSize) {
      throw new RangeError(`data at ${offset}..${offset + data.length} past the disk's end ${this.virtualSize}`);
    }
    let at = offset;
    while (at < offset + data.length) {
      const index = Math.floor(at / this.chunkSize);
      const chunkEnd = Math.min((index + 1) * this.chunkSize, this.virtualSize);
      const end = Math.min(chunkEnd, offset + data.length);
      const piece = data.subarray(at - offset, end - offset);
      this.advanceTo(index);
      if (!isAllZero(piece)) {
        if (!this.inner) {
          this.inner = createHash('sha256');
          this.hashedTo = index * this.chunkSize;
        }
        this.feedZeros(at - this.hashedTo);
        this.inner.update(piece);
        this.hashedTo = end;
      }
      at = end;
    }
    this.cursor = offset + data.length;
  }

  /** Marks everything before OFFSET as handed in (what was not reads as zero). */
  skipTo(offset: number): void {
    if (offset < this.cursor) throw new RangeError(`skip to ${offset} after data up to ${this.cursor}`);
    this.cursor = Math.min(offset, this.virtualSize);
  }

  digest(): ContentDigestResult {
    if (this.finished) throw new Error('the content digest is finished');
    const chunks = Math.ceil(this.virtualSize / this.chunkSize);
    this.advanceTo(chunks);
    this.finished = true;
    return { sha256: this.outer.digest('hex'), chunkSize: this.chunkSize, chunks, zeroChunks: this.zeroChunks };
  }

  /** Records every chunk before INDEX (the current one first). */
  private advanceTo(index: number): void {
    while (this.chunk < index) {
      if (this.inner) {
        const chunkEnd = Math.min((this.chunk + 1) * this.chunkSize, this.virtualSize);
        this.feedZeros(chunkEnd - this.hashedTo);
        this.outer.update(this.inner.digest());
        this.inner = undefined;
      } else {
        this.outer.update(ZERO_RECORD);
        this.zeroChunks++;
      }
      this.chunk++;
    }
  }

  private feedZeros(n: number): void {
    for (let left = n; left > 0; left -= ZEROS.length)
      this.inner!.update(ZEROS.subarray(0, Math.min(left, ZEROS.length)));
  }
}
