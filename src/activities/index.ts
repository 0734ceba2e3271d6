/** All host activities, built over injected ports (samples-typescript activities-dependency-injection). */
import { Context } from '@temporalio/activity';
import { withDeadline } from '../hypervisor/deadline';
import type { Hypervisor } from '../hypervisor/port';
import type { HostActivities } from '../shared/activities';
import { createChainActivities } from './chain';
import { createImageActivities } from './images';
import { createPushActivities } from './push';
import { createSnapshotActivities } from './snapshot';
import { createStorageActivities } from './storage';
import type { StorageActivityDeps } from './storage';

export interface ActivityDeps {
  hypervisor: Hypervisor;
  stateDir: string;
  /** a state dir QEMU can reach, for files QEMU opens itself (snapshot overlays); default stateDir */
  qemuStateDir?: string;
  pollIntervalMs?: number;
  openTarget: StorageActivityDeps['openTarget'];
  manifestKey?: Buffer;
}

export function createActivities(deps: ActivityDeps): HostActivities {
  return withAttemptDeadlines({
    ...createPushActivities(deps),
    ...createImageActivities(deps),
    ...createSnapshotActivities({ ...deps, stateDir: deps.qemuStateDir ?? deps.stateDir }),
    ...createStorageActivities({ openTarget: deps.openTarget, manifestKey: deps.manifestKey }),
    ...createChainActivities({
      hypervisor: deps.hypervisor,
      openTarget: deps.openTarget,
      manifestKey: deps.manifestKey,
    }),
  } satisfies HostActivities);
}

/** Room left between the last child process of an attempt and Temporal's timeout of that attempt. */
export function attemptMarginMs(startToCloseMs: number): number {
  return Math.min(5_000, Math.floor(startToCloseMs / 10));
}

/**
 * Each attempt runs inside a deadline a margin before its start-to-close timeout: every virsh and qemu-img call it
 * makes is cut to what is left (src/hypervisor/deadline.ts), so Temporal never retries a step while a child of the
 * previous attempt still works on the same domain.
 */
export function withAttemptDeadlines(activities: HostActivities): HostActivities {
  const wrapped: Record<string, (input: unknown) => Promise<unknown>> = {};
  for (const [name, fn] of Object.entries(activities) as Array<[string, (input: unknown) => Promise<unknown>]>) {
    wrapped[name] = (input: unknown) => {
      const timeout = Context.current().info.startToCloseTimeoutMs;
      if (!(timeout > 0)) return fn(input);
      return withDeadline(Date.now() + timeout - attemptMarginMs(timeout), () => fn(input));
    };
  }
  return wrapped as unknown as HostActivities;
}
