/**
 * Copying a quiet base image (the overlay takes the guest's writes) into the staging directory,
 * resumable after a crash, with progress, and a SHA-256 of the copy.
 *
 * `auto` is vmbackup's own single-pass copy (./single-pass-copy): it hashes what it writes, so the base
 * is read once. `rsync` and `cp` run the external tool; their copy is then proven equal to the base by
 * hashing both (copyBaseImages). rsync runs with `--inplace`, so the bytes a killed attempt wrote stay
 * in the destination file; the next attempt continues from there with `--append-verify`, which re-reads
 * the partial file, checks it against the source and sends only the rest (and the whole file if the
 * check fails).
 */
import { rm, stat } from 'node:fs/promises';
import Rsync from 'rsync';
import { execTool, ExecStartError } from '../hypervisor/exec';
import { fileHoles } from '../hypervisor/qemu-img';
import type { ExecResult } from '../hypervisor/exec';
import { ErrorType } from '../shared/errors';
import type { CopyTool } from '../shared/types';
import { permanent } from './failures';
import { singlePassCopy } from './single-pass-copy';

/** What copyBaseImages heartbeats; the next attempt reads it back from `heartbeatDetails`. */
export interface CopyHeartbeat {
  disk: string;
  /** 'verify': hashing base and copy after rsync/cp, or (auto) checking a partial copy before continuing it */
  phase: 'copy' | 'verify';
  bytesDone: number;
  bytesTotal: number;
  /** bytes of the partial copy this attempt found and kept (0: copied from the start) */
  resumedFrom: number;
  /** bytes this attempt actually transferred for `disk` (rsync's "Literal data"), once its copy ended */
  bytesCopied?: number;
  /** own copy: the first `durable` bytes of the destination are on disk (its last fdatasync) */
  durable?: number;
  /** disks finished and verified so far in this attempt */
  disksDone: string[];
}

export interface CopyRequest {
  source: string;
  dest: string;
  tool: CopyTool;
  rsyncPath: string;
  signal: AbortSignal;
  /** 'verify': the own copy is comparing a partial destination with the base before it continues */
  onProgress(bytesDone: number, phase: 'copy' | 'verify'): void;
  /** own copy: the first `bytes` of the destination were fdatasync'ed */
  onCheckpoint?(bytes: number): void;
}

export interface CopyOutcome {
  resumedFrom: number;
  bytesCopied: number;
  /** SHA-256 of the copy when the tool computed it from the bytes it wrote (`auto`); else to be verified */
  sha256?: string;
}

/**
 * rsync options. `--sparse` is NOT combined with `--append-verify`: rsync 3.5.0 then rewrites the
 * already-copied prefix (the resumed copy differs from byte 1 and append-verify falls back to a full
 * resend), so only a fresh copy is written sparse; the resumed tail is made sparse afterwards with
 * `fallocate --dig-holes`. `--inplace` keeps a killed attempt's bytes in the destination (without it
 * they sit in a hidden temp file that SIGKILL never renames). `--inplace --sparse` is allowed since 3.1.3.
 */
export function rsyncOptions(resume: boolean): string[] {
  const cmd = new Rsync()
    .set('inplace')
    .set(resume ? 'append-verify' : 'sparse')
    .set('info', 'progress2')
    .set('outbuf', 'L')
    .set('stats')
    .set('no-human-readable');
  // args() shell-escapes sources and destination (`a b` → `a\ b`) for the wrapper's own /bin/sh
  // execute(); we spawn without a shell, so the paths are appended raw after `--` by the caller.
  return cmd.args();
}

/**
 * Bytes done from a whole rsync `--info=progress2` line, `   233078784  55%  222.25MB/s    0:00:01`;
 * undefined for anything else, including a line cut short.
 */
export function parseRsyncProgress(line: string): number | undefined {
  const m = /^\s*(\d+)\s+\d+%\s+\S+\s+(\d+:\d+:\d+|\?\?:\?\?:\?\?)/.exec(line);
  return m ? Number(m[1]) : undefined;
}

/** rsync `--stats`: the bytes it really sent (matched and skipped data excluded). */
export function parseRsyncLiteral(output: string): number | undefined {
  const m = /^Literal data: (\d+) bytes/m.exec(output);
  return m ? Number(m[1]) : undefined;
}

export async function copyImage(req: CopyRequest): Promise<CopyOutcome> {
  if (req.tool === 'auto') {
    // Holes are hashed without being read. The map arrives while the copy starts (qemu-img takes tens of
    // milliseconds); until then, and without it, every byte is read: slower, just as right.
    const mapping = new AbortController();
    const holes = fileHoles(req.source, { signal: AbortSignal.any([req.signal, mapping.signal]) }).catch(
      () => undefined,
    );
    try {
      const { resumedFrom, bytesCopied, sha256 } = await singlePassCopy({
        source: req.source,
        dest: req.dest,
        holes,
        signal: req.signal,
        onProgress: req.onProgress,
        onCheckpoint: req.onCheckpoint,
      });
      return { resumedFrom, bytesCopied, sha256 };
    } catch (err) {
      throw ownCopyFailure(err, req.dest);
    } finally {
      mapping.abort(); // a copy faster than qemu-img (a tiny image) does not leave it running
    }
  }
  const size = (await stat(req.source)).size;
  let partial = await fileSize(req.dest);
  if (partial !== undefined && partial > size) {
    // Not a prefix of this base: rsync --append would skip a destination at least as long as the source.
    await rm(req.dest, { force: true });
    partial = undefined;
  }
  if (req.tool === 'cp') {
    // cp cannot resume: it starts over.
    await rm(req.dest, { force: true });
    const stop = pollSize(req.dest, (n) => req.onProgress(n, 'copy'));
    try {
      await runTool('cp', ['--sparse=always', '--', req.source, req.dest], { signal: req.signal });
    } finally {
      stop();
    }
    req.onProgress(size, 'copy');
    return { resumedFrom: 0, bytesCopied: size };
  }

  const resumedFrom = partial ?? 0;
  const resume = resumedFrom > 0;
  const args = [...rsyncOptions(resume), '--', req.source, req.dest];
  const out = await runTool(req.rsyncPath, args, {
    signal: req.signal,
    onLine: (line) => {
      const done = parseRsyncProgress(line);
      if (done !== undefined) req.onProgress(done, 'copy');
    },
  });
  if (resume) await runTool('fallocate', ['--dig-holes', req.dest], { signal: req.signal });
  req.onProgress(size, 'copy');
  return { resumedFrom, bytesCopied: parseRsyncLiteral(out.stdout) ?? size - resumedFrom };
}

async function fileSize(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

function pollSize(path: string, onSize: (n: number) => void): () => void {
  const timer = setInterval(() => {
    fileSize(path).then(
      (n) => n !== undefined && onSize(n),
      () => undefined,
    );
  }, 1000);
  return () => clearInterval(timer);
}

/**
 * Runs a copy tool with an argument array (no shell, C locale). `setpriv --pdeathsig KILL` makes the
 * tool die with the worker: an orphaned rsync would otherwise keep appending to the file the retry
 * resumes. The activity's cancellation signal kills it too.
 */
async function runTool(
  file: string,
  args: string[],
  opts: { signal: AbortSignal; onLine?: (line: string) => void },
): Promise<ExecResult> {
  let pending = '';
  const result = await execTool('setpriv', ['--pdeathsig', 'KILL', '--', file, ...args], {
    signal: opts.signal,
    maxOutput: 1 << 20,
    onStdout: (chunk) => {
      // progress2 redraws its line about once a second, each redraw starting with \r
      pending += chunk;
      const lines = pending.split(/[\r\n]/);
      pending = lines.pop() ?? '';
      for (const line of lines) opts.onLine?.(line);
      // rsync starts each redraw with \r and ends it with nothing: the newest line is the pending one
      if (parseRsyncProgress(pending) !== undefined) opts.onLine?.(pending);
    },
  }).catch((err: unknown) => {
    if (err instanceof ExecStartError) throw new Error(`cannot run ${file} (through setpriv): ${err.message}`);
    throw err;
  });
  if (result.code !== 0) throw toolFailure(file, args, result);
  return result;
}

function toolFailure(file: string, args: string[], result: ExecResult): Error {
  const name = file.split('/').pop() ?? file;
  const dest = args[args.length - 1] ?? '';
  const last = result.stderr.trim().split('\n').filter(Boolean).pop() ?? '';
  if (/No space left on device/.test(result.stderr)) return noSpace(name, dest);
  if (/Permission denied/.test(result.stderr)) return denied(name, dest, last);
  // Killed (worker shutdown, OOM) or an I/O hiccup: retryable; the next attempt resumes from the partial file.
  return new Error(
    `${name} failed (${result.signal ?? `exit ${result.code}`}) copying to ${dest}: ${last || 'no message'}`,
  );
}

/** The own copy's file-system errors, in the same sentences as the external tools'. */
function ownCopyFailure(err: unknown, dest: string): unknown {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOSPC' || code === 'EDQUOT') return noSpace('vmbackup', dest);
  if (code === 'EACCES' || code === 'EPERM') return denied('vmbackup', dest, (err as Error).message);
  // EIO and the like: retryable; the next attempt verifies the partial file and continues
  return err;
}

function noSpace(tool: string, dest: string): Error {
  return permanent(`${tool} ran out of space writing ${dest}: free space in the staging directory`, ErrorType.NoSpace);
}

function denied(tool: string, dest: string, detail: string): Error {
  return permanent(`${tool} was denied access copying to ${dest}: ${detail}`, ErrorType.PermissionDenied);
}
