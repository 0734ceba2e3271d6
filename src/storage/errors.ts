/**
 * Typed storage failures. Drivers classify at the boundary (restic's IsPermanentError,
 * flydrive's E_CANNOT_READ_FILE): the activity layer turns `permanent` ones into
 * non-retryable Temporal failures and lets the rest reach the retry policy.
 */

export type StorageErrorKind =
  'not-found' | 'permission' | 'no-space' | 'unreachable' | 'invalid-key' | 'invalid-target' | 'checksum' | 'failed';

/** Kinds that no retry can fix unless a person acts. 'not-found' depends on context (see options). */
const PERMANENT_BY_DEFAULT: Record<StorageErrorKind, boolean> = {
  'not-found': true,
  permission: true,
  'no-space': true,
  unreachable: false,
  'invalid-key': true,
  'invalid-target': true,
  checksum: true,
  failed: false,
};

export interface StorageErrorOptions {
  /** driver name: local, nfs, s3 (or 'registry', 'catalog') */
  driver: string;
  /** overrides the kind's default */
  permanent?: boolean;
  cause?: unknown;
}

export class StorageError extends Error {
  override readonly name = 'StorageError';
  readonly kind: StorageErrorKind;
  readonly permanent: boolean;
  readonly driver: string;

  /** `message` is one sentence for a person: what failed, on which target, and what to do. */
  constructor(kind: StorageErrorKind, message: string, options: StorageErrorOptions) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.kind = kind;
    this.driver = options.driver;
    this.permanent = options.permanent ?? PERMANENT_BY_DEFAULT[kind];
  }
}

/** getBuffer's refusal of an object larger than the reader accepts (the same sentence from every driver). */
export function tooLargeError(key: string, displayUrl: string, maxBytes: number, driver: string): StorageError {
  return new StorageError(
    'checksum',
    `Object ${key} on ${displayUrl} is larger than the ${maxBytes} bytes a reader accepts for it; it is damaged or was not written by vmbackup.`,
    { driver, permanent: true },
  );
}

export function isStorageError(err: unknown): err is StorageError {
  return err instanceof StorageError;
}

/** Node's fs error codes mapped to storage kinds; undefined for codes that mean "something else broke". */
export function kindOfErrno(code: string | undefined): StorageErrorKind | undefined {
  switch (code) {
    case 'ENOENT':
    case 'ENOTDIR':
      return 'not-found';
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return 'permission';
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return 'no-space';
    case 'ECONNREFUSED':
    case 'ECONNRESET':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
    case 'ETIMEDOUT':
    case 'EPIPE':
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return 'unreachable';
    default:
      return undefined;
  }
}

/** The `code` of a Node system error, if any. */
export function errnoCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) {
    const code = (err as { code: unknown }).code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}

/** What a person should do about each kind; completes the sentence drivers start. */
export function adviceFor(kind: StorageErrorKind): string {
  switch (kind) {
    case 'not-found':
      return 'check the URL and that the object or location exists';
    case 'permission':
      return 'check the credentials and the permissions on the target';
    case 'no-space':
      return 'free space on the target or prune old backups';
    case 'unreachable':
      return 'check that the server is running and reachable, then retry';
    case 'invalid-key':
      return 'use a relative key without "..", empty segments, leading dots or backslashes';
    case 'invalid-target':
      return 'use file:///abs/dir, nfs://host/export/path or s3://bucket/prefix';
    case 'checksum':
      return 'the stored data is corrupt or changed: run the backup again';
    case 'failed':
      return 'retry, and check the target server logs if it keeps failing';
  }
}

export function isAbortError(err: unknown): boolean {
  return (
    typeof err === 'object' &&
    err !== null &&
    ((err as { name?: unknown }).name === 'AbortError' || errnoCode(err) === 'ABORT_ERR')
  );
}
