/**
 * Following a backup until it ends: a progress bar on a TTY (bytes, rate, ETA), nothing
 * otherwise (scripts read the final result). Progress is read from the workflow (progress query) and the running
 * activity's last heartbeat, so any client can follow any backup.
 */
import { SingleBar } from 'cli-progress';
import type { Client, WorkflowHandle, WorkflowHandleWithFirstExecutionRunId } from '@temporalio/client';
import { backupStatus } from '../client/backups';
import type { BackupStatusView } from '../client/backups';
import type { backupDomain } from '../workflows/backup';
import { formatBytes } from './output';

export async function watchBackup(
  client: Client,
  handle: WorkflowHandle<typeof backupDomain>,
  backupId: string,
  opts: { showProgress: boolean; intervalMs?: number },
): Promise<BackupStatusView> {
  const interval = opts.intervalMs ?? 500;
  const tty = opts.showProgress && process.stderr.isTTY;
  const bar = tty
    ? new SingleBar({
        stream: process.stderr,
        format: ' {phase} |{bar}| {percentage}% {doneH}/{totalH} {rateH}/s ETA {eta_formatted}',
        hideCursor: true,
        etaBuffer: 20,
      })
    : undefined;
  let started = false;
  let lastBytes = 0;
  let lastAt = Date.now();
  let rate = 0;
  // Wait on the result in parallel with polling: the result is the authority on the end.
  let finished = false;
  const outcome = handle.result().then(
    (result) => {
      finished = true;
      return result;
    },
    () => {
      finished = true;
      return undefined;
    },
  );
  const done = outcome.then(() => undefined);
  if (!bar) {
    // Nothing to draw: wait on the result alone (no describe and no query to the worker every interval).
    const result = await outcome;
    // A completed backup's result is the whole answer; any other end is read back (failed, cancelled...).
    if (result)
      return { backupId, workflowId: handle.workflowId, runId: runIdOf(handle), execution: 'COMPLETED', result };
    return backupStatus(client, handle, backupId);
  }
  for (;;) {
    const view = await backupStatus(client, handle, backupId);
    if (view.execution !== 'RUNNING') {
      bar.stop();
      return view;
    }
    const phase = view.progress?.phase ?? 'starting';
    const bytesDone = view.activity?.bytesDone ?? 0;
    const bytesTotal = view.activity?.bytesTotal || view.progress?.bytesTotal || 0;
    const now = Date.now();
    if (bytesDone >= lastBytes && now > lastAt) rate = ((bytesDone - lastBytes) * 1000) / (now - lastAt);
    lastBytes = bytesDone;
    lastAt = now;
    const payload = {
      phase: phase.padEnd(17),
      doneH: formatBytes(bytesDone),
      totalH: formatBytes(bytesTotal),
      rateH: formatBytes(rate),
    };
    if (!started) {
      bar.start(Math.max(bytesTotal, 1), bytesDone, payload);
      started = true;
    } else {
      bar.setTotal(Math.max(bytesTotal, 1));
      bar.update(bytesDone, payload);
    }
    if (!finished) await Promise.race([done, new Promise((r) => setTimeout(r, interval))]);
  }
}

/** The run a started handle points at (from the start response; a looked-up handle has none). */
function runIdOf(handle: WorkflowHandle<typeof backupDomain>): string {
  return (handle as Partial<WorkflowHandleWithFirstExecutionRunId>).firstExecutionRunId ?? '';
}
