/**
 * ONC RPC (RFC 5531) over TCP with record marking and AUTH_SYS: just enough for the portmapper,
 * MOUNT v3 and NFSv3. Many calls may be outstanding on one connection (matched by xid), which
 * is what lets WRITEs be pipelined.
 *
 * Once a connection has worked, losing it behaves like a "hard" NFS mount: the client reconnects
 * and retransmits the outstanding calls (same xid, so the server's duplicate request cache can
 * answer) until `retryWindowMs` has passed; a ganesha restart takes well under that. The very
 * first connect fails at once, so a wrong host or port is reported immediately.
 */
import { connect, type Socket } from 'node:net';
import { hostname } from 'node:os';
import { XdrReader, XdrWriter } from './xdr';

export class RpcError extends Error {
  constructor(
    message: string,
    /** a Node-style code: ECONNREFUSED, ETIMEDOUT, EACCES (auth), EPROTO (program/procedure) */
    readonly code: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export interface RpcConnectionOptions {
  host: string;
  port: number;
  /** how long to keep reconnecting after an established connection drops */
  retryWindowMs?: number;
  /** no reply within this time -> the call fails with ETIMEDOUT */
  callTimeoutMs?: number;
  connectTimeoutMs?: number;
  uid?: number;
  gid?: number;
}

interface PendingCall {
  xid: number;
  message: Buffer[];
  resolve: (r: XdrReader) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  /** the connection this call was last written to (retransmitted on a new one) */
  sentOn?: Socket;
}

const LAST_FRAGMENT = 0x80000000;
/** Larger than any reply we ask for (READ count <= 64 MiB); a bigger record mark is a broken stream. */
const MAX_RECORD = 256 << 20;
/** Socket reads land here unless a large fragment is being received (record marks, small replies). */
const SCRATCH = 64 << 10;
/** A fragment with at least this much still to come is read by the kernel straight into its own buffer. */
const DIRECT_MIN = 16 << 10;

export class RpcConnection {
  private socket: Socket | undefined;
  private connecting: Promise<void> | undefined;
  private everConnected = false;
  private closed = false;
  private readonly pending = new Map<number, PendingCall>();
  private xid = (Math.random() * 0xffffffff) >>> 0;
  private readonly cred: Buffer;
  // receive state: the 4-byte record mark being read, the fragment being filled, earlier fragments of the record
  private readonly scratch = Buffer.allocUnsafeSlow(SCRATCH);
  private readonly mark = Buffer.alloc(4);
  private markFill = 0;
  private fragment: Buffer | undefined;
  private fragmentFill = 0;
  private fragmentLast = false;
  private recordParts: Buffer[] = [];
  private recordSize = 0;

  constructor(private readonly opts: RpcConnectionOptions) {
    const machine = hostname().slice(0, 255);
    this.cred = new XdrWriter()
      .u32((Date.now() / 1000) >>> 0)
      .string(machine)
      .u32(opts.uid ?? process.getuid?.() ?? 0)
      .u32(opts.gid ?? process.getgid?.() ?? 0)
      .u32(0)
      .bytes();
  }

  get endpoint(): string {
    return `${this.opts.host}:${this.opts.port}`;
  }

  /** Sends one call; `args` are already XDR-encoded pieces (large WRITE data is passed through without copying). */
  call(prog: number, vers: number, proc: number, args: Buffer[]): Promise<XdrReader> {
    if (this.closed) return Promise.reject(new RpcError(`RPC connection to ${this.endpoint} is closed`, 'ECONNRESET'));
    this.xid = (this.xid + 1) >>> 0;
    const xid = this.xid;
    const header = new XdrWriter(128)
      .u32(0) // record mark, filled below
      .u32(xid)
      .u32(0) // CALL
      .u32(2) // RPC version
      .u32(prog)
      .u32(vers)
      .u32(proc)
      .u32(1) // AUTH_SYS
      .opaque(this.cred)
      .u32(0) // verifier AUTH_NONE
      .u32(0)
      .bytes();
    const length = header.length - 4 + args.reduce((n, b) => n + b.length, 0);
    header.writeUInt32BE((LAST_FRAGMENT | length) >>> 0, 0);
    const message = [header, ...args];
    return new Promise<XdrReader>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(xid);
        reject(
          new RpcError(`no reply from ${this.endpoint} within ${this.opts.callTimeoutMs ?? 60_000} ms`, 'ETIMEDOUT'),
        );
      }, this.opts.callTimeoutMs ?? 60_000);
      const call: PendingCall = { xid, message, resolve, reject, timer };
      this.pending.set(xid, call);
      if (this.socket) this.send(call);
      else this.ensureConnected().catch(() => undefined);
    });
  }

  private send(call: PendingCall): void {
    const s = this.socket;
    if (!s || call.sentOn === s) return;
    call.sentOn = s;
    s.cork();
    for (const part of call.message) s.write(part);
    s.uncork();
  }

  private ensureConnected(): Promise<void> {
    if (this.connecting) return this.connecting;
    this.connecting = this.connectLoop().finally(() => {
      this.connecting = undefined;
    });
    return this.connecting;
  }

  private async connectLoop(): Promise<void> {
    const deadline = Date.now() + (this.opts.retryWindowMs ?? 60_000);
    let lastError: Error | undefined;
    do {
      if (this.closed) return;
      try {
        await this.connectOnce();
        this.everConnected = true;
        for (const call of this.pending.values()) this.send(call);
        return;
      } catch (err) {
        lastError = err as Error;
        if (!this.everConnected) break;
        await new Promise((r) => setTimeout(r, 250));
      }
    } while (Date.now() < deadline);
    const code = (lastError as { code?: string } | undefined)?.code ?? 'ECONNREFUSED';
    const error = new RpcError(`cannot connect to ${this.endpoint} (${code})`, code, { cause: lastError });
    this.failAll(error);
    throw error;
  }

  private connectOnce(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.resetReceive();
      // onread instead of 'data' events: no 64 KiB buffer per socket read, and READ data is received in place
      const s: Socket = connect({
        host: this.opts.host,
        port: this.opts.port,
        onread: {
          buffer: () => this.readTarget(),
          callback: (n: number, buf: Uint8Array): boolean => this.onRead(s, n, buf),
        },
      });
      const timer = setTimeout(() => {
        s.destroy(Object.assign(new Error(`connect to ${this.endpoint} timed out`), { code: 'ETIMEDOUT' }));
      }, this.opts.connectTimeoutMs ?? 5_000);
      s.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        s.setNoDelay(true);
        s.setKeepAlive(true, 10_000);
        this.socket = s;
        s.on('error', () => undefined); // 'close' follows and handles it
        s.on('close', () => this.onClose(s));
        resolve();
      });
    });
  }

  private onClose(s: Socket): void {
    if (this.socket !== s) return;
    this.socket = undefined;
    if (this.closed) return;
    // retransmit what is outstanding once the server is back
    if (this.pending.size > 0) this.ensureConnected().catch(() => undefined);
  }

  private failAll(err: Error): void {
    for (const call of this.pending.values()) {
      clearTimeout(call.timer);
      call.reject(err);
    }
    this.pending.clear();
  }

  private resetReceive(): void {
    this.markFill = 0;
    this.fragment = undefined;
    this.fragmentFill = 0;
    this.recordParts = [];
    this.recordSize = 0;
  }

  /** Where the next socket read goes: the rest of a large fragment, else the scratch buffer. Never empty. */
  private readTarget(): Buffer {
    const f = this.fragment;
    if (f && f.length - this.fragmentFill >= DIRECT_MIN) return f.subarray(this.fragmentFill);
    return this.scratch;
  }

  private onRead(s: Socket, n: number, buf: Uint8Array): boolean {
    if (this.socket !== s) return true;
    const f = this.fragment;
    if (f && buf.buffer === f.buffer && buf.byteOffset === f.byteOffset + this.fragmentFill) {
      this.fragmentFill += n;
      if (this.fragmentFill === f.length) {
        this.fragment = undefined;
        this.fragmentDone(f, this.fragmentLast);
      }
    } else {
      this.onData(Buffer.from(buf.buffer, buf.byteOffset, n));
    }
    return true;
  }

  /**
   * Record-marking reassembly (RFC 5531 section 11) of bytes read into the scratch buffer, which is reused:
   * a fragment that is there whole (a small reply) is copied out; a larger one (a READ reply) gets a buffer
   * of the size its record mark announced, and readTarget() has the kernel fill the rest of it in place. A
   * record of several fragments is joined once at its end.
   */
  private onData(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      if (!this.fragment) {
        if (this.markFill === 0 && chunk.length - pos >= 4) {
          this.mark.writeUInt32BE(chunk.readUInt32BE(pos), 0);
          pos += 4;
        } else {
          const k = Math.min(4 - this.markFill, chunk.length - pos);
          chunk.copy(this.mark, this.markFill, pos, pos + k);
          this.markFill += k;
          pos += k;
          if (this.markFill < 4) return;
        }
        this.markFill = 0;
        const word = this.mark.readUInt32BE(0);
        const length = word & 0x7fffffff;
        const last = (word & LAST_FRAGMENT) !== 0;
        if (this.recordSize + length > MAX_RECORD) {
          this.protocolError(`a reply of more than ${MAX_RECORD} bytes`);
          return;
        }
        if (length <= chunk.length - pos) {
          this.fragmentDone(Buffer.from(chunk.subarray(pos, pos + length)), last);
          pos += length;
          continue;
        }
        this.fragment = Buffer.allocUnsafe(length);
        this.fragmentFill = 0;
        this.fragmentLast = last;
      }
      const f = this.fragment;
      const k = Math.min(f.length - this.fragmentFill, chunk.length - pos);
      chunk.copy(f, this.fragmentFill, pos, pos + k);
      this.fragmentFill += k;
      pos += k;
      if (this.fragmentFill === f.length) {
        this.fragment = undefined;
        this.fragmentDone(f, this.fragmentLast);
      }
    }
  }

  private fragmentDone(fragment: Buffer, last: boolean): void {
    if (!last) {
      this.recordParts.push(fragment);
      this.recordSize += fragment.length;
      return;
    }
    const record = this.recordParts.length === 0 ? fragment : Buffer.concat([...this.recordParts, fragment]);
    this.recordParts = [];
    this.recordSize = 0;
    this.onRecord(record);
  }

  /** The byte stream cannot be resynchronised: fail what is outstanding and drop the connection. */
  private protocolError(what: string): void {
    const s = this.socket;
    this.failAll(new RpcError(`server at ${this.endpoint} sent ${what}`, 'EPROTO'));
    this.resetReceive();
    s?.destroy();
  }

  private onRecord(record: Buffer): void {
    const r = new XdrReader(record);
    const xid = r.u32();
    const call = this.pending.get(xid);
    if (!call) return; // a reply to a call that timed out, or a duplicate after retransmission
    this.pending.delete(xid);
    clearTimeout(call.timer);
    try {
      if (r.u32() !== 1) throw new RpcError('not an RPC reply', 'EPROTO');
      const replyStat = r.u32();
      if (replyStat === 0) {
        r.u32(); // verifier flavor
        r.opaque();
        const acceptStat = r.u32();
        if (acceptStat === 0) return call.resolve(r);
        const names = ['SUCCESS', 'PROG_UNAVAIL', 'PROG_MISMATCH', 'PROC_UNAVAIL', 'GARBAGE_ARGS', 'SYSTEM_ERR'];
        throw new RpcError(
          `server at ${this.endpoint} answered ${names[acceptStat] ?? `accept_stat ${acceptStat}`}`,
          'EPROTO',
        );
      }
      const rejectStat = r.u32();
      if (rejectStat === 1)
        throw new RpcError(`server at ${this.endpoint} rejected the credentials (auth_stat ${r.u32()})`, 'EACCES');
      throw new RpcError(`server at ${this.endpoint} does not speak RPC version 2`, 'EPROTO');
    } catch (err) {
      call.reject(err as Error);
    }
  }

  /** Connects now (the first failure is reported at once). */
  async open(): Promise<void> {
    if (!this.socket) await this.ensureConnected();
  }

  close(): void {
    this.closed = true;
    this.failAll(new RpcError(`RPC connection to ${this.endpoint} was closed`, 'ECONNRESET'));
    this.socket?.destroy();
    this.socket = undefined;
  }
}
