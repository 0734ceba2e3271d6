/**
 * A typed NBD client: fixed newstyle handshake, structured replies, meta contexts (base:allocation,
 * qemu:dirty-bitmap:<name>), READ / BLOCK_STATUS / WRITE / WRITE_ZEROES / TRIM / FLUSH with several requests in flight.
 *
 * The server is not trusted. Every reply is checked against the request it answers (cookie, command, range, chunk
 * lengths, coverage at NBD_REPLY_FLAG_DONE); the first violation fails every pending request with one `protocol`
 * NbdError and closes the connection, so a read never resolves with bytes the server did not account for. An error
 * the server reports for one request (EIO on a bad sector) fails that request only.
 */
import { connect as netConnect } from 'node:net';
import type { Socket } from 'node:net';
import { NbdError, nbdErrnoName, printable } from './errors';
import type { NbdErrorKind } from './errors';
import {
  CMD,
  CMD_FLAG,
  CMD_NAMES,
  DEFAULT_MAX_BLOCK,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  NBDMAGIC,
  OLDSTYLE_MAGIC,
  OPT,
  REP,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REPLY_TYPE_ERROR_BIT,
  REP_ERR_BIT,
  REP_ERR_NAMES,
  REP_ERR_POLICY,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  TFLAG,
  decodeBlockStatus,
  decodeChunkHeader,
  decodeErrorPayload,
  decodeInfoBlockSize,
  decodeInfoExport,
  decodeOptionReplyHeader,
  decodeSimpleReply,
  encodeGoData,
  encodeMetaContextData,
  encodeOption,
  encodeRequest,
} from './protocol';
import type { BlockSizes } from './protocol';
import { SocketReader } from './reader';

export interface NbdConnectOptions {
  /** a Unix socket path; or host + port for TCP */
  socketPath?: string;
  host?: string;
  port?: number;
  /** the export to open ('' = the server's default export) */
  exportName?: string;
  /** meta contexts to negotiate, e.g. ['base:allocation', 'qemu:dirty-bitmap:backup-vda']; each must be granted */
  metaContexts?: readonly string[];
  /** ask for structured replies (default true; needed for meta contexts and hole-aware reads) */
  structuredReplies?: boolean;
  /** the handshake must finish within this (default 30 s): a server that accepts and says nothing is an error */
  handshakeTimeoutMs?: number;
  /** the largest request the client sends, below the server's maximum (default: the server's maximum, <= 32 MiB) */
  maxRequest?: number;
}

export interface NbdExportInfo {
  name: string;
  /** bytes */
  size: number;
  /** the transmission flags as the server sent them */
  flags: number;
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canWriteZeroes: boolean;
  canFastZero: boolean;
  canMultiConn: boolean;
  /** the server's block sizes, or the protocol's defaults (1 / 4096 / 32 MiB) when it announced none */
  blockSize: BlockSizes;
  /** whether the server sent NBD_INFO_BLOCK_SIZE */
  blockSizeAnnounced: boolean;
  structuredReplies: boolean;
  /** the granted meta contexts, by name: their ids in BLOCK_STATUS replies */
  metaContexts: ReadonlyMap<string, number>;
}

export interface BlockExtent {
  offset: number;
  length: number;
  /** base:allocation: STATE_HOLE (1) | STATE_ZERO (2); qemu:dirty-bitmap: STATE_DIRTY (1) */
  flags: number;
}

interface Pending {
  cookie: bigint;
  type: number;
  offset: number;
  length: number;
  /** READ: where the data goes */
  buffer?: Buffer;
  /** READ: the ranges chunks covered so far, sorted, never overlapping */
  covered?: Array<[number, number]>;
  coveredBytes: number;
  /** BLOCK_STATUS: extents by context id */
  statuses?: Map<number, BlockExtent[]>;
  reqOne: boolean;
  /** the first error chunk the server sent (the request fails with it at DONE) */
  error?: NbdError;
  resolve(value: unknown): void;
  reject(err: NbdError): void;
}

const MAX_OPTION_REPLY = 64 * 1024;
const MAX_ERROR_PAYLOAD = 6 + 4096 + 8;
const MAX_STATUS_DESCRIPTORS = 1 << 20;

function where(o: NbdConnectOptions): string {
  return o.socketPath !== undefined ? `socket ${o.socketPath}` : `${o.host ?? 'localhost'}:${o.port ?? 10809}`;
}

export class NbdClient {
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private failure: NbdError | undefined;
  private inReply = false;
  private readonly maxRequest: number;
  private readonly closedPromise: Promise<void>;
  private idleWaiters: Array<() => void> = [];
  /** READ bytes the server sent as data, and as holes (OFFSET_HOLE: zeros that never crossed the wire) */
  readonly received = { dataBytes: 0, holeBytes: 0 };

  private constructor(
    private readonly socket: Socket,
    private readonly reader: SocketReader,
    readonly info: NbdExportInfo,
    private readonly server: string,
    maxRequest: number | undefined,
  ) {
    const min = info.blockSize.minimum;
    const serverMax = Math.min(info.blockSize.maximum, DEFAULT_MAX_BLOCK);
    const wanted = Math.min(maxRequest ?? serverMax, serverMax);
    this.maxRequest = Math.max(min, wanted - (wanted % min));
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    void this.receiveLoop();
  }

  /** Connects, negotiates, opens the export; rejects with a typed NbdError (and closes the socket) otherwise. */
  static async connect(options: NbdConnectOptions): Promise<NbdClient> {
    const server = where(options);
    const exportName = options.exportName ?? '';
    const reader = new SocketReader();
    // each read lands where the reader says: a waiting READ's own buffer, or its scratch buffer (reader.ts)
    const onread = {
      buffer: () => reader.nextBuffer(),
      callback: (n: number, b: Buffer) => reader.feed(b.subarray(0, n)),
    };
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s =
        options.socketPath !== undefined
          ? netConnect({ path: options.socketPath, onread })
          : netConnect({ host: options.host ?? 'localhost', port: options.port ?? 10809, onread });
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err: NodeJS.ErrnoException) =>
        reject(
          new NbdError('unreachable', `Cannot connect to the NBD server at ${server}: ${err.code ?? err.message}.`, {
            exportName,
            cause: err,
          }),
        ),
      );
    });
    socket.setNoDelay(true);
    reader.attach(socket);
    const lost = (err?: Error) =>
      reader.end(
        new NbdError('disconnected', `The NBD server at ${server} closed the connection during the handshake.`, {
          exportName,
          cause: err,
        }),
      );
    socket.on('error', lost);
    socket.on('close', () => lost());
    const timeoutMs = options.handshakeTimeoutMs ?? 30_000;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      socket.destroy();
    }, timeoutMs);
    try {
      const info = await handshake(socket, reader, options, server, exportName);
      clearTimeout(timer);
      socket.removeAllListeners('error');
      socket.removeAllListeners('close');
      return new NbdClient(socket, reader, info, server, options.maxRequest);
    } catch (err) {
      clearTimeout(timer);
      socket.destroy();
      if (timedOut) {
        throw new NbdError(
          'handshake',
          `The NBD server at ${server} did not finish the handshake within ${timeoutMs / 1000} s.`,
          { exportName },
        );
      }
      throw err;
    }
  }

  /** The largest request this client sends (the server's maximum, aligned to its minimum). */
  get requestLimit(): number {
    return this.maxRequest;
  }

  /**
   * Reads LENGTH bytes at OFFSET (split into requests of at most the server's maximum, widened to its minimum).
   * INTO, when given, is where the bytes go (exactly LENGTH bytes; e.g. a pooled buffer): what resolves is INTO.
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.checkRange('read', offset, length);
    if (into && into.length !== length)
      throw this.error('invalid', `cannot read ${length} bytes into a buffer of ${into.length}`, offset, length);
    if (length === 0) return into ?? Buffer.alloc(0);
    const min = this.info.blockSize.minimum;
    const start = offset - (offset % min);
    const end = Math.min(this.info.size, Math.ceil((offset + length) / min) * min);
    if (start === offset && end === offset + length && length <= this.maxRequest) {
      return this.request(CMD.READ, 0, offset, length, undefined, into) as Promise<Buffer>;
    }
    const parts: Array<Promise<Buffer>> = [];
    for (let o = start; o < end; o += this.maxRequest) {
      parts.push(this.request(CMD.READ, 0, o, Math.min(this.maxRequest, end - o)) as Promise<Buffer>);
    }
    const whole = await settleAll(parts);
    const joined = whole.length === 1 ? whole[0]! : Buffer.concat(whole);
    const bytes = joined.subarray(offset - start, offset - start + length);
    if (!into) return bytes;
    bytes.copy(into);
    return into;
  }

  /**
   * One BLOCK_STATUS request: extents per granted context name, starting at OFFSET, contiguous. They may cover less
   * than LENGTH (the server decides), and the last one may run past it (the spec allows that); never past the export.
   */
  async blockStatus(
    offset: number,
    length: number,
    opts: { reqOne?: boolean } = {},
  ): Promise<Map<string, BlockExtent[]>> {
    this.checkRange('block status', offset, length);
    if (this.info.metaContexts.size === 0) {
      throw this.error('unsupported', 'BLOCK_STATUS needs a meta context, and none was negotiated', offset, length);
    }
    if (length === 0) throw this.error('invalid', 'a BLOCK_STATUS request must not be empty', offset, length);
    const min = this.info.blockSize.minimum;
    const cap = 0xffffffff - (0xffffffff % min);
    const statuses = (await this.request(
      CMD.BLOCK_STATUS,
      opts.reqOne ? CMD_FLAG.REQ_ONE : 0,
      offset,
      Math.min(length, cap),
    )) as Map<number, BlockExtent[]>;
    const out = new Map<string, BlockExtent[]>();
    for (const [name, id] of this.info.metaContexts) out.set(name, statuses.get(id) ?? []);
    return out;
  }

  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkWritable('write', offset, data.length);
    const flags = this.fuaFlag(opts.fua);
    const parts: Array<Promise<unknown>> = [];
    for (let o = 0; o < data.length; o += this.maxRequest) {
      const piece = data.subarray(o, Math.min(data.length, o + this.maxRequest));
      parts.push(this.request(CMD.WRITE, flags, offset + o, piece.length, piece));
    }
    await settleAll(parts);
  }

  /** Zeroes a range; noHole asks the server to allocate it (NBD_CMD_FLAG_NO_HOLE), else it may punch a hole. */
  async writeZeroes(
    offset: number,
    length: number,
    opts: { noHole?: boolean; fua?: boolean; fastZero?: boolean } = {},
  ): Promise<void> {
    this.checkWritable('write zeroes to', offset, length);
    if (!this.info.canWriteZeroes) {
      throw this.error('unsupported', 'the export does not accept WRITE_ZEROES', offset, length);
    }
    if (opts.fastZero && !this.info.canFastZero) {
      throw this.error('unsupported', 'the export does not accept fast zeroing', offset, length);
    }
    let flags = this.fuaFlag(opts.fua);
    if (opts.noHole) flags |= CMD_FLAG.NO_HOLE;
    if (opts.fastZero) flags |= CMD_FLAG.FAST_ZERO;
    await this.splitRange(CMD.WRITE_ZEROES, flags, offset, length);
  }

  async trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkWritable('trim', offset, length);
    if (!this.info.canTrim) throw this.error('unsupported', 'the export does not accept TRIM', offset, length);
    await this.splitRange(CMD.TRIM, this.fuaFlag(opts.fua), offset, length);
  }

  async flush(): Promise<void> {
    if (!this.info.canFlush) throw this.error('unsupported', 'the export does not accept FLUSH', 0, 0);
    await this.request(CMD.FLUSH, 0, 0, 0);
  }

  /** Waits for the pending requests, sends NBD_CMD_DISC and closes the connection. */
  async disconnect(): Promise<void> {
    if (this.failure) {
      this.socket.destroy();
      return;
    }
    while (this.pending.size > 0 && !this.failure) await new Promise<void>((r) => this.idleWaiters.push(r));
    if (!this.failure && !this.socket.destroyed) {
      this.socket.write(encodeRequest({ flags: 0, type: CMD.DISC, cookie: this.nextCookie++, offset: 0, length: 0 }));
      this.socket.end();
    }
    // no destroy yet: it would drop NBD_CMD_DISC if it still waits in the socket's buffer
    this.fail(this.error('closed', 'the client disconnected', 0, 0), false);
    const timer = setTimeout(() => this.socket.destroy(), 5_000);
    await this.closedPromise;
    clearTimeout(timer);
  }

  /** Closes the connection now; pending requests reject with 'closed'. */
  close(): void {
    this.fail(this.error('closed', 'the client closed the connection', 0, 0));
  }

  /** Resolves when the socket is closed (after disconnect(), close(), or a failure). */
  get closed(): Promise<void> {
    return this.closedPromise;
  }

  private fuaFlag(fua: boolean | undefined): number {
    if (!fua) return 0;
    if (!this.info.canFua) throw this.error('unsupported', 'the export does not accept FUA writes', 0, 0);
    return CMD_FLAG.FUA;
  }

  private async splitRange(type: number, flags: number, offset: number, length: number): Promise<void> {
    const parts: Array<Promise<unknown>> = [];
    for (let o = offset; o < offset + length; o += this.maxRequest) {
      parts.push(this.request(type, flags, o, Math.min(this.maxRequest, offset + length - o)));
    }
    await settleAll(parts);
  }

  private checkRange(what: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw this.error('invalid', `cannot ${what} ${length} bytes at offset ${offset}: not a valid range`, 0, 0);
    }
    if (offset + length > this.info.size) {
      throw this.error(
        'invalid',
        `cannot ${what} ${length} bytes at offset ${offset}: the export ends at ${this.info.size}`,
        offset,
        length,
      );
    }
  }

  private checkWritable(what: string, offset: number, length: number): void {
    this.checkRange(what, offset, length);
    if (this.info.readOnly) throw this.error('unsupported', `cannot ${what} a read-only export`, offset, length);
    const min = this.info.blockSize.minimum;
    if (offset % min !== 0 || length % min !== 0) {
      throw this.error(
        'invalid',
        `cannot ${what} ${length} bytes at offset ${offset}: not aligned to the server's minimum block size ${min}`,
        offset,
        length,
      );
    }
  }

  private error(kind: NbdErrorKind, what: string, offset: number, length: number): NbdError {
    return new NbdError(kind, `NBD export '${this.info.name}' at ${this.server}: ${what}.`, {
      exportName: this.info.name,
      offset,
      length,
    });
  }

  private request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
    into?: Buffer,
  ): Promise<unknown> {
    if (this.failure) {
      const f = this.failure;
      return Promise.reject(
        new NbdError(
          f.kind === 'closed' ? 'closed' : 'disconnected',
          `${f.message.replace(/\.$/, '')}; no new requests.`,
          {
            exportName: this.info.name,
            cause: f,
          },
        ),
      );
    }
    const cookie = this.nextCookie++;
    return new Promise((resolve, reject) => {
      const p: Pending = {
        cookie,
        type,
        offset,
        length,
        coveredBytes: 0,
        reqOne: (flags & CMD_FLAG.REQ_ONE) !== 0,
        resolve,
        reject,
      };
      if (type === CMD.READ) {
        // every byte is overwritten by a data chunk or zeroed by a hole chunk before resolve (coverage is checked)
        p.buffer = into ?? Buffer.allocUnsafe(length);
        p.covered = [];
      }
      if (type === CMD.BLOCK_STATUS) p.statuses = new Map();
      this.pending.set(cookie, p);
      this.socket.write(encodeRequest({ flags, type, cookie, offset, length }));
      if (payload) this.socket.write(payload);
    });
  }

  /** Fails every pending request with ERR and closes the socket (idempotent: the first failure is kept). */
  private fail(err: NbdError, destroy = true): void {
    if (this.failure) return;
    this.failure = err;
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(err);
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
    this.reader.end(err);
    if (destroy) this.socket.destroy();
  }

  private protocol(what: string): NbdError {
    return new NbdError(
      'protocol',
      `The NBD server at ${this.server} (export '${this.info.name}') broke the protocol: ${what}; the connection was closed.`,
      { exportName: this.info.name },
    );
  }

  private async receiveLoop(): Promise<void> {
    this.socket.on('error', (err) => this.reader.end(this.lostError(err)));
    this.socket.on('close', () => this.reader.end(this.lostError()));
    try {
      for (;;) {
        this.inReply = false;
        const head = await this.reader.read(16);
        this.inReply = true;
        const magic = head.readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) await this.simpleReply(head);
        else if (magic === STRUCTURED_REPLY_MAGIC)
          await this.structuredChunk(Buffer.concat([head, await this.reader.read(4)]));
        else throw this.protocol(`a reply starts with the magic 0x${magic.toString(16)}`);
      }
    } catch (err) {
      if (err instanceof NbdError) this.fail(err);
      else this.fail(this.protocol(`the reply could not be parsed (${String(err)})`));
    }
  }

  private lostError(err?: Error): NbdError {
    if (this.failure) return this.failure;
    const cmd = [...this.pending.values()][0];
    const what =
      this.inReply || this.reader.available > 0
        ? 'in the middle of a reply'
        : this.pending.size > 0
          ? `with ${this.pending.size} request(s) pending (the first: ${CMD_NAMES[cmd?.type ?? 0]} at offset ${cmd?.offset})`
          : 'while idle';
    return new NbdError(
      'disconnected',
      `The NBD server at ${this.server} (export '${this.info.name}') closed the connection ${what}${err ? ` (${(err as NodeJS.ErrnoException).code ?? err.message})` : ''}.`,
      { exportName: this.info.name, cause: err },
    );
  }

  /** The request is answered: forget it, and wake disconnect() when nothing is pending any more. */
  private settle(p: Pending): void {
    this.pending.delete(p.cookie);
    if (this.pending.size === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private take(cookie: bigint, what: string): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw this.protocol(`${what} for cookie ${cookie}, which no pending request has`);
    return p;
  }

  private async simpleReply(head: Buffer): Promise<void> {
    const { error, cookie } = decodeSimpleReply(head);
    const p = this.take(cookie, 'a simple reply');
    const cmd = CMD_NAMES[p.type];
    if (error !== 0) {
      this.settle(p);
      p.reject(this.serverError(p, error, '', p.offset));
      return;
    }
    if (this.info.structuredReplies && (p.type === CMD.READ || p.type === CMD.BLOCK_STATUS)) {
      throw this.protocol(`a simple reply to ${cmd} at offset ${p.offset} although structured replies were agreed`);
    }
    if (p.type === CMD.READ) {
      await this.reader.readInto(p.buffer!, 0, p.length);
      this.received.dataBytes += p.length;
    }
    this.settle(p);
    p.resolve(p.type === CMD.READ ? p.buffer : undefined);
  }

  private serverError(p: Pending, errno: number, message: string, offset: number): NbdError {
    const name = nbdErrnoName(errno);
    const what = p.type === CMD.READ ? 'read' : (CMD_NAMES[p.type] ?? `command ${p.type}`);
    return new NbdError(
      'server-error',
      `The NBD server at ${this.server} (export '${this.info.name}') failed the ${what} of ${p.length} bytes at offset ${p.offset} with ${name}${offset !== p.offset ? ` at offset ${offset}` : ''}.`,
      { exportName: this.info.name, errno: name, offset, length: p.length, serverMessage: printable(message) },
    );
  }

  private async structuredChunk(head: Buffer): Promise<void> {
    const { flags, type, cookie, length } = decodeChunkHeader(head);
    const p = this.take(cookie, `a reply chunk of type ${type}`);
    const cmd = CMD_NAMES[p.type];
    const reqEnd = p.offset + p.length;
    if (!this.info.structuredReplies) throw this.protocol('a structured reply chunk although none were agreed');
    if ((flags & ~REPLY_FLAG_DONE) !== 0)
      throw this.protocol(`a reply chunk with unknown flags 0x${flags.toString(16)}`);
    const done = (flags & REPLY_FLAG_DONE) !== 0;

    if (type === REPLY_TYPE.NONE) {
      if (length !== 0 || !done) throw this.protocol('an NBD_REPLY_TYPE_NONE chunk with a payload or without DONE');
    } else if (type === REPLY_TYPE.OFFSET_DATA || type === REPLY_TYPE.OFFSET_HOLE) {
      const name = type === REPLY_TYPE.OFFSET_DATA ? 'OFFSET_DATA' : 'OFFSET_HOLE';
      if (p.type !== CMD.READ) throw this.protocol(`an ${name} chunk in the reply to ${cmd}`);
      if (type === REPLY_TYPE.OFFSET_DATA && (length <= 8 || length - 8 > p.length)) {
        throw this.protocol(`an OFFSET_DATA chunk of ${length - 8} bytes for a read of ${p.length} bytes`);
      }
      if (type === REPLY_TYPE.OFFSET_HOLE && length !== 12) {
        throw this.protocol(`an OFFSET_HOLE chunk with a ${length}-byte payload (12 expected)`);
      }
      const fixed = await this.reader.read(type === REPLY_TYPE.OFFSET_DATA ? 8 : 12);
      const at = Number(fixed.readBigUInt64BE(0));
      const size = type === REPLY_TYPE.OFFSET_DATA ? length - 8 : fixed.readUInt32BE(8);
      if (size === 0) throw this.protocol(`an empty ${name} chunk at offset ${at}`);
      if (at < p.offset || at + size > reqEnd) {
        throw this.protocol(
          `an ${name} chunk for bytes ${at}..${at + size} in the reply to a read of bytes ${p.offset}..${reqEnd}`,
        );
      }
      this.cover(p, at, size, name);
      if (type === REPLY_TYPE.OFFSET_DATA) {
        await this.reader.readInto(p.buffer!, at - p.offset, size);
        this.received.dataBytes += size;
      } else {
        p.buffer!.fill(0, at - p.offset, at - p.offset + size);
        this.received.holeBytes += size;
      }
    } else if (type === REPLY_TYPE.BLOCK_STATUS) {
      if (p.type !== CMD.BLOCK_STATUS) throw this.protocol(`a BLOCK_STATUS chunk in the reply to ${cmd}`);
      const maxDescriptors = Math.min(MAX_STATUS_DESCRIPTORS, p.reqOne ? 1 : p.length);
      if (length < 12 || length > 4 + 8 * maxDescriptors) {
        throw this.protocol(`a BLOCK_STATUS chunk of ${length} bytes for a request of ${p.length} bytes`);
      }
      const decoded = decodeBlockStatus(await this.reader.read(length));
      if (!decoded) throw this.protocol(`a BLOCK_STATUS chunk of ${length} bytes, not a whole number of extents`);
      this.statusChunk(p, decoded.contextId, decoded.descriptors);
    } else if ((type & REPLY_TYPE_ERROR_BIT) !== 0) {
      if (length > MAX_ERROR_PAYLOAD) throw this.protocol(`an error chunk of ${length} bytes`);
      const e = decodeErrorPayload(type, await this.reader.read(length));
      if (!e) throw this.protocol(`an error chunk (type ${type}) whose lengths do not add up`);
      if (e.error === 0) throw this.protocol('an error chunk with error value 0');
      if (e.offset !== undefined && (e.offset < p.offset || e.offset >= reqEnd)) {
        throw this.protocol(`an error at offset ${e.offset}, outside the request's bytes ${p.offset}..${reqEnd}`);
      }
      p.error ??= this.serverError(p, e.error, e.message, e.offset ?? p.offset);
    } else {
      throw this.protocol(`a reply chunk of unknown type ${type} in the reply to ${cmd}`);
    }

    if (!done) return;
    // checked before the request is settled: a violation below fails it together with every other pending one
    if (p.error) {
      this.settle(p);
      p.reject(p.error);
      return;
    }
    if (p.type === CMD.READ) {
      if (p.coveredBytes !== p.length) {
        throw this.protocol(
          `the reply to a read of ${p.length} bytes at offset ${p.offset} ended after ${p.coveredBytes} bytes`,
        );
      }
      this.settle(p);
      p.resolve(p.buffer);
    } else if (p.type === CMD.BLOCK_STATUS) {
      for (const [name, id] of this.info.metaContexts) {
        if (!p.statuses!.has(id)) {
          throw this.protocol(`the BLOCK_STATUS reply at offset ${p.offset} has no extents for ${name}`);
        }
      }
      this.settle(p);
      p.resolve(p.statuses);
    } else {
      if (type !== REPLY_TYPE.NONE) throw this.protocol(`a ${type} chunk ends the reply to ${cmd}`);
      this.settle(p);
      p.resolve(undefined);
    }
  }

  /** Records a READ chunk's range; overlapping an earlier chunk is a protocol error. */
  private cover(p: Pending, at: number, size: number, name: string): void {
    const list = p.covered!;
    const end = at + size;
    // binary search for the first range that ends after AT
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (list[mid]![1] <= at) lo = mid + 1;
      else hi = mid;
    }
    const next = list[lo];
    if (next && next[0] < end) {
      throw this.protocol(
        `an ${name} chunk for bytes ${at}..${end} overlaps bytes ${next[0]}..${next[1]} already sent`,
      );
    }
    const prev = lo > 0 ? list[lo - 1] : undefined;
    if (prev && prev[1] === at) {
      prev[1] = end;
      if (next && next[0] === end) {
        prev[1] = next[1];
        list.splice(lo, 1);
      }
    } else if (next && next[0] === end) next[0] = at;
    else list.splice(lo, 0, [at, end]);
    p.coveredBytes += size;
  }

  private statusChunk(
    p: Pending,
    contextId: number,
    descriptors: ReadonlyArray<{ length: number; flags: number }>,
  ): void {
    const name = [...this.info.metaContexts].find(([, id]) => id === contextId)?.[0];
    if (name === undefined)
      throw this.protocol(`BLOCK_STATUS extents for context id ${contextId}, which was never granted`);
    if (p.statuses!.has(contextId)) throw this.protocol(`two BLOCK_STATUS chunks for ${name} in one reply`);
    if (p.reqOne && descriptors.length !== 1) {
      throw this.protocol(`${descriptors.length} extents for ${name} in the reply to a single-extent BLOCK_STATUS`);
    }
    const reqEnd = p.offset + p.length;
    const extents: BlockExtent[] = [];
    let at = p.offset;
    descriptors.forEach((d, i) => {
      if (d.length === 0) throw this.protocol(`a zero-length extent at offset ${at} for ${name}`);
      const end = at + d.length;
      const last = i === descriptors.length - 1;
      if (end > reqEnd && (!last || p.reqOne)) {
        throw this.protocol(`an extent for ${name} at offset ${at} runs to ${end}, past the request's end ${reqEnd}`);
      }
      if (end > this.info.size) {
        throw this.protocol(
          `an extent for ${name} at offset ${at} runs to ${end}, past the export's end ${this.info.size}`,
        );
      }
      extents.push({ offset: at, length: d.length, flags: d.flags });
      at = end;
    });
    p.statuses!.set(contextId, extents);
  }
}

/** Waits for every promise (none left unhandled), then throws the first rejection or returns all values. */
async function settleAll<T>(parts: Array<Promise<T>>): Promise<T[]> {
  const settled = await Promise.allSettled(parts);
  const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
  if (failed) throw failed.reason;
  return settled.map((s) => (s as PromiseFulfilledResult<T>).value);
}

// ---- handshake ----

async function handshake(
  socket: Socket,
  reader: SocketReader,
  options: NbdConnectOptions,
  server: string,
  exportName: string,
): Promise<NbdExportInfo> {
  const fail = (kind: NbdErrorKind, what: string) =>
    new NbdError(kind, `NBD handshake with ${server} (export '${exportName}'): ${what}.`, { exportName });
  const hello = await reader.read(16);
  if (hello.readBigUInt64BE(0) !== NBDMAGIC) throw fail('handshake', 'the server is not an NBD server (no NBDMAGIC)');
  const style = hello.readBigUInt64BE(8);
  if (style === OLDSTYLE_MAGIC)
    throw fail('unsupported', 'the server speaks the oldstyle protocol, which is not supported');
  if (style !== IHAVEOPT) throw fail('handshake', 'the server sent neither IHAVEOPT nor the oldstyle magic');
  const serverFlags = (await reader.read(2)).readUInt16BE(0);
  if ((serverFlags & FLAG_FIXED_NEWSTYLE) === 0) {
    throw fail('unsupported', 'the server does not offer the fixed newstyle handshake');
  }
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
  socket.write(clientFlags);

  const replies = async (option: number): Promise<Array<{ type: number; data: Buffer }>> => {
    const out: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const head = decodeOptionReplyHeader(await reader.read(20));
      if (!head) throw fail('handshake', 'an option reply with a bad magic');
      if (head.option !== option) {
        throw fail('handshake', `the reply to option ${option} names option ${head.option}`);
      }
      if (head.length > MAX_OPTION_REPLY) throw fail('handshake', `an option reply of ${head.length} bytes`);
      const data = head.length > 0 ? await reader.read(head.length) : Buffer.alloc(0);
      out.push({ type: head.type, data });
      if (head.type === REP.ACK || (head.type & REP_ERR_BIT) !== 0) return out;
    }
  };
  const refusal = (type: number, data: Buffer): string => {
    const text = data.length > 0 ? `: ${printable(data.toString('utf8'))}` : '';
    return `${REP_ERR_NAMES[type] ?? `error ${type}`}${text}`;
  };

  const metaQueries = [...new Set(options.metaContexts ?? [])];
  let structured = false;
  if (options.structuredReplies !== false || metaQueries.length > 0) {
    socket.write(encodeOption(OPT.STRUCTURED_REPLY));
    const [r] = await replies(OPT.STRUCTURED_REPLY);
    if (r!.type === REP.ACK) structured = true;
    else if (r!.type !== REP_ERR_UNSUP)
      throw fail('handshake', `structured replies refused (${refusal(r!.type, r!.data)})`);
    if (!structured && metaQueries.length > 0) {
      throw fail('unsupported', 'the server has no structured replies, which meta contexts need');
    }
  }

  const metaContexts = new Map<string, number>();
  if (metaQueries.length > 0) {
    socket.write(encodeOption(OPT.SET_META_CONTEXT, encodeMetaContextData(exportName, metaQueries)));
    for (const r of await replies(OPT.SET_META_CONTEXT)) {
      if (r.type === REP.META_CONTEXT) {
        if (r.data.length < 5) throw fail('handshake', 'a meta context reply without a name');
        const id = r.data.readUInt32BE(0);
        const name = r.data.subarray(4).toString('utf8');
        if (!metaQueries.includes(name))
          throw fail('handshake', `the server granted meta context ${printable(name)}, never asked for`);
        if (metaContexts.has(name) || [...metaContexts.values()].includes(id)) {
          throw fail('handshake', `the server granted meta context ${name} (id ${id}) twice`);
        }
        metaContexts.set(name, id);
      } else if (r.type === REP_ERR_UNKNOWN) {
        throw fail('no-export', 'the server has no such export');
      } else if (r.type !== REP.ACK) {
        throw fail('unsupported', `meta contexts refused (${refusal(r.type, r.data)})`);
      }
    }
    const missing = metaQueries.filter((q) => !metaContexts.has(q));
    if (missing.length > 0) {
      throw fail(
        'unsupported',
        `the export does not offer the meta context${missing.length > 1 ? 's' : ''} ${missing.join(', ')}`,
      );
    }
  }

  socket.write(encodeOption(OPT.GO, encodeGoData(exportName, [INFO.BLOCK_SIZE])));
  let exportInfo: { size: bigint; flags: number } | undefined;
  let blockSize: BlockSizes | undefined;
  for (const r of await replies(OPT.GO)) {
    if (r.type === REP.INFO) {
      if (r.data.length < 2) throw fail('handshake', 'an NBD_REP_INFO without a type');
      const infoType = r.data.readUInt16BE(0);
      if (infoType === INFO.EXPORT) {
        exportInfo = decodeInfoExport(r.data);
        if (!exportInfo) throw fail('handshake', 'a malformed NBD_INFO_EXPORT');
      } else if (infoType === INFO.BLOCK_SIZE) {
        blockSize = decodeInfoBlockSize(r.data);
        if (!blockSize) throw fail('handshake', "an NBD_INFO_BLOCK_SIZE that breaks the spec's rules");
      }
    } else if (r.type === REP_ERR_UNKNOWN) {
      throw fail('no-export', 'the server has no such export');
    } else if (r.type === REP_ERR_TLS_REQD) {
      throw fail('unsupported', 'the server requires TLS, which this client does not speak');
    } else if (r.type === REP_ERR_UNSUP) {
      throw fail('unsupported', 'the server does not support NBD_OPT_GO');
    } else if (r.type === REP_ERR_POLICY) {
      throw fail('handshake', `the server refused the export (${refusal(r.type, r.data)})`);
    } else if (r.type !== REP.ACK) {
      throw fail('handshake', `the server refused the export (${refusal(r.type, r.data)})`);
    }
  }
  if (!exportInfo) throw fail('handshake', 'the server opened the export without sending its size');
  if (exportInfo.size > BigInt(Number.MAX_SAFE_INTEGER))
    throw fail('unsupported', `an export of ${exportInfo.size} bytes`);
  const tflags = exportInfo.flags;
  const has = (f: number) => (tflags & TFLAG.HAS_FLAGS) !== 0 && (tflags & f) !== 0;
  return {
    name: exportName,
    size: Number(exportInfo.size),
    flags: tflags,
    readOnly: has(TFLAG.READ_ONLY),
    canFlush: has(TFLAG.SEND_FLUSH),
    canFua: has(TFLAG.SEND_FUA),
    canTrim: has(TFLAG.SEND_TRIM),
    canWriteZeroes: has(TFLAG.SEND_WRITE_ZEROES),
    canFastZero: has(TFLAG.SEND_FAST_ZERO),
    canMultiConn: has(TFLAG.CAN_MULTI_CONN),
    blockSize: blockSize ?? { minimum: 1, preferred: 4096, maximum: DEFAULT_MAX_BLOCK },
    blockSizeAnnounced: blockSize !== undefined,
    structuredReplies: structured,
    metaContexts,
  };
}
