/**
 * finishInstantRestore: `vmbackup restore --finish NEWNAME`. Pulls every disk of an instant-restored domain from the
 * backup into its overlay while the VM runs, then checks that no disk has a backing file any more. Both steps run on
 * the domain's host queue and are idempotent: a worker killed mid-pull leaves the job running in QEMU, and the retry
 * on the next worker attaches to it (or starts it again when it was lost). Nothing here ever moves a disk to another
 * file, so whatever fails, the VM keeps running on its overlay.
 */
import { proxyActivities } from '@temporalio/workflow';
import type { FinishInstantResult, InstantActivities } from '../shared/activities';
import { hostTaskQueue, MAX_HEARTBEAT_SECONDS, MIN_HEARTBEAT_SECONDS } from '../shared/names';

export interface FinishInstantWorkflowInput {
  host: string;
  domain: string;
  bandwidthMiB?: number;
  /** heartbeat timeout of the pull (MIN_HEARTBEAT_SECONDS..MAX_HEARTBEAT_SECONDS); default 30 s */
  heartbeatTimeoutSeconds?: number;
}

export async function finishInstantRestore(input: FinishInstantWorkflowInput): Promise<FinishInstantResult> {
  const taskQueue = hostTaskQueue(input.host);
  const hb = input.heartbeatTimeoutSeconds;
  // anyone on the cluster can start this workflow: a silly timeout is not taken
  const heartbeatSeconds = hb !== undefined && hb >= MIN_HEARTBEAT_SECONDS && hb <= MAX_HEARTBEAT_SECONDS ? hb : 30;
  const { pullInstantDisks } = proxyActivities<InstantActivities>({
    taskQueue,
    // a pull copies the whole disk: hours for a big one; a dead worker is noticed by the heartbeat
    startToCloseTimeout: '7 days',
    heartbeatTimeout: `${heartbeatSeconds}s`,
    retry: { initialInterval: '2s', maximumInterval: '1m', nonRetryableErrorTypes: [] },
  });
  const { completeInstantFinish } = proxyActivities<InstantActivities>({
    taskQueue,
    startToCloseTimeout: '5m',
    // the worker heartbeats for it (KEEPALIVE_STEPS): a worker that dies in it is noticed in seconds, not minutes
    heartbeatTimeout: `${heartbeatSeconds}s`,
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
