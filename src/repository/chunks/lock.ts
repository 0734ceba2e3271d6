/**
 * S3 Object Lock in a chunk repository (issue #17). A backup's objects are its manifest, the indexes it names (disks
 * and whole-VM files) and every chunk those indexes reference; most of them were stored by earlier backups (dedup).
 * A locked backup is only as undeletable as the least-locked object it needs, so before its manifest is written
 * every one of them is retained until at least the backup's date: `holdChunkObjects` extends (PutObjectRetention,
 * never shortens) what is retained for less. `lockShortfalls` is verify's side: which of them carry less.
 *
 * Cost: one HeadObject per distinct object a backup references (plus one PutObjectRetention per object whose
 * retention is shorter), since S3 listings do not carry retention dates.
 */
import type { ObjectInfo, StorageTarget } from '../../storage/contract';
import { StorageError } from '../../storage/errors';
import { chunkKey, indexKey } from './config';
import type { DiskIndex } from './disk-index';

/** Every distinct key a backup needs: its indexes, then the chunks they reference (zero entries need none). */
export async function chunkBackupKeys(
  indexIds: readonly string[],
  readIndex: (id: string) => Promise<DiskIndex>,
): Promise<string[]> {
  const keys = new Set<string>();
  const chunks = new Set<string>();
  for (const id of indexIds) {
    if (keys.has(indexKey(id))) continue;
    keys.add(indexKey(id));
    for (const e of (await readIndex(id)).entries) if (e !== 'zero') chunks.add(chunkKey(e));
  }
  return [...keys, ...chunks];
}

export interface HoldStats {
  /** objects looked at */
  objects: number;
  /** objects whose retention was extended to the backup's date */
  extended: number;
}

/**
 * Makes every object in `keys` retained until at least `target`'s write lock date (nothing without one). Idempotent:
 * an object already retained that long is left alone, so a retried call only repeats the HeadObjects. An object that
 * is missing fails (the backup would point at nothing): StorageError 'not-found'.
 */
export async function holdChunkObjects(target: StorageTarget, keys: readonly string[]): Promise<HoldStats> {
  const lock = target.objectLock?.writeLock;
  const stats: HoldStats = { objects: 0, extended: 0 };
  if (!lock || !target.objectLock) return stats;
  const wanted = Date.parse(lock.retainUntil);
  for (const key of keys) {
    stats.objects++;
    const info = await statOrThrow(target, key);
    if (info.retainUntil && info.retainUntil.getTime() >= wanted) continue;
    await target.objectLock.hold(key);
    stats.extended++;
  }
  return stats;
}

async function statOrThrow(target: StorageTarget, key: string): Promise<ObjectInfo> {
  const info = await target.stat(key);
  if (info) return info;
  throw new StorageError(
    'not-found',
    `${key} is missing from ${target.displayUrl}: a locked backup cannot be committed pointing at it.`,
    { driver: 'chunks' },
  );
}

export interface LockShortfall {
  key: string;
  /** the date the object is retained until; absent: not retained at all (or missing) */
  retainUntil?: string;
  missing?: boolean;
}

/** The objects among `keys` retained for less than `until` (ISO), in the order given. One HeadObject each. */
export async function lockShortfalls(
  target: StorageTarget,
  keys: readonly string[],
  until: string,
): Promise<LockShortfall[]> {
  const wanted = Date.parse(until);
  const out: LockShortfall[] = [];
  for (const key of keys) {
    const info = await target.stat(key);
    if (!info) out.push({ key, missing: true });
    else if (!info.retainUntil) out.push({ key });
    else if (info.retainUntil.getTime() < wanted) out.push({ key, retainUntil: info.retainUntil.toISOString() });
  }
  return out;
}
