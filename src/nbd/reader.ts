/**
 * Bytes from a socket, pulled as the parser needs them: `read(n)` resolves with exactly n bytes, `readInto` copies n
 * bytes straight into a caller's buffer (READ payloads land in the request's buffer without an extra copy). When the
 * socket ends or fails first, both reject with what `onEnd` says.
 */
import type { Socket } from 'node:net';

export class SocketReader {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: (() => void) | undefined;
  private ended: Error | undefined;
  private paused = false;

  /** Pauses the socket when more than highWater bytes wait unparsed (bounded memory whatever the server sends). */
  constructor(
    private readonly socket: Socket,
    private readonly highWater = 8 << 20,
  ) {
    socket.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.buffered += b.length;
      if (this.buffered > this.highWater && !this.paused) {
        this.paused = true;
        socket.pause();
      }
      this.wake();
    });
  }

  /** No more bytes will come: pending and later reads reject with ERR once the buffered bytes run out. */
  end(err: Error): void {
    this.ended ??= err;
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

  private async waitFor(n: number): Promise<void> {
    while (this.buffered < n) {
      if (this.ended) throw this.ended;
      if (this.paused) {
        this.paused = false;
        this.socket.resume();
      }
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  private consumed(): void {
    if (this.paused && this.buffered <= this.highWater) {
      this.paused = false;
      this.socket.resume();
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
    this.consumed();
    return out;
  }

  /** Copies n bytes into DEST at OFFSET as they arrive (a large payload never waits whole in memory twice). */
  async readInto(dest: Buffer, offset: number, n: number): Promise<void> {
    let done = 0;
    while (done < n) {
      if (this.buffered === 0) await this.waitFor(1);
      const take = Math.min(n - done, this.buffered);
      this.copyOut(dest, offset + done, take);
      this.buffered -= take;
      done += take;
      this.consumed();
    }
  }

  /** Drops n bytes (a payload that is checked and thrown away). */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.buffered === 0) await this.waitFor(1);
      const take = Math.min(left, this.buffered);
      this.copyOut(undefined, 0, take);
      this.buffered -= take;
      left -= take;
      this.consumed();
    }
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
