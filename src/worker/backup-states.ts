/** The BackupStates port over Temporal: what visibility shows now for a backup id. */
import type { Client } from '@temporalio/client';
import type { BackupStates } from '../activities/backup-states';
import { isValidBackupId } from '../activities/snapshot-paths';
import { SEARCH_ATTRIBUTES } from '../shared/names';

export function temporalBackupStates(client: Client): BackupStates {
  return async (backupId) => {
    // The id goes into a query string: only the file-safe form (no quotes) is ever asked about.
    if (!isValidBackupId(backupId)) throw new Error(`'${backupId}' is not a valid backup id`);
    const ofBackup = `${SEARCH_ATTRIBUTES.backupId} = '${backupId}' AND WorkflowType = 'backupDomain'`;
    // Counted, not listed: a listing decodes memos, and one encoded with a codec we lack would fail it. All
    // runs first: a backup that becomes visible between the two counts must not read as closed. Any open run
    // counts (a reset reopens a backup under a new run).
    if ((await client.workflow.count(ofBackup)).count === 0) return 'unknown';
    return (await client.workflow.count(`${ofBackup} AND ExecutionStatus = 'Running'`)).count > 0
      ? 'running'
      : 'closed';
  };
}
