/**
 * recoverHost: find overlays vmbackup left on a host for backups that no longer run, commit
 * and pivot them, and report what was done. Started by `vmbackup recover` and by each worker
 * when it starts.
 */
import { proxyActivities } from '@temporalio/workflow';
import type { HostActivities, RecoveryAction } from '../shared/activities';
import { hostTaskQueue } from '../shared/names';

export interface RecoverHostInput {
  host: string;
  activeBackupIds: string[];
  domain?: string;
}

export async function recoverHost(input: RecoverHostInput): Promise<RecoveryAction[]> {
  const { recoverOverlays } = proxyActivities<HostActivities>({
    taskQueue: hostTaskQueue(input.host),
    startToCloseTimeout: '1h',
    heartbeatTimeout: '60s',
    retry: { maximumAttempts: 5, initialInterval: '2s' },
  });
  return await recoverOverlays({ activeBackupIds: input.activeBackupIds, domain: input.domain });
}
