/**
 * Schedules: a Temporal Schedule per `vmbackup schedule create NAME` (id `vmbackup-schedule-NAME`) whose action
 * starts one `scheduledBackups` run on the control task queue. The group, the targets, the backup options and the
 * retention policy are that action's workflow input, so the schedule itself is the one record of what it backs up
 * (`describe` and `report` read it back). Schedules live in the Temporal cluster, not on any host.
 */
import {
  ScheduleAlreadyRunning,
  ScheduleNotFoundError,
  ScheduleOverlapPolicy,
  WorkflowNotFoundError,
} from '@temporalio/client';
import type {
  CalendarSpec,
  Client,
  ScheduleDescription,
  ScheduleHandle,
  ScheduleSpec,
  ScheduleSpecDescription,
  ScheduleSummary,
} from '@temporalio/client';
import { SCHEDULE_ID_PREFIX, SCHEDULE_NAME_RE, scheduleId, scheduledRunWorkflowId } from '../shared/names';
import type { ScheduledBackupsInput, ScheduledBackupsResult } from '../shared/schedule';
import type { scheduledBackups } from '../workflows/scheduled';
import { failureMessage } from './backups';

export class ScheduleError extends Error {}

/** The CLI's names of Temporal's overlap policies. */
export const OVERLAP_POLICIES = {
  skip: ScheduleOverlapPolicy.SKIP,
  'buffer-one': ScheduleOverlapPolicy.BUFFER_ONE,
  'buffer-all': ScheduleOverlapPolicy.BUFFER_ALL,
  'cancel-other': ScheduleOverlapPolicy.CANCEL_OTHER,
  'terminate-other': ScheduleOverlapPolicy.TERMINATE_OTHER,
  'allow-all': ScheduleOverlapPolicy.ALLOW_ALL,
} as const;
export type OverlapName = keyof typeof OVERLAP_POLICIES;

export function overlapName(policy: ScheduleOverlapPolicy | undefined): OverlapName | undefined {
  return (Object.keys(OVERLAP_POLICIES) as OverlapName[]).find((k) => OVERLAP_POLICIES[k] === policy);
}

// ------------------------------------------------------------------------------------------ timing

/** When a schedule runs, as the CLI takes it: `--every 1d [--at 02:00] [--jitter 30m] [--timezone Europe/Berlin]`. */
export interface ScheduleTiming {
  everySeconds: number;
  /** HH:MM or HH:MM:SS, in `timezone` (default UTC) */
  at?: string;
  jitterSeconds?: number;
  timezone?: string;
}

const DAY = 86_400;

/**
 * Temporal's spec for a timing. Without `--at`: an interval (counted from 1970-01-01 UTC: `--every 1d` runs at
 * midnight UTC). With `--at`: a calendar in the time zone (daylight saving time moves with it), which needs an
 * interval that divides a day: 1d, or 1h, 2h, 3h, 4h, 6h, 8h, 12h (runs at the given minute of every Nth hour,
 * counted from `--at`).
 */
export function scheduleSpecOf(t: ScheduleTiming): ScheduleSpec {
  if (!(Number.isInteger(t.everySeconds) && t.everySeconds >= 1)) {
    throw new ScheduleError(`--every must be at least one second, not ${t.everySeconds} s`);
  }
  const spec: ScheduleSpec = {};
  if (t.jitterSeconds) spec.jitter = `${t.jitterSeconds}s`;
  if (t.timezone !== undefined) {
    if (t.at === undefined) {
      throw new ScheduleError('--timezone applies to --at only: an --every interval alone counts from 1970-01-01 UTC');
    }
    checkTimezone(t.timezone);
    spec.timezone = t.timezone;
  }
  if (t.at === undefined) {
    spec.intervals = [{ every: `${t.everySeconds}s` }];
    return spec;
  }
  const m = /^(\d{1,2}):(\d{2})(?::(\d{2}))?$/.exec(t.at);
  const [hour, minute, second] = m ? [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)] : [NaN, NaN, NaN];
  if (!m || hour > 23 || minute > 59 || second > 59) {
    throw new ScheduleError(`--at must be a time of day such as 02:00 or 23:30:15, not "${t.at}"`);
  }
  const comment = `every ${formatDuration(t.everySeconds)} at ${t.at}`;
  let calendar: CalendarSpec;
  if (t.everySeconds === DAY) {
    calendar = { hour, minute, second, comment };
  } else if (t.everySeconds % 3600 === 0 && t.everySeconds < DAY && DAY % t.everySeconds === 0) {
    const step = t.everySeconds / 3600;
    calendar = { hour: { start: hour % step, end: 23, step }, minute, second, comment };
  } else {
    throw new ScheduleError(
      `--at needs --every 1d, or a number of hours that divides a day (1h, 2h, 3h, 4h, 6h, 8h, 12h), not ${formatDuration(t.everySeconds)}; ` +
        'leave out --at to run every interval counted from 1970-01-01 UTC',
    );
  }
  spec.calendars = [calendar];
  return spec;
}

function checkTimezone(tz: string): void {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: tz });
  } catch {
    throw new ScheduleError(`--timezone "${tz}" is not a time zone this system knows (e.g. Europe/Berlin, UTC)`);
  }
}

/** `90s` -> `90s`, `3600` -> `1h`, `86400` -> `1d`: the largest unit that divides it. */
export function formatDuration(seconds: number): string {
  for (const [unit, size] of [
    ['w', 604_800],
    ['d', DAY],
    ['h', 3600],
    ['m', 60],
  ] as const) {
    if (seconds >= size && seconds % size === 0) return `${seconds / size}${unit}`;
  }
  return `${seconds}s`;
}

/** How a schedule's spec reads: `every 1d at 02:00 Europe/Berlin, jitter 30m`. */
export function describeSpec(spec: ScheduleSpecDescription | undefined): string {
  if (!spec) return '?';
  const parts: string[] = [];
  for (const i of spec.intervals ?? []) {
    const every = Math.round(Number(i.every) / 1000);
    const offset = Math.round(Number(i.offset ?? 0) / 1000);
    parts.push(`every ${formatDuration(every)}${offset ? ` (offset ${formatDuration(offset)})` : ''}`);
  }
  for (const c of spec.calendars ?? []) {
    const hours = c.hour.map((r) => (r.step && r.step > 1 ? `${r.start}-${r.end}/${r.step}` : `${r.start}`)).join(',');
    parts.push(c.comment ?? `at hour ${hours}, minute ${c.minute.map((r) => r.start).join(',')}`);
  }
  for (const cron of (spec as { cronExpressions?: string[] }).cronExpressions ?? []) parts.push(`cron ${cron}`);
  let text = parts.join('; ') || 'never';
  if (spec.timezone) text += ` ${spec.timezone}`;
  if (spec.jitter) text += `, jitter ${formatDuration(Math.round(spec.jitter / 1000))}`;
  return text;
}

/** Default catch-up window: a run missed while Temporal was down still happens, unless the next one is due. */
export function defaultCatchupSeconds(everySeconds: number): number {
  return Math.max(60, Math.min(everySeconds, DAY));
}

// ------------------------------------------------------------------------------------------ commands

export interface CreateScheduleInput {
  name: string;
  controlTaskQueue: string;
  run: ScheduledBackupsInput;
  timing: ScheduleTiming;
  overlap: OverlapName;
  catchupSeconds: number;
  paused?: boolean;
  note?: string;
}

export function checkScheduleName(name: string): void {
  if (!SCHEDULE_NAME_RE.test(name)) {
    throw new ScheduleError(
      `"${name}" is not a schedule name: use up to 64 letters, digits, '.', '_' and '-', starting with a letter or digit`,
    );
  }
}

export async function createSchedule(client: Client, input: CreateScheduleInput): Promise<ScheduleDescription> {
  checkScheduleName(input.name);
  const spec = scheduleSpecOf(input.timing);
  try {
    const handle = await client.schedule.create({
      scheduleId: scheduleId(input.name),
      spec,
      action: {
        type: 'startWorkflow',
        workflowType: 'scheduledBackups',
        taskQueue: input.controlTaskQueue,
        workflowId: scheduledRunWorkflowId(input.name),
        args: [input.run] as Parameters<typeof scheduledBackups>,
      },
      policies: {
        overlap: OVERLAP_POLICIES[input.overlap],
        catchupWindow: `${input.catchupSeconds}s`,
        pauseOnFailure: false,
      },
      // No memo: a listing decodes every schedule's memo, and one encrypted with a payload key would make
      // `schedule list` fail for a client with another key or none. The action's input carries everything.
      state: { paused: input.paused ?? false, ...(input.note ? { note: input.note } : {}) },
    });
    return await handle.describe();
  } catch (err) {
    if (err instanceof ScheduleAlreadyRunning) {
      throw new ScheduleError(
        `a schedule named ${input.name} exists already: \`vmbackup schedule delete ${input.name}\` first, or choose another name`,
      );
    }
    throw err;
  }
}

/** The handle of schedule NAME; describe() of a missing one says so in one sentence. */
export function scheduleHandle(client: Client, name: string): ScheduleHandle {
  checkScheduleName(name);
  return client.schedule.getHandle(scheduleId(name));
}

export async function describeSchedule(client: Client, name: string): Promise<ScheduleDescription> {
  try {
    return await scheduleHandle(client, name).describe();
  } catch (err) {
    throw notFound(err, name);
  }
}

function notFound(err: unknown, name: string): unknown {
  if (err instanceof ScheduleNotFoundError) {
    return new ScheduleError(`no schedule named ${name}: see \`vmbackup schedule list\``);
  }
  return err;
}

/** Runs an operation on schedule NAME, turning "not found" into one sentence. */
export async function onSchedule<T>(client: Client, name: string, op: (h: ScheduleHandle) => Promise<T>): Promise<T> {
  const handle = scheduleHandle(client, name);
  try {
    return await op(handle);
  } catch (err) {
    throw notFound(err, name);
  }
}

/** vmbackup's schedules (schedule id prefix and action), in name order. Visibility: eventually consistent. */
export async function listSchedules(client: Client): Promise<Array<ScheduleSummary & { name: string }>> {
  const out: Array<ScheduleSummary & { name: string }> = [];
  for await (const s of client.schedule.list()) {
    if (!s.scheduleId.startsWith(SCHEDULE_ID_PREFIX)) continue;
    if (s.action && s.action.workflowType !== 'scheduledBackups') continue;
    out.push({ ...s, name: s.scheduleId.slice(SCHEDULE_ID_PREFIX.length) });
  }
  return out.sort((a, b) => a.name.localeCompare(b.name));
}

/** The run input of a described schedule (what it backs up), or undefined for an action that is not ours. */
export function runInputOf(desc: ScheduleDescription): ScheduledBackupsInput | undefined {
  if (desc.action.type !== 'startWorkflow' || desc.action.workflowType !== 'scheduledBackups') return undefined;
  const input = desc.action.args?.[0] as ScheduledBackupsInput | undefined;
  return typeof input === 'object' && input !== null && typeof input.group === 'object' ? input : undefined;
}

export interface ScheduledRunView {
  workflowId: string;
  runId: string;
  scheduledAt: Date;
  takenAt: Date;
  /** RUNNING, COMPLETED, FAILED, ... */
  status: string;
  result?: ScheduledBackupsResult;
  error?: string;
}

/** A run the schedule started, with its summary once it has ended. */
export async function scheduledRun(
  client: Client,
  action: { workflowId: string; firstExecutionRunId: string; scheduledAt: Date; takenAt: Date },
): Promise<ScheduledRunView> {
  const handle = client.workflow.getHandle<typeof scheduledBackups>(action.workflowId, action.firstExecutionRunId);
  const view: ScheduledRunView = {
    workflowId: action.workflowId,
    runId: action.firstExecutionRunId,
    scheduledAt: action.scheduledAt,
    takenAt: action.takenAt,
    status: 'UNKNOWN',
  };
  try {
    view.status = (await handle.describe()).status.name;
    if (view.status === 'COMPLETED') view.result = await handle.result();
    else if (view.status !== 'RUNNING')
      await handle.result().catch((err: unknown) => (view.error = failureMessage(err)));
  } catch (err) {
    // its history is gone (the namespace's retention): the schedule still remembers that it ran
    if (!(err instanceof WorkflowNotFoundError)) throw err;
  }
  return view;
}

/** The recent runs of a described schedule, newest last. */
export async function recentRuns(client: Client, desc: ScheduleDescription): Promise<ScheduledRunView[]> {
  return Promise.all(
    desc.info.recentActions.map((a) =>
      scheduledRun(client, { ...a.action.workflow, scheduledAt: a.scheduledAt, takenAt: a.takenAt }),
    ),
  );
}
