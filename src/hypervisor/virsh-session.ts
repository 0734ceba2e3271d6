/**
 * Long-lived virsh shells for read-only queries. Every virsh process costs ~25 ms of start-up (dynamic
 * linking of libvirt and friends) before it even connects; a virsh started without a command reads
 * commands from stdin and answers each in ~1 ms over the connection it already has.
 *
 * Only the queries in QUERIES go through a session; a command with a side effect always runs as its own
 * process, so a misread session can never repeat it. A query is safe to repeat: on any anomaly (the echoed
 * command line differs, unexpected output, the shell died, no answer in time) the session is killed and
 * the caller runs the query as a one-shot process instead.
 *
 * The shell behaves as its interactive self on pipes (libvirt 9.0): it prints the prompt `virsh # `,
 * echoes each line it read, then the command's output, then the blank line virsh adds after every command
 * when not quiet (a one-shot `virsh CMD` prints the same text, which keeps stdout identical). Errors are
 * `error: ...` lines on stderr, and the shell goes on after a failed command. Each query is framed as
 *
 *   echo --err B        stderr: `error: B`   (what stderr held before it was not ours: anomaly)
 *   <the query>         stdout: `virsh # <the query>` then its output; stderr: its errors
 *   echo E              stdout: `virsh # echo E` `E`
 *   echo --err E        stdout: `virsh # echo --err E`; stderr: `error: E`
 *
 * with B and E unique per query (a random per-session nonce and a counter).
 */
import { spawn } from 'node:child_process';
import type { ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { classifyHypervisorError } from './errors';
import type { ExecResult } from './exec';
import { toolEnv } from './exec';

/** virsh commands that only read, with the options they may take here (any other option: one-shot). */
const QUERIES: ReadonlyMap<string, ReadonlySet<string>> = new Map([
  ['version', new Set<string>()],
  ['domstate', new Set<string>()],
  ['dumpxml', new Set(['--inactive'])],
  ['domblkinfo', new Set<string>()],
  ['domjobinfo', new Set(['--completed', '--keep-completed', '--rawstats'])],
  // recovery asks every domain whose backup job (if any) it is
  ['backup-dumpxml', new Set<string>()],
  // `blockjob DOM DISK --raw` reports the job; --abort, --pivot and --bandwidth change it
  ['blockjob', new Set(['--raw'])],
  // an incremental backup asks these 4-6 times (plan, the new checkpoint's XML, retiring old ones)
  ['checkpoint-list', new Set(['--name', '--topological'])],
  // --size merges the bitmaps into a temporary one to count them and drops it: nothing is changed
  ['checkpoint-dumpxml', new Set(['--domain', '--checkpointname', '--no-domain', '--size'])],
]);

const PROMPT = 'virsh # ';
const MAX_SESSIONS = 4;
const IDLE_CLOSE_MS = 10_000;
const MAX_OUTPUT = 16 << 20;
/** longer query lines run one-shot (ours are < 200 characters: names are at most 64) */
const MAX_LINE = 4096;

export interface VirshSessionsOptions {
  virsh: string;
  uri: string;
  /** most shells at once; more concurrent queries run one-shot (never queued behind a slow one) */
  max?: number;
  /** a shell idle this long exits */
  idleMs?: number;
}

/** `'it'\''s'`: virsh's parser takes single-quoted text literally, like a POSIX shell. */
export function quoteVirshArg(arg: string): string {
  return `'${arg.replace(/'/g, `'\\''`)}'`;
}

/**
 * The session's command line for ARGS, or undefined when ARGS is not a query or holds a character the
 * shell's line editor could act on (control characters; non-ASCII, which readline may take as meta keys).
 */
export function queryLine(args: readonly string[]): string | undefined {
  const [command, ...rest] = args;
  const allowed = command === undefined ? undefined : QUERIES.get(command);
  if (!allowed || !args.every((a) => /^[\x20-\x7e]+$/.test(a))) return undefined;
  if (rest.some((a) => a.startsWith('-') && !allowed.has(a))) return undefined;
  const line = [command, ...rest.map(quoteVirshArg)].join(' ');
  return line.length <= MAX_LINE ? line : undefined;
}

/** A pool of virsh shells on one connection URI. */
export class VirshSessions {
  private readonly idle: VirshSession[] = [];
  private live = 0;
  private closed = false;
  private readonly max: number;
  private readonly idleMs: number;

  constructor(private readonly opts: VirshSessionsOptions) {
    this.max = opts.max ?? MAX_SESSIONS;
    this.idleMs = opts.idleMs ?? IDLE_CLOSE_MS;
  }

  /**
   * Answers a query from a session, as `virsh -c URI ARGS` would have: its stdout, its stderr, and code 1
   * when it printed an error. Undefined when no session answered (not a query, every session busy, or an
   * anomaly): the caller runs it one-shot.
   */
  async run(args: readonly string[], timeoutMs: number): Promise<ExecResult | undefined> {
    const line = queryLine(args);
    if (line === undefined || this.closed) return undefined;
    let session = this.idle.pop();
    if (!session) {
      if (this.live >= this.max) return undefined;
      session = this.start();
    }
    session.busy();
    const reply = await session.query(line, timeoutMs);
    if (session.alive && this.closed) session.close();
    else if (session.alive) {
      session.idleFor(this.idleMs);
      this.idle.push(session);
    }
    return reply && this.result(args, reply);
  }

  /** Ends every idle session now and the busy ones when their query returns; later queries run one-shot. */
  close(): void {
    this.closed = true;
    for (const s of this.idle.splice(0)) s.close();
  }

  private start(): VirshSession {
    this.live++;
    return new VirshSession(this.opts.virsh, this.opts.uri, (s) => {
      this.live--;
      const i = this.idle.indexOf(s);
      if (i >= 0) this.idle.splice(i, 1);
    });
  }

  private result(args: readonly string[], reply: Reply): ExecResult {
    // A failed command always reports (virsh's vshReportError); anything else on stderr was refused in parse()
    const failed = reply.stderr.length > 0;
    return {
      command: [this.opts.virsh, '-c', this.opts.uri, ...args],
      code: failed ? 1 : 0,
      signal: null,
      stdout: reply.stdout,
      stderr: reply.stderr,
      timedOut: false,
    };
  }
}

interface Reply {
  stdout: string;
  stderr: string;
}

interface Pending {
  line: string;
  begin: string;
  end: string;
  settle(reply: Reply | undefined): void;
}

/** One virsh shell; one query at a time. */
class VirshSession {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly nonce = randomBytes(8).toString('hex');
  /** queries sent, this one included */
  private counter = 0;
  private stdout = '';
  private stderr = '';
  private pending: Pending | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  alive = true;

  constructor(
    virsh: string,
    uri: string,
    private readonly onGone: (s: VirshSession) => void,
  ) {
    this.child = spawn(virsh, ['-c', uri], {
      stdio: ['pipe', 'pipe', 'pipe'],
      // TERM=dumb and no inputrc: readline prints no escape sequences (bracketed paste) and binds nothing a
      // user configured. On a pipe it takes the line width from COLUMNS, else 80, and echoes a longer line
      // scrolled ("\r<obe' '/tmp/..."): a width no query line reaches. The shell saves its history on exit
      // under $XDG_CACHE_HOME; a cache dir below /dev/null cannot be created, so our queries never land in
      // (or trim) a user's virsh history.
      env: toolEnv({ TERM: 'dumb', COLUMNS: String(MAX_LINE * 2), INPUTRC: '/dev/null', XDG_CACHE_HOME: '/dev/null' }),
    });
    // An idle session must not keep a CLI or worker alive; a query's own timer keeps the loop up meanwhile.
    this.child.unref();
    for (const stream of [this.child.stdin, this.child.stdout, this.child.stderr]) {
      (stream as unknown as { unref?: () => void }).unref?.();
    }
    this.child.stdin.on('error', () => this.kill()); // EPIPE: the shell is gone; 'exit' says so too
    this.child.on('error', () => this.kill()); // ENOENT: the one-shot run reports it in its own words
    this.child.on('exit', () => this.kill());
    this.child.stdout.setEncoding('utf8').on('data', (chunk: string) => {
      this.stdout += chunk;
      this.check();
    });
    this.child.stderr.setEncoding('utf8').on('data', (chunk: string) => {
      this.stderr += chunk;
      // Printed while idle: "error: Disconnected from qemu:///system due to end of file" (libvirtd went away).
      if (!this.pending) this.kill();
      else this.check();
    });
  }

  busy(): void {
    clearTimeout(this.idleTimer);
  }

  idleFor(ms: number): void {
    this.idleTimer = setTimeout(() => this.close(), ms);
    this.idleTimer.unref();
  }

  query(line: string, timeoutMs: number): Promise<Reply | undefined> {
    const id = `${this.nonce}-${++this.counter}`;
    const begin = `vmbackup-${id}-begin`;
    const end = `vmbackup-${id}-end`;
    return new Promise((resolve) => {
      const timer = setTimeout(() => this.kill(), timeoutMs);
      this.pending = {
        line,
        begin,
        end,
        settle: (reply) => {
          clearTimeout(timer);
          this.pending = undefined;
          resolve(reply);
        },
      };
      if (!this.alive) {
        this.pending.settle(undefined);
        return;
      }
      this.child.stdin.write(`echo --err ${begin}\n${line}\necho ${end}\necho --err ${end}\n`);
    });
  }

  close(): void {
    this.kill();
  }

  private kill(): void {
    if (this.alive) {
      this.alive = false;
      clearTimeout(this.idleTimer);
      this.child.stdin.destroy();
      this.child.kill('SIGKILL');
      this.onGone(this);
    }
    this.pending?.settle(undefined);
  }

  /** Settles the pending query once both streams carry its end marker. */
  private check(): void {
    const p = this.pending;
    if (!p) return;
    if (this.stdout.length + this.stderr.length > MAX_OUTPUT) {
      this.kill();
      return;
    }
    const outTail = `${PROMPT}echo ${p.end}\n${p.end}\n${PROMPT}echo --err ${p.end}\n\n`;
    const errTail = `error: ${p.end}\n`;
    const outEnd = this.stdout.indexOf(outTail);
    const errEnd = this.stderr.indexOf(errTail);
    if (outEnd < 0 || errEnd < 0) return;
    const reply = this.parse(p, this.stdout.slice(0, outEnd), this.stderr.slice(0, errEnd));
    // What follows is the next prompt (or a part of it); anything else on stderr is not ours.
    this.stdout = this.stdout.slice(outEnd + outTail.length);
    const errRest = this.stderr.slice(errEnd + errTail.length);
    this.stderr = '';
    if (!reply || errRest.length > 0) {
      this.kill();
      return;
    }
    p.settle(reply);
  }

  private parse(p: Pending, out: string, err: string): Reply | undefined {
    // The first query finds virsh's banner before its prompt; later ones only the prompt.
    const head = `${PROMPT}echo --err ${p.begin}\n\n${PROMPT}${p.line}\n`;
    const at = out.indexOf(head);
    if (at < 0 || (this.counter > 1 && at !== 0)) return undefined;
    const errHead = `error: ${p.begin}\n`;
    if (!err.startsWith(errHead)) return undefined;
    const stdout = out.slice(at + head.length);
    const stderr = err.slice(errHead.length);
    if (stderr.length > 0 && !isCommandError(stderr)) return undefined;
    return { stdout, stderr };
  }
}

/**
 * The stderr of a query that failed in the usual way: `error:` lines, and no sign that the shell's own
 * connection broke ("Disconnected from qemu:///system due to end of file", "Failed to reconnect to the
 * hypervisor"). A one-shot virsh reports such a state in its own words ("failed to connect to the
 * hypervisor"), or answers once libvirtd is back: the caller runs it one-shot.
 */
function isCommandError(stderr: string): boolean {
  const lines = stderr.split('\n').filter((l) => l.length > 0);
  if (!lines.every((l) => l.startsWith('error: '))) return false;
  if (/Disconnected from .* due to|reconnect(ed)? to the hypervisor/i.test(stderr)) return false;
  return classifyHypervisorError(stderr) !== 'unreachable';
}
