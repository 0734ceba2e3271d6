/**
 * Measuring: child processes under /usr/bin/time (wall, CPU, peak RSS), a long-running process
 * through /proc (CPU delta, peak RSS since a reset of VmHWM), medians, and a cold page cache so
 * every candidate and its baseline read the image from disk alike.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface RunStats {
  wallMs: number;
  /** user + system of the process and the children it waited for */
  cpuMs: number;
  peakRssMiB: number;
}

export interface RunResult extends RunStats {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs FILE ARGS under /usr/bin/time; fails with its stderr when it exits non-zero (unless allowFail). */
export async function timed(
  file: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; allowFail?: boolean; timeoutMs?: number } = {},
): Promise<RunResult> {
  const dir = await mkdtemp(join(tmpdir(), 'vmbt-bench-time-'));
  const out = join(dir, 'time');
  try {
    const started = process.hrtime.bigint();
    const r = await run('/usr/bin/time', ['-f', '%e %U %S %M', '-o', out, file, ...args], opts);
    const wallMs = Number(process.hrtime.bigint() - started) / 1e6;
    if (r.code !== 0 && !opts.allowFail) {
      throw new Error(`${file} ${args.join(' ')} exited ${r.code}: ${(r.stderr || r.stdout).trim().slice(-2000)}`);
    }
    const last = (await readFile(out, 'utf8')).trim().split('\n').pop() ?? '';
    const [, user, sys, rssKiB] = last.split(' ').map(Number);
    return { ...r, wallMs, cpuMs: ((user ?? 0) + (sys ?? 0)) * 1000, peakRssMiB: (rssKiB ?? 0) / 1024 };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export function run(
  file: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 1_800_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

export async function must(file: string, args: string[], env?: NodeJS.ProcessEnv): Promise<string> {
  const r = await run(file, args, env ? { env } : {});
  if (r.code !== 0) throw new Error(`${file} ${args.join(' ')} exited ${r.code}: ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

/** CPU (incl. reaped children) and peak RSS of a running process between reset() and read(). */
export class ProcessMeter {
  private cpuAtReset = 0;

  constructor(readonly pid: number) {}

  private async cpuTicks(): Promise<number> {
    const stat = await readFile(`/proc/${this.pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // fields 14..17 (utime stime cutime cstime), counted from 1; f[0] is field 3
    return [11, 12, 13, 14].reduce((n, i) => n + Number(f[i] ?? 0), 0);
  }

  async reset(): Promise<void> {
    // "5" resets VmHWM (peak RSS) to the current RSS (proc(5), clear_refs)
    await writeFile(`/proc/${this.pid}/clear_refs`, '5');
    this.cpuAtReset = await this.cpuTicks();
  }

  async read(): Promise<{ cpuMs: number; peakRssMiB: number; rssMiB: number }> {
    const status = await readFile(`/proc/${this.pid}/status`, 'utf8');
    const kib = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0);
    const cpuMs = ((await this.cpuTicks()) - this.cpuAtReset) * 10; // USER_HZ = 100
    return { cpuMs, peakRssMiB: kib('VmHWM') / 1024, rssMiB: kib('VmRSS') / 1024 };
  }
}

/** Write back dirty pages, then drop the page cache: every timed run starts cold. */
export async function dropCaches(): Promise<void> {
  await must('sync', []);
  await writeFile('/proc/sys/vm/drop_caches', '3').catch(() => undefined);
}

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export function spread(xs: number[]): { min: number; max: number } {
  return { min: Math.min(...xs), max: Math.max(...xs) };
}

export async function elapsed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t = process.hrtime.bigint();
  const value = await fn();
  return { ms: Number(process.hrtime.bigint() - t) / 1e6, value };
}

/** Bytes stored under DIR (st_blocks of every file, so holes do not count). */
export async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) n += (await stat(join(e.parentPath ?? dir, e.name))).blocks * 512;
  }
  return n;
}
