/**
 * Reused buffers of one size for the data path (NBD reads, chunk objects), so that a backup allocates a few dozen
 * buffers instead of one per 4 MiB piece.
 *
 * Why: a piece lives across many awaits (several requests in flight, a codec thread, an upload), survives young
 * collections and is promoted, so each fresh 4 MiB buffer could only be freed by a major collection of the whole
 * worker heap. Measured with `perf` on a pull backup of 2 GiB (bench/pull.ts): V8's major-GC marking took about a
 * quarter of the worker's CPU, and the page faults of fresh buffers (the worker maps each large buffer on its own,
 * bin/vmbackup) a good part of the rest of the overhead.
 *
 * Two kinds, chosen by the data's path:
 * - plain ArrayBuffers (the default) for buffers that stay on this thread: V8 copies into and out of shared memory
 *   with a slower relaxed-atomic memmove (measured: 9% of a pull's CPU). A plain buffer moved to a thread and back (a
 *   transfer: the memory moves, the ArrayBuffer object does not) comes back as another ArrayBuffer object over the
 *   same memory, so such a pool's `give` takes any unshared buffer of its size, not only the objects `take` made.
 * - SharedArrayBuffers (`shared: true`) for buffers that go to the codec threads and back with every chunk (the NBD
 *   reads and chunk objects of a chunk backup). Each transfer back makes a new ArrayBuffer, which V8 counts as 4 MiB of
 *   new external memory on the main isolate: measured, a 2 GiB pull into a chunk repository ran ~55 full mark-compacts,
 *   about 30% of the worker's CPU. Shared memory is not counted so, and is not moved: the codec pool hands back the
 *   very object it was given (CodecPool rebinds the reply), so a shared pool knows its buffers by identity: `give`
 *   keeps only buffers it made, each once; anything else (a copy, another thread's view) is dropped.
 *
 * - page-aligned memory (`aligned: true`) for buffers written to files with O_DIRECT (a chunk object on a local
 *   target, storage/local/tree.ts): the kernel reads them straight from this memory, so they must start on a page.
 *   Node's own buffers are malloc'd (16 bytes into a page), so an aligned buffer is a WebAssembly.Memory's, which
 *   starts on a 64 KiB boundary. Each reserves address space (not memory) for its guard regions: only for pools of
 *   a few buffers.
 *
 * Ownership: `take()` hands a buffer out; the taker gives it back with `give()` only once nothing (a socket write, a
 * thread, an upload) can still read or write it. A buffer whose use failed is simply dropped (the garbage collector
 * frees it). A buffer given twice is kept once; a detached one (moved to a thread meanwhile) is ignored.
 */
import { isArrayBuffer } from 'node:util/types';

/** WebAssembly.Memory (not in @types/node): memory that starts on a 64 KiB boundary. */
interface WasmMemory {
  readonly buffer: ArrayBufferLike;
}
const { Memory } = (
  globalThis as unknown as {
    WebAssembly: { Memory: new (d: { initial: number; maximum: number; shared?: boolean }) => WasmMemory };
  }
).WebAssembly;
const WASM_PAGE = 64 * 1024;

/** SIZE bytes (rounded up to 64 KiB) of zeroed memory that starts on a 64 KiB boundary, shared or not. */
export function alignedArrayBuffer(size: number, shared: boolean): ArrayBufferLike {
  const pages = Math.max(1, Math.ceil(size / WASM_PAGE));
  return new Memory({ initial: pages, maximum: pages, shared }).buffer;
}

export class BufferPool {
  private readonly free: ArrayBufferLike[] = [];
  /** shared pools: the buffers this pool made (the only ones it takes back) */
  private readonly made = new WeakSet<ArrayBufferLike>();
  /** buffers made since the pool was created (tests; diagnostics) */
  allocated = 0;
  /** each buffer's ArrayBuffer's length: `size`, or more when aligned (whole 64 KiB pages) */
  private readonly byteLength: number;

  /**
   * @param size bytes of each buffer
   * @param keep buffers kept for reuse at most (more taken at once are made, and dropped when given back)
   */
  constructor(
    readonly size: number,
    readonly keep = 64,
    readonly opts: { shared?: boolean; aligned?: boolean } = {},
  ) {
    if (!Number.isSafeInteger(size) || size <= 0)
      throw new RangeError(`A buffer pool needs a positive size, not ${size}.`);
    this.byteLength = opts.aligned ? Math.max(1, Math.ceil(size / WASM_PAGE)) * WASM_PAGE : size;
  }

  /**
   * A buffer of `length` bytes (the first bytes of a pooled one), or without `length` a whole pooled one (`size`
   * bytes; an aligned one may be up to 64 KiB longer). Its content is whatever was there before.
   */
  take(length?: number): Buffer {
    if (length !== undefined && (!Number.isSafeInteger(length) || length < 0 || length > this.size))
      throw new RangeError(`A buffer of ${length} bytes does not fit this pool's ${this.size}.`);
    let ab = this.free.pop();
    if (!ab) {
      if (this.opts.aligned) {
        ab = alignedArrayBuffer(this.size, this.opts.shared === true);
        if (this.opts.shared) this.made.add(ab);
      } else if (this.opts.shared) {
        ab = new SharedArrayBuffer(this.size);
        this.made.add(ab);
      } else {
        // its own ArrayBuffer (allocUnsafe may slice Node's shared 8 KiB pool for small sizes)
        ab = Buffer.allocUnsafeSlow(this.size).buffer as ArrayBuffer;
      }
      this.allocated++;
    }
    return Buffer.from(ab, 0, length ?? ab.byteLength);
  }

  /** Takes back a buffer (any view of one whole pool-sized ArrayBuffer) once its user is done with it. */
  give(b: Uint8Array): void {
    const ab = b.buffer;
    if (this.opts.shared ? !this.made.has(ab) : !isArrayBuffer(ab) || ab.byteLength !== this.byteLength) return;
    if (this.free.length >= this.keep || this.free.includes(ab)) return;
    this.free.push(ab);
  }

  /** Buffers waiting for reuse. */
  get idle(): number {
    return this.free.length;
  }
}

/** The transfer list of a message holding these views: their unshared memory (shared memory is never moved). */
export function movable(views: Array<Uint8Array | undefined>): ArrayBuffer[] {
  const list: ArrayBuffer[] = [];
  for (const v of views) if (v && isArrayBuffer(v.buffer) && !list.includes(v.buffer)) list.push(v.buffer);
  return list;
}
