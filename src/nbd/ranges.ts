/**
 * What a backup reader needs on top of the client: the extents of one context over a range (merged), and the bytes of
 * a list of ranges read with several requests in flight, handed out in order with bounded memory.
 */
import { BufferPool } from '../shared/buffer-pool';
import type { BlockExtent, NbdClient } from './client';
import { NbdError } from './errors';

export interface ExtentsOptions {
  /** the meta context, e.g. 'base:allocation' or 'qemu:dirty-bitmap:backup-vda'; it must have been negotiated */
  context: string;
  offset?: number;
  /** default: to the end of the export */
  length?: number;
}

/**
 * The extents of CONTEXT over [offset, offset + length), in order, contiguous, clipped to the range, adjacent extents
 * with equal flags merged. Issues BLOCK_STATUS requests one after the other until the range is covered.
 */
export async function* extents(client: NbdClient, opts: ExtentsOptions): AsyncGenerator<BlockExtent> {
  const start = opts.offset ?? 0;
  const end = opts.length === undefined ? client.info.size : start + opts.length;
  if (!client.info.metaContexts.has(opts.context)) {
    throw new NbdError(
      'invalid',
      `NBD export '${client.info.name}': the meta context ${opts.context} was not negotiated on this connection.`,
      { exportName: client.info.name },
    );
  }
  let held: BlockExtent | undefined;
  let at = start;
  while (at < end) {
    const status = await client.blockStatus(at, end - at);
    // the client checked: at least one extent, contiguous from AT, none empty
    for (const e of status.get(opts.context)!) {
      const clipped = { offset: e.offset, length: Math.min(e.offset + e.length, end) - e.offset, flags: e.flags };
      if (clipped.length <= 0) break;
      if (held && held.flags === clipped.flags) held.length += clipped.length;
      else {
        if (held) yield held;
        held = clipped;
      }
      at = clipped.offset + clipped.length;
    }
  }
  if (held) yield held;
}

export interface ByteRange {
  offset: number;
  length: number;
}

/** readRanges' largest request by default (never above the server's maximum) */
export const READ_REQUEST_BYTES = 4 << 20;

export interface ReadRangesOptions {
  /** requests in flight (default 8) */
  inFlight?: number;
  /** the largest single request (default: 4 MiB, never above the client's limit) */
  requestSize?: number;
  /**
   * where the pieces are read into (no fresh buffer per piece): each piece handed out is then the caller's to give
   * back to the pool once done with it (or to drop). Its buffers must hold requestSize bytes.
   */
  pool?: BufferPool;
}

export interface RangeData {
  offset: number;
  data: Buffer;
}

/**
 * Reads RANGES (in the order given) as pieces of at most requestSize bytes, with up to inFlight requests outstanding,
 * and yields every piece in order: a caller can hash the stream as it comes. At most inFlight pieces are held
 * (the consumer's pace bounds memory: nothing new is requested until it takes the next piece). The first failed
 * piece ends the iteration with its NbdError; no later piece is yielded.
 *
 * Given several connections to one export (only when it offers CAN_MULTI_CONN: qemu-nbd does for a read-only
 * export), the pieces are spread over them in turn; the order handed out stays the same.
 */
export async function* readRanges(
  client: NbdClient | readonly NbdClient[],
  ranges: Iterable<ByteRange> | AsyncIterable<ByteRange>,
  opts: ReadRangesOptions = {},
): AsyncGenerator<RangeData> {
  const clients = Array.isArray(client) ? (client as readonly NbdClient[]) : [client as NbdClient];
  const first = clients[0];
  if (!first) throw new NbdError('invalid', 'readRanges needs at least one NBD connection.');
  if (clients.length > 1 && !clients.every((c) => c.info.canMultiConn && c.info.name === first.info.name)) {
    throw new NbdError(
      'invalid',
      `NBD export '${first.info.name}': several connections are safe only to one export that offers multi-conn.`,
      { exportName: first.info.name },
    );
  }
  const inFlight = Math.max(1, opts.inFlight ?? 8);
  const limit = Math.min(...clients.map((c) => c.requestLimit));
  const size = Math.max(1, Math.min(opts.requestSize ?? READ_REQUEST_BYTES, limit));
  if (opts.pool && opts.pool.size < size)
    throw new NbdError('invalid', `readRanges: the pool's buffers of ${opts.pool.size} bytes cannot hold ${size}.`);
  let turn = 0;
  const pieces = splitRanges(ranges, size);
  const queue: Array<{ offset: number; data: Promise<Buffer> }> = [];
  let exhausted = false;
  const fill = async () => {
    while (!exhausted && queue.length < inFlight) {
      const next = await pieces.next();
      if (next.done) {
        exhausted = true;
        break;
      }
      const { offset, length } = next.value;
      const data = clients[turn++ % clients.length]!.read(offset, length, opts.pool?.take(length));
      data.catch(() => undefined); // awaited in order below; a later piece's failure must not be unhandled meanwhile
      queue.push({ offset, data });
    }
  };
  try {
    await fill();
    while (queue.length > 0) {
      const head = queue.shift()!;
      const data = await head.data;
      await fill();
      yield { offset: head.offset, data };
    }
  } finally {
    // the consumer stopped early or a read failed: let what is in flight settle (its result is dropped)
    for (const r of await Promise.allSettled(queue.map((q) => q.data)))
      if (r.status === 'fulfilled') opts.pool?.give(r.value);
    await pieces.return(undefined);
  }
}

/**
 * readRanges over CLIENT into reused buffers (a pool of its own): `read` hands out the pieces, `release` takes a
 * piece's buffer back once its reader is done with it (pieces never released are simply garbage).
 */
export function pooledReads(
  client: NbdClient,
  opts: { inFlight?: number } = {},
): { read(ranges: AsyncIterable<ByteRange>): AsyncGenerator<RangeData>; release(data: Buffer): void } {
  // shared: every piece goes to the codec threads and back (see BufferPool)
  const pool = new BufferPool(Math.min(READ_REQUEST_BYTES, client.requestLimit), 64, { shared: true });
  return {
    read: (ranges) => readRanges(client, ranges, { inFlight: opts.inFlight ?? 8, requestSize: pool.size, pool }),
    release: (data) => pool.give(data),
  };
}

async function* splitRanges(
  ranges: Iterable<ByteRange> | AsyncIterable<ByteRange>,
  size: number,
): AsyncGenerator<ByteRange> {
  for await (const r of ranges) {
    for (let o = r.offset; o < r.offset + r.length; o += size) {
      yield { offset: o, length: Math.min(size, r.offset + r.length - o) };
    }
  }
}

/** The ranges whose extents match WANT (e.g. allocated: `(f) => (f & STATE_HOLE) === 0`), adjacent ones joined. */
export async function* rangesWhere(
  source: AsyncIterable<BlockExtent>,
  want: (flags: number) => boolean,
): AsyncGenerator<ByteRange> {
  let held: ByteRange | undefined;
  for await (const e of source) {
    if (!want(e.flags)) continue;
    if (held && held.offset + held.length === e.offset) held.length += e.length;
    else {
      if (held) yield held;
      held = { offset: e.offset, length: e.length };
    }
  }
  if (held) yield held;
}
