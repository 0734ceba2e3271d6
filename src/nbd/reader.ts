/**
 * Bytes from a socket, pulled as the parser needs them: `read(n)` resolves with exactly n bytes, `readInto` puts n
 * bytes straight into a caller's buffer. The socket reads (`net.connect`'s `onread`) into the buffer `nextBuffer`
 * names before each read: while the parser waits in `readInto` with nothing buffered, that is the rest of the
 * request's own buffer, so the kernel writes a READ payload where it belongs (no copy, no allocation); otherwise one
 * reused scratch buffer, whose bytes `feed` copies out synchronously. A payload's first read or two (they come with
 * its reply header, before the parser asked) take the copy. Measured on a pull into a chunk repository: the copy
 * into the shared buffers (V8 copies into shared memory word by word) was a fifth of the worker's CPU. When the
 * socket ends or fails first, pending and later reads reject with what `end` was given.
 */
import type { Socket } from 'node:net';

interface Sink {
  dest: Buffer;
  at: number;
  left: number;
  resolve(): void;
  reject(err: Error): void;
}

export class SocketReader {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: (() => void) | undefined;
  private sink: Sink | undefined;
  private ended: Error | undefined;
  private paused = false;
  private socket: Socket | undefined;

  /** bytes the socket read straight into a request's buffer (tests; diagnostics) */
  inPlace = 0;
  /** where the socket reads when no request's buffer waits for the bytes */
  private readonly scratch = Buffer.allocUnsafe(1 << 20);

  /** Pauses the socket when more than highWater bytes wait unparsed (bounded memory whatever the server sends). */
  constructor(private readonly highWater = 8 << 20) {}

  /**
   * The buffer the socket's next read goes into (onread's `buffer` function, called after each `feed`): the rest of
   * the waiting request's buffer when nothing is buffered before it, else the scratch buffer.
   */
  nextBuffer(): Buffer {
    const sink = this.sink;
    if (sink && this.buffered === 0 && sink.left > 0) return sink.dest.subarray(sink.at, sink.at + sink.left);
    return this.scratch;
  }

  /** The socket to pause and resume (feed() is its onread callback). */
  attach(socket: Socket): void {
    this.socket = socket;
  }

  /**
   * Bytes the socket read into the buffer nextBuffer gave: in place when that was the waiting request's, else used
   * or copied before returning. Returns false to pause reading (onread's contract) when too much waits unparsed.
   */
  feed(b: Buffer): boolean {
    let off = 0;
    const sink = this.sink;
    if (sink && this.buffered === 0) {
      off = Math.min(sink.left, b.length);
      // read straight into the sink (nextBuffer): the bytes are in place already
      if (b.buffer !== sink.dest.buffer || b.byteOffset !== sink.dest.byteOffset + sink.at)
        b.copy(sink.dest, sink.at, 0, off);
      else this.inPlace += off;
      sink.at += off;
      sink.left -= off;
      if (sink.left === 0) {
        this.sink = undefined;
        sink.resolve();
      }
    }
    if (off < b.length) {
      const rest = Buffer.allocUnsafe(b.length - off);
      b.copy(rest, 0, off);
      this.chunks.push(rest);
      this.buffered += rest.length;
      this.wake();
    }
    if (this.buffered > this.highWater) {
      this.paused = true;
      return false;
    }
    return true;
  }

  /**
   * No more bytes will come: pending and later reads reject with ERR once the buffered bytes run out. Only for a
   * socket that reads no more (ended, failed, destroyed; or idle, no readInto waiting): the read after a nextBuffer
   * that named a waiting request's buffer still lands there, so its owner must not reuse that buffer before the
   * socket is gone (a rejected read's buffer is dropped, never given back to a pool).
   */
  end(err: Error): void {
    this.ended ??= err;
    const sink = this.sink;
    this.sink = undefined;
    sink?.reject(this.ended);
    this.wake();
  }

  get available(): number {
    return this.buffered;
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  private resume(): void {
    if (this.paused && this.buffered <= this.highWater) {
      this.paused = false;
      this.socket?.resume();
    }
  }

  private async waitFor(n: number): Promise<void> {
    while (this.buffered < n) {
      if (this.ended) throw this.ended;
      if (this.paused) {
        this.paused = false;
        this.socket?.resume();
      }
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  async read(n: number): Promise<Buffer> {
    if (this.buffered < n) await this.waitFor(n);
    const first = this.chunks[0];
    let out: Buffer;
    if (first && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      this.copyOut(out, 0, n);
    }
    this.buffered -= n;
    this.resume();
    return out;
  }

  /** Copies n bytes into DEST at OFFSET: what is buffered first, the rest straight from the socket as it arrives. */
  async readInto(dest: Buffer, offset: number, n: number): Promise<void> {
    const now = Math.min(n, this.buffered);
    if (now > 0) {
      this.copyOut(dest, offset, now);
      this.buffered -= now;
      this.resume();
    }
    if (now === n) return;
    if (this.ended) throw this.ended;
    await new Promise<void>((resolve, reject) => {
      this.sink = { dest, at: offset + now, left: n - now, resolve, reject };
    });
  }

  private copyOut(dest: Buffer | undefined, at: number, n: number): void {
    let left = n;
    let pos = at;
    while (left > 0) {
      const c = this.chunks[0]!;
      const take = Math.min(left, c.length);
      if (dest) c.copy(dest, pos, 0, take);
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
      left -= take;
      pos += take;
    }
  }
}
