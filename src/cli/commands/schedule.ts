/**
 * `vmbackup schedule create|list|describe|pause|unpause|trigger|backfill|delete`: backups that run themselves, as
 * Temporal Schedules (src/client/schedules.ts). Each run is a `scheduledBackups` workflow on the control queue,
 * served by every `vmbackup worker`; each VM's backup is its own `backupDomain` on its host.
 */
import { Option } from 'commander';
import type { Command } from 'commander';
import type { Client, ScheduleDescription, ScheduleHandle } from '@temporalio/client';
import type { OverlapName, ScheduledRunView } from '../../client/schedules';
import type * as SchedulesModule from '../../client/schedules';
import { parseDuration } from '../../shared/duration';
import { DOMAIN_NAME_RE, HOST_NAME_RE } from '../../shared/names';
import type { RetentionPolicy, ScheduleGroup, ScheduleMember, ScheduledBackupsInput } from '../../shared/schedule';
import { redactUrl } from '../../storage/registry';
import { loadConfig } from '../../worker/config';
import type { Config } from '../../worker/config';
import { action, CliError, printJson, printTable, safeText } from '../output';
import { retentionReachDays } from '../../shared/object-lock';
import { addBackupOptions, backupOptionsFrom, collect, requireLockTarget, uniqueTargets } from './backup';
import type { BackupOptionFlags } from './backup';
import { addTemporalOptions, temporalFlagsFrom } from './temporal-options';

const OVERLAPS = ['skip', 'buffer-one', 'buffer-all', 'cancel-other', 'terminate-other', 'allow-all'];
/** `--match` globs: `*` and `?` over the characters of a domain name. */
const GLOB_RE = /^[A-Za-z0-9_.+*?-]{1,64}$/;

interface CreateFlags extends BackupOptionFlags {
  domain: string[];
  all?: boolean;
  host: string[];
  match: string[];
  every: string;
  at?: string;
  jitter?: string;
  timezone?: string;
  target: string[];
  keepLast?: string;
  keepDaily?: string;
  keepWeekly?: string;
  keepMonthly?: string;
  overlap: OverlapName;
  catchupWindow?: string;
  paused?: boolean;
  note?: string;
  json?: boolean;
}

export function register(program: Command): void {
  const schedule = program
    .command('schedule')
    .description('backups that run themselves: Temporal Schedules of one VM or a group, with retention');

  const create = schedule
    .command('create')
    .description(
      'create a schedule: every --every, back up the VMs of the group (each on its host), then apply retention',
    )
    .argument('<name>', 'schedule name (letters, digits, ".", "_", "-")')
    .option('--domain <[host/]name>', 'a VM, on --host or this machine unless host/ is given (repeatable)', collect, [])
    .option('--all', 'every domain libvirt has on each --host when the run starts (a VM added is picked up)')
    .option(
      '--host <name>',
      'with --all: a host to take every domain of (repeatable); else the host of --domain',
      collect,
      [],
    )
    .option('--match <glob>', 'with --all: only domains whose name matches (`*`, `?`; repeatable)', collect, [])
    .requiredOption('--every <duration>', 'how often: 1d, 12h, 30m, 90s, ...')
    .option('--at <HH:MM>', 'time of day of the runs (with --every 1d, or hours that divide a day)')
    .option('--jitter <duration>', 'start each run up to this much later, at random (spreads a fleet out)')
    .option('--timezone <zone>', 'time zone of --at (default UTC), e.g. Europe/Berlin')
    .option('--target <url>', 'file:///abs/dir, nfs://host/export/path or s3://bucket/prefix (repeatable)', collect, [])
    .option('--keep-last <n>', 'retention: keep the newest n backups of each VM on each target')
    .option('--keep-daily <n>', 'retention: keep the newest backup of each of the last n days')
    .option('--keep-weekly <n>', 'retention: keep the newest backup of each of the last n ISO weeks')
    .option('--keep-monthly <n>', 'retention: keep the newest backup of each of the last n months')
    .addOption(
      new Option('--overlap <policy>', 'when a run is due while the last one still runs')
        .choices(OVERLAPS)
        .default('skip'),
    )
    .option(
      '--catchup-window <duration>',
      'a run missed while Temporal was down still happens this late (default: --every, 1m to 1d)',
    )
    .option('--paused', 'create it paused')
    .option('--note <text>', 'a note on the schedule (shown by describe)')
    .option('--json', 'print one JSON object');
  addBackupOptions(create);
  create.action(action(async (name: string, flags: CreateFlags) => runCreate(name, flags)));

  schedule
    .command('list')
    .description("vmbackup's schedules: when they run, paused or not, the last and next run")
    .option('--json', 'print one JSON array')
    .action(action(async (flags: { json?: boolean }) => runList(flags)));

  schedule
    .command('describe')
    .description('a schedule: what it backs up where, when, retention, its recent runs and how each VM fared')
    .argument('<name>')
    .option('--json', 'print one JSON object')
    .action(action(async (name: string, flags: { json?: boolean }) => runDescribe(name, flags)));

  schedule
    .command('pause')
    .description('stop starting runs (a run going on goes on)')
    .argument('<name>')
    .option('--note <text>', 'why (shown by describe and list)')
    .action(
      action(async (name: string, flags: { note?: string }) =>
        withSchedule(name, flags, async (h) => {
          await h.pause(flags.note ?? 'paused with vmbackup schedule pause');
          process.stderr.write(`schedule ${name}: paused\n`);
        }),
      ),
    );

  schedule
    .command('unpause')
    .description('start runs again, from the next one due')
    .argument('<name>')
    .option('--note <text>', 'a note (shown by describe and list)')
    .action(
      action(async (name: string, flags: { note?: string }) =>
        withSchedule(name, flags, async (h) => {
          await h.unpause(flags.note ?? 'unpaused with vmbackup schedule unpause');
          process.stderr.write(`schedule ${name}: unpaused\n`);
        }),
      ),
    );

  schedule
    .command('trigger')
    .description('start a run now (also when paused); a VM whose backup still runs is reported skipped')
    .argument('<name>')
    .addOption(
      new Option('--overlap <policy>', 'when the last run still runs (default: start anyway)').choices(OVERLAPS),
    )
    .action(
      action(async (name: string, flags: { overlap?: OverlapName }) =>
        withSchedule(name, flags, async (h, { OVERLAP_POLICIES }) => {
          await h.trigger(OVERLAP_POLICIES[flags.overlap ?? 'allow-all']);
          process.stderr.write(`schedule ${name}: triggered\n`);
        }),
      ),
    );

  schedule
    .command('backfill')
    .description('take the runs that were due between --from and --to now (e.g. missed while paused or down)')
    .argument('<name>')
    .requiredOption('--from <time>', 'ISO time, e.g. 2026-11-29T00:00:00Z')
    .requiredOption('--to <time>', 'ISO time')
    .addOption(
      new Option('--overlap <policy>', 'how the runs overlap each other and a running one')
        .choices(OVERLAPS)
        .default('allow-all'),
    )
    .action(
      action(async (name: string, flags: { from: string; to: string; overlap: OverlapName }) => {
        const start = isoTime('--from', flags.from);
        const end = isoTime('--to', flags.to);
        if (end.getTime() <= start.getTime()) throw new CliError('--to must be later than --from');
        await withSchedule(name, flags, async (h, { OVERLAP_POLICIES }) => {
          await h.backfill({ start, end, overlap: OVERLAP_POLICIES[flags.overlap] });
          process.stderr.write(`schedule ${name}: backfilled ${start.toISOString()} .. ${end.toISOString()}\n`);
        });
      }),
    );

  schedule
    .command('delete')
    .description('delete a schedule (its runs going on, and the backups it made, stay)')
    .argument('<name>')
    .action(
      action(async (name: string, flags: object) =>
        withSchedule(name, flags, async (h) => {
          await h.delete();
          process.stderr.write(`schedule ${name}: deleted\n`);
        }),
      ),
    );

  for (const cmd of schedule.commands) addTemporalOptions(cmd);
}

function isoTime(flag: string, text: string): Date {
  const d = new Date(text);
  if (!/^\d{4}-\d{2}-\d{2}T/.test(text) || Number.isNaN(d.getTime())) {
    throw new CliError(`${flag} must be an ISO time such as 2026-11-29T02:00:00Z, not "${text}"`);
  }
  return d;
}

function count(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value) || Number(value) > 100_000) {
    throw new CliError(`--${flag} must be a whole number from 0 to 100000, not "${value}"`);
  }
  return Number(value);
}

function duration(flag: string, value: string): number {
  const seconds = parseDuration(value);
  if (!seconds) throw new CliError(`${flag} must be a duration such as 1d, 12h, 30m or 90s, not "${value}"`);
  return seconds;
}

/** The VMs of `--domain`, `--all`, `--host` and `--match`, checked. */
export function groupFrom(
  flags: Pick<CreateFlags, 'domain' | 'all' | 'host' | 'match'>,
  thisHost: string,
): ScheduleGroup {
  for (const h of flags.host) if (!HOST_NAME_RE.test(h)) throw new CliError(`--host "${h}" is not a valid host name`);
  if (new Set(flags.host).size !== flags.host.length) throw new CliError('a --host is given twice');
  if (flags.domain.length === 0 && !flags.all) {
    throw new CliError('a schedule needs VMs: give --domain NAME (repeatable) or --all [--host H]');
  }
  if (flags.match.length > 0 && !flags.all) throw new CliError('--match applies to --all only');
  for (const g of flags.match) {
    if (!GLOB_RE.test(g)) throw new CliError(`--match "${g}" is not a pattern of domain-name characters, '*' and '?'`);
  }
  const domains: ScheduleMember[] = [];
  for (const d of flags.domain) {
    const slash = d.indexOf('/');
    let host: string;
    let domain: string;
    if (slash >= 0) {
      host = d.slice(0, slash);
      domain = d.slice(slash + 1);
      if (!HOST_NAME_RE.test(host)) throw new CliError(`--domain "${d}": "${host}" is not a valid host name`);
    } else if (flags.host.length > 1 && !flags.all) {
      throw new CliError(`--domain "${d}": several --host are given, say which one holds it: --domain HOST/${d}`);
    } else {
      host = flags.host.length === 1 ? flags.host[0]! : thisHost;
      domain = d;
    }
    if (!DOMAIN_NAME_RE.test(domain)) {
      throw new CliError(
        `--domain "${d}": "${domain}" is not a valid domain name: use letters, digits, '.', '_', '+' and '-'`,
      );
    }
    if (!domains.some((m) => m.host === host && m.domain === domain)) domains.push({ host, domain });
  }
  const allOn = flags.all ? (flags.host.length > 0 ? [...flags.host] : [thisHost]) : [];
  return { domains, allOn, ...(flags.match.length > 0 ? { match: [...flags.match] } : {}) };
}

async function runCreate(name: string, flags: CreateFlags): Promise<void> {
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const schedules = await import('../../client/schedules');
  schedules.checkScheduleName(name);
  const group = groupFrom(flags, config.host);
  if (flags.target.length === 0) {
    throw new CliError("a schedule needs --target URL (repeatable): its backups run on the VMs' hosts, not here");
  }
  // each target once (two spellings of one place would race on the same keys); a bad URL fails here
  const targets = uniqueTargets(flags.target, (line) => process.stderr.write(`${line}\n`));
  const everySeconds = duration('--every', flags.every);
  const jitterSeconds = flags.jitter !== undefined ? duration('--jitter', flags.jitter) : undefined;
  const retention: RetentionPolicy = {
    keepLast: count('keep-last', flags.keepLast),
    keepDaily: count('keep-daily', flags.keepDaily),
    keepWeekly: count('keep-weekly', flags.keepWeekly),
    keepMonthly: count('keep-monthly', flags.keepMonthly),
  };
  const hasRetention = Object.values(retention).some((v) => v !== undefined);
  if (hasRetention && !Object.values(retention).some((v) => (v ?? 0) > 0)) {
    throw new CliError('the retention policy keeps nothing: give a --keep-* greater than 0');
  }
  const options = backupOptionsFrom(flags);
  requireLockTarget(options, targets);
  const lock = options.s3?.objectLock;
  if (lock && hasRetention) {
    const reach = retentionReachDays(retention, everySeconds);
    if (reach < lock.days) {
      throw new CliError(
        `the retention policy keeps backups about ${Math.floor(reach)} day(s) but --s3-object-lock locks them for ${lock.days}: prune could not remove what the policy drops until the lock passes; keep them at least as long (e.g. --keep-daily ${lock.days}) or lock them for fewer days`,
      );
    }
  }
  const run: ScheduledBackupsInput = {
    schedule: name,
    group,
    method: flags.method,
    targets,
    options,
    ...(hasRetention ? { retention: JSON.parse(JSON.stringify(retention)) as RetentionPolicy } : {}),
    waitSeconds: everySeconds,
  };
  const timing = {
    everySeconds,
    ...(flags.at !== undefined ? { at: flags.at } : {}),
    ...(jitterSeconds !== undefined ? { jitterSeconds } : {}),
    ...(flags.timezone !== undefined ? { timezone: flags.timezone } : {}),
  };
  try {
    schedules.scheduleSpecOf(timing); // one sentence for a bad --at or --timezone, before connecting
  } catch (err) {
    throw new CliError((err as Error).message);
  }
  const catchupSeconds =
    flags.catchupWindow !== undefined
      ? duration('--catchup-window', flags.catchupWindow)
      : schedules.defaultCatchupSeconds(everySeconds);
  if (catchupSeconds < 10) throw new CliError("--catchup-window must be at least 10s (Temporal's minimum)");

  await withSession(config, true, async (client) => {
    const desc = await schedules.createSchedule(client, {
      name,
      controlTaskQueue: config.controlTaskQueue,
      run,
      timing,
      overlap: flags.overlap,
      catchupSeconds,
      paused: flags.paused,
      ...(flags.note !== undefined ? { note: flags.note } : {}),
    });
    if (flags.json) {
      printJson(describeJson(name, desc, []));
      return;
    }
    const next = desc.info.nextActionTimes[0];
    process.stdout.write(`${name}\n`);
    process.stderr.write(
      `schedule ${name}: ${schedules.describeSpec(desc.spec)}${flags.paused ? ', paused' : ''}` +
        `${next && !flags.paused ? `; next run ${next.toISOString()}` : ''}\n` +
        `  runs are carried out by \`vmbackup worker\` processes (control queue ${config.controlTaskQueue}); ` +
        `each VM's backup runs on its host's worker\n`,
    );
  });
}

async function runList(flags: { json?: boolean }): Promise<void> {
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const schedules = await import('../../client/schedules');
  await withSession(config, false, async (client) => {
    const list = await schedules.listSchedules(client);
    if (flags.json) {
      printJson(
        list.map((s) => ({
          name: s.name,
          spec: schedules.describeSpec(s.spec),
          paused: s.state.paused,
          ...(s.state.note ? { note: s.state.note } : {}),
          nextRun: s.info.nextActionTimes[0]?.toISOString(),
          lastRun: s.info.recentActions.at(-1)?.takenAt.toISOString(),
        })),
      );
      return;
    }
    if (list.length === 0) {
      process.stderr.write('no schedules (create one with `vmbackup schedule create`)\n');
      return;
    }
    printTable(
      ['NAME', 'WHEN', 'STATE', 'LAST RUN', 'NEXT RUN'],
      list.map((s) => [
        s.name,
        schedules.describeSpec(s.spec),
        s.state.paused ? `paused${s.state.note ? `: ${s.state.note}` : ''}` : 'active',
        s.info.recentActions.at(-1)?.takenAt.toISOString() ?? '-',
        s.state.paused ? '-' : (s.info.nextActionTimes[0]?.toISOString() ?? '-'),
      ]),
    );
  });
}

async function runDescribe(name: string, flags: { json?: boolean }): Promise<void> {
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const schedules = await import('../../client/schedules');
  await withSession(config, false, async (client) => {
    const desc = await schedules.describeSchedule(client, name);
    const runs = await schedules.recentRuns(client, desc);
    if (flags.json) {
      printJson(describeJson(name, desc, runs));
      return;
    }
    const input = schedules.runInputOf(desc);
    const lines: string[] = [];
    lines.push(`schedule ${name}: ${schedules.describeSpec(desc.spec)}`);
    lines.push(
      `  state: ${desc.state.paused ? 'paused' : 'active'}${desc.state.note ? ` (${desc.state.note})` : ''}; ` +
        `overlap ${schedules.overlapName(desc.policies.overlap) ?? desc.policies.overlap}; ` +
        `catch-up window ${schedules.formatDuration(Math.round(desc.policies.catchupWindow / 1000))}`,
    );
    if (input) {
      const g = input.group;
      const vms = [
        ...g.domains.map((m) => `${m.host}/${m.domain}`),
        ...g.allOn.map((h) => `${h}/*${g.match ? ` matching ${g.match.join(' or ')}` : ''}`),
      ];
      lines.push(`  VMs: ${vms.join(', ')}`);
      lines.push(`  targets: ${input.targets.map((t) => redactUrl(t)).join(', ')}`);
      lines.push(
        `  backups: method ${input.method}, level ${input.options.level ?? 'auto'}` +
          `${input.options.maxChain ? `, max chain ${input.options.maxChain}` : ''}` +
          `${input.options.fullEverySeconds ? `, full every ${schedules.formatDuration(input.options.fullEverySeconds)}` : ''}`,
      );
      const r = input.retention;
      lines.push(
        `  retention: ${
          r
            ? (['keepLast', 'keepDaily', 'keepWeekly', 'keepMonthly'] as const)
                .filter((k) => r[k] !== undefined)
                .map((k) => `${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} ${r[k]}`)
                .join(', ')
            : 'none (backups are kept until `vmbackup prune`)'
        }`,
      );
    } else {
      lines.push(`  action: ${desc.action.workflowType} (not a vmbackup run)`);
    }
    lines.push(
      `  runs: ${desc.info.numActionsTaken} taken, ${desc.info.numActionsSkippedOverlap} skipped (overlap), ` +
        `${desc.info.numActionsMissedCatchupWindow} missed (catch-up window)`,
    );
    if (!desc.state.paused) {
      lines.push(
        `  next: ${
          desc.info.nextActionTimes
            .slice(0, 3)
            .map((d) => d.toISOString())
            .join(', ') || '-'
        }`,
      );
    }
    process.stdout.write(`${lines.map((l) => safeText(l)).join('\n')}\n`);
    for (const run of runs) {
      process.stdout.write(`${safeText(runLine(run))}\n`);
      for (const vm of run.result?.vms ?? []) {
        process.stdout.write(
          `${safeText(
            `    ${vm.host}/${vm.domain}: ${vm.status}${vm.level ? ` ${vm.level}` : ''}${vm.backupId ? ` ${vm.backupId}` : ''}` +
              `${vm.error ? `: ${vm.error}` : ''}`,
          )}\n`,
        );
      }
      for (const r of run.result?.retention ?? []) {
        const what = r.error
          ? `retention failed: ${r.error}`
          : r.deferred
            ? `retention deferred: ${r.deferred}`
            : `retention removed ${r.removed.length}${r.removed.length ? ` (${r.removed.map((x) => x.backupId).join(', ')})` : ''}, kept ${r.kept}`;
        process.stdout.write(`${safeText(`    ${r.host}/${r.domain} on ${r.target}: ${what}`)}\n`);
      }
      for (const u of run.result?.unlistedHosts ?? []) process.stdout.write(`${safeText(`    ${u.error}`)}\n`);
    }
  });
}

function runLine(run: ScheduledRunView): string {
  const vms = run.result?.vms ?? [];
  const by = (s: string) => vms.filter((v) => v.status === s).length;
  const summary = run.result
    ? `${by('completed')} completed, ${by('partial')} partial, ${by('failed')} failed, ${by('skipped')} skipped` +
      `${by('running') ? `, ${by('running')} still running` : ''}`
    : (run.error ?? '');
  return `  run ${run.takenAt.toISOString()} (${run.workflowId}): ${run.status.toLowerCase()}${summary ? `: ${summary}` : ''}`;
}

function describeJson(name: string, desc: ScheduleDescription, runs: ScheduledRunView[]): object {
  const input = desc.action.type === 'startWorkflow' ? (desc.action.args?.[0] as ScheduledBackupsInput) : undefined;
  return {
    name,
    scheduleId: desc.scheduleId,
    spec: desc.spec,
    paused: desc.state.paused,
    ...(desc.state.note ? { note: desc.state.note } : {}),
    overlap: desc.policies.overlap,
    catchupWindowSeconds: Math.round(desc.policies.catchupWindow / 1000),
    ...(input ? { run: redactRun(input) } : {}),
    nextRuns: desc.info.nextActionTimes.map((d) => d.toISOString()),
    actionsTaken: desc.info.numActionsTaken,
    skippedOverlap: desc.info.numActionsSkippedOverlap,
    missedCatchupWindow: desc.info.numActionsMissedCatchupWindow,
    runningRuns: desc.info.runningActions.map((a) => a.workflow.workflowId),
    recentRuns: runs.map((r) => ({
      workflowId: r.workflowId,
      runId: r.runId,
      scheduledAt: r.scheduledAt.toISOString(),
      takenAt: r.takenAt.toISOString(),
      status: r.status.toLowerCase(),
      ...(r.result ? { result: r.result } : {}),
      ...(r.error ? { error: r.error } : {}),
    })),
  };
}

/** A run's input as printed: credentials out of target URLs, a webhook only by its origin (its path may be a token). */
function redactRun(input: ScheduledBackupsInput): ScheduledBackupsInput {
  const notify = input.options?.notify;
  return {
    ...input,
    targets: input.targets.map((t) => redactUrl(t)),
    options: { ...input.options, ...(notify ? { notify: { ...notify, url: webhookOrigin(notify.url) } } : {}) },
  };
}

function webhookOrigin(url: string): string {
  try {
    return `${new URL(url).origin}/…`;
  } catch {
    return '(not a URL)';
  }
}

async function withSession<T>(config: Config, startServer: boolean, fn: (client: Client) => Promise<T>): Promise<T> {
  const { openSession, openExistingSession } = await import('../../client/connect');
  const session = startServer
    ? await openSession(config, { log: (l) => process.stderr.write(`${l}\n`) })
    : await openExistingSession(config);
  try {
    return await fn(session.client);
  } catch (err) {
    const { ScheduleError } = await import('../../client/schedules');
    if (err instanceof ScheduleError) throw new CliError(err.message);
    throw err;
  } finally {
    await session.close();
  }
}

async function withSchedule(
  name: string,
  flags: object,
  fn: (h: ScheduleHandle, schedules: typeof SchedulesModule) => Promise<void>,
): Promise<void> {
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const schedules = await import('../../client/schedules');
  schedules.checkScheduleName(name);
  await withSession(config, false, (client) => schedules.onSchedule(client, name, (h) => fn(h, schedules)));
}
