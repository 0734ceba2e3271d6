/**
 * The catalog: what a target holds, read from the manifests alone (no database). Every operation on
 * backups (list, verify, restore, copy, prune) starts here and goes through the StorageTarget contract,
 * so it works the same on local, NFS and S3 targets.
 */
import type { ObjectInfo, StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import { backupPrefix, manifestKey, parseManifestKey } from '../storage/keys';
import { DOMAIN_NAME_RE } from '../shared/names';
import { readManifest, type Manifest } from './manifest';

/**
 * The largest manifest any reader accepts. A real one is a few KiB (a 64-disk backup with chain fields stays below
 * 64 KiB); the cap keeps one bad object (3 GiB made `list` fail for the whole target) from costing more memory.
 */
export const MAX_MANIFEST_BYTES = 16 * 1024 * 1024;

export interface BackupEntry {
  manifest: Manifest;
  /** key of manifest.json */
  key: string;
  /** bytes of all images */
  size: number;
  /**
   * the manifest exactly as stored: `copy` writes these bytes, so a signature and fields this version does not know
   * arrive unchanged
   */
  body: Buffer;
  /** only when a manifestKey was given: whether the manifest carries a signature made with that key */
  signed?: boolean;
}

export interface CatalogOptions {
  /**
   * the user's manifest signing key (VMBACKUP_MANIFEST_KEY_FILE). With it, `findBackup` refuses a manifest that is
   * not signed with it, and `listBackups` marks each entry (`signed`).
   */
  manifestKey?: Buffer;
}

export interface ListBackupsOptions extends CatalogOptions {
  domain?: string;
  /** called for manifests that cannot be read (too big, not JSON, invalid, moved); they are left out of the result */
  onInvalid?: (key: string, error: StorageError) => void;
  /**
   * when the target holds nothing at all, fail with 'not-found' if its location (directory, NFS path, bucket) does
   * not exist, instead of returning an empty list: a typo in a URL must not look like an empty target
   */
  mustExist?: boolean;
}

/**
 * Every object of the image tree, `<domain>/...`, or of one domain's backups: only below top-level names that are
 * domain names, so a chunk repository beside the tree (`@chunk-repo/`, possibly millions of chunks) is never walked.
 */
export async function* treeObjects(target: StorageTarget, domain?: string): AsyncIterable<ObjectInfo> {
  if (domain !== undefined) {
    yield* target.list(`${domain}/`);
    return;
  }
  for await (const name of target.listTop()) {
    if (DOMAIN_NAME_RE.test(name)) yield* target.list(`${name}/`);
  }
}

/** Committed backups (those with a manifest), oldest first. A manifest that cannot be read is skipped. */
export async function listBackups(target: StorageTarget, opts: ListBackupsOptions = {}): Promise<BackupEntry[]> {
  const found: ObjectInfo[] = [];
  let anything = false;
  if (!opts.domain && opts.mustExist) {
    // anything at all, a chunk repository included, shows that the location exists
    for await (const _name of target.listTop()) {
      anything = true;
      break;
    }
  }
  for await (const obj of treeObjects(target, opts.domain)) {
    anything = true;
    const parsed = parseManifestKey(obj.key);
    if (parsed && (!opts.domain || parsed.domain === opts.domain)) found.push(obj);
  }
  if (!anything && opts.mustExist) await target.checkLocation();
  const entries: BackupEntry[] = [];
  for (const obj of found) {
    const entry = await readEntry(target, obj.key, obj.size, opts).catch((err: unknown) => {
      if (isBadManifest(err)) {
        opts.onInvalid?.(obj.key, err);
        return undefined;
      }
      throw err;
    });
    if (entry) entries.push(entry);
  }
  return entries.sort(
    (a, b) =>
      a.manifest.startedAt.localeCompare(b.manifest.startedAt) ||
      a.manifest.backupId.localeCompare(b.manifest.backupId),
  );
}

/** A failure of this one manifest (skip it), not of the target (unreachable, no permission: fail the listing). */
function isBadManifest(err: unknown): err is StorageError {
  return err instanceof StorageError && (err.kind === 'checksum' || err.kind === 'not-found' || err.permanent);
}

async function readEntry(target: StorageTarget, key: string, size: number, opts: CatalogOptions): Promise<BackupEntry> {
  const where = `${key} on ${target.displayUrl}`;
  // the size the listing reported first: a huge object is refused without a read; getBuffer's own limit covers a
  // size that was wrong or an object replaced since
  if (size > MAX_MANIFEST_BYTES) throw tooBig(where, size);
  const body = await target.getBuffer(key, { maxBytes: MAX_MANIFEST_BYTES }).catch((err: unknown) => {
    if (err instanceof StorageError && err.kind === 'checksum') throw tooBig(where, undefined, err);
    throw err;
  });
  const { manifest, signed } = readManifest(body, where, opts);
  const stored = parseManifestKey(key);
  if (stored && (stored.domain !== manifest.domain || stored.backupId !== manifest.backupId)) {
    throw new StorageError(
      'checksum',
      `The manifest ${where} describes ${manifest.domain}/${manifest.backupId}; it was moved or damaged.`,
      {
        driver: 'catalog',
      },
    );
  }
  return {
    manifest,
    key,
    size: manifest.disks.reduce((n, d) => n + d.size, 0),
    body,
    ...(signed !== undefined ? { signed } : {}),
  };
}

function tooBig(where: string, size: number | undefined, cause?: unknown): StorageError {
  const mib = MAX_MANIFEST_BYTES / (1024 * 1024);
  const what = size === undefined ? 'is' : `is ${humanSize(size)},`;
  return new StorageError(
    'checksum',
    `The manifest ${where} ${what} larger than the ${mib} MiB a manifest may have; it was not written by vmbackup: remove it.`,
    { driver: 'catalog', permanent: true, ...(cause ? { cause } : {}) },
  );
}

function humanSize(n: number): string {
  return n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
}

function unsigned(target: StorageTarget, backupId: string): StorageError {
  return new StorageError(
    'checksum',
    `The manifest of ${backupId} on ${target.displayUrl} is not signed with your key: it was written by someone else or changed; do not trust this backup.`,
    { driver: 'catalog', permanent: true },
  );
}

/**
 * One committed backup. Backup ids are `<domain>-<yyyymmddThhmmssZ>-<hex>`: that domain is tried first, then every
 * domain. Fails with one sentence when it is not there, its manifest cannot be read, or (with a manifestKey) its
 * manifest is not signed with that key.
 */
export async function findBackup(
  target: StorageTarget,
  backupId: string,
  opts: CatalogOptions = {},
): Promise<BackupEntry> {
  const entry = await locate(target, backupId, opts);
  if (opts.manifestKey && !entry.signed) throw unsigned(target, backupId);
  return entry;
}

async function locate(target: StorageTarget, backupId: string, opts: CatalogOptions): Promise<BackupEntry> {
  const guess = /^(.+)-\d{8}T\d{6}Z-[0-9a-f]+$/.exec(backupId)?.[1];
  if (guess) {
    const key = safeManifestKey(guess, backupId);
    const info = key ? await target.stat(key) : undefined;
    if (key && info) return readEntry(target, key, info.size, opts);
  }
  for await (const obj of treeObjects(target)) {
    const parsed = parseManifestKey(obj.key);
    if (parsed?.backupId === backupId) return readEntry(target, obj.key, obj.size, opts);
  }
  throw new StorageError(
    'not-found',
    `Backup ${backupId} is not on ${target.displayUrl} (no committed manifest); run \`vmbackup list --target ${target.displayUrl}\` to see the backups there.`,
    { driver: 'catalog' },
  );
}

function safeManifestKey(domain: string, backupId: string): string | undefined {
  try {
    return manifestKey(domain, backupId);
  } catch {
    return undefined;
  }
}

/** Deletes a committed backup: manifest first, then every object under its prefix. */
export async function deleteBackup(target: StorageTarget, domain: string, backupId: string): Promise<void> {
  await target.delete(manifestKey(domain, backupId));
  await deleteObjectsUnder(target, domain, backupId);
}

/**
 * Removes every object under `<domain>/<backupId>/` (images of an uncommitted backup), and what unfinished puts
 * left there: temp files and S3 multipart uploads, which no listing shows and S3 bills until they are aborted.
 */
export async function deleteObjectsUnder(target: StorageTarget, domain: string, backupId: string): Promise<string[]> {
  return (await removeBackupPrefix(target, domain, backupId)).keys;
}

/**
 * deleteObjectsUnder, also saying how many unfinished puts it removed.
 *
 * In a bucket with S3 Object Lock (versioned) a plain delete only adds delete markers: the bytes stay, billed, and
 * hidden from every listing, so no later gc would find them. There the prefix's versions are deleted for good, or,
 * when one of them is still retained, nothing is deleted and `lockedUntil` says until when (the objects stay listed,
 * and a gc after that date removes them).
 */
export async function removeBackupPrefix(
  target: StorageTarget,
  domain: string,
  backupId: string,
): Promise<{ keys: string[]; unfinished: number; lockedUntil?: string }> {
  const prefix = backupPrefix(domain, backupId);
  const lock = target.objectLock && (await target.objectLock.enabled()) ? target.objectLock : undefined;
  if (lock) {
    const versions = await lock.versions(prefix);
    const until = Math.max(0, ...versions.map((v) => v.retainUntil?.getTime() ?? 0));
    const unfinished = await target.removeUnfinished(prefix);
    if (until > Date.now()) return { keys: [], unfinished, lockedUntil: new Date(until).toISOString() };
    for (const v of versions) await lock.deleteVersion(v.key, v.versionId);
    return { keys: [...new Set(versions.filter((v) => !v.deleteMarker).map((v) => v.key))].sort(), unfinished };
  }
  const keys: string[] = [];
  for await (const obj of target.list(prefix)) keys.push(obj.key);
  for (const key of keys) await target.delete(key);
  const unfinished = await target.removeUnfinished(prefix);
  return { keys, unfinished };
}

/** S3 Object Lock: the latest date a version under the backup prefix is retained until, when still to come. */
export async function backupPrefixLockedUntil(
  target: StorageTarget,
  domain: string,
  backupId: string,
): Promise<string | undefined> {
  const lock = target.objectLock && (await target.objectLock.enabled()) ? target.objectLock : undefined;
  if (!lock) return undefined;
  const versions = await lock.versions(backupPrefix(domain, backupId));
  const until = Math.max(0, ...versions.map((v) => v.retainUntil?.getTime() ?? 0));
  return until > Date.now() ? new Date(until).toISOString() : undefined;
}
