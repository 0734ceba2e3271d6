/**
 * backupDomain: one full backup of one VM, as a durable sequence of idempotent activities.
 *
 * Every step runs on the VM's host task queue and is recorded in the workflow history, so
 * after a worker, host, libvirtd or Temporal restart the backup resumes at the step it was
 * in. Undo steps (abort the push job, commit and pivot the overlays, remove the staging
 * files) are registered right after the step that needs them and run in a non-cancellable
 * scope, so a cancel or a failure never leaves the VM on an overlay or a job running.
 */
import {
  ApplicationFailure,
  CancellationScope,
  isCancellation,
  log,
  patched,
  proxyActivities,
  proxyLocalActivities,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
import type { ActivityOptions } from '@temporalio/workflow';
import type { HostActivities, ImageFile, OverlayRecord, StagingArea } from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { hostTaskQueue } from '../shared/names';
import { progressQuery } from '../shared/queries';
import { StateKey, MethodKey } from '../shared/search';
import type {
  BackupMethod,
  BackupPhase,
  BackupProgress,
  BackupRequest,
  BackupResult,
  DiskImage,
  DomainInfo,
  TargetResult,
} from '../shared/types';

type ActivityProxy = ReturnType<typeof proxyActivities<HostActivities>>;

/** Failures no retry can fix. Storage/hypervisor "unreachable" stays retryable. */
const PERMANENT: string[] = Object.values(ErrorType).filter(
  (t) => t !== ErrorType.Unreachable && t !== ErrorType.HypervisorUnreachable,
);

function activities(host: string, heartbeatTimeoutSec: number) {
  const base: ActivityOptions = {
    taskQueue: hostTaskQueue(host),
    retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '20s', nonRetryableErrorTypes: PERMANENT },
  };
  // Short steps give up after ~30 s of a transient failure (libvirt unreachable) so the user gets an answer;
  // long steps keep retrying: a libvirtd restart or a flaky network must not lose an hour-long copy.
  const short = proxyActivities<HostActivities>({
    ...base,
    startToCloseTimeout: '5m',
    retry: { ...base.retry, maximumAttempts: 6 },
  });
  // Long steps heartbeat: a dead worker is noticed after heartbeatTimeout and the step is retried elsewhere
  // (on this host's queue) from its last heartbeat.
  const long = proxyActivities<HostActivities>({
    ...base,
    startToCloseTimeout: '24h',
    heartbeatTimeout: `${heartbeatTimeoutSec}s`,
  });
  // Overlay creation and removal are quick and do not heartbeat: a dead worker is noticed after a minute.
  const overlaySteps = proxyActivities<HostActivities>({
    ...base,
    startToCloseTimeout: '1m',
    retry: { ...base.retry, maximumAttempts: 10 },
  });
  // The same short steps as local activities: they run inside the workflow task on the worker that runs the
  // workflow (always this host's: the workflow is on the host's queue), with no task round trip through the
  // server. A crash re-runs them when the workflow task is retried; each of them is idempotent.
  const local = proxyLocalActivities<HostActivities>({
    startToCloseTimeout: '2m',
    localRetryThreshold: '10s',
    retry: { ...base.retry, maximumAttempts: 6 },
  });
  const localOverlaySteps = proxyLocalActivities<HostActivities>({
    startToCloseTimeout: '1m',
    localRetryThreshold: '10s',
    retry: { ...base.retry, maximumAttempts: 10 },
  });
  return { short, long, overlaySteps, local, localOverlaySteps };
}

/**
 * Backups started before this change ran inspectDomain, prepareStaging, beginPushBackup, createOverlays,
 * removeOverlays, writeManifest and cleanupStaging as regular activities; their histories must replay with the
 * same commands.
 */
export const SHORT_STEPS_LOCAL_PATCH = 'short-steps-as-local-activities';

export async function backupDomain(req: BackupRequest): Promise<BackupResult> {
  const { backupId, domain, host } = req;
  const acts = activities(host, req.options.heartbeatTimeoutSeconds ?? 30);
  const { short, long } = acts;
  // Decided once per backup and recorded in its history (a marker): every quick step below uses it.
  const localSteps = patched(SHORT_STEPS_LOCAL_PATCH);
  const quick = localSteps ? acts.local : short;
  const overlaySteps = localSteps ? acts.localOverlaySteps : acts.overlaySteps;
  const removeUnknownOverlays = localSteps ? acts.localOverlaySteps : short;
  const startedAt = workflowInfo().startTime.toISOString();

  const progress: BackupProgress = {
    backupId,
    domain,
    host,
    phase: 'starting',
    bytesDone: 0,
    bytesTotal: 0,
    targets: Object.fromEntries(
      req.targets.map((t) => [t, { bytesDone: 0, bytesTotal: 0, state: 'pending' as const }]),
    ),
  };
  setHandler(progressQuery, () => progress);
  const phase = (p: BackupPhase) => {
    progress.phase = p;
    upsertSearchAttributes([{ key: StateKey, value: p }]);
  };

  phase('inspecting');
  const info = await quick.inspectDomain({ domain, includeAllDisks: req.options.includeAllDisks });
  const method = chooseMethod(req, info);
  progress.method = method;
  progress.bytesTotal = info.disks.reduce((n, d) => n + d.virtualSize, 0);
  upsertSearchAttributes([{ key: MethodKey, value: method }]);
  log.info('backup planned', { backupId, domain, method, disks: info.disks.map((d) => d.name) });

  const staging = await quick.prepareStaging({
    backupId,
    domain,
    targets: req.targets,
    writtenByQemu: method === 'push',
  });
  // Undo steps, newest first; run on failure or cancel in a non-cancellable scope.
  const compensations: Array<() => Promise<void>> = [() => quick.cleanupStaging({ backupId, stagingDir: staging.dir })];

  let images: DiskImage[];
  let quiesced = false;
  try {
    let files: ImageFile[];
    if (method === 'push') {
      phase('backing-up');
      const job = await quick.beginPushBackup({ backupId, domain, disks: info.disks, stagingDir: staging.dir });
      const jobInput = { backupId, domain, images: job.images };
      compensations.unshift(() => short.abortPushBackup(jobInput));
      const stats = await long.awaitBackupJob(jobInput);
      compensations.shift();
      progress.bytesDone = stats.bytes;
      files = job.images;
    } else if (method === 'offline') {
      phase('copying');
      files = await long.copyOfflineDisks({ backupId, domain, disks: info.disks, stagingDir: staging.dir });
    } else {
      phase('creating-overlays');
      // Registered before the step: a createOverlays that fails after libvirt made the snapshot must still be
      // undone. commitAndPivot finds this backup's overlays on the domain itself when given none.
      const undoUnknown = async () => {
        await long.commitAndPivot({ backupId, domain, overlays: [] });
        await removeUnknownOverlays.removeOverlays({ backupId, domain, overlays: [] });
      };
      compensations.unshift(undoUnknown);
      const created = await overlaySteps.createOverlays({
        backupId,
        domain,
        disks: info.disks,
        quiesce: req.options.quiesce ?? false,
        requireQuiesce: req.options.requireQuiesce ?? false,
      });
      quiesced = created.quiesced;
      const overlays: OverlayRecord[] = created.overlays;
      const undoOverlays = async () => {
        await long.commitAndPivot({ backupId, domain, overlays });
        await overlaySteps.removeOverlays({ backupId, domain, overlays });
      };
      compensations[0] = undoOverlays;
      phase('copying');
      files = await long.copyBaseImages({
        backupId,
        domain,
        overlays,
        stagingDir: staging.dir,
        copyTool: req.options.copyTool ?? 'auto',
      });
      phase('committing');
      // The saga step itself: from here on the VM is put back on its base whatever happens.
      compensations.shift();
      await CancellationScope.nonCancellable(undoOverlays);
    }
    phase('finalizing');
    images = await long.finalizeImages({ backupId, images: files });
  } catch (err) {
    await runCompensations(compensations);
    progress.error = errorMessage(err);
    upsertSearchAttributes([{ key: StateKey, value: isCancellation(err) ? 'cancelled' : 'failed' }]);
    throw err;
  }

  phase('uploading');
  const targets = await shipToTargets(req, { long, quick }, staging, images, progress, {
    method,
    startedAt,
    quiesced,
    info,
  });

  phase('cleaning-up');
  await CancellationScope.nonCancellable(() => quick.cleanupStaging({ backupId, stagingDir: staging.dir }));

  const okTargets = targets.filter((t) => t.ok);
  const first = okTargets[0];
  const result: BackupResult = {
    backupId,
    domain,
    host,
    method,
    status: okTargets.length === targets.length ? 'completed' : 'partial',
    startedAt,
    finishedAt: new Date().toISOString(),
    quiesced,
    libvirtVersion: info.libvirtVersion,
    qemuVersion: info.qemuVersion,
    disks: images.map((img) => ({
      name: img.name,
      format: img.format,
      virtualSize: img.virtualSize,
      size: img.size,
      sha256: img.sha256,
      location: first?.locations?.[img.name] ?? '',
    })),
    skipped: info.skipped,
    targets,
  };
  if (!first) {
    progress.error = targets.map((t) => t.error).join('; ');
    upsertSearchAttributes([{ key: StateKey, value: 'failed' }]);
    throw ApplicationFailure.create({
      message: `backup ${backupId} of ${domain} reached no target: ${progress.error}`,
      type: 'NoTargetSucceeded',
      nonRetryable: true,
      details: [result],
    });
  }
  phase('done');
  upsertSearchAttributes([{ key: StateKey, value: result.status }]);
  return result;
}

function chooseMethod(req: BackupRequest, info: DomainInfo): BackupMethod {
  if (info.disks.length === 0) {
    throw ApplicationFailure.nonRetryable(
      `${req.domain} has no disk to back up (skipped: ${info.skipped.map((s) => `${s.name}: ${s.reason}`).join(', ') || 'none'})`,
      ErrorType.UnsupportedDisk,
    );
  }
  // A shut-off domain has no QEMU process: no backup job and no snapshot, copy the files directly.
  if (info.state === 'shut off') return 'offline';
  if (req.method === 'snapshot') return 'snapshot';
  if (req.method === 'push') {
    if (!info.backupApi) {
      throw ApplicationFailure.nonRetryable(
        `push mode needs libvirt >= 7.2 and QEMU >= 4.2, ${req.host} has libvirt ${info.libvirtVersion} and QEMU ${info.qemuVersion}: use --method snapshot`,
        ErrorType.BackupApiUnavailable,
      );
    }
    return 'push';
  }
  return info.backupApi ? 'push' : 'snapshot';
}

async function shipToTargets(
  req: BackupRequest,
  acts: { long: ActivityProxy; quick: ActivityProxy },
  staging: StagingArea,
  images: DiskImage[],
  progress: BackupProgress,
  meta: { method: BackupMethod; startedAt: string; quiesced: boolean; info: DomainInfo },
): Promise<TargetResult[]> {
  const { backupId, domain, host } = req;
  const total = images.reduce((n, i) => n + i.size, 0);
  // The target whose filesystem holds the staging dir takes the images by rename; it goes last so the
  // other targets can still read the staged files.
  const order = [...req.targets].sort((a, b) => Number(a === staging.localTarget) - Number(b === staging.localTarget));
  const results = new Map<string, TargetResult>();
  const shipOne = async (target: string): Promise<void> => {
    const state = progress.targets[target] ?? { bytesDone: 0, bytesTotal: total, state: 'pending' as const };
    progress.targets[target] = state;
    state.bytesTotal = total;
    state.state = 'uploading';
    try {
      const locations: Record<string, string> = {};
      const disks = [];
      for (const disk of images) {
        const shipped = await acts.long.shipImage({
          backupId,
          domain,
          target,
          disk,
          allowMove: target === staging.localTarget,
          s3Options: req.options.s3,
        });
        locations[disk.name] = `${target.replace(/\/+$/, '')}/${shipped.key}`;
        state.bytesDone += shipped.size;
        disks.push({ ...disk, size: shipped.size, key: shipped.key });
      }
      await acts.quick.writeManifest({
        target,
        manifest: {
          backupId,
          domain,
          host,
          method: meta.method,
          startedAt: meta.startedAt,
          finishedAt: new Date().toISOString(),
          quiesced: meta.quiesced,
          libvirtVersion: meta.info.libvirtVersion,
          qemuVersion: meta.info.qemuVersion,
          disks: disks.map((d) => ({
            name: d.name,
            format: d.format,
            virtualSize: d.virtualSize,
            size: d.size,
            sha256: d.sha256,
            key: d.key,
          })),
        },
      });
      state.state = 'done';
      results.set(target, { target, ok: true, locations });
    } catch (err) {
      if (isCancellation(err)) throw err;
      state.state = 'failed';
      results.set(target, { target, ok: false, error: errorMessage(err) });
      // Never leave a half backup on a target: no manifest was written, remove what was uploaded.
      await CancellationScope.nonCancellable(() =>
        acts.quick.deleteBackupObjects({ target, domain, backupId }).catch((e: unknown) => {
          log.warn('could not remove partial upload', { target, error: errorMessage(e) });
        }),
      );
    }
  };
  // Remote targets in parallel, each retried independently; the rename target after them.
  const remote = order.filter((t) => t !== staging.localTarget);
  await Promise.all(remote.map(shipOne));
  if (staging.localTarget && req.targets.includes(staging.localTarget)) await shipOne(staging.localTarget);
  return req.targets.map((t) => results.get(t) ?? { target: t, ok: false, error: 'not attempted' });
}

async function runCompensations(compensations: Array<() => Promise<void>>): Promise<void> {
  await CancellationScope.nonCancellable(async () => {
    for (const undo of compensations) {
      try {
        await undo();
      } catch (err) {
        log.error('undo step failed', { error: errorMessage(err) });
      }
    }
  });
}

function errorMessage(err: unknown): string {
  if (err instanceof Error) {
    const cause = (err as { cause?: unknown }).cause;
    if (cause instanceof Error && cause.message) return cause.message;
    return err.message;
  }
  return String(err);
}
