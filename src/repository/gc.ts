/**
 * gc: removes what dead backups left on a target. A backup prefix `<domain>/<backupId>/` that holds objects but no
 * manifest.json was never committed (an upload cut off, a cancel during the upload, a prune interrupted after it
 * deleted the manifest): nothing lists it, restores it or prunes it, and it is stored (and on S3 billed) until
 * someone removes it. A committed backup is never touched here: gc skips every prefix with a manifest, even one
 * that cannot be read.
 *
 * Never anything a running backup owns: a prefix goes only when its newest object is older than the policy's age
 * AND `isRunning(backupId)` says no backup with that id runs (the CLI asks Temporal's visibility).
 */
import { parseDuration } from '../shared/duration';
import { DOMAIN_NAME_RE } from '../shared/names';
import type { ObjectInfo, StorageTarget } from '../storage/contract';
import { backupPrefix, MANIFEST_NAME, manifestKey } from '../storage/keys';
import { backupPrefixLockedUntil, removeBackupPrefix, treeObjects } from './catalog';

export interface GcPolicy {
  /** a dead prefix is removed only when its newest object is at least this old (milliseconds) */
  olderThanMs: number;
  /** only report what would be removed */
  dryRun?: boolean;
  /** the time ages are measured from; default now */
  now?: Date;
}

export interface GcEntry {
  domain: string;
  backupId: string;
  /** `<domain>/<backupId>/` */
  prefix: string;
  objects: number;
  bytes: number;
  /** modified time of the newest object under the prefix (ISO 8601) */
  newest: string;
  /**
   * removed (or, with dryRun, would be); kept because a backup with this id runs, or it is younger than the policy,
   * or (S3 Object Lock) one of its versions is still retained: `lockedUntil`
   */
  action: 'removed' | 'would remove' | 'running' | 'too young' | 'locked';
  /** S3 Object Lock: the date the last of its versions is retained until, when that is still to come */
  lockedUntil?: string;
  /** objects removed (keys); empty with dryRun */
  removedKeys: string[];
  /** unfinished uploads (temp files, S3 multipart uploads) removed under the prefix */
  unfinishedRemoved: number;
}

export interface GcReport {
  target: string;
  dryRun: boolean;
  olderThanMs: number;
  /** every manifest-less backup prefix found, in key order */
  entries: GcEntry[];
}

interface Prefix {
  domain: string;
  backupId: string;
  objects: ObjectInfo[];
  committed: boolean;
}

function safePrefix(domain: string, backupId: string): string | undefined {
  // only what a backup's key can be: a chunk repository beside the tree (`@chunk-repo/...`) is not a dead backup
  if (!DOMAIN_NAME_RE.test(domain)) return undefined;
  try {
    return backupPrefix(domain, backupId);
  } catch {
    return undefined;
  }
}

/** Groups the target's objects by `<domain>/<backupId>/`; keys with fewer segments are not backups and are skipped. */
async function backupPrefixes(target: StorageTarget): Promise<Prefix[]> {
  const byPrefix = new Map<string, Prefix>();
  for await (const obj of treeObjects(target)) {
    const parts = obj.key.split('/');
    if (parts.length < 3) continue;
    const [domain, backupId] = parts as [string, string];
    const prefix = safePrefix(domain, backupId);
    if (!prefix) continue; // a name no backup can have (someone else's file): not ours to remove
    let p = byPrefix.get(prefix);
    if (!p) byPrefix.set(prefix, (p = { domain, backupId, objects: [], committed: false }));
    p.objects.push(obj);
    if (parts.length === 3 && parts[2] === MANIFEST_NAME) p.committed = true;
  }
  return [...byPrefix.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, p]) => p);
}

/**
 * Finds every manifest-less backup prefix and removes those older than the policy whose backup is not running,
 * together with the unfinished uploads under them. Idempotent: a second run finds nothing of what the first removed.
 */
export async function collectGarbage(
  target: StorageTarget,
  policy: GcPolicy,
  isRunning: (backupId: string) => Promise<boolean>,
): Promise<GcReport> {
  const now = (policy.now ?? new Date()).getTime();
  const report: GcReport = {
    target: target.displayUrl,
    dryRun: Boolean(policy.dryRun),
    olderThanMs: policy.olderThanMs,
    entries: [],
  };
  for (const p of await backupPrefixes(target)) {
    if (p.committed) continue;
    const newest = Math.max(...p.objects.map((o) => o.modified.getTime()));
    const entry: GcEntry = {
      domain: p.domain,
      backupId: p.backupId,
      prefix: backupPrefix(p.domain, p.backupId),
      objects: p.objects.length,
      bytes: p.objects.reduce((n, o) => n + o.size, 0),
      newest: new Date(newest).toISOString(),
      action: policy.dryRun ? 'would remove' : 'removed',
      removedKeys: [],
      unfinishedRemoved: 0,
    };
    report.entries.push(entry);
    if (now - newest < policy.olderThanMs) {
      entry.action = 'too young';
      continue;
    }
    if (await isRunning(p.backupId)) {
      entry.action = 'running';
      continue;
    }
    if (policy.dryRun) {
      const lockedUntil = await backupPrefixLockedUntil(target, p.domain, p.backupId);
      if (lockedUntil) Object.assign(entry, { action: 'locked', lockedUntil });
      continue;
    }
    // a backup may have committed since the listing (its manifest is the last object it writes): then it is not dead
    if (await target.stat(manifestKey(p.domain, p.backupId))) {
      report.entries.pop();
      continue;
    }
    const removed = await removeBackupPrefix(target, p.domain, p.backupId);
    entry.removedKeys = removed.keys;
    entry.unfinishedRemoved = removed.unfinished;
    if (removed.lockedUntil) Object.assign(entry, { action: 'locked', lockedUntil: removed.lockedUntil });
  }
  return report;
}

/** Parses `30s`, `15m`, `12h`, `1d`, `2w` (and `0s`) into milliseconds; undefined for anything else. */
export function parseAge(text: string): number | undefined {
  const seconds = parseDuration(text);
  return seconds === undefined ? undefined : seconds * 1000;
}
