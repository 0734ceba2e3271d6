/**
 * Stored objects as local files: a download that hashes every byte while it writes and leaves all-zero blocks as
 * holes (a sparse disk image stays sparse), and the check that a file is exactly the object its manifest describes.
 * Used by restore (the links of a chain, a streamed full), verify (qemu-img check of a remote image) and copy.
 */
import { createHash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { addAbortSignal, type Readable } from 'node:stream';
import { sha256File } from '../shared/sha256-file';

/** Holes are made per filesystem block: a block of only zeros is skipped (left unallocated), like `cp --sparse`. */
const BLOCK = 4096;
const ZEROS = Buffer.alloc(BLOCK);

export interface WrittenFile {
  sha256: string;
  bytes: number;
}

/**
 * Writes `source` to a NEW file `path` (created 0600, refused when it exists), hashing every byte, skipping
 * all-zero blocks so they stay holes, and ending with ftruncate and fsync. The caller removes the file when this
 * throws. `signal` destroys the source and stops the copy.
 */
export async function writeSparseFile(
  source: Readable,
  path: string,
  opts: { signal?: AbortSignal; onBytes?: (bytesDone: number) => void } = {},
): Promise<WrittenFile> {
  let fh: FileHandle;
  try {
    fh = await open(path, 'wx', 0o600);
  } catch (err) {
    source.destroy();
    throw err;
  }
  if (opts.signal) addAbortSignal(opts.signal, source);
  const hash = createHash('sha256');
  let position = 0;
  // one write in flight while the next chunk is hashed: disk and CPU work at the same time
  let writing: Promise<void> = Promise.resolve();
  try {
    for await (const chunk of source as AsyncIterable<Buffer>) {
      hash.update(chunk);
      await writing;
      writing = writeNonZero(fh, chunk, position);
      writing.catch(() => undefined); // surfaced when awaited
      position += chunk.length;
      opts.onBytes?.(position);
    }
    await writing;
    opts.signal?.throwIfAborted();
    await fh.truncate(position);
    await fh.sync();
  } finally {
    source.destroy();
    await writing.catch(() => undefined); // never close the handle under a write
    await fh.close();
  }
  return { sha256: hash.digest('hex'), bytes: position };
}

/** Writes the blocks of `chunk` (at file offset `at`) that are not all zero, adjacent ones in one write. */
async function writeNonZero(fh: FileHandle, chunk: Buffer, at: number): Promise<void> {
  let runStart = -1;
  let i = 0;
  while (i < chunk.length) {
    // block boundaries are aligned to the file, not to the chunk
    const end = Math.min(chunk.length, i + BLOCK - ((at + i) % BLOCK));
    const zero = chunk.subarray(i, end).equals(ZEROS.subarray(0, end - i));
    if (!zero && runStart < 0) runStart = i;
    if (zero && runStart >= 0) {
      await writeAll(fh, chunk.subarray(runStart, i), at + runStart);
      runStart = -1;
    }
    i = end;
  }
  if (runStart >= 0) await writeAll(fh, chunk.subarray(runStart), at + runStart);
}

async function writeAll(fh: FileHandle, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

/** Size and SHA-256 of a local file (a local target's object read in place), from the same read. */
export async function hashFile(
  path: string,
  opts: { signal?: AbortSignal; onBytes?: (bytesDone: number) => void } = {},
): Promise<WrittenFile> {
  let bytes = 0;
  const sha256 = await sha256File(path, {
    signal: opts.signal,
    onProgress: (done) => {
      bytes = done;
      opts.onBytes?.(done);
    },
  });
  return { sha256, bytes };
}
