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
import { Readable } from 'node:stream';
import type {
  GetBufferOptions,
  ObjectInfo,
  PutImageOptions,
  PutImageResult,
  StorageTarget,
  TargetCapabilities,
} from '../contract';
import { StorageError, adviceFor, isAbortError, tooLargeError } from '../errors';
import { normaliseKey } from '../keys';
import { tempName } from '../sidecar';
import { asTempFileCheckpoint, hashRange, prefixDigest, readChunks, sourceSize } from '../source';
import type { TempFileCheckpoint } from '../source';
import { AtomicTree } from '../tree/atomic-tree';
import { splitKey } from '../tree/port';
import { NfsStatusError, Stable, type NfsClient } from './client';
import { NFS_DRIVER, NfsFileTree, type NfsTargetSpec } from './tree';

export type { NfsTargetSpec } from './tree';

const DRIVER = NFS_DRIVER;
/** COMMIT + checkpoint this often: the resume point, and what is re-sent if the server restarts */
const CHECKPOINT_EVERY = 64 << 20;
/** WRITEs in flight on the one TCP connection */
const WRITE_DEPTH = 8;
/** READs in flight for get(): enough to keep the server's disk and the socket busy while one reply is consumed */
const READ_DEPTH = 16;
/** READ size for get() (the server's rtmax permitting) */
const READ_SIZE = 1 << 20;

export class NfsTarget implements StorageTarget {
  readonly capabilities: TargetCapabilities = { atomicReplace: true, multipart: true, rangeReads: true };
  private readonly fs: NfsFileTree;
  private readonly tree: AtomicTree;

  constructor(
    private readonly spec: NfsTargetSpec,
    readonly displayUrl: string,
  ) {
    this.fs = new NfsFileTree(spec, displayUrl);
    this.tree = new AtomicTree(this.fs);
  }

  private error(err: unknown, what: string): StorageError {
    return this.fs.classify(err, what);
  }

  async putImage(key: string, sourcePath: string, opts: PutImageOptions = {}): Promise<PutImageResult> {
    const k = normaliseKey(key);
    const { dirKey, name } = splitKey(k);
    const size = await sourceSize(sourcePath, key, DRIVER);
    const signal = opts.signal;
    let c: NfsClient | undefined;
    let dir: Buffer | undefined;
    let temp: string | undefined;
    try {
      c = await this.fs.client();
      const client = c;
      dir = (await this.fs.dir(client, dirKey, true)) as Buffer;
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
        await this.tree.removeStaleTemps(dirKey, name);
        temp = tempName(name, randomBytes(8).toString('hex'));
        fh = await client.create(d, temp, 'guarded', 0o600);
      }
      const file = fh;
      const tempFile = temp as string;
      const startOffset = offset;
      const wsize = this.fs.wsize(client);
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
      await this.tree.writeSidecar(dirKey, name, { size, sha256, metadata: { ...opts.metadata, sha256 } });
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
      const p: Promise<void> = this.fs
        .writeFully(c, fh, at, chunk, Stable.UNSTABLE)
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

  putManifest(key: string, body: Buffer): Promise<void> {
    return this.tree.putManifest(key, body);
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
    const { c, file } = await this.fs.op(`read ${key}`, async (c) => ({ c, file: await this.fs.lookupFile(c, k) }));
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
    const body = await this.fs.op(`read ${key}`, async (c) => {
      const file = await this.fs.lookupFile(c, k);
      if (!file) return undefined;
      if (maxBytes !== undefined && file.attrs.size > maxBytes) {
        throw tooLargeError(key, this.displayUrl, maxBytes, DRIVER);
      }
      const data = await this.fs.readBounded(c, file.fh, maxBytes ?? Number.POSITIVE_INFINITY);
      if (!data) throw tooLargeError(key, this.displayUrl, maxBytes ?? 0, DRIVER);
      return data;
    });
    if (!body) throw this.notFound(key);
    return body;
  }

  async checkLocation(): Promise<void> {
    const there = await this.fs.op('look at its directory', (c) => this.fs.dir(c, '', false));
    if (!there) {
      throw new StorageError(
        'not-found',
        `NFS target ${this.displayUrl} does not exist: the export has no directory ${this.spec.path}; check the URL.`,
        { driver: DRIVER },
      );
    }
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

  async touch(key: string): Promise<void> {
    const k = normaliseKey(key);
    const found = await this.fs.op(`touch ${key}`, async (c) => {
      const file = await this.fs.lookupFile(c, k);
      if (file) await c.touch(file.fh);
      return file !== undefined;
    });
    if (!found) throw this.notFound(key);
  }

  delete(key: string): Promise<void> {
    return this.tree.delete(key);
  }

  removeUnfinished(prefix: string): Promise<number> {
    return this.tree.removeUnfinished(prefix);
  }

  close(): Promise<void> {
    return this.fs.close();
  }
}
