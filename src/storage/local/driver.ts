/**
 * Local directory target (file:///abs/dir). Also the right driver for a directory that is an
 * NFS mount on another host: it never relies on O_EXCL alone, uses unique temp names, and
 * fsyncs before every rename (restic's local.Save: temp in the same dir, fsync, rename,
 * fsync the directory).
 */
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import type { Readable } from 'node:stream';
import type {
  GetBufferOptions,
  ObjectInfo,
  PutImageOptions,
  PutImageResult,
  StorageTarget,
  TargetCapabilities,
} from '../contract';
import { StorageError, adviceFor, errnoCode, isAbortError, tooLargeError } from '../errors';
import { normaliseKey } from '../keys';
import { tempName, type Sidecar } from '../sidecar';
import { PRIVATE_FILE_MODE } from '../../shared/file-modes';
import { fileStamp } from '../../shared/file-stamp';
import { sha256File } from '../../shared/sha256-file';
import { asTempFileCheckpoint, hashRange, prefixDigest, sourceSize } from '../source';
import type { TempFileCheckpoint } from '../source';
import { fsyncDir } from '../../shared/fsync';
import { AtomicTree } from '../tree/atomic-tree';
import { LOCAL_DRIVER, LocalFileTree } from './tree';

const DRIVER = LOCAL_DRIVER;
/**
 * One read or write. Small on purpose: the chunk read into a buffer is still in the CPU cache when it is
 * hashed and when the kernel copies it into the page cache. With 8 MiB chunks (32 MiB of buffers) every
 * pass went to memory and the copy spent about twice the kernel time (1 GiB: 2.7 s sys vs 1.2 s).
 */
const CHUNK = 1 << 20;
/** Buffers reused for the whole copy: one being written and hashed, the others already being read ahead. */
const RING = 3;
/**
 * fdatasync + checkpoint after this many bytes or this long, whichever comes first. The trade-off: a
 * crash re-copies at most one window (about a second at local-disk speed, 10 s on a slow one), and in
 * exchange the copy pays one journal commit per 512 MiB instead of one per 64 MiB and keeps streaming;
 * each fdatasync runs in the background while the next window is copied, so the disk writes back
 * during the copy rather than all at the final fsync.
 */
const CHECKPOINT_BYTES = 512 << 20;
const CHECKPOINT_MS = 10_000;

export interface LocalTargetOptions {
  /** checkpoint window in bytes (tests shrink it so a resume needs only a small image) */
  checkpointBytes?: number;
  /** checkpoint window in milliseconds */
  checkpointMs?: number;
}

async function unlinkQuietly(path: string): Promise<void> {
  await unlink(path).catch(() => undefined);
}

export class LocalTarget implements StorageTarget {
  readonly capabilities: TargetCapabilities;
  private readonly checkpointBytes: number;
  private readonly checkpointMs: number;
  private readonly fs: LocalFileTree;
  private readonly tree: AtomicTree;

  constructor(
    private readonly root: string,
    readonly displayUrl: string,
    options: LocalTargetOptions = {},
  ) {
    this.checkpointBytes = options.checkpointBytes ?? CHECKPOINT_BYTES;
    this.checkpointMs = options.checkpointMs ?? CHECKPOINT_MS;
    this.fs = new LocalFileTree(root, displayUrl);
    this.tree = new AtomicTree(this.fs);
    // multipart: a copy resumes from its durable prefix after a crash
    this.capabilities = { atomicReplace: true, multipart: true, rangeReads: true, localPath: root };
  }

  private error(err: unknown, what: string, fallback: 'failed' | 'not-found' = 'failed'): StorageError {
    return this.fs.classify(err, what, fallback);
  }

  private path(key: string): string {
    return join(this.root, normaliseKey(key));
  }

  private confine(dir: string, key: string): Promise<void> {
    return this.fs.confine(dir, key);
  }

  /** Opens an object for reading: never through a link (final name or a directory), never waiting on a FIFO. */
  private async openObject(key: string): Promise<FileHandle> {
    const path = this.path(key);
    await this.confine(dirname(path), key);
    let fh: FileHandle;
    try {
      fh = await open(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK);
    } catch (err) {
      if (errnoCode(err) === 'ELOOP') {
        throw new StorageError(
          'invalid-key',
          `Object ${key} on ${this.displayUrl} is a symbolic link; vmbackup never follows links inside a target, remove the link.`,
          { driver: DRIVER, cause: err },
        );
      }
      throw this.missing(err, key);
    }
    const st = await fh.stat().catch(async (err: unknown) => {
      await fh.close();
      throw this.error(err, `read ${key}`);
    });
    if (!st.isFile()) {
      await fh.close();
      throw new StorageError('not-found', `Object ${key} on ${this.displayUrl} is not a regular file.`, {
        driver: DRIVER,
      });
    }
    return fh;
  }

  async putImage(key: string, sourcePath: string, opts: PutImageOptions = {}): Promise<PutImageResult> {
    const final = this.path(key);
    const dir = dirname(final);
    const name = basename(final);
    const expected = opts.metadata?.sha256;
    const size = await sourceSize(sourcePath, key, DRIVER);
    await this.mkdirs(dir, `create the directory for ${key}`);

    if (opts.allowMove) {
      const moved = await this.tryMove(key, sourcePath, final, size, opts);
      if (moved) return moved;
    }

    let temp: string | undefined;
    let fh: FileHandle | undefined;
    try {
      let offset = 0;
      let hash: Hash = createHash('sha256');
      const resume = asTempFileCheckpoint(opts.resume);
      if (resume && resume.offset <= size) {
        const resumed = await this.openResumed(join(dir, resume.temp), resume, opts.signal);
        if (resumed) {
          ({ fh, hash } = resumed);
          offset = resume.offset;
          temp = join(dir, resume.temp);
        }
      }
      if (!fh) {
        await this.tree.removeStaleTemps(this.dirKeyOf(dir), name);
        temp = join(dir, tempName(name, randomBytes(8).toString('hex')));
        // 'wx' plus a random name: unique even where O_EXCL is unreliable (old NFS); open's mode is less the umask
        fh = await open(temp, 'wx', PRIVATE_FILE_MODE);
        await fh.chmod(PRIVATE_FILE_MODE);
      }
      const tempPath = temp as string;
      const startOffset = offset;
      opts.onProgress?.(offset, size);
      await this.copyInto(fh, sourcePath, offset, size, hash, opts, (checkpoint) =>
        opts.onCheckpoint?.({ temp: basename(tempPath), ...checkpoint } satisfies TempFileCheckpoint),
      );
      await fh.sync();
      await fh.close();
      fh = undefined;
      const sha256 = hash.digest('hex');
      if (expected && expected !== sha256) {
        await unlinkQuietly(tempPath);
        throw new StorageError(
          'checksum',
          `Copying ${sourcePath} to ${key} on ${this.displayUrl} produced SHA-256 ${sha256} but ${expected} was expected; the source changed or is corrupt, run the backup again.`,
          { driver: DRIVER },
        );
      }
      await this.writeSidecar(dir, name, { size, sha256, metadata: { ...opts.metadata, sha256 } });
      await rename(tempPath, final);
      await fsyncDir(dir);
      return { key: normaliseKey(key), size, sha256, bytesSent: size - startOffset };
    } catch (err) {
      if (fh) await fh.close().catch(() => undefined);
      const aborted = opts.signal?.aborted || isAbortError(err);
      const classified = aborted ? undefined : this.error(err, `write ${key}`);
      // keep the temp file only when a retry can resume from it
      if (temp && (aborted || classified?.permanent)) await unlinkQuietly(temp);
      if (aborted) throw opts.signal?.reason ?? err;
      throw classified;
    }
  }

  /**
   * Copies [start, size) of the source into `fh` at the same offsets, feeding `hash` on the way. Reads run
   * ahead into a small ring of reused buffers while the current chunk is written (one write in flight, so
   * the file grows in order) and hashed on this thread meanwhile. Every checkpoint window the written prefix
   * is fdatasync'ed in the background and reported through `checkpoint` once it is durable.
   */
  private async copyInto(
    fh: FileHandle,
    sourcePath: string,
    start: number,
    size: number,
    hash: Hash,
    opts: PutImageOptions,
    checkpoint: (cp: Omit<TempFileCheckpoint, 'temp'>) => void,
  ): Promise<void> {
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
      checkpoint({ offset: s.offset, prefixSha256: s.prefixSha256 });
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
        const due = offset - windowStart >= this.checkpointBytes || Date.now() - windowSince >= this.checkpointMs;
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

  /** Rename the source into place when it lives on the target's filesystem; undefined when it does not. */
  private async tryMove(
    key: string,
    sourcePath: string,
    final: string,
    size: number,
    opts: PutImageOptions,
  ): Promise<PutImageResult | undefined> {
    const dir = dirname(final);
    const [src, dst] = await Promise.all([stat(sourcePath), stat(dir)]);
    if (src.dev !== dst.dev) return undefined;
    const expected = opts.metadata?.sha256;
    // The digest was taken by the caller on this very file (same inode, size and mtime): a rename does not
    // change a byte, so reading the whole image again would only cost time.
    const trusted = expected !== undefined && opts.sourceStamp !== undefined && opts.sourceStamp === fileStamp(src);
    const sha256 = trusted ? expected : await sha256File(sourcePath, { signal: opts.signal });
    opts.onProgress?.(size, size);
    if (expected && expected !== sha256) {
      throw new StorageError(
        'checksum',
        `Image ${sourcePath} for ${key} on ${this.displayUrl} has SHA-256 ${sha256} but ${expected} was expected; the image changed or is corrupt, run the backup again.`,
        { driver: DRIVER },
      );
    }
    try {
      const fh = await open(sourcePath, 'r+');
      try {
        // the staged file keeps its inode: whoever wrote it (QEMU, qemu-img, rsync) chose its mode
        await fh.chmod(PRIVATE_FILE_MODE);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await this.writeSidecar(dir, basename(final), { size, sha256, metadata: { ...opts.metadata, sha256 } });
      await rename(sourcePath, final);
    } catch (err) {
      if (errnoCode(err) === 'EXDEV') return undefined;
      throw this.error(err, `move ${sourcePath} to ${key}`);
    }
    await fsyncDir(dir);
    await fsyncDir(dirname(sourcePath)).catch(() => undefined);
    return { key: normaliseKey(key), size, sha256, bytesSent: 0 };
  }

  /** Reopen a temp file from a checkpoint if its durable prefix still hashes as recorded. */
  private async openResumed(
    temp: string,
    cp: TempFileCheckpoint,
    signal?: AbortSignal,
  ): Promise<{ fh: FileHandle; hash: Hash } | undefined> {
    try {
      const st = await stat(temp);
      if (st.size < cp.offset) return undefined;
      const hash = createHash('sha256');
      await hashRange(temp, hash, 0, cp.offset, signal);
      if (prefixDigest(hash) !== cp.prefixSha256) {
        await unlinkQuietly(temp);
        return undefined;
      }
      const fh = await open(temp, 'r+');
      await fh.truncate(cp.offset);
      return { fh, hash };
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      throw err;
    }
  }

  private dirKeyOf(dir: string): string {
    return relative(this.root, dir);
  }

  private async mkdirs(dir: string, what: string): Promise<void> {
    await this.tree.mkdirs(this.dirKeyOf(dir), what);
  }

  private async writeSidecar(dir: string, name: string, body: Sidecar): Promise<void> {
    await this.tree.writeSidecar(this.dirKeyOf(dir), name, body);
  }

  async putManifest(key: string, body: Buffer): Promise<void> {
    await this.tree.putManifest(key, body);
  }

  async get(key: string, range?: { start: number; end: number }): Promise<Readable> {
    const fh = await this.openObject(key);
    if (range && range.end <= range.start) {
      await fh.close();
      const { Readable: R } = await import('node:stream');
      return R.from([]);
    }
    return fh.createReadStream(range ? { start: range.start, end: range.end - 1 } : {});
  }

  async getBuffer(key: string, opts: GetBufferOptions = {}): Promise<Buffer> {
    const { maxBytes } = opts;
    // a symlink or a FIFO where an object should be is never followed or waited on
    const fh = await this.openObject(key);
    try {
      const st = await fh.stat();
      if (maxBytes === undefined) return await fh.readFile();
      // the size first (a 3 GiB file is refused without a read), then a read that stops past the limit
      if (st.size > maxBytes) throw tooLargeError(key, this.displayUrl, maxBytes, DRIVER);
      const parts: Buffer[] = [];
      let total = 0;
      for (;;) {
        const chunk = Buffer.allocUnsafe(Math.min(CHUNK, maxBytes + 1 - total));
        const { bytesRead } = await fh.read(chunk, 0, chunk.length, total);
        if (bytesRead === 0) return Buffer.concat(parts, total);
        parts.push(chunk.subarray(0, bytesRead));
        total += bytesRead;
        if (total > maxBytes) throw tooLargeError(key, this.displayUrl, maxBytes, DRIVER);
      }
    } catch (err) {
      throw this.error(err, `read ${key}`);
    } finally {
      await fh.close();
    }
  }

  async checkLocation(): Promise<void> {
    let st;
    try {
      st = await stat(this.root);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') {
        throw new StorageError(
          'not-found',
          `Target ${this.displayUrl} does not exist: there is no directory ${this.root}; check the URL.`,
          { driver: DRIVER, cause: err },
        );
      }
      throw this.error(err, 'look at its directory');
    }
    if (!st.isDirectory()) {
      throw new StorageError('not-found', `Target ${this.displayUrl} is not a directory; check the URL.`, {
        driver: DRIVER,
      });
    }
  }

  private missing(err: unknown, key: string): StorageError {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') {
      return new StorageError(
        'not-found',
        `Object ${key} does not exist on ${this.displayUrl}; ${adviceFor('not-found')}.`,
        {
          driver: DRIVER,
          cause: err,
        },
      );
    }
    return this.error(err, `read ${key}`);
  }

  stat(key: string): Promise<ObjectInfo | undefined> {
    return this.tree.stat(key);
  }

  list(prefix: string): AsyncIterable<ObjectInfo> {
    return this.tree.list(prefix);
  }

  listTop(): AsyncIterable<string> {
    return this.tree.listTop();
  }

  removeUnfinished(prefix: string): Promise<number> {
    return this.tree.removeUnfinished(prefix);
  }

  async touch(key: string): Promise<void> {
    // through the same guarded open as a read: never a link, never a FIFO, never a directory
    const fh = await this.openObject(key);
    try {
      const now = new Date();
      await fh.utimes(now, now);
    } catch (err) {
      throw this.error(err, `touch ${key}`);
    } finally {
      await fh.close();
    }
  }

  delete(key: string): Promise<void> {
    return this.tree.delete(key);
  }

  async close(): Promise<void> {}
}

/** pwrite until the kernel took every byte (a regular file may take less than asked, e.g. near ENOSPC). */
async function writeFully(fh: FileHandle, data: Buffer, at: number): Promise<void> {
  let written = 0;
  while (written < data.length) {
    const { bytesWritten } = await fh.write(data, written, data.length - written, at + written);
    written += bytesWritten;
  }
}
