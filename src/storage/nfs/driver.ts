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
import { Readable } from 'node:stream';
import type { GetBufferOptions, StorageTarget, TargetCapabilities } from '../contract';
import { StorageError, adviceFor, tooLargeError } from '../errors';
import { normaliseKey } from '../keys';
import { AtomicTree } from '../tree/atomic-tree';
import { TreeTarget } from '../tree/tree-target';
import { NFS_DRIVER, NfsFileTree, type NfsTargetSpec } from './tree';

export type { NfsTargetSpec } from './tree';

const DRIVER = NFS_DRIVER;
/** READs in flight for get(): enough to keep the server's disk and the socket busy while one reply is consumed */
const READ_DEPTH = 16;
/** READ size for get() (the server's rtmax permitting) */
const READ_SIZE = 1 << 20;

export class NfsTarget extends TreeTarget implements StorageTarget {
  readonly capabilities: TargetCapabilities = {
    atomicReplace: true,
    multipart: true,
    rangeReads: true,
    fileTree: true,
  };
  private readonly fs: NfsFileTree;
  protected readonly tree: AtomicTree;

  constructor(
    private readonly spec: NfsTargetSpec,
    readonly displayUrl: string,
  ) {
    super();
    this.fs = new NfsFileTree(spec, displayUrl);
    this.tree = new AtomicTree(this.fs);
  }

  private error(err: unknown, what: string): StorageError {
    return this.fs.classify(err, what);
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

  async touch(key: string): Promise<void> {
    const k = normaliseKey(key);
    const found = await this.fs.op(`touch ${key}`, async (c) => {
      const file = await this.fs.lookupFile(c, k);
      if (file) await c.touch(file.fh);
      return file !== undefined;
    });
    if (!found) throw this.notFound(key);
  }

  close(): Promise<void> {
    return this.fs.close();
  }
}
