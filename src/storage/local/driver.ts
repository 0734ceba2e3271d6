/**
 * Local directory target (file:///abs/dir). Also the right driver for a directory that is an
 * NFS mount on another host: it never relies on O_EXCL alone, uses unique temp names, and
 * fsyncs before every rename (restic's local.Save: temp in the same dir, fsync, rename,
 * fsync the directory).
 */
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rmdir, stat, unlink, lstat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import type { ObjectInfo, PutImageOptions, PutImageResult, StorageTarget, TargetCapabilities } from '../contract';
import { StorageError, adviceFor, errnoCode, isAbortError, kindOfErrno } from '../errors';
import { isReservedName, normaliseKey, normalisePrefix } from '../keys';
import { decodeSidecar, encodeSidecar, isTempFor, metadataOf, sidecarName, tempName } from '../sidecar';
import { asTempFileCheckpoint, hashRange, prefixDigest, readChunks, sha256File, sourceSize } from '../source';
import type { TempFileCheckpoint } from '../source';

const DRIVER = 'local';
const CHUNK = 4 << 20;
/** fdatasync + checkpoint this often: the resume point after a crash */
const CHECKPOINT_EVERY = 64 << 20;

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function unlinkQuietly(path: string): Promise<void> {
  await unlink(path).catch(() => undefined);
}

export class LocalTarget implements StorageTarget {
  readonly capabilities: TargetCapabilities;

  constructor(
    private readonly root: string,
    readonly displayUrl: string,
  ) {
    // multipart: a copy resumes from its durable prefix after a crash
    this.capabilities = { atomicReplace: true, multipart: true, rangeReads: true, localPath: root };
  }

  private error(err: unknown, what: string, fallback: 'failed' | 'not-found' = 'failed'): StorageError {
    if (err instanceof StorageError) return err;
    const code = errnoCode(err);
    const kind = kindOfErrno(code) ?? fallback;
    const detail = code ? ` (${code})` : err instanceof Error ? ` (${err.message})` : '';
    const verb = kind === 'no-space' ? `ran out of space while trying to ${what}` : `could not ${what}${detail}`;
    return new StorageError(kind, `Target ${this.displayUrl} ${verb}; ${adviceFor(kind)}.`, {
      driver: DRIVER,
      cause: err,
    });
  }

  private path(key: string): string {
    return join(this.root, normaliseKey(key));
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
        await this.removeStaleTemps(dir, name);
        temp = join(dir, tempName(name, randomBytes(8).toString('hex')));
        // 'wx' plus a random name: unique even where O_EXCL is unreliable (old NFS)
        fh = await open(temp, 'wx', 0o600);
      }
      const tempPath = temp as string;
      const startOffset = offset;
      let sinceCheckpoint = 0;
      // the fdatasync of one window runs while the next is written; its checkpoint is emitted once it is durable
      let syncing: { done: Promise<void>; offset: number; prefix: string } | undefined;
      const settle = async (): Promise<void> => {
        if (!syncing) return;
        const s = syncing;
        syncing = undefined;
        await s.done;
        opts.onCheckpoint?.({
          temp: basename(tempPath),
          offset: s.offset,
          prefixSha256: s.prefix,
        } satisfies TempFileCheckpoint);
      };
      opts.onProgress?.(offset, size);
      for await (const chunk of readChunks(sourcePath, {
        start: offset,
        end: size,
        chunkSize: CHUNK,
        signal: opts.signal,
        pace: opts.pace,
      })) {
        // hash while the write is in flight (the write runs on libuv's thread pool)
        const writing = (async () => {
          let written = 0;
          while (written < chunk.length) {
            const { bytesWritten } = await (fh as FileHandle).write(
              chunk,
              written,
              chunk.length - written,
              offset + written,
            );
            written += bytesWritten;
          }
        })();
        hash.update(chunk);
        await writing;
        offset += chunk.length;
        sinceCheckpoint += chunk.length;
        opts.onProgress?.(offset, size);
        if (sinceCheckpoint >= CHECKPOINT_EVERY && offset < size) {
          await settle();
          const done = fh.datasync();
          done.catch(() => undefined); // awaited in settle
          syncing = { done, offset, prefix: prefixDigest(hash) };
          sinceCheckpoint = 0;
        }
      }
      await settle();
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
    const sha256 = trusted ? expected : await sha256File(sourcePath, opts.signal);
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

  /** Temp files of an earlier attempt whose checkpoint was lost (the key is written by one workflow at a time). */
  private async removeStaleTemps(dir: string, name: string): Promise<void> {
    for (const entry of await readdir(dir)) {
      if (isTempFor(name, entry)) await unlinkQuietly(join(dir, entry));
    }
  }

  private async mkdirs(dir: string, what: string): Promise<void> {
    try {
      await mkdir(dir, { recursive: true });
    } catch (err) {
      throw this.error(err, what);
    }
  }

  private async writeSidecar(dir: string, name: string, body: Parameters<typeof encodeSidecar>[0]): Promise<void> {
    await this.writeAtomic(dir, sidecarName(name), encodeSidecar(body));
  }

  private async writeAtomic(dir: string, name: string, body: Buffer): Promise<void> {
    const temp = join(dir, tempName(name, randomBytes(8).toString('hex')));
    try {
      const fh = await open(temp, 'wx', 0o644);
      try {
        await fh.writeFile(body);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(temp, join(dir, name));
      await fsyncDir(dir);
    } catch (err) {
      await unlinkQuietly(temp);
      throw err;
    }
  }

  async putManifest(key: string, body: Buffer): Promise<void> {
    const final = this.path(key);
    const dir = dirname(final);
    await this.mkdirs(dir, `create the directory for ${key}`);
    try {
      await this.writeAtomic(dir, basename(final), body);
    } catch (err) {
      throw this.error(err, `write ${key}`);
    }
  }

  async get(key: string, range?: { start: number; end: number }): Promise<Readable> {
    const path = this.path(key);
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw this.missing(err, key);
    }
    if (range && range.end <= range.start) {
      await fh.close();
      const { Readable: R } = await import('node:stream');
      return R.from([]);
    }
    return fh.createReadStream(range ? { start: range.start, end: range.end - 1 } : {});
  }

  async getBuffer(key: string): Promise<Buffer> {
    try {
      return await readFile(this.path(key));
    } catch (err) {
      throw this.missing(err, key);
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

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const path = this.path(key);
    try {
      const st = await lstat(path);
      if (!st.isFile()) return undefined;
      const side = await readFile(join(dirname(path), sidecarName(basename(path)))).catch(() => undefined);
      const metadata = side ? metadataOf(decodeSidecar(side, st.size)) : undefined;
      return { key: normaliseKey(key), size: st.size, modified: st.mtime, ...(metadata ? { metadata } : {}) };
    } catch (err) {
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return undefined;
      throw this.error(err, `stat ${key}`);
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const p = normalisePrefix(prefix);
    // start at the deepest directory the prefix names completely
    const slash = p.lastIndexOf('/');
    const baseKey = slash >= 0 ? p.slice(0, slash) : '';
    yield* this.walk(baseKey, p);
  }

  private async *walk(dirKey: string, prefix: string): AsyncIterable<ObjectInfo> {
    const dir = dirKey ? join(this.root, dirKey) : this.root;
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (err) {
      // a target directory nobody wrote to yet holds no objects (the default target starts that way)
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return;
      throw this.error(err, `list ${dirKey || 'its directory'}`);
    }
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const entry of entries) {
      if (isReservedName(entry.name)) continue;
      const key = dirKey ? `${dirKey}/${entry.name}` : entry.name;
      if (entry.isDirectory()) {
        if (prefix.startsWith(`${key}/`) || key.startsWith(prefix) || `${key}/`.startsWith(prefix)) {
          yield* this.walk(key, prefix);
        }
      } else if (entry.isFile() && key.startsWith(prefix)) {
        const info = await this.stat(key);
        if (info) yield info;
      }
    }
  }

  async delete(key: string): Promise<void> {
    const path = this.path(key);
    const dir = dirname(path);
    try {
      await unlink(path);
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT' && errnoCode(err) !== 'ENOTDIR') throw this.error(err, `delete ${key}`);
    }
    await unlinkQuietly(join(dir, sidecarName(basename(path))));
    await this.removeEmptyParents(dir);
  }

  /** Drop now-empty `<domain>/<backupId>` directories so pruning leaves no litter. */
  private async removeEmptyParents(dir: string): Promise<void> {
    let current = dir;
    while (current.startsWith(this.root + '/') && current !== this.root) {
      try {
        await rmdir(current);
      } catch {
        return;
      }
      current = dirname(current);
    }
  }

  async close(): Promise<void> {}
}

/** `ino:size:mtimeMs`, as PutImageOptions.sourceStamp records it. */
export function fileStamp(s: { ino: number; size: number; mtimeMs: number }): string {
  return `${s.ino}:${s.size}:${s.mtimeMs}`;
}
