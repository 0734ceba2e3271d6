/**
 * Storing a disk from a source that knows where its data is (an NBD export with `base:allocation`): only the ranges
 * that may hold data are read, each aligned chunk is hashed once as it is assembled, and only chunks the repository
 * does not hold are uploaded, several at once. A chunk with no data range at all is `zero` without a read. Resuming
 * after a crash is the same call again: `has()` finds what an earlier attempt stored and nothing is sent twice.
 */
import { ChunkFormatError } from './errors';
import type { DiskIndex, IndexEntry } from './disk-index';
import { entryCount } from './disk-index';
import type { ChunkStore, StoreStats } from './store';

export interface ByteRange {
  offset: number;
  length: number;
}

/** A disk's guest-visible bytes as a reader of an NBD export (or a test) offers them. */
export interface DiskSource {
  /** the virtual size in bytes */
  readonly size: number;
  /** the ranges that may hold data, in offset order, not overlapping; the rest reads as zeros and is not read */
  dataRanges(): AsyncIterable<ByteRange>;
  /**
   * the bytes of `ranges`, handed out in the order asked, each piece inside one range; a piece's buffer is the
   * caller's once handed out (the source never writes it again): a piece that is a whole chunk is stored as it is
   */
  read(ranges: AsyncIterable<ByteRange>): AsyncIterable<{ offset: number; data: Buffer }>;
  /**
   * a buffer ingest is done with (a piece's, or what a stored chunk's buffer came back as): the source may reuse it
   * for a later piece. Never called for a buffer anything may still read.
   */
  release?(data: Buffer): void;
}

export interface IngestProgress {
  /** guest bytes handled so far (chunks whose outcome is known, holes included) */
  bytesDone: number;
  stats: StoreStats;
  /** every chunk below this one has its final entry (what a resumed attempt can start after) */
  settledChunks: number;
  /** the index entries so far (final below settledChunks); a live view: copy what is kept */
  entries: readonly IndexEntry[];
}

/** Chunks an increment does not read: each takes the entry of the backup it builds on. */
export interface IngestCarry {
  /** the previous backup's entries for this disk (same chunk size and disk size) */
  entries: readonly IndexEntry[];
  /** whether chunk n changed since that backup (or must be read again): only those are read */
  changed(n: number): boolean;
}

export interface IngestOptions {
  /** chunks being hashed, encoded or uploaded at once (default: the store's concurrency) */
  concurrency?: number;
  signal?: AbortSignal;
  onProgress?: (p: IngestProgress) => void;
  /** an increment: unchanged chunks keep the previous backup's entries (the source's ranges must skip them) */
  carry?: IngestCarry;
  /**
   * a resumed attempt: the first `chunks` entries are final already (a journal of an earlier attempt); the source's
   * ranges must start at or after chunk `chunks`
   */
  resume?: { chunks: number; entries: readonly IndexEntry[] };
}

/** The data ranges cut at chunk boundaries, so that every piece read belongs to exactly one chunk. */
export async function* splitAtChunks(ranges: AsyncIterable<ByteRange>, chunkSize: number): AsyncGenerator<ByteRange> {
  let last = 0;
  for await (const r of ranges) {
    if (r.offset < last || r.length < 0) throw new ChunkFormatError('invalid-argument', 'Data ranges overlap.');
    last = r.offset + r.length;
    let at = r.offset;
    while (at < last) {
      const end = Math.min(last, (Math.floor(at / chunkSize) + 1) * chunkSize);
      yield { offset: at, length: end - at };
      at = end;
    }
  }
}

/** Stores the disk `source` holds; returns its index (not yet stored: see ChunkStore.putIndex) and what it cost. */
export async function ingestDisk(
  store: ChunkStore,
  source: DiskSource,
  opts: IngestOptions = {},
): Promise<{ index: DiskIndex; stats: StoreStats }> {
  const { chunkSize } = store.repo.config;
  const size = source.size;
  const count = entryCount(size, chunkSize);
  const entries: IndexEntry[] = new Array<IndexEntry>(count).fill('zero');
  const { carry, resume } = opts;
  if (carry && carry.entries.length !== count)
    throw new ChunkFormatError(
      'invalid-argument',
      `The previous index has ${carry.entries.length} chunks, not ${count}.`,
    );
  if (resume && (resume.chunks < 0 || resume.chunks > count || resume.entries.length < resume.chunks))
    throw new ChunkFormatError('invalid-argument', 'The resumed entries do not fit this disk.');
  // a chunk no range reaches: unchanged (the previous entry) or zero
  const unread = (n: number): IndexEntry => (carry && !carry.changed(n) ? carry.entries[n]! : 'zero');
  for (let n = 0; n < count; n++) entries[n] = resume && n < resume.chunks ? resume.entries[n]! : unread(n);
  const first = resume?.chunks ?? 0;
  const stats: StoreStats = { chunks: count, zeroChunks: 0, knownChunks: 0, uploadedChunks: 0, uploadedBytes: 0 };
  const limit = Math.max(1, opts.concurrency ?? store.concurrency);
  const running = new Set<Promise<void>>();
  const pending = new Set<number>();
  let failure: unknown;
  let bytesDone = first * chunkSize;
  let current = -1;
  const settled = (): number => {
    let low = current < 0 ? first : current;
    for (const n of pending) low = Math.min(low, n);
    return low;
  };
  const report = () => opts.onProgress?.({ bytesDone, stats, settledChunks: settled(), entries });

  const lengthOf = (n: number) => Math.min(chunkSize, size - n * chunkSize);
  const submit = async (n: number, chunk: Buffer): Promise<void> => {
    while (running.size >= limit) await Promise.race(running);
    if (failure !== undefined) throw failure;
    const length = chunk.length;
    pending.add(n);
    const task = (async () => {
      try {
        const put = await store.put(chunk, undefined, { handOver: true });
        source.release?.(put.data ?? chunk);
        entries[n] = put.id;
        if (put.id !== 'zero') {
          if (put.uploadedBytes > 0) {
            stats.uploadedChunks++;
            stats.uploadedBytes += put.uploadedBytes;
          } else stats.knownChunks++;
        }
        bytesDone += length;
        report();
      } catch (err) {
        failure ??= err;
      } finally {
        pending.delete(n);
      }
    })();
    running.add(task);
    void task.finally(() => running.delete(task));
  };

  let buf: Buffer | undefined;
  try {
    for await (const piece of source.read(splitAtChunks(source.dataRanges(), chunkSize))) {
      if (opts.signal?.aborted) throw opts.signal.reason ?? new Error('aborted');
      if (failure !== undefined) throw failure;
      const n = Math.floor(piece.offset / chunkSize);
      if (
        piece.offset + piece.data.length > size ||
        n < current ||
        n < first ||
        (n + 1) * chunkSize < piece.offset + piece.data.length
      )
        throw new ChunkFormatError('invalid-argument', `A read at offset ${piece.offset} is outside its chunk.`);
      if (n !== current) {
        if (buf) await submit(current, buf);
        // the chunks in between had no data range: zero or unchanged, never read
        bytesDone += Math.max(0, n - Math.max(current + 1, first)) * chunkSize;
        current = n;
        entries[n] = 'zero';
        // a read of the whole chunk is the chunk: no second buffer, no copy (each fresh 4 MiB buffer costs its page
        // faults in the worker, which maps every large buffer on its own; bin/vmbackup)
        if (piece.offset === n * chunkSize && piece.data.length === lengthOf(n)) {
          buf = piece.data;
          continue;
        }
        buf = Buffer.alloc(lengthOf(n));
      }
      piece.data.copy(buf!, piece.offset - n * chunkSize);
      source.release?.(piece.data);
    }
    if (buf) await submit(current, buf);
    current = count;
  } finally {
    await Promise.all([...running]);
  }
  if (failure !== undefined) throw failure;
  stats.zeroChunks = entries.filter((e) => e === 'zero').length;
  bytesDone = size;
  report();
  return { index: { chunkSize, virtualSize: size, entries }, stats };
}
