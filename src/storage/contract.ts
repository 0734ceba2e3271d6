/**
 * The storage-target contract (after flydrive's DriverContract and restic's Backend).
 *
 * Keys are relative, '/'-separated, normalised; a key containing '..', a leading '/', an
 * empty segment or a NUL is rejected with StorageError kind 'invalid-key' before any I/O.
 * Every method names whether it is idempotent and what happens when the object is missing.
 * Drivers throw StorageError (errors.ts) with a kind, so activities can make permanent
 * failures non-retryable.
 */
import type { Readable } from 'node:stream';

export interface TargetCapabilities {
  /** putManifest/putImage replace an existing object atomically */
  atomicReplace: boolean;
  /** images are uploaded in parts that survive a crash (resume from a checkpoint) */
  multipart: boolean;
  /** get() honours byte ranges without reading the whole object */
  rangeReads: boolean;
  /** a local directory backs this target: images may be moved in with rename(2) */
  localPath?: string;
  /** a directory tree backs this target (local, NFS): listing a prefix costs a readdir per directory, not a request per 1000 objects */
  fileTree?: boolean;
  /**
   * a put signs the SHA-256 of its body (S3 SigV4), which the server checks: putBatched takes it precomputed
   * (`PutBatchedOptions.sha256`), so it need not be hashed again on the caller's thread
   */
  signsPayloadHash?: boolean;
}

export interface PutBatchedOptions {
  /**
   * the hex SHA-256 of `body`, computed by the caller (a codec thread) from these very bytes; a target that signs
   * its payload's hash sends this one, and the server refuses a body that does not match it
   */
  sha256?: string;
}

export interface ObjectInfo {
  key: string;
  size: number;
  modified: Date;
  /** user metadata, e.g. sha256 for images */
  metadata?: Record<string, string>;
  /** S3 Object Lock: the date this (current) version is retained until, when it has one */
  retainUntil?: Date;
}

/** One version of an object in a versioned (Object Lock) bucket, or a delete marker. */
export interface ObjectVersion {
  key: string;
  versionId: string;
  deleteMarker: boolean;
  /** when the version may be deleted; absent: it never was locked (delete markers never are) */
  retainUntil?: Date;
}

/**
 * S3 Object Lock: versions that cannot be deleted before a date. A plain delete in such a bucket only adds a delete
 * marker (the bytes stay, and are billed), so removing a backup there means deleting its versions.
 */
export interface ObjectLockStore {
  /** the lock this target writes every object with (`--s3-object-lock`); absent: objects are written unlocked */
  readonly writeLock?: { mode: 'governance' | 'compliance'; retainUntil: string };
  /** whether the bucket has Object Lock enabled (asked once per target). Read-only, idempotent. */
  enabled(): Promise<boolean>;
  /** extends the current version of `key` to `writeLock`'s date when it is retained for less. Idempotent. */
  hold(key: string): Promise<void>;
  /** every version and delete marker under `prefix`, with retention dates; empty when none. Read-only. */
  versions(prefix: string): Promise<ObjectVersion[]>;
  /** deletes one version for good; missing is no error; one still retained fails with kind 'permission'. */
  deleteVersion(key: string, versionId: string): Promise<void>;
}

/** Opaque resume state a driver hands out during putImage and accepts back after a crash. */
export type PutCheckpoint = Record<string, unknown>;

export interface PutImageOptions {
  /** called with bytes sent so far (monotonic within one call) */
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
  /** called whenever durable progress was made; persist it (heartbeat) and pass it back as resume */
  onCheckpoint?: (checkpoint: PutCheckpoint) => void;
  /** checkpoint from an earlier, interrupted attempt */
  resume?: PutCheckpoint;
  /** aborts the transfer; the driver leaves no visible object and cleans temporary state */
  signal?: AbortSignal;
  /**
   * stored with the object (S3 user metadata / sidecar). A `sha256` entry is the expected
   * digest: the driver fails with kind 'checksum' and leaves no visible object when the
   * bytes it stored hash differently (S3 needs the digest before the upload starts).
   */
  metadata?: Record<string, string>;
  /** if set, the driver may move (rename) the source instead of copying it (same filesystem only) */
  allowMove?: boolean;
  /**
   * `ino:size:mtimeMs` of the source when `metadata.sha256` was computed. A driver that moves the
   * file may trust that digest while the source still has this stamp (no second read of the image).
   * With `metadata.content` and no `metadata.sha256` (an image pulled in place, whose guest data was hashed as it
   * was written), a driver that moves the file stores no file SHA-256 at all: readers compare `content`.
   */
  sourceStamp?: string;
  /**
   * Awaited before each chunk of `bytes` is read from the source. Set by wrappers (bandwidth
   * limit) so cross-cutting pacing is not copied into each driver; drivers only call it.
   */
  pace?: (bytes: number, signal?: AbortSignal) => Promise<void>;
}

export interface GetBufferOptions {
  /** refuse objects larger than this many bytes (see getBuffer) */
  maxBytes?: number;
}

export interface PutImageResult {
  key: string;
  size: number;
  /**
   * SHA-256 of the bytes stored, computed while streaming (hex); '' for an image moved into place with a content
   * digest only (`metadata.content`, no `metadata.sha256`, an unchanged `sourceStamp`): its file was never hashed
   */
  sha256: string;
  /** bytes actually transferred in this call (less than size after a resume) */
  bytesSent: number;
}

export interface StorageTarget {
  /** URL of the target with credentials removed; safe to print */
  readonly displayUrl: string;
  readonly capabilities: TargetCapabilities;

  /**
   * Store the file at `sourcePath` under `key`. Atomic: the object becomes visible whole or
   * not at all. Idempotent: storing the same bytes again leaves one object. Overwrites an
   * existing object only if `atomicReplace`; otherwise the driver replaces it safely.
   */
  putImage(key: string, sourcePath: string, opts?: PutImageOptions): Promise<PutImageResult>;

  /** Store a small object (manifest) atomically. Idempotent. */
  putManifest(key: string, body: Buffer): Promise<void>;
  /**
   * Store a small object (a chunk) atomically, like putManifest, except that its name is durable only once a later
   * `flush()` returns: many of them cost one directory sync each instead of one per object. Its bytes are durable
   * before its name is visible, so after a crash it is there whole, or not at all; never a name whose data was
   * lost. Readers see it when this returns. Idempotent.
   */
  putBatched(key: string, body: Buffer, opts?: PutBatchedOptions): Promise<void>;
  /**
   * Makes every putBatched that returned before this call durable, name included. Call it before writing what names
   * those objects (a chunk repository's index). Idempotent; a no-op on a target where each put is durable when it
   * returns (S3; NFS, whose server commits a RENAME before it replies).
   */
  flush(): Promise<void>;

  /** Read an object, whole or `range` (inclusive start, exclusive end). Missing -> 'not-found'. */
  get(key: string, range?: { start: number; end: number }): Promise<Readable>;

  /**
   * Small objects into memory. Missing -> 'not-found'. With `maxBytes`, an object larger than that fails with
   * kind 'checksum' (permanent) and no more than about `maxBytes` is ever held in memory, even when the size the
   * server reported was wrong or the object grows while it is read: a reader of data someone else may have written
   * (manifests) stays small.
   */
  getBuffer(key: string, opts?: GetBufferOptions): Promise<Buffer>;

  /** Metadata, or undefined when the object is missing. Idempotent, no error when missing. */
  stat(key: string): Promise<ObjectInfo | undefined>;

  /** Every object whose key starts with `prefix` (recursive); empty when none. */
  list(prefix: string): AsyncIterable<ObjectInfo>;

  /**
   * The distinct first segments of the target's keys (`web` for `web/b1/vda.qcow2`, `@chunk-repo` for a chunk
   * repository), sorted, without walking below them: how the image tree's catalog finds its domains without listing
   * the millions of chunks a chunk repository beside it may hold. Empty when the target holds nothing.
   */
  listTop(): AsyncIterable<string>;

  /**
   * Fails with kind 'not-found' and one sentence naming what is missing (the directory, the NFS path, the bucket)
   * when the place this target names does not exist. An existing but empty place (an empty S3 prefix in an existing
   * bucket) is fine. Read-only, idempotent. `list` never makes that distinction: it is empty either way.
   */
  checkLocation(): Promise<void>;

  /**
   * Set the object's modification time (what `stat` and `list` report as `modified`) to now, by the storage's own
   * clock (the NFS server's, S3's), leaving its bytes and metadata as they are. Idempotent. Missing -> 'not-found'.
   * A chunk repository's gc deletes only unreferenced objects older than its grace period; a backup that reuses a
   * stored chunk touches it first when it is old, so gc cannot take it while the backup runs.
   */
  touch(key: string): Promise<void>;

  /** Remove an object. Idempotent: a missing object is not an error. */
  delete(key: string): Promise<void>;

  /**
   * Remove what unfinished puts of keys under `prefix` left on the server, which `list` never shows: temp files
   * (local, NFS) and multipart uploads (S3, where they are stored and billed until aborted). Finished objects
   * stay. A put still running under the prefix fails. Returns how many unfinished puts were removed.
   */
  removeUnfinished(prefix: string): Promise<number>;

  /** Release sockets/handles. */
  close(): Promise<void>;

  /** S3 only: Object Lock and object versions (see ObjectLockStore); absent on targets without versions. */
  readonly objectLock?: ObjectLockStore;
}
