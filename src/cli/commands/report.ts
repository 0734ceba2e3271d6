/**
 * `vmbackup report [--json] [--stale 36h] [--target URL…] [--notify URL]`: every VM the schedules cover and the
 * given targets' catalogs hold, with its last good backup (from the catalogs: time, level, size, the targets holding
 * it), its last failure with the one sentence (from Temporal), and STALE when the last good backup started longer
 * ago than --stale (or there is none). Exit 1 when a VM is stale or a target cannot be read: usable as a monitoring
 * check. `--notify` POSTs a `stale` event per stale VM.
 */
import type { Command } from 'commander';
import type { LastFailure, ScheduleCoverage } from '../../client/report';
import { listBackups } from '../../repository';
import type { BackupEntry } from '../../repository';
import { parseDuration } from '../../shared/duration';
import { HOST_NAME_RE } from '../../shared/names';
import type { BackupEvent } from '../../shared/events';
import { redactTargetUrl, redactWebhookUrl } from '../../shared/events';
import type { BackupLevel } from '../../shared/types';
import { defaultTargetUrl, targetEnvironmentFrom } from '../../storage/registry';
import { loadConfig } from '../../worker/config';
import { action, CliError, formatBytes, printJson, printTable, printWarning, safeText } from '../output';
import { parseWebhookUrl } from '../../shared/webhook';
import { cliManifestKey, withCliTarget } from './target-options';
import { addS3Options } from './s3-options';
import { temporalFlagsFrom } from './temporal-options';

interface ReportFlags {
  json?: boolean;
  stale: string;
  target: string[];
  host: string[];
  notify?: string;
  [flag: string]: unknown;
}

export function register(program: Command): void {
  const cmd = program
    .command('report')
    .description(
      'every VM of the schedules and the targets: its last good backup, its last failure, and STALE when too old (exit 1)',
    )
    .option('--json', 'print one JSON object')
    .option('--stale <age>', 'a VM whose last good backup started longer ago than this is STALE (30m, 36h, 7d)', '36h')
    .option(
      '--target <url>',
      "a target whose catalog to read, besides the schedules' targets (repeatable; default when none: the local default target)",
      (v: string, prev: string[]) => [...prev, v],
      [],
    )
    .option(
      '--host <name>',
      'only VMs of this host, and only the schedules that cover it (repeatable; a check per host)',
      (v: string, prev: string[]) => [...prev, v],
      [],
    )
    .option('--notify <url>', 'POST a `stale` event for each stale VM to this http(s) webhook');
  addS3Options(cmd);
  cmd.action(action(async (flags: ReportFlags) => runReport(flags)));
}

export interface ReportedVm {
  domain: string;
  host: string;
  schedules: string[];
  status: 'ok' | 'stale';
  lastGood: {
    backupId: string;
    startedAt: string;
    finishedAt: string;
    level: BackupLevel;
    /** bytes of its images (on one target) */
    size: number;
    targets: string[];
    /** S3 Object Lock: the date its objects are retained until (from its manifest), when it was written locked */
    lockedUntil?: string;
  } | null;
  lastFailure: LastFailure | null;
}

async function runReport(flags: ReportFlags): Promise<void> {
  const staleSeconds = parseDuration(flags.stale);
  if (!staleSeconds) throw new CliError(`--stale must be an age such as 30m, 36h or 7d, not "${flags.stale}"`);
  if (flags.notify !== undefined) {
    try {
      parseWebhookUrl(flags.notify);
    } catch (err) {
      throw new CliError((err as Error).message);
    }
  }
  for (const h of flags.host) if (!HOST_NAME_RE.test(h)) throw new CliError(`"${h}" is not a valid host name`);
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const warnings: string[] = [];
  const manifestKey = cliManifestKey();

  // Temporal: schedules and failures. Without it the report still reads the catalogs, and says what it lacks.
  const [{ openExistingSession }, { scheduleCoverage, domainsBackedUpOn, lastFailure, takes }] = await Promise.all([
    import('../../client/connect'),
    import('../../client/report'),
  ]);
  const session = await openExistingSession(config).catch((err: unknown) => {
    warnings.push(
      `Temporal cannot be reached (${(err as Error).message.replace(/\.$/, '')}): the report shows no schedules and no failures.`,
    );
    return undefined;
  });
  try {
    let coverage: ScheduleCoverage = { vms: [], allOn: [], targets: [], unreadable: [] };
    if (session) {
      coverage = await scheduleCoverage(session.client).catch((err: unknown) => {
        warnings.push(`the schedules could not be listed: ${(err as Error).message}`);
        return coverage;
      });
      warnings.push(...coverage.unreadable);
      if (flags.host.length > 0) coverage = onHosts(coverage, new Set(flags.host));
    }

    // Targets: those named here, then the schedules'; the default target when there is none.
    const targetUrls = unique([...flags.target, ...coverage.targets.map((t) => t.target)]);
    const explicit = new Set(flags.target);
    if (targetUrls.length === 0) targetUrls.push(defaultTargetUrl(config.stateDir));
    const targetErrors: Array<{ target: string; error: string }> = [];
    const entries: Array<{ entry: BackupEntry; target: string }> = [];
    let unsigned = 0;
    for (const url of targetUrls) {
      try {
        const found = await withCliTarget(url, flags, (target) =>
          listBackups(target, {
            mustExist: explicit.has(url),
            ...(manifestKey ? { manifestKey } : {}),
            onInvalid: (key, error) => warnings.push(`skipping ${key} on ${redactTargetUrl(url)}: ${error.message}`),
          }),
        );
        for (const entry of found) {
          // with a key, a manifest someone else wrote never makes a VM look backed up
          if (manifestKey && !entry.signed) unsigned++;
          else entries.push({ entry, target: url });
        }
      } catch (err) {
        targetErrors.push({ target: redactTargetUrl(url), error: (err as Error).message });
      }
    }
    if (unsigned > 0) {
      warnings.push(`${unsigned} manifest(s) not signed with your key were not counted as good backups.`);
    }

    // The VMs: the schedules' named ones, the domains of `--all` hosts, and every VM the catalogs hold.
    const vms = new Map<string, { domain: string; host: string; schedules: Set<string>; backups: typeof entries }>();
    const vm = (domain: string, host: string) => {
      const key = `${domain}\u0000${host}`;
      let v = vms.get(key);
      if (!v) {
        v = { domain, host, schedules: new Set(), backups: [] };
        vms.set(key, v);
      }
      return v;
    };
    for (const s of coverage.vms) vm(s.domain, s.host).schedules.add(s.schedule);
    const allOnHosts = new Set(coverage.allOn.map((a) => a.host));
    for (const e of entries) {
      if (flags.host.length > 0 && !flags.host.includes(e.entry.manifest.host)) continue;
      vm(e.entry.manifest.domain, e.entry.manifest.host).backups.push(e);
    }
    if (session) {
      for (const host of allOnHosts) {
        const domains = await domainsBackedUpOn(session.client, host).catch((err: unknown) => {
          warnings.push(`the backups of host ${host} could not be listed: ${(err as Error).message}`);
          return [] as string[];
        });
        // a domain that no schedule's --match takes is reported only when a catalog holds its backups
        for (const d of domains) if (coverage.allOn.some((a) => takes(a, d, host))) vm(d, host);
      }
    }
    for (const a of coverage.allOn) {
      for (const v of vms.values()) if (takes(a, v.domain, v.host)) v.schedules.add(a.schedule);
    }

    const now = Date.now();
    const reported: ReportedVm[] = [];
    const list = [...vms.values()].sort((a, b) => a.host.localeCompare(b.host) || a.domain.localeCompare(b.domain));
    const failures = session
      ? await mapLimited(list, 8, (v) =>
          lastFailure(session.client, v.domain, v.host).catch((err: unknown) => {
            warnings.push(`the failures of ${v.domain} on ${v.host} could not be read: ${(err as Error).message}`);
            return undefined;
          }),
        )
      : list.map(() => undefined);
    list.forEach((v, i) => {
      const newest = [...v.backups].sort(
        (a, b) =>
          Date.parse(b.entry.manifest.startedAt) - Date.parse(a.entry.manifest.startedAt) ||
          b.entry.manifest.backupId.localeCompare(a.entry.manifest.backupId),
      )[0];
      const m = newest?.entry.manifest;
      const started = m ? Date.parse(m.startedAt) : NaN;
      const stale = !m || !(now - started <= staleSeconds * 1000);
      reported.push({
        domain: v.domain,
        host: v.host,
        schedules: [...v.schedules].sort(),
        status: stale ? 'stale' : 'ok',
        lastGood: m
          ? {
              backupId: m.backupId,
              startedAt: m.startedAt,
              finishedAt: m.finishedAt,
              level: m.chain.level,
              size: newest.entry.size,
              targets: unique(
                v.backups.filter((b) => b.entry.manifest.backupId === m.backupId).map((b) => redactTargetUrl(b.target)),
              ),
              ...(m.objectLock ? { lockedUntil: m.objectLock.retainUntil } : {}),
            }
          : null,
        lastFailure: failures[i] ?? null,
      });
    });

    const stale = reported.filter((r) => r.status === 'stale');
    const notified = flags.notify ? await notifyStale(flags.notify, stale, config, warnings) : undefined;
    if (flags.json) {
      printJson({
        generatedAt: new Date(now).toISOString(),
        staleAfter: flags.stale,
        vms: reported,
        stale: stale.length,
        targets: targetUrls.map((u) => {
          const shown = redactTargetUrl(u);
          const error = targetErrors.find((t) => t.target === shown)?.error;
          return { target: shown, ok: error === undefined, ...(error ? { error } : {}) };
        }),
        ...(notified ? { notified } : {}),
        warnings,
      });
    } else {
      printHuman(reported, now, targetErrors, warnings, flags.stale);
    }
    if (stale.length > 0 || targetErrors.length > 0) process.exitCode = 1;
  } finally {
    await session?.close();
  }
}

/** What the schedules that cover one of `hosts` say about those hosts (a schedule of other hosts adds nothing). */
function onHosts(coverage: ScheduleCoverage, hosts: Set<string>): ScheduleCoverage {
  const vms = coverage.vms.filter((v) => hosts.has(v.host));
  const allOn = coverage.allOn.filter((a) => hosts.has(a.host));
  const covering = new Set([...vms, ...allOn].map((x) => x.schedule));
  return {
    vms,
    allOn,
    targets: coverage.targets.filter((t) => covering.has(t.schedule)),
    unreadable: coverage.unreadable,
  };
}

function printHuman(
  reported: ReportedVm[],
  now: number,
  targetErrors: Array<{ target: string; error: string }>,
  warnings: string[],
  staleAfter: string,
): void {
  for (const w of warnings) printWarning(w);
  for (const t of targetErrors) printWarning(`the target ${t.target} could not be read: ${t.error}`);
  if (reported.length === 0) {
    process.stderr.write('No VMs: no schedule covers any, and the targets hold no backups.\n');
    return;
  }
  // the lock column only when a reported backup was written with S3 Object Lock (as `list`)
  const locked = reported.some((r) => r.lastGood?.lockedUntil);
  printTable(
    [
      'DOMAIN',
      'HOST',
      'STATUS',
      'LAST GOOD',
      'AGE',
      'LEVEL',
      'SIZE',
      'TARGETS',
      ...(locked ? ['LOCKED UNTIL'] : []),
      'LAST FAILURE',
    ],
    reported.map((r) => [
      r.domain,
      r.host,
      r.status === 'stale' ? 'STALE' : 'ok',
      r.lastGood?.startedAt ?? 'never',
      r.lastGood ? age(now - Date.parse(r.lastGood.startedAt)) : '-',
      r.lastGood?.level ?? '-',
      r.lastGood ? formatBytes(r.lastGood.size) : '-',
      r.lastGood ? String(r.lastGood.targets.length) : '0',
      ...(locked ? [r.lastGood?.lockedUntil ?? '-'] : []),
      r.lastFailure ? `${r.lastFailure.at} (${r.lastFailure.status})` : '-',
    ]),
  );
  for (const r of reported) {
    if (r.lastFailure) {
      process.stdout.write(
        `${safeText(r.domain)} on ${safeText(r.host)}, last failure: ${safeText(r.lastFailure.error)}\n`,
      );
    }
  }
  const stale = reported.filter((r) => r.status === 'stale').length;
  process.stderr.write(
    stale > 0
      ? `${stale} of ${reported.length} VM(s) have no good backup newer than ${staleAfter}.\n`
      : `All ${reported.length} VM(s) have a good backup newer than ${staleAfter}.\n`,
  );
}

/** POSTs one `stale` event per stale VM; a webhook that does not take one is a warning. */
async function notifyStale(
  url: string,
  stale: ReportedVm[],
  config: ReturnType<typeof loadConfig>,
  warnings: string[],
): Promise<{ url: string; sent: number; failed: number }> {
  const env = targetEnvironmentFrom(process.env);
  const secrets = [env.AWS_SECRET_ACCESS_KEY, env.AWS_SESSION_TOKEN, config.temporalAccess.apiKey].filter(
    (s): s is string => typeof s === 'string',
  );
  const { postEvent } = await import('../../activities/notify');
  let sent = 0;
  let failed = 0;
  for (const r of stale) {
    const event: BackupEvent = {
      kind: 'stale',
      domain: r.domain,
      host: r.host,
      ...(r.lastGood
        ? { backupId: r.lastGood.backupId, level: r.lastGood.level, lastGoodAt: r.lastGood.startedAt }
        : {}),
      targets: (r.lastGood?.targets ?? []).map((target) => ({ target, ok: true })),
      error: r.lastGood
        ? `the last good backup of ${r.domain} on ${r.host} started at ${r.lastGood.startedAt}`
        : `${r.domain} on ${r.host} has no good backup on the targets read`,
      at: new Date().toISOString(),
    };
    try {
      await postEvent(url, event, { secrets });
      sent++;
    } catch (err) {
      failed++;
      warnings.push(`the stale event of ${r.domain} on ${r.host} was not taken: ${(err as Error).message}`);
    }
  }
  return { url: redactWebhookUrl(url), sent, failed };
}

function age(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 172_800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86_400)}d`;
}

function unique<T>(values: T[]): T[] {
  return [...new Set(values)];
}

async function mapLimited<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i] as T);
    }
  });
  await Promise.all(workers);
  return out;
}
