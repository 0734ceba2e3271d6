/**
 * vmbackup's own single-pass copy of a quiet base image. The base is read once, in large chunks; every
 * chunk is written to the destination (all-zero blocks are skipped and end up as holes, as with
 * `cp --sparse=always`) and fed to one SHA-256, which is therefore the digest of the copy. Reads run
 * ahead of and writes behind the hashing (libuv thread pool vs. this thread), so the disk and the CPU
 * work at the same time.
 *
 * Resume: the destination is fdatasync'ed every few hundred MiB or seconds (a checkpoint: what a host
 * crash can lose is bounded). A later attempt never trusts a partial destination: it reads it back next
 * to the base, folds the matching prefix into the hash, truncates at the first block that differs and
 * copies the rest. A destination longer than the base is not a copy of it and is started over.
 */
import { createHash } from 'node:crypto';
import type { Hash } from 'node:crypto';
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';

/** Hole granularity: the file system block (cp --sparse=always looks at blocks too). */
export const COPY_BLOCK = 4096;

export interface SinglePassCopyRequest {
  source: string;
  dest: string;
  signal: AbortSignal;
  /** bytes of the source done so far: compared with the partial destination ('verify') or copied ('copy') */
  onProgress(bytesDone: number, phase: 'verify' | 'copy'): void;
  /** the first `bytes` of the destination are on disk (fdatasync) */
  onCheckpoint?(bytes: number): void;
  /**
   * Byte ranges of the source that are holes (no data, read as zeros: SEEK_HOLE, `qemu-img map`). They
   * are hashed as zeros without being read and stay holes in the copy. May arrive while the copy runs
   * (it does not wait for them); without them every byte is read, and all-zero blocks still become holes.
   */
  holes?: Array<[number, number]> | Promise<Array<[number, number]> | undefined>;
  /** read/write size; default 1 MiB */
  chunkSize?: number;
  /** fdatasync the destination after this many bytes (default 512 MiB) ... */
  checkpointBytes?: number;
  /** ... or after this long (default 10 s), whichever comes first */
  checkpointMs?: number;
}

export interface SinglePassCopyOutcome {
  size: number;
  /** bytes of a partial destination found equal to the base and kept (0: copied from the start) */
  resumedFrom: number;
  /** bytes of the base this attempt read and wrote (holes included) */
  bytesCopied: number;
  /** SHA-256 of the whole copy (hex) */
  sha256: string;
}

/**
 * 1 MiB: the chunk the kernel copies into is still in the CPU cache when it is hashed and copied out
 * again; with 8 MiB chunks the same copy took about twice the system time and waited on writes.
 */
const CHUNK = 1 << 20;
/** bytes of reads in flight ahead of the chunk being hashed, and of writes in flight behind it */
const READ_AHEAD_BYTES = 16 << 20;
const WRITE_BEHIND_BYTES = 8 << 20;
/** a hole is hashed in pieces of this size, yielding to the event loop between them */
const HOLE_PIECE = 8 << 20;
/** hole pieces queued beside the reads, so the reads after a hole start while it is hashed */
const HOLES_AHEAD = 4;
/** read size when a partial copy is compared with the base */
const VERIFY_CHUNK = 8 << 20;
/** a smaller hole is read like data (its zero blocks still become holes in the copy) */
const MIN_HOLE = 1 << 20;
const CHECKPOINT_BYTES = 512 << 20;
const CHECKPOINT_MS = 10_000;
const PROGRESS_MS = 200;

/** Destinations being copied by this process: a retry must not write beside an attempt that has not stopped yet. */
const busy = new Set<string>();

const noop = (): void => undefined;

export async function singlePassCopy(req: SinglePassCopyRequest): Promise<SinglePassCopyOutcome> {
  req.signal.throwIfAborted();
  if (busy.has(req.dest)) {
    // retryable: the earlier attempt stops at its next chunk once it sees its cancellation
    throw new Error(`an earlier attempt is still copying to ${req.dest}`);
  }
  busy.add(req.dest);
  let src: FileHandle | undefined;
  let dst: FileHandle | undefined;
  try {
    src = await open(req.source, 'r');
    const { size, mode } = await src.stat();
    dst = await open(req.dest, constants.O_RDWR | constants.O_CREAT, mode & 0o666);
    const chunk = req.chunkSize ?? CHUNK;
    const progress = throttled(req.onProgress);
    const hash = createHash('sha256');

    const resumedFrom = await verifiedPrefix(req, src, dst, size, hash, progress);
    await dst.truncate(resumedFrom); // nothing past it may stay: skipped zero blocks must read as holes
    progress.now(resumedFrom, 'copy');
    await copyRange(req, src, dst, resumedFrom, size, chunk, hash, progress);
    await dst.truncate(size); // a trailing run of zeros was skipped: the size makes it a hole
    await dst.sync();
    await syncDir(dirname(req.dest));
    progress.now(size, 'copy');
    return { size, resumedFrom, bytesCopied: size - resumedFrom, sha256: hash.digest('hex') };
  } finally {
    await dst?.close().catch(noop);
    await src?.close().catch(noop);
    busy.delete(req.dest);
  }
}

/**
 * Compares an existing destination with the base, chunk by chunk; the matching prefix goes into `hash`.
 * Returns its length: where the copy continues.
 */
async function verifiedPrefix(
  req: SinglePassCopyRequest,
  src: FileHandle,
  dst: FileHandle,
  size: number,
  hash: Hash,
  progress: Progress,
): Promise<number> {
  const have = (await dst.stat()).size;
  if (have === 0 || have > size) return 0; // empty, or not a prefix of this base
  const base = Buffer.allocUnsafe(VERIFY_CHUNK);
  const copy = Buffer.allocUnsafe(VERIFY_CHUNK);
  let pos = 0;
  while (pos < have) {
    const len = Math.min(VERIFY_CHUNK, have - pos);
    await Promise.all([readExactly(src, req.source, base, len, pos), readExactly(dst, req.dest, copy, len, pos)]);
    const same = matchingPrefix(base, copy, len);
    hash.update(base.subarray(0, same));
    pos += same;
    progress(pos, 'verify');
    if (same < len) break;
    req.signal.throwIfAborted();
  }
  return pos;
}

interface Pending {
  pos: number;
  end: number;
  /** undefined: a hole of the source, nothing to read or write */
  buf?: Buffer;
  done: Promise<void>;
}

const settled = Promise.resolve();

/** The copy loop: [from, size) of the base into the destination and the hash. */
async function copyRange(
  req: SinglePassCopyRequest,
  src: FileHandle,
  dst: FileHandle,
  from: number,
  size: number,
  chunk: number,
  hash: Hash,
  progress: Progress,
): Promise<void> {
  const checkpointBytes = req.checkpointBytes ?? CHECKPOINT_BYTES;
  const checkpointMs = req.checkpointMs ?? CHECKPOINT_MS;
  const readAhead = Math.max(2, Math.floor(READ_AHEAD_BYTES / chunk));
  const writeBehind = Math.max(2, Math.floor(WRITE_BEHIND_BYTES / chunk));
  const free: Buffer[] = Array.from({ length: readAhead + writeBehind }, () => Buffer.allocUnsafe(chunk));
  const pieces = new SourcePieces(size, chunk);
  if (Array.isArray(req.holes)) pieces.addHoles(req.holes);
  else void req.holes?.then((holes) => holes && pieces.addHoles(holes), noop);
  const reads: Pending[] = [];
  const writes: Pending[] = [];
  let next = from;
  let sync: Promise<void> | undefined;
  let lastCheckpoint = from;
  let lastCheckpointAt = Date.now();

  const readMore = () => {
    while (next < size && reads.length < readAhead + HOLES_AHEAD) {
      const { end, hole } = pieces.from(next);
      if (hole) {
        reads.push({ pos: next, end, done: settled });
        next = end;
        continue;
      }
      if (reads.filter((r) => r.buf).length >= readAhead) return;
      const buf = free.pop();
      if (!buf) return;
      const pos = next;
      next = end;
      const done = readExactly(src, req.source, buf, end - pos, pos);
      done.catch(noop); // awaited in order below; this only keeps an early failure from being "unhandled"
      reads.push({ buf, pos, end, done });
    }
  };
  const retireWrite = async () => {
    const w = writes.shift();
    if (!w) return;
    await w.done;
    if (w.buf) free.push(w.buf);
  };

  try {
    readMore();
    for (let c = reads.shift(); c; c = reads.shift()) {
      await c.done;
      const len = c.end - c.pos;
      if (c.buf) {
        const done = writeData(dst, c.buf, len, c.pos);
        done.catch(noop);
        writes.push({ ...c, done });
        while (writes.length > writeBehind) await retireWrite();
        readMore();
        hash.update(c.buf.subarray(0, len)); // while the write and the next reads are in flight
      } else {
        readMore();
        hash.update(zeroes(len).subarray(0, len)); // a hole reads as zeros; the copy gets the same hole
        // no I/O to wait for here: let heartbeats and a cancellation in during a long hole
        await new Promise<void>((r) => setImmediate(r));
      }
      progress(c.end, 'copy');
      req.signal.throwIfAborted();

      const now = Date.now();
      if (c.end < size && (c.end - lastCheckpoint >= checkpointBytes || now - lastCheckpointAt >= checkpointMs)) {
        if (sync) await sync; // one fdatasync at a time: a slow disk slows the copy down
        while (writes.length > 0) await retireWrite(); // a checkpoint covers only finished writes
        const upTo = c.end;
        sync = dst.datasync().then(() => req.onCheckpoint?.(upTo));
        sync.catch(noop);
        lastCheckpoint = upTo;
        lastCheckpointAt = now;
      }
    }
    while (writes.length > 0) await retireWrite();
    if (sync) await sync;
  } finally {
    // never close a file under a read or write in flight
    await Promise.allSettled([...reads.map((r) => r.done), ...writes.map((w) => w.done), sync]);
  }
}

/**
 * Cuts the source into the pieces the copy loop works on, front to back: holes of at least `minHole`
 * (nothing read, nothing written), hashed in pieces of `holePiece`, and data pieces of at most `chunk`
 * bytes that stop where a hole starts. Holes can be added while the walk is under way.
 */
export class SourcePieces {
  private holes: Array<[number, number]> = [];
  private i = 0;

  constructor(
    private readonly size: number,
    private readonly chunk: number,
    private readonly holePiece = HOLE_PIECE,
    private readonly minHole = MIN_HOLE,
  ) {}

  addHoles(holes: Array<[number, number]>): void {
    const big = holes
      .map(([a, b]): [number, number] => [a, Math.min(b, this.size)])
      .filter(([a, b]) => b - a >= this.minHole);
    this.holes = [...this.holes, ...big].sort((x, y) => x[0] - y[0]);
    this.i = 0;
  }

  /** The piece that starts at `pos` (never before the previous one's start). */
  from(pos: number): { end: number; hole: boolean } {
    while (this.i < this.holes.length && this.holes[this.i]![1] <= pos) this.i++;
    const h = this.holes[this.i];
    if (h && h[0] <= pos) return { end: Math.min(h[1], pos + this.holePiece), hole: true };
    return { end: Math.min(this.size, pos + this.chunk, h ? h[0] : this.size), hole: false };
  }
}

/** Writes the blocks of `buf[0, len)` that hold data at `pos`; all-zero blocks are left to be holes. */
async function writeData(fh: FileHandle, buf: Buffer, len: number, pos: number): Promise<void> {
  for (const [start, end] of dataRuns(buf, len)) {
    let off = start;
    while (off < end) {
      const { bytesWritten } = await fh.write(buf, off, end - off, pos + off);
      off += bytesWritten;
    }
  }
}

async function readExactly(fh: FileHandle, path: string, buf: Buffer, len: number, pos: number): Promise<void> {
  let got = 0;
  while (got < len) {
    const { bytesRead } = await fh.read(buf, got, len - got, pos + got);
    if (bytesRead === 0) throw new Error(`${path} ended at byte ${pos + got} while being copied: it changed meanwhile`);
    got += bytesRead;
  }
}

/** fsync of a directory, so the new file's entry survives a host crash too. */
async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * `[start, end)` ranges of `buf[0, len)` that hold a non-zero byte, whole `block`s at a time, adjacent
 * blocks merged into one range (one write each).
 */
export function dataRuns(buf: Buffer, len: number, block = COPY_BLOCK): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  // a chunk read from a hole: one memcmp instead of one per block
  if (buf[0] === 0 && buf.compare(zeroes(len), 0, len, 0, len) === 0) return runs;
  const zeros = zeroes(block);
  let start = -1;
  for (let off = 0; off < len; off += block) {
    const end = Math.min(off + block, len);
    // a non-zero first or last byte settles most data blocks without a call into C++
    const zero = buf[off] === 0 && buf[end - 1] === 0 && buf.compare(zeros, 0, end - off, off, end) === 0;
    if (!zero && start < 0) start = off;
    if (zero && start >= 0) {
      runs.push([start, off]);
      start = -1;
    }
  }
  if (start >= 0) runs.push([start, len]);
  return runs;
}

/** Length of the common prefix of `a[0, len)` and `b[0, len)`: all of `len`, or whole blocks up to the first difference. */
export function matchingPrefix(a: Buffer, b: Buffer, len: number, block = COPY_BLOCK): number {
  if (a.compare(b, 0, len, 0, len) === 0) return len;
  let off = 0;
  while (off + block <= len && a.compare(b, off, off + block, off, off + block) === 0) off += block;
  return off;
}

let zeroCache: Buffer | undefined;
/** `len` or more zero bytes, allocated once per size class */
function zeroes(len: number): Buffer {
  if (!zeroCache || zeroCache.length < len) zeroCache = Buffer.alloc(len);
  return zeroCache;
}

type Progress = ((bytes: number, phase: 'verify' | 'copy') => void) & {
  now(bytes: number, phase: 'verify' | 'copy'): void;
};

/** At most one progress report every PROGRESS_MS (each becomes a heartbeat), and every one asked for with now(). */
function throttled(report: SinglePassCopyRequest['onProgress']): Progress {
  let last = 0;
  const now = (bytes: number, phase: 'verify' | 'copy') => {
    last = Date.now();
    report(bytes, phase);
  };
  const progress = (bytes: number, phase: 'verify' | 'copy') => {
    if (Date.now() - last >= PROGRESS_MS) now(bytes, phase);
  };
  return Object.assign(progress, { now });
}
