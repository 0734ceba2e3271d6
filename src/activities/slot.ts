/**
 * A host's backup slots, with Temporal as the queue: a backup's workflow first schedules `holdBackupSlot` on
 * `vmbackup-host-<host>-slots`, which the host's worker polls with at most `--max-concurrent-backups` activities at
 * once. The activity that runs tells its workflow (a signal) and then holds the slot, heartbeating, until the workflow
 * cancels it after its last step. A worker that dies stops heartbeating: Temporal times the activity out and the
 * slot is free. Backups waiting for a slot are activity tasks in that queue, visible to Temporal and to
 * `vmbackup status` (`queued`).
 */
import { Context } from '@temporalio/activity';
import { ErrorType } from '../shared/errors';
import { BACKUP_ID_RE } from '../shared/names';
import type { HoldBackupSlotInput, SlotActivities } from '../shared/schedule';
import { permanent } from './failures';

export interface SlotActivityDeps {
  /**
   * Sends the workflow run its slotGranted(token) signal; resolves false when that run no longer exists (it was
   * terminated while it waited): the slot is then not held.
   */
  grantSlot(workflowId: string, runId: string, token: string): Promise<boolean>;
  /** how often a held slot heartbeats (default 3 s); a cancel reaches the activity with the next heartbeat */
  heartbeatMs?: number;
}

export function createSlotActivities(deps: SlotActivityDeps): SlotActivities {
  const every = deps.heartbeatMs ?? 3000;
  return {
    async holdBackupSlot(input: HoldBackupSlotInput): Promise<void> {
      if (typeof input?.token !== 'string' || input.token.length === 0 || input.token.length > 64) {
        throw permanent('invalid slot request: no token', ErrorType.InvalidInput);
      }
      if (typeof input.backupId !== 'string' || !BACKUP_ID_RE.test(input.backupId)) {
        throw permanent(`invalid slot request: "${String(input.backupId)}" is not a backup id`, ErrorType.InvalidInput);
      }
      const ctx = Context.current();
      const run = ctx.info.workflowExecution;
      if (!run) throw permanent('a backup slot is held by a backup workflow only', ErrorType.InvalidInput);
      if (!(await deps.grantSlot(run.workflowId, run.runId, input.token))) return;
      // Held until the workflow cancels this activity (ctx.sleep then rejects with the cancellation), or until
      // the run is gone (the heartbeat's answer cancels it too).
      for (;;) {
        ctx.heartbeat();
        await ctx.sleep(every);
      }
    },
  };
}
