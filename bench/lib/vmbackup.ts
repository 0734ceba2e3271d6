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
import { activityTimeline } from '../../test/helpers/history';
import type { ActivityTimeline as BackupTimeline } from '../../test/helpers/history';
import { cliEnv } from '../../test/helpers/vmbackup';
import { ProcessMeter, timed } from './measure';
import type { RunResult } from './measure';

/** bench/run.sh runs the compiled bench from the repository root (the build itself lives in a temp dir) */
export const REPO = process.cwd();
export const BIN = join(REPO, 'bin', 'vmbackup');

export function benchHost(): string {
  return `bench-${randomBytes(3).toString('hex')}`;
}

/** The CLI and worker environment: the stack's addresses, a cluster configured (same as the tests'). */
export const vmbackupEnv = (): NodeJS.ProcessEnv => cliEnv();

/**
 * `vmbackup ARGS` under /usr/bin/time; parses the --json object it prints. `env` adds variables to vmbackupEnv() (a
 * chunk repository's password); `allowFail` returns a non-zero exit instead of throwing.
 */
export async function cli(
  args: string[],
  opts: { env?: Record<string, string>; allowFail?: boolean } = {},
): Promise<RunResult & { json: Record<string, unknown> }> {
  const r = await timed(BIN, args, { env: { ...vmbackupEnv(), ...opts.env }, allowFail: opts.allowFail });
  let json: Record<string, unknown> = {};
  try {
    // --json prints one (pretty-printed) object; warnings may precede it
    json = JSON.parse(r.stdout.slice(Math.max(0, r.stdout.indexOf('{')))) as Record<string, unknown>;
  } catch {
    /* not a --json command */
  }
  return { ...r, json };
}

/** One vmbackup CLI backup as the bench measured it (bench/main.ts vmbackupBackup). */
export interface MeasuredBackup {
  /** wall, CLI CPU and RSS, worker CPU and RSS, the workflow's own time */
  sample: Record<string, number>;
  backupId: string;
  /** seconds per activity (splitTimeline) */
  split: Record<string, number>;
  /** the libvirt job's own time (awaitBackupJob's result) */
  jobMs: number;
  /** what `backup --json` printed (level, chain, disks, targets) */
  json: Record<string, unknown>;
}

export interface WorkerProcess {
  host: string;
  child: ChildProcess;
  meter: ProcessMeter;
  output(): string;
  stop(): Promise<void>;
}

/** `vmbackup worker --host HOST`; `bin` runs another build of vmbackup (a baseline), `env` adds variables. */
export async function startWorker(
  host: string,
  opts: { bin?: string; env?: Record<string, string> } = {},
): Promise<WorkerProcess> {
  const child = spawn(opts.bin ?? BIN, ['worker', '--host', host, '--no-recover'], {
    env: { ...vmbackupEnv(), ...opts.env },
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

export type { ActivitySpan, ActivityTimeline as BackupTimeline } from '../../test/helpers/history';

/** The activities (regular and local) of the backup workflow of DOMAIN on HOST (latest run, or RUNID), from its history. */
export async function backupTimeline(
  client: Client,
  host: string,
  domain: string,
  runId?: string,
): Promise<BackupTimeline> {
  const history = await client.workflow.getHandle(`vmbackup-backup-${host}-${domain}`, runId).fetchHistory();
  return activityTimeline(history.events ?? []);
}

/** Run time (start -> close) summed per activity type; "temporal" = workflow time not inside any activity run. */
export function splitTimeline(t: BackupTimeline): Record<string, number> {
  const out: Record<string, number> = {};
  for (const a of t.activities) out[a.name] = (out[a.name] ?? 0) + (a.closedAt - a.startedAt);
  // union of activity run intervals (targets ship in parallel); a span without both times (an activity still
  // running, or cancelled before it started: NaN) is left out, or one NaN would make the whole union NaN-poisoned
  const iv = t.activities
    .filter((a) => Number.isFinite(a.startedAt) && Number.isFinite(a.closedAt))
    .map((a) => [a.startedAt, a.closedAt] as const)
    .sort((x, y) => x[0] - y[0]);
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
