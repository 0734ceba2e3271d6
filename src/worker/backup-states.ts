/** The BackupStates port over Temporal: what visibility shows now for a backup id. */
import type { Client } from '@temporalio/client';
import type { BackupStates } from '../activities/backup-states';
import { isValidBackupId } from '../activities/snapshot-paths';
import { SEARCH_ATTRIBUTES } from '../shared/names';

export function temporalBackupStates(client: Client): BackupStates {
  return async (backupId) => {
    // The id goes into a query string: only the file-safe form (no quotes) is ever asked about.
    if (!isValidBackupId(backupId)) throw new Error(`'${backupId}' is not a valid backup id`);
    const query = `${SEARCH_ATTRIBUTES.backupId} = '${backupId}' AND WorkflowType = 'backupDomain'`;
    let seen = false;
    // A workflow reset makes a closed backup run again, under a new run: any open run counts.
    for await (const wf of client.workflow.list({ query, pageSize: 10 })) {
      if (wf.status.name === 'RUNNING') return 'running';
      seen = true;
    }
    return seen ? 'closed' : 'unknown';
  };
}
