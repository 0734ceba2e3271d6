/** prune: restic's retention policy per domain; manifests are deleted first, then images. */
import type { ObjectLockStore, StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import { backupPrefix, manifestKey } from '../storage/keys';
import { deleteBackup, listBackups, type CatalogOptions } from './catalog';
import { isChunkManifest } from './manifest';
import type { ChainLevel, Manifest } from './manifest';
export interface PrunePolicy {
  keepLast?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  /**
   * Backups kept whatever the rules say ('protected'), with everything they depend on: a scheduled run protects
   * the backup it just made, so manifests someone else wrote on the target (newer-looking ones) never push it out.
   */
  protect?: readonly string[];
}

export interface PruneOptions extends PrunePolicy, CatalogOptions {
  domain?: string;
  dryRun?: boolean;
}

export interface PruneDecision {
  backupId: string;
  domain: string;
  startedAt: string;
  level: ChainLevel;
  /** the backup it depends on (inc: the previous link, diff: the full) */
  parent?: string;
  /**
   * why it is kept: 'last', 'daily', 'weekly', 'monthly', 'only backup', 'parent of <id>' (a kept backup depends
   * on it), 'not restorable: …' (its chain is broken on this target: not counted, left for a person to decide),
   * 'locked until <date>' (S3 Object Lock: the policy would remove it, the server does not allow it yet);
   * empty when removed
   */
  reasons: string[];
  /** S3 Object Lock: the latest date one of its objects is retained until, when that is still to come */
  lockedUntil?: string;
}

export interface PruneReport {
  target: string;
  dryRun: boolean;
  keep: PruneDecision[];
  /** in the order they are removed: every backup before the backups it depends on */
  remove: PruneDecision[];
}

/** ISO 8601 week, e.g. 2026-W48 (weeks start on Monday; week 1 holds the year's first Thursday). */
function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const day = t.getUTCDay() || 7;
  t.setUTCDate(t.getUTCDate() + 4 - day);
  const yearStart = Date.UTC(t.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((t.getTime() - yearStart) / 86_400_000 + 1) / 7);
  return `${t.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}

/**
 * restic's policy for one domain's backups, counted in restorable points (every full, inc or diff is one): keep the
 * newest `keepLast`, and the newest backup of each of the last `keepDaily` days / `keepWeekly` ISO weeks /
 * `keepMonthly` months (UTC) that have backups. The newest point is always kept, so a domain never loses its only
 * backup. Then every backup a kept one depends on is kept too ('parent of <id>'), so nothing kept stops being
 * restorable. A backup whose chain is broken on this target (its parent is missing) is no restorable point: it is
 * neither counted nor removed ('not restorable: …'), `verify` names the missing link.
 *
 * `remove` comes out in a safe order: every backup before the ones it depends on, so a prune stopped half way never
 * leaves a committed backup whose parent is gone.
 */
export function applyPolicy(
  backups: Manifest[],
  policy: PrunePolicy,
): { keep: PruneDecision[]; remove: PruneDecision[] } {
  const byId = new Map(backups.map((m) => [m.backupId, m]));
  const broken = new Map<string, string>();
  for (const m of backups) {
    const missing = missingAncestor(m, byId);
    if (missing) broken.set(m.backupId, `not restorable: ${missing} is missing`);
  }
  const newestFirst = [...backups].sort(
    (a, b) => b.startedAt.localeCompare(a.startedAt) || b.backupId.localeCompare(a.backupId),
  );
  const rules: Array<{ name: string; limit: number; bucket: (d: Date, i: number) => string }> = [
    { name: 'last', limit: policy.keepLast ?? 0, bucket: (_d, i) => String(i) },
    { name: 'daily', limit: policy.keepDaily ?? 0, bucket: (d) => d.toISOString().slice(0, 10) },
    { name: 'weekly', limit: policy.keepWeekly ?? 0, bucket: isoWeek },
    { name: 'monthly', limit: policy.keepMonthly ?? 0, bucket: (d) => d.toISOString().slice(0, 7) },
  ];
  const state = rules.map(() => ({ count: 0, last: undefined as string | undefined }));
  const reasons = new Map<string, string[]>(backups.map((m) => [m.backupId, []]));
  const points = newestFirst.filter((m) => !broken.has(m.backupId));
  points.forEach((m, i) => {
    const at = new Date(m.startedAt);
    const why = reasons.get(m.backupId) as string[];
    rules.forEach((rule, r) => {
      const s = state[r] as { count: number; last: string | undefined };
      if (s.count >= rule.limit) return;
      const b = rule.bucket(at, i);
      if (b !== s.last) {
        s.last = b;
        s.count += 1;
        why.push(rule.name);
      }
    });
    if (i === 0 && why.length === 0) why.push('only backup');
    if (policy.protect?.includes(m.backupId)) why.push('protected');
  });
  for (const [id, why] of broken) reasons.get(id)?.push(why);
  // a kept backup keeps its whole chain: walk from each kept one (newest first) to its full
  for (const m of points) {
    if ((reasons.get(m.backupId) ?? []).length === 0) continue;
    let child = m;
    let parent = child.chain.parent && !isChunkManifest(child) ? byId.get(child.chain.parent) : undefined;
    while (parent) {
      const why = reasons.get(parent.backupId) as string[];
      const reason = `parent of ${child.backupId}`;
      if (why.includes(reason)) break;
      why.push(reason);
      child = parent;
      parent = child.chain.parent && !isChunkManifest(child) ? byId.get(child.chain.parent) : undefined;
    }
  }
  const decision = (m: Manifest): PruneDecision => ({
    backupId: m.backupId,
    domain: m.domain,
    startedAt: m.startedAt,
    level: m.chain.level,
    ...(m.chain.parent ? { parent: m.chain.parent } : {}),
    reasons: reasons.get(m.backupId) ?? [],
  });
  const keep = newestFirst.filter((m) => (reasons.get(m.backupId) ?? []).length > 0).map(decision);
  const remove = dependentsFirst(newestFirst.filter((m) => (reasons.get(m.backupId) ?? []).length === 0)).map(decision);
  return { keep, remove };
}

/** The first ancestor of `m` that is not among `byId` (its chain is broken here), or undefined. */
function missingAncestor(m: Manifest, byId: ReadonlyMap<string, Manifest>): string | undefined {
  const seen = new Set<string>();
  let link = m;
  while (link.chain.level !== 'full' && !isChunkManifest(link)) {
    const parentId = link.chain.parent;
    if (!parentId || seen.has(parentId)) return parentId ?? '(no parent)';
    seen.add(parentId);
    const parent = byId.get(parentId);
    if (!parent) return parentId;
    link = parent;
  }
  return undefined;
}

/** Orders backups so that each comes before every backup it depends on (children before parents). */
function dependentsFirst(victims: Manifest[]): Manifest[] {
  const ids = new Set(victims.map((m) => m.backupId));
  const children = new Map<string, number>();
  for (const m of victims) {
    const p = m.chain.parent;
    if (p && ids.has(p)) children.set(p, (children.get(p) ?? 0) + 1);
  }
  const out: Manifest[] = [];
  const pending = [...victims];
  while (pending.length > 0) {
    const i = pending.findIndex((m) => (children.get(m.backupId) ?? 0) === 0);
    // no such backup only with a loop of parents, which the walk above already treats as broken
    const [next] = pending.splice(i < 0 ? 0 : i, 1);
    if (!next) break;
    out.push(next);
    const p = next.chain.parent;
    if (p && children.has(p)) children.set(p, (children.get(p) ?? 1) - 1);
  }
  return out;
}

/**
 * Applies the policy per domain and deletes what it does not keep: the manifest FIRST (the backup
 * stops being listed as valid at once), then its images. Backups without a manifest (running or
 * failed uploads) are never touched.
 */
export async function pruneBackups(target: StorageTarget, opts: PruneOptions): Promise<PruneReport> {
  const rules: Omit<PrunePolicy, 'protect'> = {
    keepLast: opts.keepLast,
    keepDaily: opts.keepDaily,
    keepWeekly: opts.keepWeekly,
    keepMonthly: opts.keepMonthly,
  };
  for (const [name, value] of Object.entries(rules)) {
    if (value !== undefined && (!Number.isInteger(value) || value < 0)) {
      throw new StorageError(
        'failed',
        `--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} must be a whole number of 0 or more, not ${value}.`,
        {
          driver: 'catalog',
          permanent: true,
        },
      );
    }
  }
  if (!Object.values(rules).some((v) => (v ?? 0) > 0)) {
    throw new StorageError(
      'failed',
      'Prune needs a policy: give at least one of --keep-last, --keep-daily, --keep-weekly or --keep-monthly greater than 0.',
      {
        driver: 'catalog',
        permanent: true,
      },
    );
  }
  const policy: PrunePolicy = { ...rules, ...(opts.protect ? { protect: opts.protect } : {}) };
  const entries = await listBackups(target, {
    ...(opts.domain ? { domain: opts.domain } : {}),
    ...(opts.manifestKey ? { manifestKey: opts.manifestKey } : {}),
  });
  const report: PruneReport = { target: target.displayUrl, dryRun: Boolean(opts.dryRun), keep: [], remove: [] };
  const byDomain = new Map<string, Manifest[]>();
  for (const e of entries) {
    if (opts.manifestKey && !e.signed) {
      // someone else wrote it: it neither counts as a point (a forged newer backup would push real ones out) nor
      // is removed on its word
      report.keep.push({
        backupId: e.manifest.backupId,
        domain: e.manifest.domain,
        startedAt: e.manifest.startedAt,
        level: e.manifest.chain.level,
        ...(e.manifest.chain.parent ? { parent: e.manifest.chain.parent } : {}),
        reasons: ['not signed with your key: not counted'],
      });
      continue;
    }
    byDomain.set(e.manifest.domain, [...(byDomain.get(e.manifest.domain) ?? []), e.manifest]);
  }
  for (const manifests of [...byDomain.values()]) {
    const { keep, remove } = applyPolicy(manifests, policy);
    report.keep.push(...keep);
    report.remove.push(...remove);
  }
  const lock = target.objectLock;
  if (lock && (await lock.enabled())) {
    await keepLocked(target, report, lock);
    if (opts.dryRun) return report;
    for (const victim of report.remove) await deleteVersions(target, lock, victim.domain, victim.backupId);
    return report;
  }
  if (opts.dryRun) return report;
  for (const victim of report.remove) await deleteBackup(target, victim.domain, victim.backupId);
  return report;
}

/**
 * S3 Object Lock: a backup the policy would remove while one of its object versions is still retained stays
 * ('locked until <date>'), with every backup it depends on (a locked inc must stay restorable); a later prune removes
 * it once the date passed. Asked of the server (one HeadObject per version), not of the manifest's `objectLock`:
 * the retention is what holds.
 */
async function keepLocked(target: StorageTarget, report: PruneReport, lock: ObjectLockStore): Promise<void> {
  const now = Date.now();
  const byId = new Map(report.remove.map((d) => [d.backupId, d]));
  const kept = new Set<string>();
  for (const victim of report.remove) {
    let latest = 0;
    for (const v of await lock.versions(backupPrefix(victim.domain, victim.backupId))) {
      latest = Math.max(latest, v.retainUntil?.getTime() ?? 0);
    }
    if (latest <= now) continue;
    victim.lockedUntil = new Date(latest).toISOString();
    victim.reasons.push(`locked until ${victim.lockedUntil}`);
    kept.add(victim.backupId);
  }
  for (const id of [...kept]) {
    let child = byId.get(id);
    let parent = child?.parent ? byId.get(child.parent) : undefined;
    while (child && parent) {
      parent.reasons.push(`parent of ${child.backupId}`);
      kept.add(parent.backupId);
      child = parent;
      parent = child.parent ? byId.get(child.parent) : undefined;
    }
  }
  report.keep.push(...report.remove.filter((d) => kept.has(d.backupId)));
  report.remove = report.remove.filter((d) => !kept.has(d.backupId));
}

/**
 * A backup in a versioned (Object Lock) bucket: a plain delete would only hide it behind delete markers, its bytes
 * kept and billed for ever. Every version and delete marker goes, the manifest's first (the backup stops being listed
 * at once), then what unfinished uploads left.
 */
async function deleteVersions(
  target: StorageTarget,
  lock: ObjectLockStore,
  domain: string,
  backupId: string,
): Promise<void> {
  const prefix = backupPrefix(domain, backupId);
  const manifest = manifestKey(domain, backupId);
  const versions = await lock.versions(prefix);
  const ordered = [...versions.filter((v) => v.key === manifest), ...versions.filter((v) => v.key !== manifest)];
  for (const v of ordered) await lock.deleteVersion(v.key, v.versionId);
  await target.removeUnfinished(prefix);
}
