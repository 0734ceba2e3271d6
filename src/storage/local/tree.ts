/**
 * The file-tree port over a local directory (or an NFS mount of one). It keeps the driver's link confinement: no
 * directory at or below the target's root may be a symbolic link (`confine`), a file is opened with O_NOFOLLOW and
 * O_NONBLOCK (never a link, never waiting on a FIFO), and every new file or directory is private.
 */
import { createHash, type Hash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { lstat, open, readdir, rename, rmdir, stat, unlink, type FileHandle } from 'node:fs/promises';
import { join, relative, sep } from 'node:path';
import { StorageError, adviceFor, errnoCode, kindOfErrno } from '../errors';
import { makeDirs, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE } from '../../shared/file-modes';
import { fsyncDir } from '../../shared/fsync';
import { hashRange, prefixDigest } from '../source';
import type { FileInfo, ImageTreePort, ImageUpload, TreeEntry } from '../tree/port';
import { LocalUpload, type CheckpointWindow } from './upload';
import { childKey } from '../tree/port';

export const LOCAL_DRIVER = 'local';

/** writeNew uses O_DIRECT for bodies of this size or more (chunk objects), in whole blocks of DIRECT_ALIGN */
const DIRECT_MIN_BYTES = 256 * 1024;
const DIRECT_ALIGN = 4096;

/** Writes all of DATA at POSITION (a write may take less than asked). */
async function writeAll(fh: FileHandle, data: Buffer, position: number): Promise<void> {
  for (let done = 0; done < data.length;) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, position + done);
    if (bytesWritten <= 0) throw new Error(`a write of ${data.length - done} bytes wrote nothing`);
    done += bytesWritten;
  }
}

function isMissing(err: unknown): boolean {
  return errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR';
}

export class LocalFileTree implements ImageTreePort {
  readonly driver = LOCAL_DRIVER;
  readonly listsMetadata = true;
  /** whether writeNew tries O_DIRECT (false once the file system refused it) */
  private direct = true;
  /** objects writeNew wrote with O_DIRECT (tests; diagnostics) */
  directWrites = 0;

  constructor(
    readonly root: string,
    readonly displayUrl: string,
    private readonly window: CheckpointWindow,
  ) {}

  async createUpload(dirKey: string, temp: string): Promise<ImageUpload> {
    // 'wx' plus a random name: unique even where O_EXCL is unreliable (old NFS); open's mode is less the umask
    const fh = await open(join(this.dirPath(dirKey), temp), 'wx', PRIVATE_FILE_MODE);
    try {
      await fh.chmod(PRIVATE_FILE_MODE);
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw err;
    }
    return new LocalUpload(fh, this.window);
  }

  /** The temp file's own durable prefix is hashed again: it must still be what the checkpoint recorded. */
  async resumeUpload(
    dirKey: string,
    temp: string,
    cp: { offset: number; prefixSha256: string },
    _sourcePath: string,
    signal?: AbortSignal,
  ): Promise<{ upload: ImageUpload; hash: Hash } | undefined> {
    const path = join(this.dirPath(dirKey), temp);
    try {
      const st = await stat(path);
      if (st.size < cp.offset) return undefined;
      const hash = createHash('sha256');
      await hashRange(path, hash, 0, cp.offset, signal);
      if (prefixDigest(hash) !== cp.prefixSha256) {
        await unlink(path).catch(() => undefined);
        return undefined;
      }
      const fh = await open(path, 'r+');
      await fh.truncate(cp.offset);
      return { upload: new LocalUpload(fh, this.window), hash };
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return undefined;
      throw err;
    }
  }

  commit(dirKey: string, temp: string, name: string): Promise<void> {
    return this.rename(dirKey, temp, name);
  }

  classify(err: unknown, what: string, fallback: 'failed' | 'not-found' = 'failed'): StorageError {
    if (err instanceof StorageError) return err;
    const code = errnoCode(err);
    const kind = kindOfErrno(code) ?? fallback;
    const detail = code ? ` (${code})` : err instanceof Error ? ` (${err.message})` : '';
    const verb = kind === 'no-space' ? `ran out of space while trying to ${what}` : `could not ${what}${detail}`;
    return new StorageError(kind, `Target ${this.displayUrl} ${verb}; ${adviceFor(kind)}.`, {
      driver: LOCAL_DRIVER,
      cause: err,
    });
  }

  dirPath(dirKey: string): string {
    return dirKey ? join(this.root, dirKey) : this.root;
  }

  /**
   * Refuses a directory of this target that is, or lies below, a symbolic link. Whoever else can write the target
   * could otherwise make `<domain>` a link to /etc, and a root worker would read, write or delete there. The target
   * directory itself may be a link (a mount point named elsewhere); nothing below it may. A component that does not
   * exist yet ends the walk: makeDirs creates real directories. (A link swapped in between this check and the
   * open is not caught: docs/security.md.)
   */
  async confine(dir: string, key: string): Promise<void> {
    const rel = relative(this.root, dir);
    if (rel === '') return;
    let current = this.root;
    for (const part of rel.split(sep)) {
      current = join(current, part);
      let st;
      try {
        st = await lstat(current);
      } catch (err) {
        if (isMissing(err)) return;
        throw this.classify(err, `look at the directory of ${key}`);
      }
      if (st.isSymbolicLink()) {
        throw new StorageError(
          'invalid-key',
          `Object ${key} on ${this.displayUrl} lies behind a symbolic link (${current}); vmbackup never follows links inside a target, remove the link.`,
          { driver: LOCAL_DRIVER },
        );
      }
      if (!st.isDirectory()) return;
    }
  }

  async readdir(dirKey: string): Promise<TreeEntry[] | undefined> {
    let entries;
    try {
      entries = await readdir(this.dirPath(dirKey), { withFileTypes: true });
    } catch (err) {
      if (isMissing(err)) return undefined;
      throw err;
    }
    // a Dirent's type is the entry's own (lstat): a link is neither a file nor a directory here
    return entries.map((e) => ({ name: e.name, type: e.isDirectory() ? 'dir' : e.isFile() ? 'file' : 'other' }));
  }

  async mkdirs(dirKey: string): Promise<void> {
    const dir = this.dirPath(dirKey);
    await this.confine(dir, dirKey || '.');
    await makeDirs(dir, PRIVATE_DIR_MODE);
  }

  async unlink(dirKey: string, name: string): Promise<boolean> {
    const dir = this.dirPath(dirKey);
    await this.confine(dir, childKey(dirKey, name));
    try {
      await unlink(join(dir, name));
      return true;
    } catch (err) {
      if (isMissing(err)) return false;
      throw err;
    }
  }

  async rmdir(dirKey: string): Promise<boolean> {
    if (!dirKey) return false;
    try {
      await rmdir(this.dirPath(dirKey));
      return true;
    } catch {
      return false;
    }
  }

  async writeNew(dirKey: string, name: string, body: Buffer): Promise<void> {
    const path = join(this.dirPath(dirKey), name);
    if (body.length >= DIRECT_MIN_BYTES && this.direct && (await this.writeNewDirect(path, body))) return;
    // 'wx' plus a random name: unique even where O_EXCL is unreliable (old NFS); open's mode is less the umask
    const fh = await open(path, 'wx', PRIVATE_FILE_MODE);
    try {
      await fh.chmod(PRIVATE_FILE_MODE);
      await fh.writeFile(body);
      await fh.sync();
    } finally {
      await fh.close();
    }
  }

  /**
   * writeNew of a large object (a chunk) with O_DIRECT: its whole 4 KiB blocks go from BODY to the disk without the
   * page cache, and only the tail (under 4 KiB) through it. The object is synced at once and not read back soon, so
   * the page cache only costs a copy and fresh pages, and evicts what the host's VMs read. Measured (bench/pull.ts):
   * that copy was about a fifth of a pull's CPU on the bench VM. False, with no file left, where O_DIRECT cannot be
   * used: a file system that refuses it (tmpfs before Linux 6.6; then never tried again on this target) or a BODY
   * not on an aligned address (only BufferPool's `aligned` buffers are): the caller writes it the usual way.
   */
  private async writeNewDirect(path: string, body: Buffer): Promise<boolean> {
    const flags = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_DIRECT;
    let fh: FileHandle;
    try {
      fh = await open(path, flags, PRIVATE_FILE_MODE);
    } catch (err) {
      if (errnoCode(err) !== 'EINVAL') throw err;
      this.direct = false;
      return false;
    }
    const whole = body.length - (body.length % DIRECT_ALIGN);
    let written = false;
    try {
      await fh.chmod(PRIVATE_FILE_MODE);
      try {
        await writeAll(fh, body.subarray(0, whole), 0);
        written = true;
      } catch (err) {
        if (errnoCode(err) !== 'EINVAL') throw err; // the buffer's address: not aligned
      }
    } finally {
      await fh.close().catch(() => undefined);
      if (!written) await unlink(path).catch(() => undefined);
    }
    if (!written) return false;
    // the tail through the page cache, then one sync for both (an fsync covers every write to the file)
    const tail = await open(path, fsConstants.O_WRONLY | fsConstants.O_NOFOLLOW);
    try {
      await writeAll(tail, body.subarray(whole), whole);
      await tail.sync();
    } finally {
      await tail.close();
    }
    this.directWrites++;
    return true;
  }

  async rename(dirKey: string, from: string, to: string, opts: { syncDir?: boolean } = {}): Promise<void> {
    const dir = this.dirPath(dirKey);
    await rename(join(dir, from), join(dir, to));
    if (opts.syncDir ?? true) await fsyncDir(dir);
  }

  async syncDir(dirKey: string): Promise<void> {
    try {
      await fsyncDir(this.dirPath(dirKey));
    } catch (err) {
      // removed since (its last object deleted): nothing left in it to make durable
      if (!isMissing(err)) throw err;
    }
  }

  async statFile(dirKey: string, name: string): Promise<FileInfo | undefined> {
    const dir = this.dirPath(dirKey);
    await this.confine(dir, childKey(dirKey, name));
    try {
      const st = await lstat(join(dir, name));
      return st.isFile() ? { size: st.size, modified: st.mtime } : undefined;
    } catch (err) {
      if (isMissing(err)) return undefined;
      throw err;
    }
  }

  /**
   * A small file's bytes, or undefined when there is none or it cannot be ours: a link, a FIFO (never waited on),
   * not a regular file, or larger than `maxBytes` (never read into memory).
   */
  async readSmall(dirKey: string, name: string, maxBytes: number): Promise<Buffer | undefined> {
    let fh: FileHandle;
    try {
      fh = await open(
        join(this.dirPath(dirKey), name),
        fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK,
      );
    } catch {
      return undefined;
    }
    try {
      const st = await fh.stat();
      if (!st.isFile() || st.size > maxBytes) return undefined;
      const buf = Buffer.alloc(maxBytes + 1);
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      return bytesRead > maxBytes ? undefined : buf.subarray(0, bytesRead);
    } catch {
      return undefined;
    } finally {
      await fh.close();
    }
  }
}
