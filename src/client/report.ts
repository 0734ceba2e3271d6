/**
 * What `vmbackup report` asks Temporal: which VMs the schedules cover (and on which targets), which domains backups
 * ran for on a host, and each VM's newest failed backup with its one sentence. The backups themselves (the last good
 * one of each VM) come from the targets' catalogs, which hold the truth: a backup pruned or deleted from its target
 * is no good backup any more, whatever Temporal remembers.
 */
import type { Client } from '@temporalio/client';
import { decodeSearchAttributes } from '@temporalio/common/lib/converter/payload-search-attributes';
import {
  DOMAIN_GLOB_RE,
  DOMAIN_NAME_RE,
  globMatcher,
  HOST_NAME_RE,
  SCHEDULE_ID_PREFIX,
  SEARCH_ATTRIBUTES,
} from '../shared/names';
import type { BackupResult } from '../shared/types';
import { failureMessage } from './backups';

export interface ScheduledVm {
  domain: string;
  host: string;
  schedule: string;
}

export interface ScheduledHost {
  host: string;
  schedule: string;
  /** `--match` globs; none: every domain of the host */
  match?: string[];
}

/** Whether a schedule's `--all --host H [--match GLOB]` takes the domain `domain` of `host`. */
export function takes(scheduled: ScheduledHost, domain: string, host: string): boolean {
  return scheduled.host === host && globMatcher(scheduled.match ?? [])(domain);
}

export interface ScheduleCoverage {
  /** VMs named by a schedule (`--domain`) */
  vms: ScheduledVm[];
  /**
   * hosts a schedule backs up entirely (`--all --host H`), or the domains there that match one of `match` (`--match
   * GLOB`): their VMs are found in catalogs and visibility
   */
  allOn: ScheduledHost[];
  /** the targets of every schedule */
  targets: Array<{ target: string; schedule: string }>;
  /** schedules that could not be read, one sentence each */
  unreadable: string[];
}

/**
 * The shape of a schedule's action input that the report reads (`ScheduledBackupsInput` of the schedules change):
 * checked field by field, since anyone on the cluster can create a schedule with that id prefix.
 */
interface ScheduleInputView {
  group?: { domains?: Array<{ host?: unknown; domain?: unknown }>; allOn?: unknown[]; match?: unknown };
  targets?: unknown[];
}

export async function scheduleCoverage(client: Client): Promise<ScheduleCoverage> {
  const coverage: ScheduleCoverage = { vms: [], allOn: [], targets: [], unreadable: [] };
  for await (const summary of client.schedule.list()) {
    if (!summary.scheduleId.startsWith(SCHEDULE_ID_PREFIX)) continue;
    const schedule = summary.scheduleId.slice(SCHEDULE_ID_PREFIX.length);
    let input: ScheduleInputView | undefined;
    try {
      const described = await client.schedule.getHandle(summary.scheduleId).describe();
      const action = described.action as { type?: string; args?: unknown[] };
      input = action.type === 'startWorkflow' ? (action.args?.[0] as ScheduleInputView | undefined) : undefined;
    } catch (err) {
      coverage.unreadable.push(`schedule ${schedule} could not be read: ${(err as Error).message}`);
      continue;
    }
    if (typeof input !== 'object' || input === null) continue;
    for (const m of Array.isArray(input.group?.domains) ? input.group.domains : []) {
      if (typeof m?.domain === 'string' && typeof m.host === 'string' && isVm(m.domain, m.host)) {
        coverage.vms.push({ domain: m.domain, host: m.host, schedule });
      }
    }
    const match = input.group?.match;
    if (
      match !== undefined &&
      !(Array.isArray(match) && match.every((g) => typeof g === 'string' && DOMAIN_GLOB_RE.test(g)))
    ) {
      // its runs refuse these patterns too: they back up none of the hosts' domains
      coverage.unreadable.push(`schedule ${schedule} has --match patterns that are not domain-name globs`);
    } else {
      const globs = (match as string[] | undefined) ?? [];
      for (const host of Array.isArray(input.group?.allOn) ? input.group.allOn : []) {
        if (typeof host === 'string' && HOST_NAME_RE.test(host)) {
          coverage.allOn.push({ host, schedule, ...(globs.length > 0 ? { match: [...globs] } : {}) });
        }
      }
    }
    for (const target of Array.isArray(input.targets) ? input.targets : []) {
      if (typeof target === 'string' && target.length > 0) coverage.targets.push({ target, schedule });
    }
  }
  return coverage;
}

function isVm(domain: string, host: string): boolean {
  return DOMAIN_NAME_RE.test(domain) && HOST_NAME_RE.test(host);
}

/** Domains that `backupDomain` workflows ran for on a host (newest first, at most `limit` runs looked at). */
export async function domainsBackedUpOn(client: Client, host: string, limit = 5000): Promise<string[]> {
  if (!HOST_NAME_RE.test(host)) return [];
  const query = `WorkflowType = 'backupDomain' AND ${SEARCH_ATTRIBUTES.host} = '${host}'`;
  const domains = new Set<string>();
  let nextPageToken: Uint8Array | undefined;
  let seen = 0;
  do {
    const page = await client.workflowService.listWorkflowExecutions({
      namespace: client.options.namespace,
      query,
      pageSize: 1000,
      nextPageToken,
    });
    for (const e of page.executions ?? []) {
      const domain = first(decodeSearchAttributes(e.searchAttributes?.indexedFields)[SEARCH_ATTRIBUTES.domain]);
      if (typeof domain === 'string' && DOMAIN_NAME_RE.test(domain)) domains.add(domain);
    }
    seen += page.executions?.length ?? 0;
    nextPageToken = page.nextPageToken?.length ? page.nextPageToken : undefined;
  } while (nextPageToken && seen < limit);
  return [...domains];
}

export interface LastFailure {
  backupId?: string;
  /** ISO time the failed run closed */
  at: string;
  /** failed, timed out, terminated; or partial (stored on some targets only) */
  status: 'failed' | 'timed-out' | 'terminated' | 'partial';
  /** the one sentence */
  error: string;
}

/** How many closed runs of a VM are looked at for its newest failure. */
const RUNS_LOOKED_AT = 20;

/**
 * The newest failed, timed-out, terminated or partial backup of a VM among its latest closed runs, with its one
 * sentence (a failure's innermost message; a partial backup's failing targets). Cancelled backups are not failures.
 */
export async function lastFailure(client: Client, domain: string, host: string): Promise<LastFailure | undefined> {
  if (!isVm(domain, host)) return undefined;
  const query =
    `WorkflowType = 'backupDomain' AND ${SEARCH_ATTRIBUTES.domain} = '${domain}' AND ${SEARCH_ATTRIBUTES.host} = '${host}'` +
    ` AND ExecutionStatus != 'Running'`;
  // raw: search attributes need no codec, and a memo encrypted with another key must not fail the report
  const page = await client.workflowService.listWorkflowExecutions({
    namespace: client.options.namespace,
    query,
    pageSize: RUNS_LOOKED_AT,
  });
  const runs = (page.executions ?? [])
    .map((e) => {
      const attrs = decodeSearchAttributes(e.searchAttributes?.indexedFields);
      return {
        workflowId: e.execution?.workflowId ?? '',
        runId: e.execution?.runId ?? '',
        status: Number(e.status ?? 0),
        closedMs: Number(e.closeTime?.seconds ?? 0) * 1000 + Math.floor((e.closeTime?.nanos ?? 0) / 1e6),
        state: first(attrs[SEARCH_ATTRIBUTES.state]),
        backupId: first(attrs[SEARCH_ATTRIBUTES.backupId]),
      };
    })
    .sort((a, b) => b.closedMs - a.closedMs);
  for (const run of runs) {
    const status = failedStatus(run.status, run.state);
    if (!status) continue;
    const handle = client.workflow.getHandle(run.workflowId, run.runId);
    let error: string;
    if (status === 'partial') {
      const result = (await handle.result().catch(() => undefined)) as BackupResult | undefined;
      const failed = (result?.targets ?? []).filter((t) => !t.ok);
      error = failed.length
        ? failed.map((t) => `${t.target}: ${t.error ?? 'failed'}`).join('; ')
        : 'stored on some of its targets only';
    } else {
      error = await handle.result().then(
        () => 'failed',
        (err: unknown) => failureMessage(err),
      );
    }
    return {
      ...(typeof run.backupId === 'string' ? { backupId: run.backupId } : {}),
      at: new Date(run.closedMs).toISOString(),
      status,
      error,
    };
  }
  return undefined;
}

/** Temporal's WorkflowExecutionStatus: 2 completed, 3 failed, 4 canceled, 5 terminated, 7 timed out. */
function failedStatus(status: number, state: unknown): LastFailure['status'] | undefined {
  if (status === 3) return 'failed';
  if (status === 5) return 'terminated';
  if (status === 7) return 'timed-out';
  if (status === 2 && state === 'partial') return 'partial';
  return undefined;
}

function first(value: unknown): unknown {
  return Array.isArray(value) ? (value[0] as unknown) : value;
}
