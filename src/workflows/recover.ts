/**
 * recoverHost: undo what backups that no longer run left on a host (overlays a VM still runs on, overlay
 * files, staging directories), and report what was done. Started by `vmbackup recover` and by each
 * worker when it starts. The activities ask Temporal about each backup right before acting on it, so a
 * backup that started after this workflow did is never taken for a dead one.
 */
import { patched, proxyActivities } from '@temporalio/workflow';
import type { HostActivities, RecoveryAction } from '../shared/activities';
import { hostTaskQueue } from '../shared/names';

export interface RecoverHostInput {
  host: string;
  /** what ran when recovery was requested: only older workers use it (see RecoverInput) */
  activeBackupIds?: string[];
  domain?: string;
}

export async function recoverHost(input: RecoverHostInput): Promise<RecoveryAction[]> {
  const { recoverOverlays, removeDeadStaging } = proxyActivities<HostActivities>({
    taskQueue: hostTaskQueue(input.host),
    startToCloseTimeout: '1h',
    heartbeatTimeout: '60s',
    retry: { maximumAttempts: 5, initialInterval: '2s' },
  });
  const request = { activeBackupIds: input.activeBackupIds ?? [], domain: input.domain };
  const actions: RecoveryAction[] = await recoverOverlays(request);
  // Histories recorded before staging directories were recovered replay without this step.
  if (patched('recover-dead-staging')) actions.push(...(await removeDeadStaging(request)));
  return actions;
}
