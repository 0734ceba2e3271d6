/** prune: restic's retention policy per domain; manifests are deleted first, then images. */
import type { StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import { deleteBackup, listBackups } from './catalog';
import type { Manifest } from './manifest';
export interface PrunePolicy {
  keepLast?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
}

export interface PruneOptions extends PrunePolicy {
  domain?: string;
  dryRun?: boolean;
}

export interface PruneDecision {
  backupId: string;
  domain: string;
  startedAt: string;
  /** why it is kept: 'last', 'daily', 'weekly', 'monthly', 'only backup'; empty when removed */
  reasons: string[];
}

export interface PruneReport {
  target: string;
  dryRun: boolean;
  keep: PruneDecision[];
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
 * restic's policy for one domain's backups: keep the newest `keepLast`, and the newest backup of
 * each of the last `keepDaily` days / `keepWeekly` ISO weeks / `keepMonthly` months (UTC) that
 * have backups. The newest backup is always kept, so a domain never loses its only backup.
 */
export function applyPolicy(
  backups: Manifest[],
  policy: PrunePolicy,
): { keep: PruneDecision[]; remove: PruneDecision[] } {
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
  const keep: PruneDecision[] = [];
  const remove: PruneDecision[] = [];
  newestFirst.forEach((m, i) => {
    const at = new Date(m.startedAt);
    const reasons: string[] = [];
    rules.forEach((rule, r) => {
      const s = state[r] as { count: number; last: string | undefined };
      if (s.count >= rule.limit) return;
      const b = rule.bucket(at, i);
      if (b !== s.last) {
        s.last = b;
        s.count += 1;
        reasons.push(rule.name);
      }
    });
    if (i === 0 && reasons.length === 0) reasons.push('only backup');
    (reasons.length > 0 ? keep : remove).push({
      backupId: m.backupId,
      domain: m.domain,
      startedAt: m.startedAt,
      reasons,
    });
  });
  return { keep, remove };
}

/**
 * Applies the policy per domain and deletes what it does not keep: the manifest FIRST (the backup
 * stops being listed as valid at once), then its images. Backups without a manifest (running or
 * failed uploads) are never touched.
 */
export async function pruneBackups(target: StorageTarget, opts: PruneOptions): Promise<PruneReport> {
  const policy: PrunePolicy = {
    keepLast: opts.keepLast,
    keepDaily: opts.keepDaily,
    keepWeekly: opts.keepWeekly,
    keepMonthly: opts.keepMonthly,
  };
  for (const [name, value] of Object.entries(policy)) {
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
  if (!Object.values(policy).some((v) => (v ?? 0) > 0)) {
    throw new StorageError(
      'failed',
      'Prune needs a policy: give at least one of --keep-last, --keep-daily, --keep-weekly or --keep-monthly greater than 0.',
      {
        driver: 'catalog',
        permanent: true,
      },
    );
  }
  const entries = await listBackups(target, opts.domain ? { domain: opts.domain } : {});
  const byDomain = new Map<string, Manifest[]>();
  for (const e of entries) byDomain.set(e.manifest.domain, [...(byDomain.get(e.manifest.domain) ?? []), e.manifest]);
  const report: PruneReport = { target: target.displayUrl, dryRun: Boolean(opts.dryRun), keep: [], remove: [] };
  for (const manifests of [...byDomain.values()]) {
    const { keep, remove } = applyPolicy(manifests, policy);
    report.keep.push(...keep);
    report.remove.push(...remove);
  }
  if (opts.dryRun) return report;
  for (const victim of report.remove) await deleteBackup(target, victim.domain, victim.backupId);
  return report;
}
