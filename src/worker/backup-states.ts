/** The BackupStates port over Temporal (src/client/backups.ts asks visibility). */
import type { Client } from '@temporalio/client';
import type { BackupStates } from '../activities/backup-states';
import { isValidBackupId } from '../activities/snapshot-paths';
import { backupState } from '../client/backups';

export function temporalBackupStates(client: Client): BackupStates {
  return async (backupId) => {
    // only names of our own directories are ever asked about
    if (!isValidBackupId(backupId)) throw new Error(`'${backupId}' is not a valid backup id`);
    return backupState(client, backupId);
  };
}
