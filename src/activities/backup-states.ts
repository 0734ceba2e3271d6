/**
 * Whether a backup still runs, asked of Temporal right before recovery undoes what the backup left on the
 * host (an overlay, a staging directory). A list of running backups read earlier goes stale: a backup that
 * starts after it was read looks dead, and its overlay would be committed under it, or deleted while
 * libvirt is still creating it.
 */
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { BackupState } from '../shared/types';

export type { BackupState } from '../shared/types';

/** The port the worker implements (a visibility query on VmbackupBackupId). */
export type BackupStates = (backupId: string) => Promise<BackupState>;

/**
 * A backup Temporal shows no workflow for counts as running while what it left changed within this time:
 * visibility can trail a workflow's start, and a backup started through another namespace is not visible
 * here at all. Older than this, it counts as abandoned (e.g. its history was deleted by retention).
 */
export const UNKNOWN_BACKUP_GRACE_MS = 60 * 60_000;

/** True when what `backupId` left in `dir` may be undone now: its workflow is closed, or unknown and long quiet. */
export async function isAbandoned(states: BackupStates, backupId: string, dir: string): Promise<boolean> {
  const state = await states(backupId);
  if (state !== 'unknown') return state === 'closed';
  const changed = await lastChange(dir);
  return changed !== undefined && Date.now() - changed > UNKNOWN_BACKUP_GRACE_MS;
}

/** Newest mtime of `dir` and of its entries (links are not followed), in ms; undefined when `dir` is gone. */
export async function lastChange(dir: string): Promise<number | undefined> {
  let newest: number;
  try {
    newest = (await lstat(dir)).mtimeMs;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names) {
    const s = await lstat(join(dir, name)).catch(() => undefined);
    if (s && s.mtimeMs > newest) newest = s.mtimeMs;
  }
  return newest;
}
