/**
 * vmbackup as the benchmarks run it: the built CLI under /usr/bin/time, one long-running worker
 * process per bench host, and the workflow history read back to split a backup's time into its
 * activities (where is the time: the libvirt job, hashing, shipping, or Temporal round trips).
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { stackEnv } from '../../test/helpers/stack';
import { cliEnv } from '../../test/helpers/vmbackup';
import { ProcessMeter, timed } from './measure';
import type { RunResult } from './measure';

/** bench/run.sh runs the compiled bench from the repository root (the build itself lives in a temp dir) */
export const REPO = process.cwd();
const BIN = join(REPO, 'bin', 'vmbackup.js');

export function benchHost(): string {
  return `bench-${randomBytes(3).toString('hex')}`;
}

/** The CLI and worker environment: the stack's addresses, a cluster configured (same as the tests'). */
export const vmbackupEnv = (): NodeJS.ProcessEnv => cliEnv();

/** `vmbackup ARGS` under /usr/bin/time; parses the --json object it prints. */
export async function cli(args: string[]): Promise<RunResult & { json: Record<string, unknown> }> {
  const r = await timed(process.execPath, [BIN, ...args], { env: vmbackupEnv() });
  let json: Record<string, unknown> = {};
  try {
    // --json prints one (pretty-printed) object; warnings may precede it
    json = JSON.parse(r.stdout.slice(Math.max(0, r.stdout.indexOf('{')))) as Record<string, unknown>;
  } catch {
    /* not a --json command */
  }
  return { ...r, json };
}

export interface WorkerProcess {
  host: string;
  child: ChildProcess;
  meter: ProcessMeter;
  output(): string;
  stop(): Promise<void>;
}

export async function startWorker(host: string): Promise<WorkerProcess> {
  const child = spawn(process.execPath, [BIN, 'worker', '--host', host, '--no-recover'], {
    env: vmbackupEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-20_000)));
  child.stderr?.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-20_000)));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await new Promise<void>((resolve, reject) => {
    const deadline = setTimeout(() => reject(new Error(`worker ${host} did not start in 120 s:\n${out}`)), 120_000);
    const check = setInterval(() => {
      if (/vmbackup worker for host/.test(out)) {
        clearInterval(check);
        clearTimeout(deadline);
        resolve();
      }
    }, 100);
    child.once('exit', (code) => {
      clearInterval(check);
      clearTimeout(deadline);
      reject(new Error(`worker ${host} exited with ${code}:\n${out}`));
    });
  });
  return {
    host,
    child,
    meter: new ProcessMeter(child.pid as number),
    output: () => out,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

export async function temporal(): Promise<{ client: Client; close(): Promise<void> }> {
  const env = stackEnv();
  const connection = await Connection.connect({ address: env.temporal.address });
  return { client: new Client({ connection, namespace: env.temporal.namespace }), close: () => connection.close() };
}

export interface ActivitySpan {
  name: string;
  /** ms after the workflow started */
  scheduledAt: number;
  startedAt: number;
  closedAt: number;
  attempts: number;
  result?: unknown;
}

export interface BackupTimeline {
  workflowMs: number;
  activities: ActivitySpan[];
}

type Ts = { seconds?: unknown; nanos?: number | null } | null | undefined;
const tsMs = (t: Ts): number => (t ? Number(t.seconds ?? 0) * 1000 + (t.nanos ?? 0) / 1e6 : NaN);

function decode(payloads: Array<{ data?: Uint8Array | null }> | null | undefined): unknown {
  const data = payloads?.[0]?.data;
  if (!data) return undefined;
  try {
    return JSON.parse(Buffer.from(data).toString('utf8'));
  } catch {
    return undefined;
  }
}

/** The activities of the backup workflow of DOMAIN on HOST (latest run, or RUNID), from its history. */
export async function backupTimeline(
  client: Client,
  host: string,
  domain: string,
  runId?: string,
): Promise<BackupTimeline> {
  const history = await client.workflow.getHandle(`vmbackup-backup-${host}-${domain}`, runId).fetchHistory();
  const events = history.events ?? [];
  const t0 = tsMs(events[0]?.eventTime as Ts);
  const spans = new Map<string, ActivitySpan>();
  let end = t0;
  for (const e of events) {
    const at = tsMs(e.eventTime as Ts) - t0;
    end = Math.max(end, at + t0);
    const id = String(e.eventId);
    if (e.activityTaskScheduledEventAttributes) {
      const name = e.activityTaskScheduledEventAttributes.activityType?.name ?? '?';
      spans.set(id, { name, scheduledAt: at, startedAt: NaN, closedAt: NaN, attempts: 0 });
    }
    const started = e.activityTaskStartedEventAttributes;
    if (started) {
      const s = spans.get(String(started.scheduledEventId));
      if (s) {
        s.startedAt = at;
        s.attempts = started.attempt ?? 1;
      }
    }
    const done =
      e.activityTaskCompletedEventAttributes ??
      e.activityTaskFailedEventAttributes ??
      e.activityTaskTimedOutEventAttributes ??
      e.activityTaskCanceledEventAttributes;
    if (done) {
      const s = spans.get(String(done.scheduledEventId));
      if (s) {
        s.closedAt = at;
        if (e.activityTaskCompletedEventAttributes)
          s.result = decode(e.activityTaskCompletedEventAttributes.result?.payloads);
      }
    }
  }
  return { workflowMs: end - t0, activities: [...spans.values()] };
}

/** Run time (start -> close) summed per activity type; "temporal" = workflow time not inside any activity run. */
export function splitTimeline(t: BackupTimeline): Record<string, number> {
  const out: Record<string, number> = {};
  for (const a of t.activities) out[a.name] = (out[a.name] ?? 0) + (a.closedAt - a.startedAt);
  // union of activity run intervals (targets ship in parallel)
  const iv = t.activities.map((a) => [a.startedAt, a.closedAt] as const).sort((x, y) => x[0] - y[0]);
  let covered = 0;
  let curS = -Infinity;
  let curE = -Infinity;
  for (const [s, e] of iv) {
    if (s > curE) {
      if (curE > curS) covered += curE - curS;
      curS = s;
      curE = e;
    } else curE = Math.max(curE, e);
  }
  if (curE > curS) covered += curE - curS;
  out['(between activities)'] = t.workflowMs - covered;
  return out;
}
