/** The ports of the slot and retention activities over Temporal: the slot's signal, and "does a backup run?". */
import { WorkflowNotFoundError } from '@temporalio/client';
import type { Client } from '@temporalio/client';
import type { RunningBackupOf } from '../activities/schedule';
import type { SlotActivityDeps } from '../activities/slot';
import { runningBackupOfDomain } from '../client/backups';
import { DOMAIN_NAME_RE } from '../shared/names';
import { slotGrantedSignal, storeProgressSignal } from '../shared/queries';
import type { StoreProgressReporter } from '../activities/chunk-repository';

export function temporalSlotGrants(client: Client): SlotActivityDeps['grantSlot'] {
  return async (workflowId, runId, token) => {
    try {
      await client.workflow.getHandle(workflowId, runId).signal(slotGrantedSignal, token);
      return true;
    } catch (err) {
      if (err instanceof WorkflowNotFoundError) return false; // the backup ended (terminated) while it waited
      throw err;
    }
  };
}

export function temporalRunningBackupOf(client: Client): RunningBackupOf {
  return async (domain, exceptRunId) => {
    if (!DOMAIN_NAME_RE.test(domain)) throw new Error(`"${domain}" is not a domain name`);
    return runningBackupOfDomain(client, domain, exceptRunId);
  };
}

/** storeChunkImages' progress, sent to its backup's workflow run as the storeProgress signal. */
export function temporalStoreProgress(client: Client): StoreProgressReporter {
  return async ({ workflowId, runId }, progress) => {
    await client.workflow.getHandle(workflowId, runId).signal(storeProgressSignal, progress);
  };
}
