/**
 * The file-tree port over NFSv3 (./client.ts), without a kernel mount. It owns the session (mounted on first use,
 * again after a failed mount) and a cache of directory handles, forgotten and looked up again when the server
 * calls one stale.
 */
import { createHash, type Hash } from 'node:crypto';
import { StorageError, adviceFor, errnoCode, kindOfErrno, type StorageErrorKind } from '../errors';
import { hashRange, prefixDigest } from '../source';
import type { FileInfo, ImageTreePort, ImageUpload, TreeEntry } from '../tree/port';
import { childKey, splitKey } from '../tree/port';
import { NfsClient, NfsStatusError, Stable, type DirEntry, type Fattr } from './client';
import { RpcError } from './rpc';
import { NfsUpload } from './upload';

export const NFS_DRIVER = 'nfs';
const NFS3ERR_STALE = 70;
const MAX_IO = 1 << 20;

export interface NfsTargetSpec {
  host: string;
  port?: number;
  path: string;
}

export class NfsFileTree implements ImageTreePort {
  readonly driver = NFS_DRIVER;
  readonly listsMetadata = false;
  private session: Promise<NfsClient> | undefined;
  /** directory key ('' = the URL's directory) -> file handle */
  private readonly dirs = new Map<string, Buffer>();

  constructor(
    readonly spec: NfsTargetSpec,
    readonly displayUrl: string,
  ) {}

  classify(err: unknown, what: string): StorageError {
    if (err instanceof StorageError) return err;
    let kind: StorageErrorKind = 'failed';
    let detail: string;
    let permanent: boolean | undefined;
    if (err instanceof NfsStatusError) {
      detail = err.statusName;
      switch (err.status) {
        case 2:
        case 20:
          kind = 'not-found';
          break;
        case 1:
        case 13:
        case 30:
          kind = 'permission';
          break;
        case 27:
        case 28:
        case 69:
          kind = 'no-space';
          break;
        case 5: // IO
        case 70: // STALE
        case 10006: // SERVERFAULT
        case 10008: // JUKEBOX
          permanent = false;
          break;
        default:
          permanent = true;
      }
    } else if (err instanceof RpcError) {
      detail = err.code;
      kind = kindOfErrno(err.code) ?? (err.code === 'EACCES' ? 'permission' : 'failed');
    } else {
      detail = errnoCode(err) ?? (err instanceof Error ? err.message : 'error');
      kind = kindOfErrno(errnoCode(err)) ?? 'failed';
    }
    const verb =
      kind === 'no-space'
        ? `ran out of space while trying to ${what}`
        : kind === 'unreachable'
          ? `is unreachable while trying to ${what}`
          : `could not ${what}`;
    return new StorageError(kind, `NFS target ${this.displayUrl} ${verb} (${detail}); ${adviceFor(kind)}.`, {
      driver: NFS_DRIVER,
      cause: err,
      ...(permanent !== undefined ? { permanent } : {}),
    });
  }

  client(): Promise<NfsClient> {
    if (!this.session) {
      this.session = NfsClient.mount(this.spec);
      this.session.catch(() => {
        this.session = undefined; // the next call tries again
      });
    }
    return this.session;
  }

  /** Runs `fn`, forgetting cached handles and trying once more if the server calls one stale (raw errors). */
  async withClient<T>(fn: (c: NfsClient) => Promise<T>): Promise<T> {
    const c = await this.client();
    try {
      return await fn(c);
    } catch (err) {
      if (!(err instanceof NfsStatusError && err.status === NFS3ERR_STALE)) throw err;
      this.dirs.clear();
      return await fn(c);
    }
  }

  /** `withClient`, its failure told as the sentence for `what`. */
  async op<T>(what: string, fn: (c: NfsClient) => Promise<T>): Promise<T> {
    try {
      return await this.withClient(fn);
    } catch (err) {
      throw this.classify(err, what);
    }
  }

  /** Handle of directory `dirKey` below the URL's path; creates missing directories when asked. */
  async dir(c: NfsClient, dirKey: string, create: boolean): Promise<Buffer | undefined> {
    const cached = this.dirs.get(dirKey);
    if (cached) return cached;
    const segments = [
      ...(c.subPath ? c.subPath.split('/') : []).map((s) => ({ s, base: true })),
      ...(dirKey ? dirKey.split('/') : []).map((s) => ({ s, base: false })),
    ];
    let fh = c.rootFh;
    let walked = '';
    for (const { s, base } of segments) {
      if (!base) walked = walked ? `${walked}/${s}` : s;
      const known = !base ? this.dirs.get(walked) : undefined;
      if (known) {
        fh = known;
        continue;
      }
      const found = await c.lookup(fh, s);
      if (found && found.attrs && found.attrs.type !== 2) throw new NfsStatusError(20, 'NFS3ERR_NOTDIR', `LOOKUP ${s}`);
      if (found) fh = found.fh;
      else if (create) fh = await c.mkdir(fh, s);
      else return undefined;
      if (!base) this.dirs.set(walked, fh);
    }
    this.dirs.set(dirKey, fh);
    return fh;
  }

  /** A directory entry's handle and attributes (READDIRPLUS may leave them out); undefined once it is gone. */
  async entry(c: NfsClient, dir: Buffer, e: DirEntry): Promise<{ fh: Buffer; attrs: Fattr } | undefined> {
    if (e.attrs && e.fh) return { fh: e.fh, attrs: e.attrs };
    const found = await c.lookup(dir, e.name);
    return found && { fh: found.fh, attrs: found.attrs ?? (await c.getattr(found.fh)) };
  }

  /** A regular file's directory, handle and attributes; undefined when missing or not a regular file. */
  async lookupFile(c: NfsClient, k: string): Promise<{ dir: Buffer; fh: Buffer; attrs: Fattr } | undefined> {
    const { dirKey, name } = splitKey(k);
    const dir = await this.dir(c, dirKey, false);
    if (!dir) return undefined;
    const found = await c.lookup(dir, name);
    if (!found) return undefined;
    const attrs = found.attrs ?? (await c.getattr(found.fh));
    if (attrs.type !== 1) return undefined;
    return { dir, fh: found.fh, attrs };
  }

  /** The whole file; undefined once more than `maxBytes` came back (the file grew, or its size was wrong). */
  async readBounded(c: NfsClient, fh: Buffer, maxBytes: number): Promise<Buffer | undefined> {
    const parts: Buffer[] = [];
    let offset = 0;
    const chunk = Math.min(c.fsinfo.rtmax || MAX_IO, MAX_IO);
    for (;;) {
      const { data, eof } = await c.read(fh, offset, Math.min(chunk, maxBytes + 1 - offset));
      parts.push(data);
      offset += data.length;
      if (offset > maxBytes) return undefined;
      if (eof || data.length === 0) return Buffer.concat(parts);
    }
  }

  wsize(c: NfsClient): number {
    return Math.min(c.fsinfo.wtmax || MAX_IO, MAX_IO);
  }

  /** WRITE until the server took every byte (servers may write less than asked). */
  async writeFully(c: NfsClient, fh: Buffer, offset: number, data: Buffer, stable: Stable): Promise<string> {
    let done = 0;
    let verifier = '';
    while (done < data.length) {
      const res = await c.write(fh, offset + done, done === 0 ? data : data.subarray(done), stable);
      if (res.count === 0) throw new NfsStatusError(5, 'NFS3ERR_IO', 'WRITE wrote nothing');
      done += res.count;
      verifier = res.verifier;
    }
    return verifier;
  }

  readdir(dirKey: string): Promise<TreeEntry[] | undefined> {
    return this.withClient(async (c) => {
      const dir = await this.dir(c, dirKey, false);
      if (!dir) return undefined;
      const out: TreeEntry[] = [];
      for (const e of await c.readdirplus(dir)) {
        if (e.name === '.' || e.name === '..') continue;
        const found = await this.entry(c, dir, e);
        if (!found) continue;
        const type = found.attrs.type === 1 ? 'file' : found.attrs.type === 2 ? 'dir' : 'other';
        if (type === 'dir') this.dirs.set(childKey(dirKey, e.name), found.fh);
        out.push({ name: e.name, type });
      }
      return out;
    });
  }

  async mkdirs(dirKey: string): Promise<void> {
    await this.withClient((c) => this.dir(c, dirKey, true));
  }

  unlink(dirKey: string, name: string): Promise<boolean> {
    return this.withClient(async (c) => {
      const dir = await this.dir(c, dirKey, false);
      return dir ? c.remove(dir, name) : false;
    });
  }

  rmdir(dirKey: string): Promise<boolean> {
    if (!dirKey) return Promise.resolve(false);
    return this.withClient(async (c) => {
      const { dirKey: parent, name } = splitKey(dirKey);
      const parentFh = await this.dir(c, parent, false);
      if (!parentFh || !(await c.rmdir(parentFh, name))) return false;
      for (const cachedKey of [...this.dirs.keys()])
        if (cachedKey === dirKey || cachedKey.startsWith(`${dirKey}/`)) this.dirs.delete(cachedKey);
      return true;
    });
  }

  /** Written whole with FILE_SYNC, so it is durable without a COMMIT. */
  writeNew(dirKey: string, name: string, body: Buffer): Promise<void> {
    return this.withClient(async (c) => {
      const dir = (await this.dir(c, dirKey, true)) as Buffer;
      const fh = await c.create(dir, name, 'guarded');
      const wsize = this.wsize(c);
      for (let off = 0; off < body.length; off += wsize) {
        await this.writeFully(c, fh, off, body.subarray(off, Math.min(body.length, off + wsize)), Stable.FILE_SYNC);
      }
    });
  }

  /** Durable when the server replies (NFSv3, RFC 1813: a server commits a RENAME to stable storage first). */
  rename(dirKey: string, from: string, to: string, _opts?: { syncDir?: boolean }): Promise<void> {
    return this.withClient(async (c) => {
      const dir = (await this.dir(c, dirKey, true)) as Buffer;
      await c.rename(dir, from, dir, to);
    });
  }

  /** Nothing to do: every RENAME into the directory was durable when the server replied. */
  syncDir(_dirKey: string): Promise<void> {
    return Promise.resolve();
  }

  statFile(dirKey: string, name: string): Promise<FileInfo | undefined> {
    return this.withClient(async (c) => {
      const file = await this.lookupFile(c, childKey(dirKey, name));
      return file && { size: file.attrs.size, modified: file.attrs.mtime };
    });
  }

  /** Read bounded: a sidecar someone else made huge is ignored, never held in memory. */
  readSmall(dirKey: string, name: string, maxBytes: number): Promise<Buffer | undefined> {
    return this.withClient(async (c) => {
      const dir = await this.dir(c, dirKey, false);
      const found = dir && (await c.lookup(dir, name));
      return found ? this.readBounded(c, found.fh, maxBytes) : undefined;
    });
  }

  createUpload(dirKey: string, temp: string): Promise<ImageUpload> {
    return this.withClient(async (c) => {
      const dir = (await this.dir(c, dirKey, true)) as Buffer;
      return new NfsUpload(this, c, await c.create(dir, temp, 'guarded', 0o600));
    });
  }

  /**
   * The server's prefix is durable (COMMITted); our side of it (the source) is hashed again to restore the hash
   * state, which costs a local read rather than reading the image back over the network.
   */
  resumeUpload(
    dirKey: string,
    temp: string,
    cp: { offset: number; prefixSha256: string },
    sourcePath: string,
    signal?: AbortSignal,
  ): Promise<{ upload: ImageUpload; hash: Hash } | undefined> {
    return this.withClient(async (c) => {
      const dir = (await this.dir(c, dirKey, true)) as Buffer;
      const found = await c.lookup(dir, temp);
      const attrs = found ? (found.attrs ?? (await c.getattr(found.fh))) : undefined;
      if (!found || !attrs || attrs.size < cp.offset) return undefined;
      const hash = createHash('sha256');
      await hashRange(sourcePath, hash, 0, cp.offset, signal);
      if (prefixDigest(hash) !== cp.prefixSha256) return undefined;
      await c.setSize(found.fh, cp.offset);
      return { upload: new NfsUpload(this, c, found.fh), hash };
    });
  }

  commit(dirKey: string, temp: string, name: string, size: number): Promise<void> {
    return this.withClient(async (c) => {
      const dir = (await this.dir(c, dirKey, true)) as Buffer;
      try {
        await c.rename(dir, temp, dir, name);
      } catch (err) {
        // a RENAME retransmitted after a reconnect finds its source gone: it was done the first time
        const now = await c.lookup(dir, name);
        if (!(err instanceof NfsStatusError && err.status === 2 && now?.attrs?.size === size)) throw err;
      }
    });
  }

  async close(): Promise<void> {
    const s = this.session;
    this.session = undefined;
    this.dirs.clear();
    if (s) (await s.catch(() => undefined))?.close();
  }
}
