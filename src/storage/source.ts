/**
 * Reading a local source file for upload: sequential chunks (so SHA-256 can be computed in
 * order while streaming), with pacing and cancellation. Shared by every driver.
 */
import type { Hash } from 'node:crypto';
import { open, stat } from 'node:fs/promises';
import type { PutCheckpoint } from './contract';
import { errnoCode, StorageError } from './errors';

export interface ReadChunksOptions {
  start?: number;
  /** exclusive; defaults to the file size at open time */
  end?: number;
  chunkSize: number;
  signal?: AbortSignal;
  pace?: (bytes: number, signal?: AbortSignal) => Promise<void>;
}

/**
 * Yields consecutive chunks of exactly `chunkSize` bytes (the last may be shorter). The next
 * chunk is read while the caller works on the current one (hashing, sending), so disk reads
 * overlap with the rest of the pipeline.
 */
export async function* readChunks(path: string, opts: ReadChunksOptions): AsyncGenerator<Buffer> {
  const fh = await open(path, 'r');
  let pending: Promise<Buffer> | undefined;
  try {
    const end = opts.end ?? (await fh.stat()).size;
    let pos = opts.start ?? 0;
    const readAt = async (at: number, want: number): Promise<Buffer> => {
      if (opts.pace) await opts.pace(want, opts.signal);
      const buf = Buffer.allocUnsafe(want);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await fh.read(buf, got, want - got, at + got);
        if (bytesRead === 0) throw new Error(`${path} shrank while it was being read (expected ${end} bytes)`);
        got += bytesRead;
      }
      return buf;
    };
    const next = (): Promise<Buffer> | undefined => {
      if (pos >= end) return undefined;
      const want = Math.min(opts.chunkSize, end - pos);
      const p = readAt(pos, want);
      p.catch(() => undefined); // surfaced when awaited
      pos += want;
      return p;
    };
    pending = next();
    while (pending) {
      opts.signal?.throwIfAborted();
      const buf = await pending;
      pending = next();
      yield buf;
    }
  } finally {
    await pending?.catch(() => undefined);
    await fh.close();
  }
}

/** Feeds bytes [start, end) of `path` into `hash`. */
export async function hashRange(
  path: string,
  hash: Hash,
  start: number,
  end: number,
  signal?: AbortSignal,
): Promise<void> {
  for await (const chunk of readChunks(path, { start, end, chunkSize: 4 << 20, signal })) hash.update(chunk);
}

/** Digest of what was hashed so far without ending the running hash. */
export function prefixDigest(hash: Hash): string {
  return hash.copy().digest('hex');
}

/** Hex SHA-256 of a string in the manifest/metadata format. */
export const SHA256_RE = /^[0-9a-f]{64}$/;

/**
 * Resume point of a driver that writes a temp object then renames it (local, NFS): the temp name, the
 * bytes already durable in it, and the SHA-256 state of that prefix (re-checked before resuming).
 */
export interface TempFileCheckpoint {
  temp: string;
  offset: number;
  prefixSha256: string;
}

/** A checkpoint handed back by an activity, validated (never a path outside the target's directory). */
export function asTempFileCheckpoint(cp: PutCheckpoint | undefined): TempFileCheckpoint | undefined {
  if (!cp) return undefined;
  const { temp, offset, prefixSha256 } = cp as Partial<TempFileCheckpoint>;
  if (typeof temp !== 'string' || !temp.startsWith('.') || temp.includes('/')) return undefined;
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) return undefined;
  if (typeof prefixSha256 !== 'string') return undefined;
  return { temp, offset, prefixSha256 };
}

/** Size of the image to store; a missing or unreadable source is a 'not-found' StorageError. */
export async function sourceSize(sourcePath: string, key: string, driver: string): Promise<number> {
  try {
    return (await stat(sourcePath)).size;
  } catch (err) {
    throw new StorageError(
      'not-found',
      `Source image ${sourcePath} for ${key} cannot be read (${errnoCode(err) ?? 'error'}); check that it exists.`,
      { driver, cause: err },
    );
  }
}
