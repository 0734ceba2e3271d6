/** XDR (RFC 4506) encoding for the few ONC RPC / NFSv3 structures the NFS driver needs. */

export class XdrWriter {
  private buf: Buffer;
  private pos = 0;

  constructor(initial = 256) {
    this.buf = Buffer.allocUnsafe(initial);
  }

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const next = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n));
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }

  u32(v: number): this {
    this.ensure(4);
    this.buf.writeUInt32BE(v >>> 0, this.pos);
    this.pos += 4;
    return this;
  }

  u64(v: number | bigint): this {
    this.ensure(8);
    this.buf.writeBigUInt64BE(BigInt(v), this.pos);
    this.pos += 8;
    return this;
  }

  bool(v: boolean): this {
    return this.u32(v ? 1 : 0);
  }

  /** fixed-length opaque (no length prefix), padded to 4 bytes */
  fixed(data: Buffer): this {
    const padded = (data.length + 3) & ~3;
    this.ensure(padded);
    data.copy(this.buf, this.pos);
    this.buf.fill(0, this.pos + data.length, this.pos + padded);
    this.pos += padded;
    return this;
  }

  /** variable-length opaque<> */
  opaque(data: Buffer): this {
    this.u32(data.length);
    return this.fixed(data);
  }

  string(s: string): this {
    return this.opaque(Buffer.from(s, 'utf8'));
  }

  bytes(): Buffer {
    return this.buf.subarray(0, this.pos);
  }
}

export class XdrReader {
  private pos: number;

  constructor(
    private readonly buf: Buffer,
    offset = 0,
  ) {
    this.pos = offset;
  }

  private need(n: number): void {
    if (this.pos + n > this.buf.length)
      throw new Error(`XDR: truncated reply (need ${n} bytes at ${this.pos} of ${this.buf.length})`);
  }

  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }

  u64(): number {
    this.need(8);
    const v = this.buf.readBigUInt64BE(this.pos);
    this.pos += 8;
    return Number(v);
  }

  bool(): boolean {
    return this.u32() !== 0;
  }

  fixed(len: number): Buffer {
    const padded = (len + 3) & ~3;
    this.need(padded);
    const out = this.buf.subarray(this.pos, this.pos + len);
    this.pos += padded;
    return out;
  }

  opaque(): Buffer {
    return this.fixed(this.u32());
  }

  string(): string {
    return this.opaque().toString('utf8');
  }

  skip(n: number): void {
    this.need(n);
    this.pos += n;
  }

  get remaining(): number {
    return this.buf.length - this.pos;
  }
}
