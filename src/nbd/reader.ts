/**
 * Bytes from a socket, pulled as the parser needs them: `read(n)` resolves with exactly n bytes, `readInto` copies n
 * bytes straight into a caller's buffer. The socket reads into one reused buffer (`net.connect`'s `onread`), and
 * `feed` copies each read synchronously: while the parser waits in `readInto` with nothing buffered, the bytes go
 * directly into the request's buffer (READ payloads: one copy, no allocation, little for the GC). When the socket
 * ends or fails first, pending and later reads reject with what `end` was given.
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

  /** Pauses the socket when more than highWater bytes wait unparsed (bounded memory whatever the server sends). */
  constructor(private readonly highWater = 8 << 20) {}

  /** The socket to pause and resume (feed() is its onread callback). */
  attach(socket: Socket): void {
    this.socket = socket;
  }

  /**
   * Bytes the socket read into its reused buffer: used or copied before returning. Returns false to pause reading
   * (onread's contract) when too much waits unparsed.
   */
  feed(b: Buffer): boolean {
    let off = 0;
    const sink = this.sink;
    if (sink && this.buffered === 0) {
      off = Math.min(sink.left, b.length);
      b.copy(sink.dest, sink.at, 0, off);
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

  /** No more bytes will come: pending and later reads reject with ERR once the buffered bytes run out. */
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
