/**
 * The one way this package runs virsh and qemu-img: an argument array (never a shell string), the C
 * locale (the error classifier matches English texts), an AbortSignal and a timeout that kill the
 * child, and stdout/stderr collected (or streamed, for progress output).
 */
import { spawn } from 'node:child_process';
import { boundedTimeout } from './deadline';

export interface ExecOptions {
  signal?: AbortSignal;
  /** kill the child after this long (SIGTERM, then SIGKILL 5 s later); no limit when unset */
  timeoutMs?: number;
  /** called with each stdout chunk as it arrives (progress output) */
  onStdout?: (chunk: string) => void;
  /** keep at most this many characters of each stream (the tail is kept); default 16 MiB */
  maxOutput?: number;
}

export interface ExecResult {
  command: readonly string[];
  /** exit code; null when the child was killed by a signal */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** the timeout killed the child */
  timedOut: boolean;
}

/** The child could not be started (ENOENT: the tool is not installed), or the caller aborted. */
export class ExecStartError extends Error {
  override readonly name = 'ExecStartError';
  readonly code?: string;
  constructor(
    readonly command: readonly string[],
    cause: NodeJS.ErrnoException,
  ) {
    super(`cannot run ${command[0] ?? '?'}: ${cause.message}`, { cause });
    this.code = cause.code;
  }
}

const KILL_GRACE_MS = 5_000;

/**
 * What a tool may see of our environment: where programs are, home and temp dirs, and which libvirt to talk
 * to (XDG_RUNTIME_DIR locates a session daemon's socket). Nothing else: the worker's environment holds S3
 * credentials (AWS_SECRET_ACCESS_KEY) and Temporal keys, which no child needs and a child can leak.
 */
const TOOL_ENV_NAMES = [
  'PATH',
  'HOME',
  'TMPDIR',
  'LIBVIRT_DEFAULT_URI',
  'VIRSH_DEFAULT_CONNECT_URI',
  'XDG_RUNTIME_DIR',
] as const;

/**
 * The environment virsh, qemu-img, rsync and the other tools run in: the names above and the C locale,
 * since the error classifier matches English texts.
 */
export function toolEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const name of TOOL_ENV_NAMES) {
    const value = process.env[name];
    if (value !== undefined) env[name] = value;
  }
  return { ...env, LC_ALL: 'C', LANG: 'C', ...extra };
}
const DEFAULT_MAX_OUTPUT = 16 << 20;

/**
 * Runs `file args...` and resolves with its exit status and output, whatever the exit code (the
 * caller decides what a non-zero exit means: `qemu-img compare` exits 1 for "different").
 * Rejects with ExecStartError when the program cannot be started, and with the signal's reason
 * when `signal` aborts (the child is killed first).
 */
export function execTool(file: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  const command = [file, ...args];
  const { signal } = opts;
  if (signal?.aborted) return Promise.reject(abortReason(signal));
  const max = opts.maxOutput ?? DEFAULT_MAX_OUTPUT;
  // never longer than the activity attempt that runs us (deadline.ts)
  const timeoutMs = boundedTimeout(opts.timeoutMs);

  return new Promise<ExecResult>((resolve, reject) => {
    const child = spawn(file, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: toolEnv(),
    });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    let aborted = false;
    let killTimer: NodeJS.Timeout | undefined;
    let settled = false;

    const kill = (): void => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      killTimer ??= setTimeout(() => child.kill('SIGKILL'), KILL_GRACE_MS);
      killTimer.unref();
    };
    const onAbort = (): void => {
      aborted = true;
      kill();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            kill();
          }, timeoutMs);

    const cleanup = (): void => {
      settled = true;
      if (timer) clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      signal?.removeEventListener('abort', onAbort);
    };

    child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      opts.onStdout?.(chunk);
      stdout = keepTail(stdout + chunk, max);
    });
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
      stderr = keepTail(stderr + chunk, max);
    });
    child.on('error', (err: NodeJS.ErrnoException) => {
      if (settled) return;
      cleanup();
      reject(new ExecStartError(command, err));
    });
    child.on('close', (code, sig) => {
      if (settled) return;
      cleanup();
      if (aborted && signal) {
        reject(abortReason(signal));
        return;
      }
      resolve({ command, code, signal: sig, stdout, stderr, timedOut });
    });
  });
}

function keepTail(s: string, max: number): string {
  return s.length > max ? s.slice(s.length - max) : s;
}

function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException('The operation was aborted', 'AbortError');
}
