/**
 * finishInstantRestore: `vmbackup restore --finish NEWNAME`. Pulls every disk of an instant-restored domain from the
 * backup into its overlay while the VM runs, then checks that no disk has a backing file any more. Both steps run on
 * the domain's host queue and are idempotent: a worker killed mid-pull leaves the job running in QEMU, and the retry
 * on the next worker attaches to it (or starts it again when it was lost). Nothing here ever moves a disk to another
 * file, so whatever fails, the VM keeps running on its overlay.
 */
import { proxyActivities } from '@temporalio/workflow';
import type { FinishInstantResult, InstantActivities } from '../shared/activities';
import { hostTaskQueue } from '../shared/names';

export interface FinishInstantWorkflowInput {
  host: string;
  domain: string;
  bandwidthMiB?: number;
}

export async function finishInstantRestore(input: FinishInstantWorkflowInput): Promise<FinishInstantResult> {
  const taskQueue = hostTaskQueue(input.host);
  const { pullInstantDisks } = proxyActivities<InstantActivities>({
    taskQueue,
    // a pull copies the whole disk: hours for a big one; a dead worker is noticed by the heartbeat
    startToCloseTimeout: '7 days',
    heartbeatTimeout: '30s',
    retry: { initialInterval: '2s', maximumInterval: '1m', nonRetryableErrorTypes: [] },
  });
  const { completeInstantFinish } = proxyActivities<InstantActivities>({
    taskQueue,
    startToCloseTimeout: '5m',
    retry: { initialInterval: '2s', maximumInterval: '1m', maximumAttempts: 10 },
  });
  const request = {
    domain: input.domain,
    ...(input.bandwidthMiB !== undefined ? { bandwidthMiB: input.bandwidthMiB } : {}),
  };
  const pulled = await pullInstantDisks(request);
  const disks = await completeInstantFinish(request);
  return { domain: pulled.domain, alreadyStandalone: pulled.alreadyStandalone, disks };
}
