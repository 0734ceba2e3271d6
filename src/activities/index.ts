/** All host activities, built over injected ports (samples-typescript activities-dependency-injection). */
import { fileURLToPath } from 'node:url';
import { Context } from '@temporalio/activity';
import { withDeadline } from '../hypervisor/deadline';
import type { Hypervisor } from '../hypervisor/port';
import type { HostActivities, InstantActivities } from '../shared/activities';
import { defaultTargetUrl } from '../storage/registry';
import type { ScheduleActivities } from '../shared/schedule';
import type { ChunkGcActivities } from '../shared/chunk-gc';
import { ErrorType } from '../shared/errors';
import type { BackupStates } from './backup-states';
import { createChainActivities } from './chain';
import { createChunkGcActivities } from './chunk-gc';
import { createChunkRepositoryActivities } from './chunk-repository';
import type { StoreProgressReporter } from './chunk-repository';
import { createDeadStagingActivities } from './dead-staging';
import { permanent } from './failures';
import { HostPaths } from './host-paths';
import { createImageActivities } from './images';
import { createInstantActivities } from './instant';
import { createNotifyActivities } from './notify';
import { createPullActivities } from './pull';
import { createPushActivities } from './push';
import { createScheduleActivities } from './schedule';
import type { RunningBackupOf } from './schedule';
import { createSnapshotActivities } from './snapshot';
import { createStorageActivities } from './storage';
import type { StorageActivityDeps } from './storage';
import { uploadSlots } from './upload-slots';
import { createVmFileActivities } from './vm-files';

export interface ActivityDeps {
  hypervisor: Hypervisor;
  stateDir: string;
  /** a state dir QEMU can reach, for files QEMU opens itself (snapshot overlays); default stateDir */
  qemuStateDir?: string;
  /** where QEMU-written staging files go when the state dir is private (default /var/lib/vmbackup) */
  systemQemuDir?: string;
  pollIntervalMs?: number;
  openTarget: StorageActivityDeps['openTarget'];
  manifestKey?: Buffer;
  /**
   * Whether a backup's workflow still runs: recovery asks before it undoes what a backup left. Without it
   * (tests that do not recover) the recovery activities refuse to act.
   */
  backupStates?: BackupStates;
  /** where staging directories of dead backups are looked for; default HostPaths.recoveryStagingRoots */
  stagingRoots?: string[];
  /** values no webhook event may contain (the worker's storage secret key, its Temporal API key) */
  secrets?: string[];
  /** webhook URL prefixes the notify activity POSTs to (`--allow-notify`); undefined: any http(s) URL */
  allowNotify?: readonly string[];
  /** target URL prefixes this worker ships to (`--allow-target`); undefined: every target */
  allowTargets?: readonly string[];
  /** whether a backup of a domain runs: retention after a scheduled backup waits while one does */
  runningBackupOf?: RunningBackupOf;
  /** uploads this worker runs at once to one target (`--max-concurrent-uploads`); undefined: no cap */
  maxConcurrentUploads?: number;
  /**
   * the chunk repositories' password (`vmbackup worker --password-file`, VMBACKUP_PASSWORD_FILE, VMBACKUP_PASSWORD),
   * read once by the worker at its start; never part of an activity's input
   */
  repositoryPassword?: string;
  /** pull into an image tree: bytes of a disk between two durable resume points (default 1 GiB) */
  pullWindowBytes?: number;
  /** tells a backup's workflow how far its chunk store is (the worker's Temporal client); undefined: not told */
  reportStoreProgress?: StoreProgressReporter;
}

/** Everything the host's worker runs on `vmbackup-host-<host>`: the backup steps and a scheduled run's steps. */
export type HostWorkerActivities = HostActivities & ScheduleActivities & InstantActivities & ChunkGcActivities;

export function createActivities(deps: ActivityDeps): HostWorkerActivities {
  const backupStates = deps.backupStates ?? cannotTellBackupStates;
  // One view of this host's roots and allowed targets for every activity: none trusts a path or target it is given.
  // one set of upload places per target for every step that writes a backup's data to a target
  const uploads = deps.maxConcurrentUploads ? uploadSlots(deps.maxConcurrentUploads) : undefined;
  const paths = new HostPaths({
    stateDir: deps.stateDir,
    qemuStateDir: deps.qemuStateDir,
    systemQemuDir: deps.systemQemuDir,
    allowTargets: deps.allowTargets,
  });
  return withAttemptDeadlines({
    ...createPushActivities({ ...deps, paths }),
    ...createImageActivities({ ...deps, paths }),
    ...createSnapshotActivities({
      ...deps,
      backupStates,
      stateDir: deps.qemuStateDir ?? deps.stateDir,
      hostPaths: paths,
    }),
    ...createStorageActivities({
      openTarget: deps.openTarget,
      manifestKey: deps.manifestKey,
      paths,
      ...(uploads ? { uploads } : {}),
    }),
    ...createChunkGcActivities({
      openTarget: deps.openTarget,
      paths,
      ...(deps.repositoryPassword !== undefined ? { repositoryPassword: deps.repositoryPassword } : {}),
    }),
    ...createChunkRepositoryActivities({
      openTarget: deps.openTarget,
      hypervisor: deps.hypervisor,
      manifestKey: deps.manifestKey,
      paths,
      ...(deps.repositoryPassword !== undefined ? { repositoryPassword: deps.repositoryPassword } : {}),
      ...(deps.reportStoreProgress ? { reportProgress: deps.reportStoreProgress } : {}),
      ...(uploads ? { uploads } : {}),
    }),
    ...createPullActivities({
      hypervisor: deps.hypervisor,
      openTarget: deps.openTarget,
      paths,
      ...(deps.pullWindowBytes ? { pullWindowBytes: deps.pullWindowBytes } : {}),
      ...(deps.repositoryPassword !== undefined ? { repositoryPassword: deps.repositoryPassword } : {}),
      ...(deps.reportStoreProgress ? { reportProgress: deps.reportStoreProgress } : {}),
      ...(uploads ? { uploads } : {}),
    }),
    ...createVmFileActivities({ hypervisor: deps.hypervisor, openTarget: deps.openTarget, paths }),
    ...createChainActivities({
      hypervisor: deps.hypervisor,
      openTarget: deps.openTarget,
      manifestKey: deps.manifestKey,
      paths,
    }),
    ...createDeadStagingActivities({
      stagingRoots: deps.stagingRoots ?? paths.recoveryStagingRoots(fileURLToPath(defaultTargetUrl(deps.stateDir))),
      backupStates,
      hypervisor: deps.hypervisor,
    }),
    ...createScheduleActivities({
      hypervisor: deps.hypervisor,
      openTarget: deps.openTarget,
      manifestKey: deps.manifestKey,
      runningBackupOf: deps.runningBackupOf,
      paths,
    }),
    ...createInstantActivities({
      hypervisor: deps.hypervisor,
      stateDir: deps.stateDir,
      paths,
      ...(deps.pollIntervalMs !== undefined ? { pollIntervalMs: deps.pollIntervalMs } : {}),
    }),
    ...createNotifyActivities({
      secrets: deps.secrets ?? [],
      ...(deps.allowNotify ? { allowUrls: deps.allowNotify } : {}),
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
    const run = KEEPALIVE_STEPS.has(name) ? (input: unknown) => keptAlive(() => fn(input)) : fn;
    wrapped[name] = (input: unknown) => {
      const timeout = Context.current().info.startToCloseTimeoutMs;
      if (!(timeout > 0)) return run(input);
      return withDeadline(Date.now() + timeout - attemptMarginMs(timeout), () => run(input));
    };
  }
  return wrapped as unknown as A;
}

/**
 * The workflow's short steps (a few seconds, at most minutes, no progress of their own to report): the worker
 * heartbeats for them while they run. With a heartbeat timeout on them, a worker that dies in one is noticed within
 * that timeout and the step is retried, rather than after its start-to-close timeout (5 minutes). Only steps that
 * never heartbeat details belong here: a heartbeat without details replaces the last one's.
 */
export const KEEPALIVE_STEPS: ReadonlySet<string> = new Set([
  'planBackup',
  'abortPushBackup',
  'endPullBackup',
  'shipVmFiles',
  'completeInstantFinish',
]);

/** Runs `fn`, heartbeating (without details) three times per heartbeat timeout while it runs; local activities cannot. */
export async function keptAlive<T>(fn: () => Promise<T>): Promise<T> {
  const ctx = Context.current();
  const every = ctx.info.heartbeatTimeoutMs;
  if (ctx.info.isLocal || !every || !(every > 0)) return fn();
  const beat = setInterval(() => ctx.heartbeat(), Math.max(200, Math.floor(every / 3)));
  try {
    return await fn();
  } finally {
    clearInterval(beat);
  }
}
