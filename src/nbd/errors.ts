/**
 * Typed failures of the NBD client. The server is not trusted (a guest controls the bytes of the disk it exports,
 * and a server may be broken): anything that does not follow the protocol is a `protocol` error that closes the
 * connection and fails every pending request, so wrong or partial data is never handed out as good.
 */

export type NbdErrorKind =
  /** the socket could not be opened (no such socket, connection refused) */
  | 'unreachable'
  /** the server broke the handshake (bad magic, an option reply it may not send, a refused option) */
  | 'handshake'
  /** the server has no export of the name asked for */
  | 'no-export'
  /** the server or the export lacks something required (structured replies, a meta context, writes, TLS) */
  | 'unsupported'
  /** a reply in transmission that the protocol forbids; the connection is closed */
  | 'protocol'
  /** the server answered a request with an error (errno in `errno`); the connection stays usable */
  | 'server-error'
  /** the server closed the connection, or the socket failed, with requests pending */
  | 'disconnected'
  /** the client closed the connection (close()) with requests pending, or a request was made after it */
  | 'closed'
  /** rejected before anything was sent: a range outside the export, an unaligned write, a bad argument */
  | 'invalid';

/** NBD's error values (the protocol's own numbering, which matches Linux errno for these). */
export const NBD_ERRNO_NAMES: Readonly<Record<number, string>> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

/** The name of an NBD error value; unknown values are named by number (a server may send anything). */
export function nbdErrnoName(value: number): string {
  return NBD_ERRNO_NAMES[value] ?? `error ${value}`;
}

export interface NbdErrorDetails {
  /** the export the connection is for */
  exportName?: string;
  /** server-error: NBD_EIO -> 'EIO' */
  errno?: string;
  /** the offset the failure is about (the server's ERROR_OFFSET, else the request's offset) */
  offset?: number;
  /** the length of the request that failed */
  length?: number;
  /** the server's own message, made printable and cut to 200 characters; never part of `message` */
  serverMessage?: string;
  cause?: unknown;
}

export class NbdError extends Error {
  override readonly name = 'NbdError';
  readonly kind: NbdErrorKind;
  readonly exportName?: string;
  readonly errno?: string;
  readonly offset?: number;
  readonly length?: number;
  readonly serverMessage?: string;

  /** `message` is one sentence for a person: what failed, on which export, at which offset. */
  constructor(kind: NbdErrorKind, message: string, details: NbdErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.kind = kind;
    this.exportName = details.exportName;
    this.errno = details.errno;
    this.offset = details.offset;
    this.length = details.length;
    this.serverMessage = details.serverMessage;
  }
}

export function isNbdError(err: unknown): err is NbdError {
  return err instanceof NbdError;
}

/** A server-controlled string as it may appear in a log: printable ASCII only, at most 200 characters. */
export function printable(text: string): string {
  const clean = text.replace(/[^\x20-\x7e]/g, '?');
  return clean.length > 200 ? `${clean.slice(0, 200)}...` : clean;
}
