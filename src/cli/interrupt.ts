/**
 * SIGINT, SIGTERM and SIGHUP for a command that follows a backup. A CLI that hosts the backup's only worker (the
 * embedded default) must not just die: the VM would stay on its overlay, or its backup job run on, until someone
 * cancels the workflow and a worker runs its undo steps. Temporal's runtime would stop the worker on these
 * signals by itself (and the CLI then waited for nothing): CLI processes install it without shutdown signals
 * (worker/index.ts quietWorkerLogs) and decide here instead.
 */

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
const SIGNAL_NUMBER: Partial<Record<NodeJS.Signals, number>> = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 };

/** The shell's convention for a command ended by a signal: 128 + its number (130 for Ctrl-C). */
export function signalExitCode(signal: NodeJS.Signals): number {
  return 128 + (SIGNAL_NUMBER[signal] ?? 0);
}

export interface InterruptWatch {
  /** the first signal received, if any */
  readonly first: NodeJS.Signals | undefined;
  /** resolves with the first signal (at once if one came already) */
  readonly received: Promise<NodeJS.Signals>;
  /** every later signal calls `fn` with the time since the first one */
  onRepeat(fn: (signal: NodeJS.Signals, msSinceFirst: number) => void): void;
  /** stops listening: the signals' default action (exit) applies again */
  dispose(): void;
}

/** Starts listening now, so a signal that comes while a backup is being started is not lost. */
export function watchInterrupts(): InterruptWatch {
  let first: NodeJS.Signals | undefined;
  let firstAt = 0;
  let repeat: ((signal: NodeJS.Signals, ms: number) => void) | undefined;
  let resolveReceived: (s: NodeJS.Signals) => void = () => undefined;
  const received = new Promise<NodeJS.Signals>((r) => (resolveReceived = r));
  // A closed terminal (SIGHUP) makes writes to it fail: that must not end the process before the undo steps.
  const ignoreWriteErrors = () => undefined;
  process.stderr.on('error', ignoreWriteErrors);
  process.stdout.on('error', ignoreWriteErrors);
  const listener = (signal: NodeJS.Signals) => {
    if (first === undefined) {
      first = signal;
      firstAt = Date.now();
      resolveReceived(signal);
    } else {
      repeat?.(signal, Date.now() - firstAt);
    }
  };
  for (const s of SIGNALS) process.on(s, listener);
  return {
    get first() {
      return first;
    },
    received,
    onRepeat: (fn) => (repeat = fn),
    dispose: () => {
      for (const s of SIGNALS) process.off(s, listener);
      process.stderr.off('error', ignoreWriteErrors);
      process.stdout.off('error', ignoreWriteErrors);
    },
  };
}
