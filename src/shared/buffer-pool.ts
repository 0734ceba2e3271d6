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
 * Plain ArrayBuffers, not SharedArrayBuffers: V8 copies into and out of shared memory with a slower relaxed-atomic
 * memmove (measured: 9% of a pull's CPU). A buffer moved to a codec thread and back (a transfer: the memory moves,
 * the ArrayBuffer object does not) comes back as another ArrayBuffer object over the same memory, so `give` takes
 * any unshared buffer of the pool's size, not only the objects `take` made.
 *
 * Ownership: `take()` hands a buffer out; the taker gives it back with `give()` only once nothing (a socket write, a
 * thread, an upload) can still read or write it. A buffer whose use failed is simply dropped (the garbage collector
 * frees it). A buffer given twice is kept once; a detached one (moved to a thread meanwhile) is ignored.
 */
export class BufferPool {
  private readonly free: ArrayBuffer[] = [];
  /** buffers made since the pool was created (tests; diagnostics) */
  allocated = 0;

  /**
   * @param size bytes of each buffer
   * @param keep buffers kept for reuse at most (more taken at once are made, and dropped when given back)
   */
  constructor(
    readonly size: number,
    readonly keep = 64,
  ) {
    if (!Number.isSafeInteger(size) || size <= 0)
      throw new RangeError(`A buffer pool needs a positive size, not ${size}.`);
  }

  /** A buffer of `length` bytes (the first bytes of a pooled one; its content is whatever was there before). */
  take(length = this.size): Buffer {
    if (!Number.isSafeInteger(length) || length < 0 || length > this.size)
      throw new RangeError(`A buffer of ${length} bytes does not fit this pool's ${this.size}.`);
    let ab = this.free.pop();
    if (!ab) {
      // its own ArrayBuffer (allocUnsafe may slice Node's shared 8 KiB pool for small sizes)
      ab = Buffer.allocUnsafeSlow(this.size).buffer as ArrayBuffer;
      this.allocated++;
    }
    return Buffer.from(ab, 0, length);
  }

  /** Takes back a buffer (any view of one whole pool-sized ArrayBuffer) once its user is done with it. */
  give(b: Uint8Array): void {
    const ab = b.buffer;
    if (!(ab instanceof ArrayBuffer) || ab.byteLength !== this.size) return;
    if (this.free.length >= this.keep || this.free.includes(ab)) return;
    this.free.push(ab);
  }

  /** Buffers waiting for reuse. */
  get idle(): number {
    return this.free.length;
  }
}
