/**
 * scheduledBackups: one run of a schedule (`vmbackup schedule create`), started by its Temporal Schedule on the
 * control task queue, which every `vmbackup worker` serves. It resolves the group (the domains libvirt has on each
 * `--all` host now, asked of that host's worker), starts each VM's `backupDomain` as a child on the VM's host queue
 * with the usual workflow id (one backup per VM and host: a VM whose backup still runs is reported skipped), applies
 * retention on each target of each VM that got a new backup (on the VM's host: file:// targets are host-local), and
 * returns what happened per VM. Its history grows by a handful of events per VM and target, once per run.
 */
import {
  ApplicationFailure,
  ParentClosePolicy,
  condition,
  isCancellation,
  log,
  proxyActivities,
  startChild,
  uuid4,
} from '@temporalio/workflow';
import { WorkflowExecutionAlreadyStartedError } from '@temporalio/common';
import { ErrorType } from '../shared/errors';
import {
  DOMAIN_NAME_RE,
  HOST_NAME_RE,
  SCHEDULE_NAME_RE,
  backupWorkflowId,
  hostTaskQueue,
  makeBackupId,
} from '../shared/names';
import type {
  RetentionResult,
  ScheduleActivities,
  ScheduleMember,
  ScheduledBackupsInput,
  ScheduledBackupsResult,
  ScheduledVmResult,
} from '../shared/schedule';
import { BackupIdKey, DomainKey, HostKey, MethodKey, StateKey } from '../shared/search';
import type { BackupRequest, BackupResult } from '../shared/types';
import type { backupDomain } from './backup';

/** A run backs up at most this many VMs: its history stays far below Temporal's 10k-event warning. */
export const MAX_VMS_PER_RUN = 500;
/** `--match` globs a run accepts (the host's activity checks them again). */
const GLOB_RE = /^[A-Za-z0-9_.+*?-]{1,64}$/;

function hostActivities(host: string) {
  const listing = proxyActivities<ScheduleActivities>({
    taskQueue: hostTaskQueue(host),
    // a host whose worker is down for this long is reported, and the other hosts' VMs go on
    scheduleToCloseTimeout: '5m',
    startToCloseTimeout: '1m',
    retry: { initialInterval: '2s', maximumInterval: '30s' },
  });
  const retention = proxyActivities<ScheduleActivities>({
    taskQueue: hostTaskQueue(host),
    startToCloseTimeout: '30m',
    // it heartbeats every 10 s: a task lost on its way to the worker is retried after this, not after 30 min
    heartbeatTimeout: '1m',
    scheduleToCloseTimeout: '2h',
    retry: { initialInterval: '5s', maximumInterval: '1m', maximumAttempts: 5 },
  });
  return { listDomains: listing.listDomains, applyRetention: retention.applyRetention };
}

export async function scheduledBackups(input: ScheduledBackupsInput): Promise<ScheduledBackupsResult> {
  validateInput(input);
  const result: ScheduledBackupsResult = { schedule: input.schedule, vms: [], retention: [], unlistedHosts: [] };
  const members = await resolveGroup(input, result);
  if (members.length > MAX_VMS_PER_RUN) {
    for (const m of members.slice(MAX_VMS_PER_RUN)) {
      result.vms.push({
        ...m,
        workflowId: backupWorkflowId(m.host, m.domain),
        status: 'failed',
        error: `the schedule covers ${members.length} VMs and a run backs up at most ${MAX_VMS_PER_RUN}: split it into several schedules`,
      });
    }
  }
  const vms = members
    .slice(0, MAX_VMS_PER_RUN)
    .map((m): ScheduledVmResult => ({ ...m, workflowId: backupWorkflowId(m.host, m.domain), status: 'running' }));
  result.vms.unshift(...vms);

  // Backups still running when the run stops waiting go on on their own (ABANDON); the run waits for the
  // retention steps already started, never starts another, and reports those VMs as running.
  let closing = false;
  let retaining = 0;
  let settled = false;
  const backUpOne = async (vm: ScheduledVmResult): Promise<void> => {
    const backupId = makeBackupId(vm.domain, new Date(), uuid4().replace(/-/g, '').slice(0, 4));
    const req: BackupRequest = {
      backupId,
      domain: vm.domain,
      host: vm.host,
      method: input.method,
      targets: input.targets,
      options: input.options,
      requestedAt: new Date().toISOString(),
    };
    let child;
    try {
      child = await startChild<typeof backupDomain>('backupDomain', {
        workflowId: vm.workflowId,
        taskQueue: hostTaskQueue(vm.host),
        args: [req],
        parentClosePolicy: ParentClosePolicy.ABANDON,
        typedSearchAttributes: [
          { key: BackupIdKey, value: backupId },
          { key: DomainKey, value: vm.domain },
          { key: HostKey, value: vm.host },
          { key: StateKey, value: 'starting' },
          { key: MethodKey, value: input.method },
        ],
      });
    } catch (err) {
      if (err instanceof WorkflowExecutionAlreadyStartedError) {
        vm.status = 'skipped';
        vm.error = `a backup of ${vm.domain} on ${vm.host} is still running (workflow ${vm.workflowId})`;
        return;
      }
      throw err;
    }
    vm.backupId = backupId;
    let backup: BackupResult | undefined;
    try {
      backup = await child.result();
      vm.status = backup.status === 'partial' ? 'partial' : 'completed';
      vm.level = backup.chain?.level ?? 'full';
      const failed = backup.targets.filter((t) => !t.ok);
      if (failed.length > 0) vm.error = failed.map((t) => `${t.target}: ${t.error ?? 'failed'}`).join('; ');
    } catch (err) {
      vm.status = isCancellation(err) ? 'cancelled' : 'failed';
      vm.error = innermostMessage(err);
      return;
    }
    if (!input.retention || closing) return;
    retaining++;
    try {
      const acts = hostActivities(vm.host);
      await Promise.all(
        backup.targets
          .filter((t) => t.ok)
          .map(async (t) => {
            const entry: RetentionResult = { host: vm.host, domain: vm.domain, target: t.target, removed: [], kept: 0 };
            try {
              Object.assign(
                entry,
                await acts.applyRetention({
                  target: t.target,
                  domain: vm.domain,
                  policy: input.retention!,
                  newBackupId: backupId,
                  backupRunId: child.firstExecutionRunId,
                  ...(input.options.s3 ? { s3Options: input.options.s3 } : {}),
                }),
              );
            } catch (err) {
              entry.error = innermostMessage(err);
              log.warn('retention failed', { domain: vm.domain, host: vm.host, error: entry.error });
            }
            result.retention.push(entry);
          }),
      );
    } finally {
      retaining--;
    }
  };

  void Promise.all(
    vms.map((vm) =>
      backUpOne(vm).catch((err: unknown) => {
        vm.status = 'failed';
        vm.error = innermostMessage(err);
      }),
    ),
  ).then(() => (settled = true));
  if (!(await condition(() => settled, input.waitSeconds * 1000))) {
    closing = true;
    await condition(() => retaining === 0);
  }
  result.retention.sort(
    (a, b) => a.host.localeCompare(b.host) || a.domain.localeCompare(b.domain) || a.target.localeCompare(b.target),
  );
  return result;
}

/** The named VMs, and every domain each `--all` host's libvirt has now (a host that cannot answer is reported). */
async function resolveGroup(input: ScheduledBackupsInput, result: ScheduledBackupsResult): Promise<ScheduleMember[]> {
  const members = new Map<string, ScheduleMember>();
  const add = (m: ScheduleMember) => members.set(`${m.host}/${m.domain}`, { host: m.host, domain: m.domain });
  for (const m of input.group.domains) add(m);
  const listed = await Promise.all(
    input.group.allOn.map(async (host) => {
      try {
        return { host, listing: await hostActivities(host).listDomains({ match: input.group.match ?? [] }) };
      } catch (err) {
        return { host, error: `the domains of host ${host} could not be listed: ${innermostMessage(err)}` };
      }
    }),
  );
  for (const l of listed) {
    if (l.error !== undefined) result.unlistedHosts.push({ host: l.host, error: l.error });
    for (const domain of l.listing?.domains ?? []) add({ host: l.host, domain });
  }
  return [...members.values()].sort((a, b) => a.host.localeCompare(b.host) || a.domain.localeCompare(b.domain));
}

/** The sentence a user needs from a child or activity failure: the innermost message that says something. */
function innermostMessage(err: unknown): string {
  let msg = err instanceof Error ? err.message : String(err);
  for (let cur: unknown = err; cur instanceof Error; cur = (cur as { cause?: unknown }).cause) {
    if (
      cur.message &&
      !/^(Child Workflow execution failed|Activity task failed|Workflow execution failed)$/i.test(cur.message)
    ) {
      msg = cur.message;
    }
  }
  return msg;
}

/**
 * Anyone on the cluster can start this workflow or a schedule of it: its input is checked before anything runs
 * (each backup checks its own request again, and the host's activities their inputs).
 */
function validateInput(input: ScheduledBackupsInput): void {
  const bad = (why: string): never => {
    throw ApplicationFailure.nonRetryable(`invalid scheduled run: ${why}`, ErrorType.InvalidInput);
  };
  if (typeof input !== 'object' || input === null) bad('no input');
  if (typeof input.schedule !== 'string' || !SCHEDULE_NAME_RE.test(input.schedule)) bad('no valid schedule name');
  const g = input.group;
  if (typeof g !== 'object' || g === null || !Array.isArray(g.domains) || !Array.isArray(g.allOn)) bad('no group');
  for (const m of g.domains) {
    if (typeof m?.host !== 'string' || !HOST_NAME_RE.test(m.host)) bad(`"${String(m?.host)}" is not a host name`);
    if (typeof m.domain !== 'string' || !DOMAIN_NAME_RE.test(m.domain))
      bad(`"${String(m.domain)}" is not a domain name`);
  }
  for (const h of g.allOn) if (typeof h !== 'string' || !HOST_NAME_RE.test(h)) bad(`"${String(h)}" is not a host name`);
  if (
    g.match !== undefined &&
    (!Array.isArray(g.match) || g.match.some((p) => typeof p !== 'string' || !GLOB_RE.test(p)))
  ) {
    bad('a --match pattern is not a glob of domain-name characters');
  }
  if (g.domains.length === 0 && g.allOn.length === 0) bad('the group names no VM and no host');
  if (!Array.isArray(input.targets) || input.targets.length === 0 || input.targets.some((t) => typeof t !== 'string')) {
    bad('it names no target');
  }
  if (typeof input.options !== 'object' || input.options === null) bad('no backup options');
  if (!(Number.isInteger(input.waitSeconds) && input.waitSeconds >= 1 && input.waitSeconds <= 366 * 86_400)) {
    bad(`waitSeconds must be a whole number of seconds from 1 to a year, not ${String(input.waitSeconds)}`);
  }
  const r = input.retention;
  if (r !== undefined) {
    if (typeof r !== 'object' || r === null) bad('the retention policy is not an object');
    const rules = [r.keepLast, r.keepDaily, r.keepWeekly, r.keepMonthly];
    if (rules.some((v) => v !== undefined && !(Number.isInteger(v) && v >= 0 && v <= 100_000))) {
      bad('a retention rule is not a whole number from 0 to 100000');
    }
    if (!rules.some((v) => (v ?? 0) > 0)) bad('the retention policy keeps nothing: give a keep rule above 0');
  }
}
