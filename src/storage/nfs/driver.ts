/**
 * NFS target (nfs://host[:port]/export[/path]) without a kernel mount.
 *
 * Why a TypeScript NFSv3 client (./client.ts over ./rpc.ts) rather than child processes:
 * the hosts we run on may have no NFS kernel client (this CI has none), and libnfs-utils'
 * nfs-cp/nfs-ls/nfs-cat cannot rename, remove, mkdir or overwrite, so they cannot give an
 * atomic "temp name, then RENAME" commit, a resumable offset, or pruning. qemu-img can only
 * write images. Speaking the dozen NFSv3 procedures ourselves gives all of that in-process:
 * large WRITEs (the server's wtmax) with several in flight, UNSTABLE writes made durable by
 * COMMIT at each checkpoint, and the write verifier to detect a server restart that lost
 * uncommitted data (then the window since the last COMMIT is sent again).
 */
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { stat as fsStat } from 'node:fs/promises';
import { posix } from 'node:path';
import { Readable } from 'node:stream';
import type {
  GetBufferOptions,
  ObjectInfo,
  PutImageOptions,
  PutImageResult,
  StorageTarget,
  TargetCapabilities,
} from '../contract';
import {
  StorageError,
  adviceFor,
  errnoCode,
  isAbortError,
  kindOfErrno,
  tooLargeError,
  type StorageErrorKind,
} from '../errors';
import { dirMayHold, isKeySegment, isReservedName, normaliseKey, normalisePrefix } from '../keys';
import {
  decodeSidecar,
  encodeSidecar,
  isTempFor,
  metadataOf,
  SIDECAR_MAX_BYTES,
  sidecarName,
  sidecarOwner,
  tempName,
  tempOwner,
  type Sidecar,
} from '../sidecar';
import { asTempFileCheckpoint, hashRange, prefixDigest, readChunks, sourceSize } from '../source';
import type { TempFileCheckpoint } from '../source';
import { NfsClient, NfsStatusError, Stable, type DirEntry, type Fattr } from './client';
import { RpcError } from './rpc';

const DRIVER = 'nfs';
/** COMMIT + checkpoint this often: the resume point, and what is re-sent if the server restarts */
const CHECKPOINT_EVERY = 64 << 20;
/** WRITEs in flight on the one TCP connection */
const WRITE_DEPTH = 8;
/** READs in flight for get(): enough to keep the server's disk and the socket busy while one reply is consumed */
const READ_DEPTH = 16;
const MAX_IO = 1 << 20;
/** READ size for get() (the server's rtmax permitting) */
const READ_SIZE = 1 << 20;
const NFS3ERR_STALE = 70;

export interface NfsTargetSpec {
  host: string;
  port?: number;
  path: string;
}

export class NfsTarget implements StorageTarget {
  readonly capabilities: TargetCapabilities = { atomicReplace: true, multipart: true, rangeReads: true };
  private session: Promise<NfsClient> | undefined;
  /** directory key ('' = the URL's directory) -> file handle */
  private readonly dirs = new Map<string, Buffer>();

  constructor(
    private readonly spec: NfsTargetSpec,
    readonly displayUrl: string,
  ) {}

  private error(err: unknown, what: string): StorageError {
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
      driver: DRIVER,
      cause: err,
      ...(permanent !== undefined ? { permanent } : {}),
    });
  }

  private client(): Promise<NfsClient> {
    if (!this.session) {
      this.session = NfsClient.mount(this.spec);
      this.session.catch(() => {
        this.session = undefined; // the next call tries again
      });
    }
    return this.session;
  }

  /** Runs `fn`, forgetting cached handles and trying once more if the server calls one stale. */
  private async op<T>(what: string, fn: (c: NfsClient) => Promise<T>): Promise<T> {
    try {
      const c = await this.client();
      try {
        return await fn(c);
      } catch (err) {
        if (!(err instanceof NfsStatusError && err.status === NFS3ERR_STALE)) throw err;
        this.dirs.clear();
        return await fn(c);
      }
    } catch (err) {
      throw this.error(err, what);
    }
  }

  /** Handle of directory `dirKey` below the URL's path; creates missing directories when asked. */
  private async dir(c: NfsClient, dirKey: string, create: boolean): Promise<Buffer | undefined> {
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

  /** The whole file; undefined once more than `maxBytes` came back (the file grew, or its size was wrong). */
  private async readBounded(c: NfsClient, fh: Buffer, maxBytes: number): Promise<Buffer | undefined> {
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

  /** Small file written whole with FILE_SYNC under a temp name, then renamed over `name`. */
  private async writeAtomic(c: NfsClient, dir: Buffer, name: string, body: Buffer): Promise<void> {
    const temp = tempName(name, randomBytes(8).toString('hex'));
    const fh = await c.create(dir, temp, 'guarded');
    try {
      const wsize = this.wsize(c);
      for (let off = 0; off < body.length; off += wsize) {
        await this.writeFully(c, fh, off, body.subarray(off, Math.min(body.length, off + wsize)), Stable.FILE_SYNC);
      }
      await c.rename(dir, temp, dir, name);
    } catch (err) {
      await c.remove(dir, temp).catch(() => undefined);
      throw err;
    }
  }

  private wsize(c: NfsClient): number {
    return Math.min(c.fsinfo.wtmax || MAX_IO, MAX_IO);
  }

  /** WRITE until the server took every byte (servers may write less than asked). */
  private async writeFully(c: NfsClient, fh: Buffer, offset: number, data: Buffer, stable: Stable): Promise<string> {
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

  async putImage(key: string, sourcePath: string, opts: PutImageOptions = {}): Promise<PutImageResult> {
    const k = normaliseKey(key);
    const dirKey = posix.dirname(k) === '.' ? '' : posix.dirname(k);
    const name = posix.basename(k);
    const size = await sourceSize(sourcePath, key, DRIVER);
    const signal = opts.signal;
    let c: NfsClient | undefined;
    let dir: Buffer | undefined;
    let temp: string | undefined;
    try {
      c = await this.client();
      const client = c;
      dir = (await this.dir(client, dirKey, true)) as Buffer;
      const d = dir;
      let hash: Hash = createHash('sha256');
      let offset = 0;
      let fh: Buffer | undefined;
      const resume = asTempFileCheckpoint(opts.resume);
      if (resume && resume.offset <= size) {
        const found = await client.lookup(d, resume.temp);
        const attrs = found ? (found.attrs ?? (await client.getattr(found.fh))) : undefined;
        if (found && attrs && attrs.size >= resume.offset) {
          // the server's prefix is durable (COMMITted); re-hash our side of it to restore the hash state
          await hashRange(sourcePath, hash, 0, resume.offset, signal);
          if (prefixDigest(hash) === resume.prefixSha256) {
            await client.setSize(found.fh, resume.offset);
            fh = found.fh;
            offset = resume.offset;
            temp = resume.temp;
          } else {
            hash = createHash('sha256');
          }
        }
      }
      if (!fh) {
        for (const entry of await client.readdirplus(d)) {
          if (isTempFor(name, entry.name)) await client.remove(d, entry.name);
        }
        temp = tempName(name, randomBytes(8).toString('hex'));
        fh = await client.create(d, temp, 'guarded', 0o600);
      }
      const file = fh;
      const tempFile = temp as string;
      const startOffset = offset;
      const wsize = this.wsize(client);
      opts.onProgress?.(offset, size);
      // COMMIT of one window runs while the next window is sent; its checkpoint is emitted once it is durable
      let pending:
        { commit: Promise<string>; verifiers: Set<string>; start: number; end: number; prefix: string } | undefined;
      const settle = async (w: NonNullable<typeof pending>): Promise<void> => {
        let committed = await w.commit;
        for (let attempt = 0; ![...w.verifiers].every((v) => v === committed); attempt++) {
          // the server restarted between WRITE and COMMIT and may have lost the window: send it again
          if (attempt >= 3) throw new NfsStatusError(5, 'NFS3ERR_IO', 'COMMIT verifier keeps changing');
          w.verifiers = await this.sendRange(client, file, sourcePath, w.start, w.end, wsize, {
            signal,
            pace: opts.pace,
          });
          committed = await client.commit(file);
        }
        if (w.end < size)
          opts.onCheckpoint?.({ temp: tempFile, offset: w.end, prefixSha256: w.prefix } satisfies TempFileCheckpoint);
      };
      while (offset < size) {
        const windowEnd = Math.min(size, offset + CHECKPOINT_EVERY);
        const verifiers = await this.sendRange(client, file, sourcePath, offset, windowEnd, wsize, opts, hash);
        if (pending) await settle(pending);
        const commit = client.commit(file);
        commit.catch(() => undefined); // awaited in settle
        pending = { commit, verifiers, start: offset, end: windowEnd, prefix: prefixDigest(hash) };
        offset = windowEnd;
      }
      if (pending) await settle(pending);
      const sha256 = hash.digest('hex');
      const expected = opts.metadata?.sha256;
      if (expected && expected !== sha256) {
        throw new StorageError(
          'checksum',
          `Copying ${sourcePath} to ${key} on ${this.displayUrl} produced SHA-256 ${sha256} but ${expected} was expected; the source changed or is corrupt, run the backup again.`,
          { driver: DRIVER },
        );
      }
      const sidecar: Sidecar = { size, sha256, metadata: { ...opts.metadata, sha256 } };
      await this.writeAtomic(client, d, sidecarName(name), encodeSidecar(sidecar));
      try {
        await client.rename(d, tempFile, d, name);
      } catch (err) {
        // a RENAME retransmitted after a reconnect finds its source gone: it was done the first time
        const now = await client.lookup(d, name);
        if (!(err instanceof NfsStatusError && err.status === 2 && now?.attrs?.size === size)) throw err;
      }
      return { key: k, size, sha256, bytesSent: size - startOffset };
    } catch (err) {
      const aborted = signal?.aborted || isAbortError(err);
      const classified = aborted ? undefined : this.error(err, `write ${key}`);
      if (c && dir && temp && (aborted || classified?.permanent)) await c.remove(dir, temp).catch(() => undefined);
      if (aborted) throw signal?.reason ?? err;
      throw classified;
    }
  }

  /** Pipelined UNSTABLE WRITEs of [start, end) of the source; returns the write verifiers seen. */
  private async sendRange(
    c: NfsClient,
    fh: Buffer,
    sourcePath: string,
    start: number,
    end: number,
    wsize: number,
    opts: Pick<PutImageOptions, 'signal' | 'pace' | 'onProgress'>,
    hash?: Hash,
  ): Promise<Set<string>> {
    const verifiers = new Set<string>();
    const inFlight = new Set<Promise<void>>();
    let failure: unknown;
    let done = start;
    const total = (await fsStat(sourcePath)).size;
    for await (const chunk of readChunks(sourcePath, {
      start,
      end,
      chunkSize: wsize,
      signal: opts.signal,
      pace: opts.pace,
    })) {
      hash?.update(chunk);
      while (inFlight.size >= WRITE_DEPTH) await Promise.race(inFlight);
      if (failure) break;
      const at = done;
      done += chunk.length;
      const p: Promise<void> = this.writeFully(c, fh, at, chunk, Stable.UNSTABLE)
        .then((v) => {
          verifiers.add(v);
          opts.onProgress?.(at + chunk.length, total);
        })
        .catch((err: unknown) => {
          failure ??= err;
        })
        .finally(() => inFlight.delete(p));
      inFlight.add(p);
    }
    await Promise.all(inFlight);
    if (failure) throw failure;
    return verifiers;
  }

  async putManifest(key: string, body: Buffer): Promise<void> {
    const k = normaliseKey(key);
    const dirKey = posix.dirname(k) === '.' ? '' : posix.dirname(k);
    await this.op(`write ${key}`, async (c) => {
      const dir = (await this.dir(c, dirKey, true)) as Buffer;
      await this.writeAtomic(c, dir, posix.basename(k), body);
    });
  }

  private async lookupFile(c: NfsClient, k: string): Promise<{ dir: Buffer; fh: Buffer; attrs: Fattr } | undefined> {
    const dirKey = posix.dirname(k) === '.' ? '' : posix.dirname(k);
    const dir = await this.dir(c, dirKey, false);
    if (!dir) return undefined;
    const found = await c.lookup(dir, posix.basename(k));
    if (!found) return undefined;
    const attrs = found.attrs ?? (await c.getattr(found.fh));
    if (attrs.type !== 1) return undefined;
    return { dir, fh: found.fh, attrs };
  }

  private notFound(key: string): StorageError {
    return new StorageError(
      'not-found',
      `Object ${key} does not exist on ${this.displayUrl}; ${adviceFor('not-found')}.`,
      { driver: DRIVER },
    );
  }

  async get(key: string, range?: { start: number; end: number }): Promise<Readable> {
    const k = normaliseKey(key);
    const { c, file } = await this.op(`read ${key}`, async (c) => ({ c, file: await this.lookupFile(c, k) }));
    if (!file) throw this.notFound(key);
    const start = range?.start ?? 0;
    const end = Math.min(range?.end ?? file.attrs.size, file.attrs.size);
    const rsize = Math.min(c.fsinfo.rtmax || READ_SIZE, READ_SIZE);
    const fh = file.fh;
    const fail = (err: unknown): StorageError => this.error(err, `read ${key}`);
    const truncated = (at: number): StorageError =>
      new StorageError(
        'failed',
        `NFS target ${this.displayUrl} ended ${key} at byte ${at} of ${end} (the object shrank while it was read); read it again or verify the backup.`,
        { driver: DRIVER },
      );
    /** [at, at + n) as views of the READ replies (no copy); a short reply is completed by more READs */
    const readRange = async (at: number, n: number): Promise<Buffer[]> => {
      const parts: Buffer[] = [];
      let got = 0;
      while (got < n) {
        const { data } = await c.read(fh, at + got, n - got);
        if (data.length === 0) throw truncated(at + got);
        parts.push(data.length > n - got ? data.subarray(0, n - got) : data);
        got += data.length;
      }
      return parts;
    };
    async function* chunks(): AsyncGenerator<Buffer> {
      const queue: Array<Promise<Buffer[]>> = [];
      let next = start;
      const issue = (): void => {
        if (next >= end) return;
        const n = Math.min(rsize, end - next);
        const p = readRange(next, n);
        p.catch(() => undefined); // surfaced when its turn comes
        queue.push(p);
        next += n;
      };
      for (let i = 0; i < READ_DEPTH; i++) issue();
      while (queue.length > 0) {
        let parts: Buffer[];
        try {
          parts = await (queue.shift() as Promise<Buffer[]>);
        } catch (err) {
          await Promise.allSettled(queue);
          throw fail(err);
        }
        issue();
        yield* parts;
      }
    }
    return Readable.from(chunks(), { objectMode: false });
  }

  async getBuffer(key: string, opts: GetBufferOptions = {}): Promise<Buffer> {
    const k = normaliseKey(key);
    const { maxBytes } = opts;
    const body = await this.op(`read ${key}`, async (c) => {
      const file = await this.lookupFile(c, k);
      if (!file) return undefined;
      if (maxBytes !== undefined && file.attrs.size > maxBytes) {
        throw tooLargeError(key, this.displayUrl, maxBytes, DRIVER);
      }
      const data = await this.readBounded(c, file.fh, maxBytes ?? Number.POSITIVE_INFINITY);
      if (!data) throw tooLargeError(key, this.displayUrl, maxBytes ?? 0, DRIVER);
      return data;
    });
    if (!body) throw this.notFound(key);
    return body;
  }

  async checkLocation(): Promise<void> {
    const there = await this.op('look at its directory', (c) => this.dir(c, '', false));
    if (!there) {
      throw new StorageError(
        'not-found',
        `NFS target ${this.displayUrl} does not exist: the export has no directory ${this.spec.path}; check the URL.`,
        { driver: DRIVER },
      );
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const k = normaliseKey(key);
    return this.op(`stat ${key}`, async (c) => {
      const file = await this.lookupFile(c, k);
      if (!file) return undefined;
      const side = await c.lookup(file.dir, sidecarName(posix.basename(k)));
      // a sidecar is read bounded: one someone else made huge is ignored, never held in memory
      const body = side ? await this.readBounded(c, side.fh, SIDECAR_MAX_BYTES) : undefined;
      const metadata = body ? metadataOf(decodeSidecar(body, file.attrs.size)) : undefined;
      return { key: k, size: file.attrs.size, modified: file.attrs.mtime, ...(metadata ? { metadata } : {}) };
    });
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const p = normalisePrefix(prefix);
    const slash = p.lastIndexOf('/');
    const baseKey = slash >= 0 ? p.slice(0, slash) : '';
    const found = await this.op('list objects', async (c) => {
      const out: ObjectInfo[] = [];
      const base = await this.dir(c, baseKey, false);
      if (base) await this.walk(c, base, baseKey, p, out);
      return out;
    });
    yield* found;
  }

  async *listTop(): AsyncIterable<string> {
    const names = await this.op('list its directory', async (c) => {
      const root = await this.dir(c, '', false);
      if (!root) return [];
      const out: string[] = [];
      for (const e of await c.readdirplus(root)) {
        if (isReservedName(e.name) || !isKeySegment(e.name)) continue;
        const found = await this.entry(c, root, e);
        if (found && (found.attrs.type === 1 || found.attrs.type === 2)) out.push(e.name);
      }
      return out.sort();
    });
    yield* names;
  }

  /** A directory entry's handle and attributes (READDIRPLUS may leave them out); undefined once it is gone. */
  private async entry(c: NfsClient, dir: Buffer, e: DirEntry): Promise<{ fh: Buffer; attrs: Fattr } | undefined> {
    if (e.attrs && e.fh) return { fh: e.fh, attrs: e.attrs };
    const found = await c.lookup(dir, e.name);
    return found && { fh: found.fh, attrs: found.attrs ?? (await c.getattr(found.fh)) };
  }

  private async walk(c: NfsClient, dir: Buffer, dirKey: string, prefix: string, out: ObjectInfo[]): Promise<void> {
    const entries = (await c.readdirplus(dir)).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      if (isReservedName(e.name)) continue;
      const key = dirKey ? `${dirKey}/${e.name}` : e.name;
      const found = await this.entry(c, dir, e);
      if (!found) continue;
      const { fh, attrs } = found;
      if (attrs.type === 2) {
        if (dirMayHold(key, prefix)) {
          this.dirs.set(key, fh);
          await this.walk(c, fh, key, prefix, out);
        }
      } else if (attrs.type === 1 && key.startsWith(prefix)) {
        out.push({ key, size: attrs.size, modified: attrs.mtime });
      }
    }
  }

  async touch(key: string): Promise<void> {
    const k = normaliseKey(key);
    const found = await this.op(`touch ${key}`, async (c) => {
      const file = await this.lookupFile(c, k);
      if (file) await c.touch(file.fh);
      return file !== undefined;
    });
    if (!found) throw this.notFound(key);
  }

  async delete(key: string): Promise<void> {
    const k = normaliseKey(key);
    const dirKey = posix.dirname(k) === '.' ? '' : posix.dirname(k);
    await this.op(`delete ${key}`, async (c) => {
      const dir = await this.dir(c, dirKey, false);
      if (!dir) return;
      await c.remove(dir, posix.basename(k));
      await c.remove(dir, sidecarName(posix.basename(k)));
      await this.removeEmptyDirs(c, dirKey);
    });
  }

  /** Drop `dirKey` and its parents while they are empty (pruning leaves no empty <domain>/<backupId>). */
  private async removeEmptyDirs(c: NfsClient, dirKey: string): Promise<void> {
    let child = dirKey;
    while (child) {
      const parent = posix.dirname(child) === '.' ? '' : posix.dirname(child);
      const parentFh = await this.dir(c, parent, false);
      if (!parentFh || !(await c.rmdir(parentFh, posix.basename(child)))) break;
      for (const cachedKey of [...this.dirs.keys()])
        if (cachedKey === child || cachedKey.startsWith(`${child}/`)) this.dirs.delete(cachedKey);
      child = parent;
    }
  }

  async removeUnfinished(prefix: string): Promise<number> {
    const p = normalisePrefix(prefix);
    const slash = p.lastIndexOf('/');
    const baseKey = slash >= 0 ? p.slice(0, slash) : '';
    return this.op('remove unfinished uploads', async (c) => {
      const base = await this.dir(c, baseKey, false);
      return base ? this.sweep(c, base, baseKey, p) : 0;
    });
  }

  /** Temp files (and the sidecars written for them) of keys under `prefix`, below `dirKey`. */
  private async sweep(c: NfsClient, dir: Buffer, dirKey: string, prefix: string): Promise<number> {
    const entries = await c.readdirplus(dir);
    const names = new Set(entries.map((e) => e.name));
    let removed = 0;
    for (const e of entries) {
      if (e.name === '.' || e.name === '..') continue;
      const key = dirKey ? `${dirKey}/${e.name}` : e.name;
      const temp = tempOwner(e.name);
      const side = sidecarOwner(e.name);
      const owner = temp ?? (side !== undefined && !names.has(side) ? side : undefined);
      if (owner !== undefined) {
        if ((dirKey ? `${dirKey}/${owner}` : owner).startsWith(prefix) && (await c.remove(dir, e.name))) {
          if (temp !== undefined) removed++;
        }
        continue;
      }
      if (isReservedName(e.name)) continue;
      if (!dirMayHold(key, prefix)) continue;
      const found = await this.entry(c, dir, e);
      if (!found) continue;
      const { fh, attrs } = found;
      if (attrs.type === 2) removed += await this.sweep(c, fh, key, prefix);
    }
    if (dirKey && `${dirKey}/`.startsWith(prefix)) await this.removeEmptyDirs(c, dirKey);
    return removed;
  }

  async close(): Promise<void> {
    const s = this.session;
    this.session = undefined;
    this.dirs.clear();
    if (s) (await s.catch(() => undefined))?.close();
  }
}
