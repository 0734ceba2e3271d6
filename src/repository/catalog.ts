/**
 * The catalog: what a target holds, read from the manifests alone (no database). Every operation on
 * backups (list, verify, restore, copy, prune) starts here and goes through the StorageTarget contract,
 * so it works the same on local, NFS and S3 targets.
 */
import type { StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import { backupPrefix, manifestKey, parseManifestKey } from '../storage/keys';
import { decodeManifest, type Manifest } from './manifest';
export interface BackupEntry {
  manifest: Manifest;
  /** key of manifest.json */
  key: string;
  /** bytes of all images */
  size: number;
}

export interface ListBackupsOptions {
  domain?: string;
  /** called for manifests that cannot be read; they are left out of the result */
  onInvalid?: (key: string, error: StorageError) => void;
}

/** Committed backups (those with a manifest), oldest first. */
export async function listBackups(target: StorageTarget, opts: ListBackupsOptions = {}): Promise<BackupEntry[]> {
  const keys: string[] = [];
  for await (const obj of target.list(opts.domain ? `${opts.domain}/` : '')) {
    const parsed = parseManifestKey(obj.key);
    if (parsed && (!opts.domain || parsed.domain === opts.domain)) keys.push(obj.key);
  }
  const entries: BackupEntry[] = [];
  for (const key of keys) {
    const entry = await readEntry(target, key).catch((err: unknown) => {
      if (err instanceof StorageError && (err.kind === 'checksum' || err.kind === 'not-found' || err.permanent)) {
        opts.onInvalid?.(key, err);
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

async function readEntry(target: StorageTarget, key: string): Promise<BackupEntry> {
  const manifest = decodeManifest(await target.getBuffer(key), `${key} on ${target.displayUrl}`);
  const where = parseManifestKey(key);
  if (where && (where.domain !== manifest.domain || where.backupId !== manifest.backupId)) {
    throw new StorageError(
      'checksum',
      `The manifest ${key} on ${target.displayUrl} describes ${manifest.domain}/${manifest.backupId}; it was moved or damaged.`,
      {
        driver: 'catalog',
      },
    );
  }
  return { manifest, key, size: manifest.disks.reduce((n, d) => n + d.size, 0) };
}

/** Backup ids are `<domain>-<yyyymmddThhmmssZ>-<hex>`: try that domain first, then search every domain. */
export async function findBackup(target: StorageTarget, backupId: string): Promise<BackupEntry> {
  const guess = /^(.+)-\d{8}T\d{6}Z-[0-9a-f]+$/.exec(backupId)?.[1];
  if (guess) {
    const key = safeManifestKey(guess, backupId);
    if (key && (await target.stat(key))) return readEntry(target, key);
  }
  for await (const obj of target.list('')) {
    const parsed = parseManifestKey(obj.key);
    if (parsed?.backupId === backupId) return readEntry(target, obj.key);
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
  const prefix = backupPrefix(domain, backupId);
  const keys: string[] = [];
  for await (const obj of target.list(prefix)) keys.push(obj.key);
  for (const key of keys) await target.delete(key);
  await target.removeUnfinished(prefix);
  return keys;
}
