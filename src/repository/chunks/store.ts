/**
 * ChunkStore: content-addressed chunks over the StorageTarget contract. Idempotent and resumable by nature: a
 * chunk's key is its id, so storing it again changes nothing and a crashed upload is finished by putting what
 * `has` does not find. Which ids exist is known from a listing of `chunks/` or a stat.
 *
 * Freshness (PBS's rule, for gc): gc deletes unreferenced objects whose modification time is older than its grace
 * period. A backup that reuses a stored chunk (or index) instead of uploading it relies on it staying there until its
 * manifest is written, so `has` (and `putIndex`) only answer "stored" for an object whose mtime is less than
 * `freshSeconds` old, touching it first when it is older; a remembered answer expires when that mtime (or touch) is
 * `freshSeconds` old. So an object `has` said yes to at time T has mtime > T - freshSeconds, and gc (deleting only
 * what is older than grace) cannot delete it before T + grace - freshSeconds. gc requires grace > 2 x freshSeconds:
 * the extra window covers clocks that differ (the storage's mtime against this host's clock).
 */
import type { Readable } from 'node:stream';
import type { ObjectInfo } from '../../storage/contract';
import { BufferPool } from '../../shared/buffer-pool';
import { isStorageError } from '../../storage/errors';
import { chunkId, decodeObject, encodeObject, isAllZero, maxObjectBytes } from './codec';
import type { DecodeOptions } from './codec';
import { codecPool } from './codec-pool';
import type { CodecPool } from './codec-pool';
import { CHUNKS_PREFIX, chunkIdOfKey, chunkKey, ID_RE, indexKey } from './config';
import type { DiskIndex, IndexEntry } from './disk-index';
import { decodeDiskIndex, encodeDiskIndex, entryCount, entryRange } from './disk-index';
import { ChunkFormatError } from './errors';
import type { OpenRepository } from './repository';

export const DEFAULT_CONCURRENCY = 4;
/** A stored object older than this is touched before a backup relies on it (see gc.ts: grace > 2 x this). */
export const FRESH_SECONDS = 3600;

export interface PutResult {
  id: IndexEntry;
  /** bytes sent to the target (0 when the chunk was zero or already stored) */
  uploadedBytes: number;
  /**
   * put with handOver: the chunk's bytes, back from the codec threads (the caller's buffer moved there and back, so
   * its old view is empty now). The caller may reuse this buffer (e.g. give it to a BufferPool).
   */
  data?: Buffer;
}

export interface StoreStats {
  chunks: number;
  zeroChunks: number;
  /** chunks that were already in the repository */
  knownChunks: number;
  uploadedChunks: number;
  uploadedBytes: number;
}

/** At most `limit` holders at once; `acquire` waits (first come, first served) while `limit` are held. */
class Slots {
  private active = 0;
  private waiters: Array<() => void> = [];
  constructor(private readonly limit: number) {}
  async acquire(): Promise<void> {
    while (this.active >= this.limit) await new Promise<void>((resolve) => this.waiters.push(resolve));
    this.active++;
  }
  release(): void {
    this.active--;
    this.waiters.shift()?.();
  }
}

export interface ChunkStoreOptions {
  concurrency?: number;
  /** objects older than this are touched before `has`/`putIndex` rely on them; default FRESH_SECONDS */
  freshSeconds?: number;
  /** the clock ages are measured with (tests); default Date.now */
  now?: () => number;
  /** the codec threads (default: this process's codecPool()) */
  pool?: CodecPool;
}

export class ChunkStore {
  /** id -> when it was last seen stored and fresh (ms): its mtime, or the time it was touched or uploaded */
  private readonly fresh = new Map<string, number>();
  /** from loadKnown: id -> mtime (ms) of every chunk the listing found */
  private listedAt: Map<string, number> | undefined;
  readonly concurrency: number;
  readonly freshMs: number;
  private readonly now: () => number;
  /** objects this store touched (tests and reports) */
  touched = 0;
  /** where chunks are hashed, encoded and decoded */
  private readonly pool: CodecPool;
  /** buffers the encoded chunks are written into (made on the first upload) */
  private bodies: BufferPool | undefined;
  /** id -> its upload while it runs: a second chunk with the same id waits for it instead of uploading it again */
  private readonly uploading = new Map<string, Promise<unknown>>();

  constructor(
    readonly repo: OpenRepository,
    opts: ChunkStoreOptions = {},
  ) {
    this.concurrency = Math.max(1, opts.concurrency ?? DEFAULT_CONCURRENCY);
    const fresh = opts.freshSeconds ?? FRESH_SECONDS;
    if (!(fresh > 0)) throw new ChunkFormatError('invalid-argument', 'The freshness window must be positive.');
    this.freshMs = fresh * 1000;
    this.now = opts.now ?? Date.now;
    this.pool = opts.pool ?? codecPool();
  }

  /**
   * Kept for callers that know a previous index. It no longer answers `has` from memory: a chunk the previous backup
   * referenced may be one a gc is about to delete (that backup may have been pruned), so it is checked, and touched
   * when old, like any other. `loadKnown` is the cheap way to know many chunks at once (one listing, with mtimes).
   */
  seed(_index: DiskIndex): void {}

  /**
   * Lists `chunks/` once, with each chunk's mtime: after this, `has` answers from memory for fresh chunks and a
   * missing one, and touches (without a stat) an old one. Returns how many chunk ids were found.
   */
  async loadKnown(): Promise<number> {
    const listed = new Map<string, number>();
    for await (const obj of this.repo.target.list(CHUNKS_PREFIX)) {
      const id = chunkIdOfKey(obj.key);
      if (id) listed.set(id, obj.modified.getTime());
    }
    this.listedAt = listed;
    return listed.size;
  }

  /** The id `plaintext` has in this repository ('zero' for an all-zero chunk). */
  idOf(plaintext: Uint8Array): IndexEntry {
    return isAllZero(plaintext) ? 'zero' : chunkId(this.repo, plaintext);
  }

  /**
   * Whether chunk `id` is stored, made fresh: an object older than the freshness window is touched before this
   * answers true (gc then keeps it for at least its grace minus twice the window). Remembered for one window.
   */
  async has(id: string): Promise<boolean> {
    const seen = this.fresh.get(id);
    if (seen !== undefined && this.now() - seen < this.freshMs) return true;
    const key = chunkKey(id);
    let info: Pick<ObjectInfo, 'modified'> | undefined;
    if (this.listedAt && seen === undefined) {
      const mtime = this.listedAt.get(id);
      if (mtime === undefined) return false;
      info = { modified: new Date(mtime) };
    } else info = await this.repo.target.stat(key);
    if (!info) return false;
    return this.keepFresh(id, key, info.modified.getTime());
  }

  /** Touches `key` when `mtime` is outside the freshness window; false when the object is gone meanwhile. */
  private async keepFresh(id: string, key: string, mtime: number): Promise<boolean> {
    const now = this.now();
    // an mtime in the future (clocks apart) counts as now: it never makes an object look fresher than now
    if (now - Math.min(mtime, now) < this.freshMs) {
      this.fresh.set(id, Math.min(mtime, now));
      return true;
    }
    try {
      await this.repo.target.touch(key);
    } catch (err) {
      if (isStorageError(err) && err.kind === 'not-found') {
        this.fresh.delete(id);
        this.listedAt?.delete(id);
        return false; // deleted since it was seen (a gc): store it again
      }
      throw err;
    }
    this.touched++;
    this.fresh.set(id, now);
    return true;
  }

  /**
   * Stores `plaintext` unless it is all zero or already stored. Idempotent. `id` is checked against the data, so
   * a caller's mistake can never store data under another chunk's name. The id and the encoding are computed in the
   * codec threads (codecPool); `handOver`: the caller no longer uses `plaintext`, which then moves there uncopied.
   */
  async put(plaintext: Uint8Array, id?: IndexEntry, opts: { handOver?: boolean } = {}): Promise<PutResult> {
    if (id === 'zero' || (id === undefined && isAllZero(plaintext))) {
      if (!isAllZero(plaintext)) throw new ChunkFormatError('invalid-argument', 'A chunk marked zero has data.');
      return { id: 'zero', uploadedBytes: 0 };
    }
    if (id !== undefined && !ID_RE.test(id))
      throw new ChunkFormatError('invalid-argument', `The data given for chunk ${id} does not have that id.`, {
        objectId: id,
      });
    const hashed = await this.pool.id(this.repo, plaintext, opts.handOver ?? false);
    if (id !== undefined && hashed.id !== id)
      throw new ChunkFormatError('invalid-argument', `The data given for chunk ${id} does not have that id.`, {
        objectId: id,
      });
    const back = opts.handOver ? { data: hashed.data } : {};
    const up = await this.storeOnce(hashed.id, () => this.uploadOwned(hashed.id, hashed.data));
    if (up === undefined) return { id: hashed.id, uploadedBytes: 0, ...back };
    return { id: hashed.id, uploadedBytes: up.bytes, ...(opts.handOver ? { data: up.plaintext } : {}) };
  }

  /**
   * Runs `upload` of chunk `id` unless it is stored (undefined then). While one upload of `id` runs, another caller
   * waits for it and then asks again (stored once it succeeded; its own upload when it failed): two equal chunks in
   * flight at once (a disk holding the same 4 MiB twice) are uploaded once.
   */
  private async storeOnce<T>(id: string, upload: () => Promise<T>): Promise<T | undefined> {
    for (;;) {
      const running = this.uploading.get(id);
      if (running !== undefined) {
        await running.then(
          () => undefined,
          () => undefined,
        );
        continue;
      }
      if (await this.has(id)) return undefined;
      if (this.uploading.has(id)) continue; // started while `has` looked
      const task = upload();
      this.uploading.set(id, task);
      try {
        return await task;
      } finally {
        if (this.uploading.get(id) === task) this.uploading.delete(id);
      }
    }
  }

  /** Encodes and stores a chunk whose id the caller computed from this very data. */
  private async upload(id: string, plaintext: Uint8Array, handOver = false): Promise<number> {
    const body = await this.pool.encode(this.repo, 'chunk', id, plaintext, handOver);
    await this.store(id, body);
    return body.length;
  }

  /**
   * upload of a buffer the store owns (a whole one, moved to the codec threads): the object is written into a
   * reused buffer, given back once the target has it; the plaintext comes back for the caller to reuse.
   */
  private async uploadOwned(id: string, plaintext: Buffer): Promise<{ bytes: number; plaintext: Buffer }> {
    // on a local path, page-aligned: the local target writes them with O_DIRECT (storage/local/tree.ts)
    this.bodies ??= new BufferPool(maxObjectBytes(this.repo, 'chunk'), this.concurrency * 2, {
      shared: true,
      aligned: this.repo.target.capabilities.localPath !== undefined,
    });
    const encoded = await this.pool.encodeInto(this.repo, 'chunk', id, plaintext, this.bodies.take(), {
      sha256: this.repo.target.capabilities.signsPayloadHash === true,
    });
    await this.store(id, encoded.body, encoded.sha256);
    // only now: the write has returned, nothing reads the body any more (a failed write drops the buffer)
    this.bodies.give(encoded.body);
    return { bytes: encoded.body.length, plaintext: encoded.plaintext };
  }

  private async store(id: string, body: Buffer, sha256?: string): Promise<void> {
    const now = this.now();
    // durable (directory synced) by the flush in putIndex, before any index can name it
    await this.repo.target.putBatched(chunkKey(id), body, sha256 !== undefined ? { sha256 } : undefined);
    this.fresh.set(id, now);
  }

  /**
   * The verified plaintext of chunk `id`; ChunkFormatError 'missing' or 'corrupt' naming it otherwise. `checkId:
   * false` trusts an encrypted chunk's GCM tag without hashing its plaintext again (DecodeOptions).
   */
  async get(id: string, opts: DecodeOptions = {}, into?: Buffer): Promise<Buffer> {
    if (!ID_RE.test(id)) throw new ChunkFormatError('invalid-argument', `${JSON.stringify(id)} is not a chunk id.`);
    let body: Buffer;
    try {
      body = await this.repo.target.getBuffer(chunkKey(id), { maxBytes: maxObjectBytes(this.repo, 'chunk') });
    } catch (err) {
      if (isStorageError(err) && err.kind === 'not-found')
        throw new ChunkFormatError('missing', `The chunk ${id} is missing from ${this.repo.where}.`, {
          objectId: id,
          cause: err,
        });
      if (isStorageError(err) && err.kind === 'checksum')
        throw new ChunkFormatError('corrupt', `The chunk ${id} on ${this.repo.where} is larger than any chunk.`, {
          objectId: id,
          cause: err,
        });
      throw err;
    }
    if (into) return this.pool.decodeInto(this.repo, 'chunk', id, body, into, opts);
    return this.pool.decode(this.repo, 'chunk', id, body, true, opts);
  }

  /**
   * Chunks a disk read from `source` (its guest-visible bytes, `virtualSize` of them) and stores what is missing,
   * at most `concurrency` chunks being encoded or uploaded at once: memory stays about (concurrency + 1) chunks.
   * Returns the disk's index (not yet stored: see putIndex).
   */
  async storeDisk(
    source: Readable | AsyncIterable<Buffer>,
    virtualSize: number,
  ): Promise<{ index: DiskIndex; stats: StoreStats }> {
    const { chunkSize } = this.repo.config;
    const count = entryCount(virtualSize, chunkSize);
    const entries: IndexEntry[] = new Array<IndexEntry>(count);
    const stats: StoreStats = { chunks: 0, zeroChunks: 0, knownChunks: 0, uploadedChunks: 0, uploadedBytes: 0 };
    const slots = new Slots(this.concurrency);
    const running = new Set<Promise<void>>();
    let failure: unknown;
    let i = 0;
    let total = 0;
    const submit = async (chunk: Buffer): Promise<void> => {
      const n = i++;
      await slots.acquire();
      if (failure !== undefined) {
        slots.release();
        throw failure;
      }
      const task = (async () => {
        try {
          const id = this.idOf(chunk);
          entries[n] = id;
          stats.chunks++;
          if (id === 'zero') stats.zeroChunks++;
          else {
            const bytes = await this.storeOnce(id, () => this.upload(id, chunk));
            if (bytes === undefined) stats.knownChunks++;
            else {
              stats.uploadedBytes += bytes;
              stats.uploadedChunks++;
            }
          }
        } catch (err) {
          failure ??= err;
        } finally {
          slots.release();
        }
      })();
      running.add(task);
      void task.finally(() => running.delete(task));
    };
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    try {
      for await (const piece of source as AsyncIterable<Buffer>) {
        let buf = piece;
        total += buf.length;
        if (total > virtualSize)
          throw new ChunkFormatError('invalid-argument', `The disk has more than its ${virtualSize} bytes.`);
        while (buf.length > 0) {
          const take = Math.min(buf.length, chunkSize - pendingBytes);
          pending.push(buf.subarray(0, take));
          pendingBytes += take;
          buf = buf.subarray(take);
          if (pendingBytes === chunkSize) {
            await submit(Buffer.concat(pending, pendingBytes));
            pending = [];
            pendingBytes = 0;
          }
        }
      }
      if (pendingBytes > 0) await submit(Buffer.concat(pending, pendingBytes));
    } finally {
      await Promise.all([...running]);
    }
    if (failure !== undefined) throw failure;
    if (total !== virtualSize || i !== count)
      throw new ChunkFormatError('invalid-argument', `The disk ended after ${total} of its ${virtualSize} bytes.`);
    return { index: { chunkSize, virtualSize, entries }, stats };
  }

  /**
   * Reads a disk back from its index, chunk by chunk in offset order, each verified, `concurrency` fetched ahead.
   * `write` receives every non-zero chunk with its offset; zero chunks are skipped (the destination keeps holes).
   * The chunk's buffer is reused once `write`'s promise resolves: copy what must be kept.
   * An encrypted chunk is trusted on its GCM tag, which authenticates it under its id (DecodeOptions); an unencrypted
   * one is checked against its id.
   */
  async readDisk(index: DiskIndex, write: (offset: number, data: Buffer) => Promise<void>): Promise<void> {
    const fetches: Array<Promise<Buffer> | undefined> = [];
    const ahead = Math.min(this.concurrency, index.entries.length);
    // each chunk is decoded into a reused buffer, taken back once `write` has returned (see BufferPool for why)
    const plain = new BufferPool(index.chunkSize, ahead + 1);
    const start = (n: number): void => {
      const e = index.entries[n];
      if (e === undefined || e === 'zero') fetches[n] = undefined;
      else {
        const p = this.get(e, { checkId: false }, plain.take());
        p.catch(() => undefined); // observed below, in order
        fetches[n] = p;
      }
    };
    for (let n = 0; n < ahead; n++) start(n);
    for (let n = 0; n < index.entries.length; n++) {
      const p = fetches[n];
      fetches[n] = undefined;
      if (n + ahead < index.entries.length) start(n + ahead);
      if (!p) continue;
      const data = await p;
      const { offset, length } = entryRange(index, n);
      if (data.length !== length)
        throw new ChunkFormatError(
          'corrupt',
          `The chunk ${index.entries[n]} has ${data.length} bytes where the index expects ${length}.`,
          {
            objectId: index.entries[n],
          },
        );
      await write(offset, data);
      plain.give(data);
    }
  }

  /**
   * Stores a disk index as an encrypted object; returns its id, after flushing the target (every chunk put before is
   * durable, name included). Idempotent. An index already stored (an unchanged
   * disk) is reused like a chunk: touched when older than the freshness window, so gc does not take it before the
   * manifest that names it is written.
   */
  async putIndex(index: DiskIndex): Promise<string> {
    // an index never names a chunk that is not durable: the chunks this store put are synced first
    await this.repo.target.flush();
    const plain = encodeDiskIndex(index);
    const id = chunkId(this.repo, plain);
    const key = indexKey(id);
    const info = await this.repo.target.stat(key);
    if (info && (await this.keepFresh(`index:${id}`, key, info.modified.getTime()))) return id;
    await this.repo.target.putManifest(key, encodeObject(this.repo, 'index', id, plain).body);
    return id;
  }

  /** Reads and verifies the disk index `id`. */
  async getIndex(id: string): Promise<DiskIndex> {
    if (!ID_RE.test(id)) throw new ChunkFormatError('invalid-argument', `${JSON.stringify(id)} is not an index id.`);
    let body: Buffer;
    try {
      body = await this.repo.target.getBuffer(indexKey(id), { maxBytes: maxObjectBytes(this.repo, 'index') });
    } catch (err) {
      if (isStorageError(err) && err.kind === 'not-found')
        throw new ChunkFormatError('missing', `The index ${id} is missing from ${this.repo.where}.`, {
          objectId: id,
          cause: err,
        });
      throw err;
    }
    const index = decodeDiskIndex(decodeObject(this.repo, 'index', id, body));
    if (index.chunkSize !== this.repo.config.chunkSize)
      throw new ChunkFormatError('corrupt', `The index ${id} uses another chunk size than its repository.`, {
        objectId: id,
      });
    return index;
  }
}
