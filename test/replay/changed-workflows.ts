/**
 * A deliberately changed backupDomain: it stages before it inspects (recoverHost below swaps its steps, and
 * scheduledBackups sleeps before anything else). Replaying a recorded history against it must fail with a
 * non-determinism error, which proves the replay test would catch an unguarded change to the real workflow (one
 * made without `patched()`).
 */
import { proxyActivities, sleep } from '@temporalio/workflow';
import type { HostActivities } from '../../src/shared/activities';
import { hostTaskQueue } from '../../src/shared/names';
import type { BackupRequest } from '../../src/shared/types';

export async function backupDomain(req: BackupRequest): Promise<void> {
  const acts = proxyActivities<HostActivities>({ taskQueue: hostTaskQueue(req.host), startToCloseTimeout: '5m' });
  await acts.prepareStaging({ backupId: req.backupId, domain: req.domain, targets: req.targets });
  await acts.inspectDomain({ domain: req.domain });
}

/** A deliberately changed recoverHost: it removes staging directories before it recovers overlays. */
export async function recoverHost(input: { host: string; domain?: string }): Promise<unknown[]> {
  const acts = proxyActivities<HostActivities>({ taskQueue: hostTaskQueue(input.host), startToCloseTimeout: '5m' });
  const staging = await acts.removeDeadStaging({ domain: input.domain });
  return [...(await acts.recoverOverlays({ domain: input.domain })), ...staging];
}

/** A deliberately changed scheduledBackups: it waits a second before it resolves its group. */
export async function scheduledBackups(): Promise<unknown> {
  await sleep('1s');
  return {};
}
