/**
 * Running vmbackup itself in tests: the built CLI (`bin/vmbackup`, built by `npm run build`)
 * as a child process, and host workers as child processes we can kill -9.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join, resolve } from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { stackEnv } from './stack';

export const REPO_ROOT = resolve(__dirname, '..', '..');
const BIN = join(REPO_ROOT, 'bin', 'vmbackup');

function requireBuilt(): void {
  if (!existsSync(join(REPO_ROOT, 'dist', 'cli', 'main.js'))) {
    throw new Error('dist/ is missing: run `npm run build` (npm test does it)');
  }
}

/** A host name of our own: its task queue is not served by any other test's worker. */
export function uniqueHost(prefix: string): string {
  return `t${prefix}-${randomBytes(3).toString('hex')}`;
}

/** Environment for CLI and worker children: the stack's addresses, a cluster configured. */
export function cliEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = stackEnv();
  return {
    ...process.env,
    VMBACKUP_STATE_DIR: env.stateDir,
    TEMPORAL_ADDRESS: env.temporal.address,
    TEMPORAL_NAMESPACE: env.temporal.namespace,
    LIBVIRT_DEFAULT_URI: env.libvirt.uri,
    AWS_ENDPOINT_URL: env.s3.endpoint,
    AWS_ACCESS_KEY_ID: env.s3.accessKeyId,
    AWS_SECRET_ACCESS_KEY: env.s3.secretAccessKey,
    AWS_REGION: env.s3.region,
    ...extra,
  };
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function runCli(args: string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliResult> {
  requireBuilt();
  return new Promise((resolvePromise, reject) => {
    const child = spawn(BIN, args, {
      env: opts.env ?? cliEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 600_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolvePromise({ code: code ?? -1, stdout, stderr });
    });
  });
}

/**
 * The embedded default as a user runs it: no TEMPORAL_ADDRESS, so the CLI uses (or starts) the dev server on
 * 127.0.0.1:VMBACKUP_TEMPORAL_PORT and runs its own worker for VMBACKUP_HOST. Defaults to the stack's server.
 */
export function embeddedEnv(host: string, extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = cliEnv({ VMBACKUP_HOST: host, ...extra });
  delete env.TEMPORAL_ADDRESS;
  env.VMBACKUP_TEMPORAL_PORT ??= stackEnv().temporal.address.split(':').pop();
  return env;
}

export interface CliProcess {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** a terminal's Ctrl-C (SIGINT) or a service manager's SIGTERM: sent to the CLI's whole process group */
  signal(signal: NodeJS.Signals): void;
  /** resolves when the process has exited; rejects after `deadlineMs` (and kills the group) */
  exited(deadlineMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** waits until stdout has a line matching `re` and returns the match */
  line(re: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
}

/**
 * Starts `vmbackup ...args` in a process group of its own, as a shell runs a foreground command: a signal to the
 * group reaches the CLI and every child it started (virsh shells, qemu-img, ...), like Ctrl-C in a terminal.
 */
export function spawnCli(args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): CliProcess {
  requireBuilt();
  const child = spawn(BIN, args, { env: opts.env ?? cliEnv(), stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    child.once('exit', (code, signal) => r({ code, signal })),
  );
  const signalGroup = (signal: NodeJS.Signals) => {
    try {
      process.kill(-child.pid!, signal);
    } catch {
      /* the group is gone */
    }
  };
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    signal: signalGroup,
    exited: async (deadlineMs = 600_000) => {
      let timer: NodeJS.Timeout | undefined;
      const deadline = new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          signalGroup('SIGKILL');
          reject(new Error(`vmbackup ${args.join(' ')} did not exit within ${deadlineMs / 1000} s; stderr:\n${err}`));
        }, deadlineMs);
      });
      try {
        return await Promise.race([exit, deadline]);
      } finally {
        clearTimeout(timer);
      }
    },
    line: async (re, timeoutMs = 120_000) => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const m = out.match(re);
        if (m) return m;
        if (child.exitCode !== null || child.signalCode !== null) {
          throw new Error(
            `vmbackup ${args.join(' ')} exited (${child.exitCode ?? child.signalCode}) before printing ${re}: ${err}`,
          );
        }
        if (Date.now() > deadline)
          throw new Error(`vmbackup ${args.join(' ')} printed no ${re} in ${timeoutMs / 1000} s: ${err}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
  };
}

export interface WorkerProcess {
  host: string;
  child: ChildProcess;
  /** everything the worker printed */
  output(): string;
  kill9(): Promise<void>;
  stop(): Promise<void>;
}

/** Starts `vmbackup worker --host H` and resolves once it polls its task queue. */
export async function startWorkerProcess(
  host: string,
  opts: { env?: NodeJS.ProcessEnv; recover?: boolean; args?: string[] } = {},
): Promise<WorkerProcess> {
  requireBuilt();
  const args = ['worker', '--host', host, ...(opts.recover ? [] : ['--no-recover']), ...(opts.args ?? [])];
  const child = spawn(BIN, args, { env: opts.env ?? cliEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  await new Promise<void>((resolvePromise, reject) => {
    const deadline = setTimeout(() => reject(new Error(`worker for ${host} did not start in 120 s:\n${out}`)), 120_000);
    const check = setInterval(() => {
      if (/vmbackup worker for host/.test(out)) {
        clearInterval(check);
        clearTimeout(deadline);
        resolvePromise();
      }
    }, 100);
    child.once('exit', (code) => {
      clearInterval(check);
      clearTimeout(deadline);
      reject(new Error(`worker for ${host} exited with ${code}:\n${out}`));
    });
  });
  const stopWith = async (signal: NodeJS.Signals) => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    await exited;
  };
  return { host, child, output: () => out, kill9: () => stopWith('SIGKILL'), stop: () => stopWith('SIGTERM') };
}

export async function temporalClient(): Promise<{ client: Client; close(): Promise<void> }> {
  const env = stackEnv();
  const connection = await Connection.connect({ address: env.temporal.address });
  return { client: new Client({ connection, namespace: env.temporal.namespace }), close: () => connection.close() };
}

export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined | false>,
  opts: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<T> {
  const deadline = Date.now() + (opts.timeoutMs ?? 120_000);
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}${lastErr ? `: ${(lastErr as Error).message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, opts.intervalMs ?? 100));
  }
}
