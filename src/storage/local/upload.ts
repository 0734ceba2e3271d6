/**
 * putImage's data path on a local directory: pwrite into the temp file, fdatasync at each checkpoint window.
 */
import type { Hash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import type { PutImageOptions } from '../contract';
import { prefixDigest } from '../source';
import type { ImageUpload } from '../tree/port';

/**
 * One read or write. Small on purpose: the chunk read into a buffer is still in the CPU cache when it is
 * hashed and when the kernel copies it into the page cache. With 8 MiB chunks (32 MiB of buffers) every
 * pass went to memory and the copy spent about twice the kernel time (1 GiB: 2.7 s sys vs 1.2 s).
 */
export const CHUNK = 1 << 20;
/** Buffers reused for the whole copy: one being written and hashed, the others already being read ahead. */
const RING = 3;

/** fdatasync + checkpoint after this many bytes or this long, whichever comes first. */
export interface CheckpointWindow {
  bytes: number;
  ms: number;
}

export class LocalUpload implements ImageUpload {
  constructor(
    private readonly fh: FileHandle,
    private readonly window: CheckpointWindow,
  ) {}

  /**
   * Copies [start, size) of the source into `fh` at the same offsets, feeding `hash` on the way. Reads run
   * ahead into a small ring of reused buffers while the current chunk is written (one write in flight, so
   * the file grows in order) and hashed on this thread meanwhile. Every checkpoint window the written prefix
   * is fdatasync'ed in the background and reported through `checkpoint` once it is durable.
   */
  async copy(
    sourcePath: string,
    start: number,
    size: number,
    hash: Hash,
    opts: PutImageOptions,
    checkpoint: (offset: number, prefixSha256: string) => void,
  ): Promise<void> {
    const fh = this.fh;
    const { signal, pace } = opts;
    const src = await open(sourcePath, 'r');
    const reads: Array<Promise<{ view: Buffer; buf: Buffer }>> = [];
    const free: Buffer[] = Array.from({ length: RING }, () =>
      Buffer.allocUnsafeSlow(Math.min(CHUNK, Math.max(size - start, 1))),
    );
    let readPos = start;
    let stopped = false;
    const readInto = async (buf: Buffer, at: number, want: number): Promise<{ view: Buffer; buf: Buffer }> => {
      if (pace) await pace(want, signal);
      if (stopped) throw new Error('copy stopped');
      let got = 0;
      while (got < want) {
        const { bytesRead } = await src.read(buf, got, want - got, at + got);
        if (bytesRead === 0) throw new Error(`${sourcePath} shrank while it was being copied (expected ${size} bytes)`);
        got += bytesRead;
      }
      return { view: buf.subarray(0, want), buf };
    };
    const readAhead = (): void => {
      while (!stopped && free.length > 0 && readPos < size) {
        const want = Math.min(CHUNK, size - readPos);
        const p = readInto(free.pop() as Buffer, readPos, want);
        p.catch(() => undefined); // surfaced when awaited
        reads.push(p);
        readPos += want;
      }
    };
    let writing: Promise<void> | undefined;
    // the fdatasync of one window runs while the next is written; its checkpoint is emitted once it is durable
    let syncing: { done: Promise<void>; offset: number; prefixSha256: string } | undefined;
    const settle = async (): Promise<void> => {
      if (!syncing) return;
      const s = syncing;
      syncing = undefined;
      await s.done;
      checkpoint(s.offset, s.prefixSha256);
    };
    let offset = start;
    let windowStart = start;
    let windowSince = Date.now();
    try {
      readAhead();
      while (reads.length > 0) {
        signal?.throwIfAborted();
        const { view, buf } = await (reads.shift() as Promise<{ view: Buffer; buf: Buffer }>);
        await writing; // one write in flight at a time
        const at = offset;
        writing = writeFully(fh, view, at).then(() => {
          free.push(buf);
          readAhead();
          opts.onProgress?.(at + view.length, size);
        });
        writing.catch(() => undefined); // awaited above or below
        hash.update(view); // on this thread while the write runs on the thread pool
        offset += view.length;
        const due = offset - windowStart >= this.window.bytes || Date.now() - windowSince >= this.window.ms;
        if (due && offset < size) {
          await writing;
          await settle();
          const done = fh.datasync();
          done.catch(() => undefined); // awaited in settle
          syncing = { done, offset, prefixSha256: prefixDigest(hash) };
          windowStart = offset;
          windowSince = Date.now();
        }
      }
      await writing;
      await settle();
    } finally {
      stopped = true;
      // nothing may still use fh when the caller closes or removes the temp file; reads still waiting for
      // their pace (a bandwidth limit) are not waited for, the source is closed once they are done
      await Promise.allSettled([writing, syncing?.done]);
      void Promise.allSettled(reads).then(() => src.close().catch(() => undefined));
    }
  }

  async finish(): Promise<void> {
    try {
      await this.fh.sync();
    } finally {
      await this.fh.close();
    }
  }

  async abandon(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }
}

/** pwrite until the kernel took every byte (a regular file may take less than asked, e.g. near ENOSPC). */
async function writeFully(fh: FileHandle, data: Buffer, at: number): Promise<void> {
  let written = 0;
  while (written < data.length) {
    const { bytesWritten } = await fh.write(data, written, data.length - written, at + written);
    written += bytesWritten;
  }
}
