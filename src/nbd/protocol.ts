/**
 * The NBD wire format (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): constants, and pure
 * encoders/decoders of the frames the client sends and receives. Everything is big-endian.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OLDSTYLE_MAGIC = 0x00420281861253n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** handshake flags (server) and client flags */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
} as const;

/** option reply types with bit 31 set are errors */
export const REP_ERR_BIT = 0x80000000;
export const REP_ERR_NAMES: Readonly<Record<number, string>> = {
  [REP_ERR_BIT + 1]: 'NBD_REP_ERR_UNSUP',
  [REP_ERR_BIT + 2]: 'NBD_REP_ERR_POLICY',
  [REP_ERR_BIT + 3]: 'NBD_REP_ERR_INVALID',
  [REP_ERR_BIT + 4]: 'NBD_REP_ERR_PLATFORM',
  [REP_ERR_BIT + 5]: 'NBD_REP_ERR_TLS_REQD',
  [REP_ERR_BIT + 6]: 'NBD_REP_ERR_UNKNOWN',
  [REP_ERR_BIT + 7]: 'NBD_REP_ERR_SHUTDOWN',
  [REP_ERR_BIT + 8]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [REP_ERR_BIT + 9]: 'NBD_REP_ERR_TOO_BIG',
  [REP_ERR_BIT + 10]: 'NBD_REP_ERR_EXT_HEADER_REQD',
};
export const REP_ERR_UNSUP = REP_ERR_BIT + 1;
export const REP_ERR_POLICY = REP_ERR_BIT + 2;
export const REP_ERR_TLS_REQD = REP_ERR_BIT + 5;
export const REP_ERR_UNKNOWN = REP_ERR_BIT + 6;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** transmission flags */
export const TFLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;
export type Command = (typeof CMD)[keyof typeof CMD];
export const CMD_NAMES: Readonly<Record<number, string>> = {
  0: 'READ',
  1: 'WRITE',
  2: 'DISC',
  3: 'FLUSH',
  4: 'TRIM',
  5: 'CACHE',
  6: 'WRITE_ZEROES',
  7: 'BLOCK_STATUS',
};

export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;
export const REPLY_TYPE_ERROR_BIT = 1 << 15;

/** base:allocation status bits */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
/** qemu:dirty-bitmap:<name> status bit */
export const STATE_DIRTY = 1 << 0;

/** The protocol's default maximum request size when the server does not announce one (32 MiB). */
export const DEFAULT_MAX_BLOCK = 32 << 20;

export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;

/** IHAVEOPT, option, length, data */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

function stringField(s: string): Buffer {
  const bytes = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(4 + bytes.length);
  b.writeUInt32BE(bytes.length, 0);
  bytes.copy(b, 4);
  return b;
}

/** NBD_OPT_GO / NBD_OPT_INFO data: export name, then the info types asked for. */
export function encodeGoData(exportName: string, infos: readonly number[]): Buffer {
  const tail = Buffer.alloc(2 + 2 * infos.length);
  tail.writeUInt16BE(infos.length, 0);
  infos.forEach((t, i) => tail.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([stringField(exportName), tail]);
}

/** NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT data: export name, number of queries, each query. */
export function encodeMetaContextData(exportName: string, queries: readonly string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([stringField(exportName), count, ...queries.map(stringField)]);
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

/** The 20-byte option reply header; undefined when the magic is wrong. */
export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader | undefined {
  if (b.length < 20 || b.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) return undefined;
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

export interface RequestHeader {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

export function encodeRequest(r: RequestHeader): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

export interface SimpleReplyHeader {
  error: number;
  cookie: bigint;
}

export function decodeSimpleReply(b: Buffer): SimpleReplyHeader {
  return { error: b.readUInt32BE(4), cookie: b.readBigUInt64BE(8) };
}

export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

export function decodeChunkHeader(b: Buffer): ChunkHeader {
  return {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    length: b.readUInt32BE(16),
  };
}

export interface ErrorPayload {
  error: number;
  message: string;
  /** ERROR_OFFSET only */
  offset?: number;
}

/**
 * An ERROR / ERROR_OFFSET payload (32-bit error, 16-bit message length, message, [64-bit offset]); undefined when the
 * lengths do not add up. Unknown error types carry at least the error and message.
 */
export function decodeErrorPayload(type: number, p: Buffer): ErrorPayload | undefined {
  if (p.length < 6) return undefined;
  const error = p.readUInt32BE(0);
  const msgLen = p.readUInt16BE(4);
  if (6 + msgLen > p.length) return undefined;
  const message = p.subarray(6, 6 + msgLen).toString('utf8');
  if (type === REPLY_TYPE.ERROR) return p.length === 6 + msgLen ? { error, message } : undefined;
  if (type === REPLY_TYPE.ERROR_OFFSET) {
    if (p.length !== 6 + msgLen + 8) return undefined;
    return { error, message, offset: Number(p.readBigUInt64BE(6 + msgLen)) };
  }
  return { error, message };
}

export interface BlockDescriptor {
  length: number;
  flags: number;
}

/** A BLOCK_STATUS payload: context id, then (length, flags) pairs; undefined when it is not a whole number of them. */
export function decodeBlockStatus(p: Buffer): { contextId: number; descriptors: BlockDescriptor[] } | undefined {
  if (p.length < 4 || (p.length - 4) % 8 !== 0) return undefined;
  const contextId = p.readUInt32BE(0);
  const descriptors: BlockDescriptor[] = [];
  for (let o = 4; o < p.length; o += 8) descriptors.push({ length: p.readUInt32BE(o), flags: p.readUInt32BE(o + 4) });
  return { contextId, descriptors };
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** NBD_INFO_EXPORT: size and transmission flags. */
export function decodeInfoExport(p: Buffer): { size: bigint; flags: number } | undefined {
  if (p.length !== 12) return undefined;
  return { size: p.readBigUInt64BE(2), flags: p.readUInt16BE(10) };
}

/** NBD_INFO_BLOCK_SIZE, checked against the spec's constraints (powers of two, min <= 64 KiB, max a multiple of min). */
export function decodeInfoBlockSize(p: Buffer): BlockSizes | undefined {
  if (p.length !== 14) return undefined;
  const minimum = p.readUInt32BE(2);
  const preferred = p.readUInt32BE(6);
  const maximum = p.readUInt32BE(10);
  const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
  if (!pow2(minimum) || minimum > 65536) return undefined;
  if (!pow2(preferred) || preferred < minimum) return undefined;
  if (maximum !== 0xffffffff && (maximum < minimum || maximum % minimum !== 0)) return undefined;
  return { minimum, preferred, maximum };
}
