/**
 * Scheduled backups in tests: a control queue of the test's own (other tests' workers, of other versions, never
 * take its runs), a schedule's runs as `vmbackup schedule describe --json` shows them, and schedules deleted at
 * the end (they outlive every process on the shared server).
 */
import { randomBytes } from 'node:crypto';
import type { Client, WorkflowExecutionInfo } from '@temporalio/client';
import type { temporal } from '@temporalio/proto';
import { ScheduleNotFoundError } from '@temporalio/client';
import { scheduleId } from '../../src/shared/names';
import type { ScheduledBackupsInput, ScheduledBackupsResult } from '../../src/shared/schedule';
import { cliEnv, runCli, waitFor } from './vmbackup';

/** The environment of a test's workers and CLI: a control queue no other test's worker serves. */
export function scheduleEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return cliEnv({ VMBACKUP_CONTROL_QUEUE: `vmbackup-control-t${randomBytes(3).toString('hex')}`, ...extra });
}

export function uniqueScheduleName(prefix: string): string {
  return `t${prefix}-${randomBytes(3).toString('hex')}`;
}

export interface RunView {
  workflowId: string;
  runId: string;
  scheduledAt: string;
  takenAt: string;
  status: string;
  result?: ScheduledBackupsResult;
  error?: string;
}

export interface DescribeView {
  name: string;
  paused: boolean;
  note?: string;
  run: ScheduledBackupsInput;
  actionsTaken: number;
  skippedOverlap: number;
  runningRuns: string[];
  recentRuns: RunView[];
  nextRuns: string[];
}

/** `vmbackup schedule describe NAME --json`, parsed; throws with stderr when it fails. */
export async function describe(name: string, env: NodeJS.ProcessEnv): Promise<DescribeView> {
  const r = await runCli(['schedule', 'describe', name, '--json'], { env, timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`schedule describe ${name} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as DescribeView;
}

/** Runs `vmbackup schedule ARGS`, expecting exit 0. */
export async function scheduleCli(args: string[], env: NodeJS.ProcessEnv): Promise<{ stdout: string; stderr: string }> {
  const r = await runCli(['schedule', ...args], { env, timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`vmbackup schedule ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r;
}

/** Waits until `probe` holds for the schedule's describe output, and returns that output. */
export function waitForRuns(
  what: string,
  name: string,
  env: NodeJS.ProcessEnv,
  probe: (d: DescribeView) => boolean,
  timeoutMs = 300_000,
): Promise<DescribeView> {
  return waitFor(
    what,
    async () => {
      const d = await describe(name, env);
      return probe(d) ? d : undefined;
    },
    { timeoutMs, intervalMs: 1000 },
  );
}

/** Deletes the schedule; one that is gone already is fine. */
export async function deleteSchedule(client: Client, name: string): Promise<void> {
  try {
    await client.schedule.getHandle(scheduleId(name)).delete();
  } catch (err) {
    if (!(err instanceof ScheduleNotFoundError)) throw err;
  }
}

/** The `identity` of every worker that started an activity of the workflow run (`<pid>@<hostname>`). */
export async function activityWorkers(client: Client, workflowId: string, runId?: string): Promise<Set<string>> {
  const history = await client.workflow.getHandle(workflowId, runId).fetchHistory();
  const ids = new Set<string>();
  for (const e of history.events ?? []) {
    const identity = e.activityTaskStartedEventAttributes?.identity;
    if (identity) ids.add(identity);
  }
  return ids;
}

/** The backupDomain workflows a scheduled run started (its children), from visibility. */
export async function childrenOf(client: Client, parentWorkflowId: string): Promise<WorkflowExecutionInfo[]> {
  const out: WorkflowExecutionInfo[] = [];
  for await (const wf of client.workflow.list({ query: `ParentWorkflowId = '${parentWorkflowId}'` })) out.push(wf);
  return out;
}

export type HistoryEvent = temporal.api.history.v1.IHistoryEvent;
