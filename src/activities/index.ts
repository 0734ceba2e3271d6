/** All host activities, built over injected ports (samples-typescript activities-dependency-injection). */
import { Context } from '@temporalio/activity';
import { withDeadline } from '../hypervisor/deadline';
import type { Hypervisor } from '../hypervisor/port';
import type { HostActivities } from '../shared/activities';
import type { ScheduleActivities } from '../shared/schedule';
import { ErrorType } from '../shared/errors';
import type { BackupStates } from './backup-states';
import { createChainActivities } from './chain';
import { createDeadStagingActivities, hostStagingRoots } from './dead-staging';
import { permanent } from './failures';
import { createImageActivities } from './images';
import { createPushActivities } from './push';
import { createScheduleActivities } from './schedule';
import type { RunningBackupOf } from './schedule';
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
  /**
   * Whether a backup's workflow still runs: recovery asks before it undoes what a backup left. Without it
   * (tests that do not recover) the recovery activities refuse to act.
   */
  backupStates?: BackupStates;
  /** where staging directories of dead backups are looked for; default hostStagingRoots(stateDir) */
  stagingRoots?: string[];
  /** whether a backup of a domain runs: retention after a scheduled backup waits while one does */
  runningBackupOf?: RunningBackupOf;
}

/** Everything the host's worker runs on `vmbackup-host-<host>`: the backup steps and a scheduled run's steps. */
export type HostWorkerActivities = HostActivities & ScheduleActivities;

export function createActivities(deps: ActivityDeps): HostWorkerActivities {
  const backupStates = deps.backupStates ?? cannotTellBackupStates;
  return withAttemptDeadlines({
    ...createPushActivities(deps),
    ...createImageActivities(deps),
    ...createSnapshotActivities({ ...deps, backupStates, stateDir: deps.qemuStateDir ?? deps.stateDir }),
    ...createStorageActivities({ openTarget: deps.openTarget, manifestKey: deps.manifestKey }),
    ...createChainActivities({
      hypervisor: deps.hypervisor,
      openTarget: deps.openTarget,
      manifestKey: deps.manifestKey,
    }),
    ...createDeadStagingActivities({
      stagingRoots: deps.stagingRoots ?? hostStagingRoots(deps.stateDir),
      backupStates,
    }),
    ...createScheduleActivities({
      hypervisor: deps.hypervisor,
      openTarget: deps.openTarget,
      manifestKey: deps.manifestKey,
      runningBackupOf: deps.runningBackupOf,
    }),
  } satisfies HostWorkerActivities);
}

function cannotTellBackupStates(): never {
  throw permanent(
    'this worker cannot ask Temporal whether a backup still runs (built without backupStates): recovery touched nothing',
    ErrorType.InvalidInput,
  );
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
export function withAttemptDeadlines<A extends object>(activities: A): A {
  const wrapped: Record<string, (input: unknown) => Promise<unknown>> = {};
  for (const [name, fn] of Object.entries(activities) as Array<[string, (input: unknown) => Promise<unknown>]>) {
    wrapped[name] = (input: unknown) => {
      const timeout = Context.current().info.startToCloseTimeoutMs;
      if (!(timeout > 0)) return fn(input);
      return withDeadline(Date.now() + timeout - attemptMarginMs(timeout), () => fn(input));
    };
  }
  return wrapped as unknown as A;
}
