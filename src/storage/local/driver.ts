/**
 * Local directory target (file:///abs/dir). Also the right driver for a directory that is an
 * NFS mount on another host: it never relies on O_EXCL alone, uses unique temp names, and
 * fsyncs before every rename (restic's local.Save: temp in the same dir, fsync, rename,
 * fsync the directory).
 */
import { constants as fsConstants } from 'node:fs';
import { open, rename, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import type { Readable } from 'node:stream';
import type { GetBufferOptions, PutImageOptions, PutImageResult, StorageTarget, TargetCapabilities } from '../contract';
import { StorageError, adviceFor, errnoCode, tooLargeError } from '../errors';
import { normaliseKey } from '../keys';
import type { Sidecar } from '../sidecar';
import { PRIVATE_FILE_MODE } from '../../shared/file-modes';
import { fileStamp } from '../../shared/file-stamp';
import { sha256File } from '../../shared/sha256-file';
import { fsyncDir } from '../../shared/fsync';
import { AtomicTree } from '../tree/atomic-tree';
import { TreeTarget } from '../tree/tree-target';
import { LOCAL_DRIVER, LocalFileTree } from './tree';
import { CHUNK } from './upload';

const DRIVER = LOCAL_DRIVER;
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

export class LocalTarget extends TreeTarget implements StorageTarget {
  readonly capabilities: TargetCapabilities;
  private readonly fs: LocalFileTree;
  protected readonly tree: AtomicTree;

  constructor(
    private readonly root: string,
    readonly displayUrl: string,
    options: LocalTargetOptions = {},
  ) {
    super();
    this.fs = new LocalFileTree(root, displayUrl, {
      bytes: options.checkpointBytes ?? CHECKPOINT_BYTES,
      ms: options.checkpointMs ?? CHECKPOINT_MS,
    });
    this.tree = new AtomicTree(this.fs);
    // multipart: a copy resumes from its durable prefix after a crash
    this.capabilities = { atomicReplace: true, multipart: true, rangeReads: true, localPath: root, fileTree: true };
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

  override putImage(key: string, sourcePath: string, opts: PutImageOptions = {}): Promise<PutImageResult> {
    return this.tree.putImage(key, sourcePath, opts, (dirKey, name, size) =>
      this.tryMove(key, sourcePath, join(this.fs.dirPath(dirKey), name), size, opts),
    );
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
    const unchanged = opts.sourceStamp !== undefined && opts.sourceStamp === fileStamp(src);
    const trusted = expected !== undefined && unchanged;
    // An image pulled in place (pull mode) comes with the content digest of its guest data only: its file was never
    // hashed, and the sidecar does not claim a file SHA-256 (readers compare `content`, verify recomputes it).
    const contentOnly = expected === undefined && opts.metadata?.content !== undefined && unchanged;
    const sha256 = contentOnly ? undefined : trusted ? expected : await sha256File(sourcePath, { signal: opts.signal });
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
      await this.writeSidecar(
        dir,
        basename(final),
        sha256 ? { size, sha256, metadata: { ...opts.metadata, sha256 } } : { size, metadata: { ...opts.metadata } },
      );
      await rename(sourcePath, final);
    } catch (err) {
      if (errnoCode(err) === 'EXDEV') return undefined;
      throw this.error(err, `move ${sourcePath} to ${key}`);
    }
    await fsyncDir(dir);
    await fsyncDir(dirname(sourcePath)).catch(() => undefined);
    return { key: normaliseKey(key), size, sha256: sha256 ?? '', bytesSent: 0 };
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
      // one buffer of the size fstat gave, read in place: a 4 MiB chunk is one allocation (that the codec threads can
      // take over whole), not four reads and a copy
      const buf = Buffer.allocUnsafe(st.size);
      let total = 0;
      while (total < buf.length) {
        const { bytesRead } = await fh.read(buf, total, buf.length - total, total);
        if (bytesRead === 0) return Buffer.from(buf.subarray(0, total)); // it shrank meanwhile
        total += bytesRead;
      }
      if ((await fh.read(Buffer.alloc(1), 0, 1, total)).bytesRead === 0) return buf;
      // it grew meanwhile: read on in pieces, never past the limit
      const parts: Buffer[] = [buf];
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

  async close(): Promise<void> {}
}
