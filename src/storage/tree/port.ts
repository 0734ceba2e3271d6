/**
 * The file-tree port: the few operations that the atomic-tree writer and lister (./atomic-tree.ts) need from a
 * directory tree, implemented once for a local directory (../local/tree.ts) and once over NFSv3 (../nfs/tree.ts).
 * restic's split: the backend speaks files, one layer above it owns the object format (temp name, sidecar, rename).
 *
 * Directories are named by key (`a/b`, '' for the target's own directory) and files by (directory key, name); a
 * port never sees `..` or an absolute path. Methods throw the backend's own errors (errno, NFS status); `classify`
 * turns one into the sentence a user reads, so the wording stays the driver's.
 */
import type { Hash } from 'node:crypto';
import type { PutImageOptions } from '../contract';
import type { StorageError } from '../errors';

export type TreeEntryType = 'file' | 'dir' | 'other';

export interface TreeEntry {
  name: string;
  /** what the entry itself is: a link is 'other', never followed */
  type: TreeEntryType;
}

export interface FileInfo {
  size: number;
  modified: Date;
}

export interface FileTreePort {
  readonly driver: string;
  readonly displayUrl: string;
  /** Whether `list` reads each object's sidecar for its metadata (cheap on a local disk, a round trip each on NFS). */
  readonly listsMetadata: boolean;
  /** The user's sentence for a failure while trying to `what`; a StorageError passes through unchanged. */
  classify(err: unknown, what: string): StorageError;
  /** Entries of the directory ('.' and '..' left out), unsorted; undefined when there is no such directory. */
  readdir(dirKey: string): Promise<TreeEntry[] | undefined>;
  /** Creates the directory and its parents (private mode); idempotent. */
  mkdirs(dirKey: string): Promise<void>;
  /** Removes a file; false when it was not there. */
  unlink(dirKey: string, name: string): Promise<boolean>;
  /** Removes the directory when it is empty; false when it is not empty, not there, or cannot be removed. */
  rmdir(dirKey: string): Promise<boolean>;
  /** Creates a new file exclusively (private mode) holding `body`, durable when this returns. */
  writeNew(dirKey: string, name: string, body: Buffer): Promise<void>;
  /**
   * Renames within one directory, replacing `to`; durable (directory synced) when this returns, or with `syncDir:
   * false` only once a later `syncDir(dirKey)` returned.
   */
  rename(dirKey: string, from: string, to: string, opts?: { syncDir?: boolean }): Promise<void>;
  /** Makes the directory's entries (renames into it) durable; nothing to do when the directory is gone. */
  syncDir(dirKey: string): Promise<void>;
  /** A regular file's size and mtime; undefined when missing or anything else than a regular file. */
  statFile(dirKey: string, name: string): Promise<FileInfo | undefined>;
  /** A small file's bytes; undefined when missing, not a regular file, or larger than `maxBytes`. */
  readSmall(dirKey: string, name: string, maxBytes: number): Promise<Buffer | undefined>;
}

/** A temp file that putImage is filling: the driver's own copy engine (local: pwrite + fdatasync, NFS: WRITE + COMMIT). */
export interface ImageUpload {
  /**
   * Copies [offset, size) of the source into the temp at the same offsets, feeding `hash` on the way and calling
   * `checkpoint` with each prefix once it is durable (never for the whole file).
   */
  copy(
    sourcePath: string,
    offset: number,
    size: number,
    hash: Hash,
    opts: PutImageOptions,
    checkpoint: (offset: number, prefixSha256: string) => void,
  ): Promise<void>;
  /** Makes every byte durable and releases the file. */
  finish(): Promise<void>;
  /** Releases the file after a failure; never throws. */
  abandon(): Promise<void>;
}

/** The file-tree port plus what putImage needs: a temp file to fill, resumed from a checkpoint, and its commit. */
export interface ImageTreePort extends FileTreePort {
  createUpload(dirKey: string, temp: string): Promise<ImageUpload>;
  /**
   * Reopens the temp of a checkpoint when its durable prefix still hashes as recorded (truncated there), with the
   * hash state at `cp.offset`; undefined when it is gone or does not match (then the put starts anew).
   */
  resumeUpload(
    dirKey: string,
    temp: string,
    cp: { offset: number; prefixSha256: string },
    sourcePath: string,
    signal?: AbortSignal,
  ): Promise<{ upload: ImageUpload; hash: Hash } | undefined>;
  /** Renames a finished temp of `size` bytes over `name`; durable when this returns. */
  commit(dirKey: string, temp: string, name: string, size: number): Promise<void>;
}

/** `a/b/c` -> { dirKey: 'a/b', name: 'c' }; `c` -> { dirKey: '', name: 'c' }. */
export function splitKey(key: string): { dirKey: string; name: string } {
  const slash = key.lastIndexOf('/');
  return slash < 0 ? { dirKey: '', name: key } : { dirKey: key.slice(0, slash), name: key.slice(slash + 1) };
}

export function childKey(dirKey: string, name: string): string {
  return dirKey ? `${dirKey}/${name}` : name;
}
