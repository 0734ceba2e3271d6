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
  ActivityCancellationType,
  ApplicationFailure,
  CancellationScope,
  condition,
  isCancellation,
  log,
  patched,
  proxyActivities,
  proxyLocalActivities,
  proxySinks,
  setHandler,
  upsertSearchAttributes,
  uuid4,
  workflowInfo,
} from '@temporalio/workflow';
import type { ActivityOptions } from '@temporalio/workflow';
import type {
  AwaitBackupJobInput,
  BackupPlan,
  HostActivities,
  ImageFile,
  ManifestInput,
  OverlayRecord,
  PulledTarget,
  PulledTreeDisk,
  StagingArea,
  VmCapture,
} from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { NOTIFY_PATCH } from '../shared/events';
import { lockedRequest } from '../shared/object-lock';
import type { BackupEvent, BackupOutcomeResult, VmbackupSinks } from '../shared/events';
import {
  BACKUP_ID_RE,
  DEFAULT_MAX_CHAIN,
  DOMAIN_NAME_RE,
  HOST_NAME_RE,
  MAX_HEARTBEAT_SECONDS,
  MIN_HEARTBEAT_SECONDS,
  hostSlotTaskQueue,
  hostTaskQueue,
  pushImageFiles,
} from '../shared/names';
import { progressQuery, slotGrantedSignal, storeProgressSignal } from '../shared/queries';
import type { SlotActivities } from '../shared/schedule';
import { StateKey, MethodKey } from '../shared/search';
import type {
  BackupChainInfo,
  BackupLevel,
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

/**
 * Before HARDENED_SAGA_PATCH the workflow also listed every error type but the two `Unreachable` ones as
 * non-retryable, which overrode the activities' own decision (a transient S3 5xx, `StorageFailed`, was never
 * retried). Histories recorded then keep that policy; new backups let the activity layer alone decide
 * (src/activities/failures.ts and toActivityFailure mark permanent failures non-retryable).
 */
const LEGACY_PERMANENT: string[] = Object.values(ErrorType).filter(
  (t) => t !== ErrorType.Unreachable && t !== ErrorType.HypervisorUnreachable,
);

/**
 * Every retry loop is capped: a failure that keeps coming back (a guest-made image that qemu-img refuses, a target
 * that keeps answering 500) must end the backup with its sentence, not block the VM's next backup forever. Long
 * steps resume from their heartbeat, so 25 attempts with backoff up to a minute ride out ~20 minutes of libvirtd
 * restarts, worker crashes or a flaky network.
 */
const LONG_STEP_ATTEMPTS = 25;

function activities(host: string, heartbeatTimeoutSec: number, legacyRetries: boolean) {
  const base: ActivityOptions = {
    taskQueue: hostTaskQueue(host),
    retry: legacyRetries
      ? {
          initialInterval: '1s',
          backoffCoefficient: 2,
          maximumInterval: '20s',
          nonRetryableErrorTypes: LEGACY_PERMANENT,
        }
      : { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '20s' },
  };
  // Short steps give up after ~30 s of a transient failure (libvirt unreachable) so the user gets an answer;
  // long steps keep retrying: a libvirtd restart or a flaky network must not lose an hour-long copy.
  // Each short step heartbeats while it runs (the worker does it for them: KEEPALIVE_STEPS in
  // src/activities/index.ts), so a worker that dies in one is noticed after the heartbeat timeout, not after the
  // step's 5 minutes. Options are not part of a history's determinism: older histories replay unchanged.
  const short = proxyActivities<HostActivities>({
    ...base,
    startToCloseTimeout: '5m',
    heartbeatTimeout: `${heartbeatTimeoutSec}s`,
    retry: { ...base.retry, maximumAttempts: 6 },
  });
  // Before SHORT_STEPS_LOCAL_PATCH the quick steps ran as these regular activities, which do not heartbeat.
  const legacyQuick = proxyActivities<HostActivities>({
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
    retry: legacyRetries ? base.retry : { ...base.retry, maximumInterval: '60s', maximumAttempts: LONG_STEP_ATTEMPTS },
  });
  // Overlay creation and removal are quick and do not heartbeat: a dead worker is noticed after the timeout. The
  // activities keep every virsh call inside it (src/activities/deadline.ts): a retry never starts while the first
  // attempt's virsh still runs.
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
  return { short, legacyQuick, long, overlaySteps, local, localOverlaySteps };
}

/**
 * Backups started before this change ran inspectDomain, prepareStaging, beginPushBackup, createOverlays,
 * removeOverlays, writeManifest and cleanupStaging as regular activities; their histories must replay with the
 * same commands.
 */
export const SHORT_STEPS_LOCAL_PATCH = 'short-steps-as-local-activities';

/**
 * Backups started before this change: the push-job abort was registered only after `beginPushBackup` returned,
 * shipping and staging cleanup ran outside the saga (a cancel while uploading left staging images on the host and
 * manifest-less images on the targets), and the workflow's own list of non-retryable types applied.
 */
export const HARDENED_SAGA_PATCH = 'saga-covers-every-phase';

/**
 * Backups started before this change were always full and created no checkpoint: no planBackup, no
 * prepareChainImages, no checkpoint steps, manifests without a chain.
 */
export const INCREMENTAL_PATCH = 'incremental-chains';

/**
 * Backups started before this change did not wait for one of their host's backup slots (`vmbackup worker
 * --max-concurrent-backups`): no holdBackupSlot activity, no `queued` phase.
 */
export const HOST_SLOT_PATCH = 'host-backup-slots';

/**
 * Backups started before this change stored the disk images only: no captureVmState at the backup point, no
 * shipVmFiles, manifests without `vm` (the domain XML, NVRAM and TPM state).
 */
export const WHOLE_VM_PATCH = 'whole-vm-files';

/**
 * Offline backups into chunk repositories started before this change copied the disks into staging
 * (copyOfflineDisks), finalized the copies and stored them (storeChunkImages); since, each target reads the shut-off
 * domain's own disks (storeOfflineDisks): no copy, no finalizeImages.
 */
export const OFFLINE_DIRECT_PATCH = 'offline-chunks-read-in-place';

/**
 * Pull mode (issue #16): QEMU exports the disks over NBD and the worker reads them straight into chunk repositories.
 * Only requests with `method: 'pull'` take this branch; no history recorded before it has one.
 */
export const PULL_PATCH = 'pull-mode';

/**
 * `--method auto` into chunk repositories (the pull bench, docs/benchmarks.md "Pull mode"): a running domain whose host
 * has the backup API is read in pull mode there (the planned push is planned again as pull). Backups started before
 * this change took push mode into chunk repositories; image trees still take push either way.
 */
export const AUTO_PULL_PATCH = 'auto-pull-into-chunk-repositories';

/**
 * Pull mode into local image trees (issue #16): before it, a pull backup to an image-tree target was refused in the
 * workflow (pullWriter); since, the disks are written as qcow2 images in the tree (pullIntoImageTrees).
 */
export const PULL_IMAGE_TREE_PATCH = 'pull-image-tree';

/**
 * A pull job that did not end (endPullBackup failed on its last attempt, e.g. the job was still running after each
 * domjobabort) may still have QEMU writing into its scratch files in staging: since this change the backup's staging
 * directory is kept then, for `vmbackup recover` to end the job and remove it, and the backup's checkpoint is not
 * deleted under the job (the next backup retires it). Before, both were removed anyway.
 */
export const PULL_JOB_LEFT_RUNNING_PATCH = 'pull-job-left-running-keeps-staging';

export async function backupDomain(request: BackupRequest): Promise<BackupResult> {
  validateRequest(request);
  // S3 Object Lock: every object of this backup is retained until its start (the manifest's startedAt) + days
  const req = lockedRequest(request, workflowInfo().startTime.toISOString());
  const seen: BackupSeen = {};
  try {
    const result = await backupSteps(req, seen);
    await backupEnded(req, seen, result, undefined);
    return result;
  } catch (err) {
    // a backup that failed or was cancelled while waiting for its slot ends here too (counted, notified)
    await backupEnded(req, seen, undefined, err);
    throw err;
  }
}

/**
 * The backup itself: wait for one of the host's backup slots, back up, release the slot. Whatever backupEnded does
 * afterwards (a webhook's retries) runs after the slot is released, so it never holds one.
 */
async function backupSteps(req: BackupRequest, seen: BackupSeen): Promise<BackupResult> {
  const hardened = patched(HARDENED_SAGA_PATCH);
  const localSteps = patched(SHORT_STEPS_LOCAL_PATCH);
  const { progress, phase } = trackProgress(req);
  if (!patched(HOST_SLOT_PATCH)) return backUp(req, { hardened, localSteps, progress, phase }, seen);
  const slot = await acquireSlot(req, phase);
  try {
    return await backUp(req, { hardened, localSteps, progress, phase }, seen);
  } finally {
    // The undo steps above ran holding the slot: they too touch libvirt and the disks.
    slot.release();
  }
}

/**
 * Waits for one of the host's backup slots: schedules holdBackupSlot on the host's slot queue, where it waits (the
 * task queue is the queue) until the host's worker has a slot free and runs it; the activity then signals back.
 * The slot is released by cancelling that activity: in a scope of its own, shielded from the backup's own
 * cancellation, so a cancelled backup keeps its slot while its undo steps run.
 */
async function acquireSlot(req: BackupRequest, phase: (p: BackupPhase) => void): Promise<{ release(): void }> {
  phase('queued');
  const token = uuid4();
  let granted = false;
  setHandler(slotGrantedSignal, (t: string) => {
    if (t === token) granted = true;
  });
  const { holdBackupSlot } = proxyActivities<SlotActivities>({
    taskQueue: hostSlotTaskQueue(req.host),
    // a slot is held for the whole backup; a dead worker's slot is freed by the heartbeat timeout
    startToCloseTimeout: '30d',
    heartbeatTimeout: '30s',
    // a release must not wait for the activity to acknowledge: the backup is done
    cancellationType: ActivityCancellationType.TRY_CANCEL,
    // An attempt is retried only once it ran (a worker that died holding the slot, a signal that failed); the
    // time spent waiting in the queue is no attempt. Capped like every retry loop: a slot that keeps failing
    // before it was granted ends the backup with its sentence; once granted, the backup goes on without it.
    retry: {
      initialInterval: '1s',
      backoffCoefficient: 2,
      maximumInterval: '10s',
      maximumAttempts: LONG_STEP_ATTEMPTS,
    },
  });
  let scope: CancellationScope | undefined;
  let ended: unknown;
  let endedEarly = false;
  void CancellationScope.nonCancellable(() => {
    scope = new CancellationScope();
    return scope.run(() => holdBackupSlot({ backupId: req.backupId, token }));
  }).then(
    () => (endedEarly = true),
    (err: unknown) => {
      endedEarly = true;
      ended = err;
    },
  );
  const release = () => scope?.cancel();
  try {
    await condition(() => granted || endedEarly);
  } catch (err) {
    // cancelled while queued: nothing was done yet, nothing to undo
    release();
    upsertSearchAttributes([{ key: StateKey, value: 'cancelled' }]);
    throw err;
  }
  if (!granted) {
    upsertSearchAttributes([{ key: StateKey, value: 'failed' }]);
    throw ApplicationFailure.nonRetryable(
      `backup ${req.backupId} of ${req.domain} got no backup slot on host ${req.host}: ${errorMessage(ended ?? 'the slot activity ended')}`,
      'SlotUnavailable',
    );
  }
  return { release };
}

interface BackupMarkers {
  hardened: boolean;
  localSteps: boolean;
  progress: BackupProgress;
  phase: (p: BackupPhase) => void;
}

async function backUp(req: BackupRequest, markers: BackupMarkers, seen: BackupSeen): Promise<BackupResult> {
  const { backupId, domain, host } = req;
  const { hardened, localSteps, progress, phase } = markers;
  const acts = activities(host, req.options.heartbeatTimeoutSeconds ?? 30, !hardened);
  // localSteps: decided once per backup and recorded in its history (a marker): every quick step below uses it.
  const steps: Steps = {
    short: acts.short,
    long: acts.long,
    quick: localSteps ? acts.local : acts.legacyQuick,
    overlaySteps: localSteps ? acts.localOverlaySteps : acts.overlaySteps,
    removeUnknownOverlays: localSteps ? acts.localOverlaySteps : acts.legacyQuick,
  };
  const { quick } = steps;
  const startedAt = workflowInfo().startTime.toISOString();

  phase('inspecting');
  const info = await quick.inspectDomain({ domain, includeAllDisks: req.options.includeAllDisks });
  let method = chooseMethod(req, info);
  progress.method = method;
  progress.bytesTotal = info.disks.reduce((n, d) => n + d.virtualSize, 0);
  upsertSearchAttributes([{ key: MethodKey, value: method }]);
  log.info('backup planned', { backupId, domain, method, disks: info.disks.map((d) => d.name) });

  let plan: BackupPlan | undefined;
  if (patched(INCREMENTAL_PATCH)) {
    phase('planning');
    plan = await planLevel(req, steps, method, info);
    // auto picked push (a running domain, the backup API): into chunk repositories pull mode is faster and reads only
    // the changed chunks, so it is taken there. The marker is asked only on that path: other histories replay as before.
    if (
      req.method === 'auto' &&
      method === 'push' &&
      plan.chunkRepository &&
      iothreadDisks(info).length === 0 &&
      patched(AUTO_PULL_PATCH)
    ) {
      method = 'pull';
      progress.method = method;
      upsertSearchAttributes([{ key: MethodKey, value: method }]);
      plan = await planLevel(req, steps, method, info);
      log.info('auto: pull mode into chunk repositories', { backupId, domain });
    }
    progress.level = plan.level;
    seen.level = plan.level;
    log.info('level chosen', { backupId, level: plan.level, reason: plan.reason, parent: plan.parent?.backupId });
  }

  const writer = method === 'pull' ? pullWriter(req, plan) : undefined;
  const staging = await quick.prepareStaging({
    backupId,
    domain,
    targets: req.targets,
    writtenByQemu: method === 'push' || method === 'pull',
  });
  // Undo steps, newest first; run on failure or cancel in a non-cancellable scope.
  const compensations: Array<() => Promise<void>> = [() => quick.cleanupStaging({ backupId, stagingDir: staging.dir })];
  const run: BackupRun = {
    req,
    steps,
    info,
    plan,
    staging,
    compensations,
    phase,
    hardened,
    wholeVm: patched(WHOLE_VM_PATCH),
  };

  if (writer) return pullBackup(run, progress, seen, startedAt, writer);

  let images: DiskImage[];
  let made: MadeImages;
  let readInPlace = false;
  let targets: TargetResult[] | undefined;
  const ship = () =>
    (plan?.chunkRepository ? storeInRepositories : shipToTargets)(req, steps, staging, images, run.vm, progress, {
      method,
      startedAt,
      quiesced: made.quiesced,
      info,
      chain: plan ? manifestChain(plan, made.checkpointXml) : undefined,
      backing: plan ? manifestBacking(plan) : {},
      readInPlace,
    });
  try {
    if (method === 'push') {
      made = await pushImages(run);
      progress.bytesDone = made.bytes ?? 0;
    } else if (method === 'offline' && plan?.chunkRepository && patched(OFFLINE_DIRECT_PATCH)) {
      // into chunk repositories the shut-off domain's disks are read where they are (storeOfflineDisks)
      await captureVm(run);
      readInPlace = true;
      made = { files: [], quiesced: false, bytes: progress.bytesTotal };
    } else if (method === 'offline') {
      // the domain is off: its definition, NVRAM and TPM state are what the disks are
      await captureVm(run);
      phase('copying');
      made = {
        files: await steps.long.copyOfflineDisks({ backupId, domain, disks: info.disks, stagingDir: staging.dir }),
        quiesced: false,
      };
    } else {
      made = await snapshotImages(run);
    }
    phase('finalizing');
    images = readInPlace
      ? info.disks.map((d) => ({ ...d, path: d.source, size: 0, sha256: '' }))
      : await steps.long.finalizeImages({
          backupId,
          images: made.files,
          ...(plan?.chunkRepository ? { skipFileHash: true } : {}),
        });
    seen.bytesRead = made.bytes ?? images.reduce((n, i) => n + i.size, 0);
    if (hardened) {
      phase('uploading');
      // A cancel (or any failure) while shipping removes what this backup put on its targets; a target where the
      // manifest was already written keeps its committed backup (deleteBackupObjects never removes one).
      compensations.unshift(() => removeUncommitted(req, quick));
      targets = await ship();
    }
  } catch (err) {
    await runCompensations(compensations);
    progress.error = errorMessage(err);
    upsertSearchAttributes([{ key: StateKey, value: isCancellation(err) ? 'cancelled' : 'failed' }]);
    throw err;
  }

  if (!targets) {
    phase('uploading');
    targets = await ship();
  }

  const okTargets = targets.filter((t) => t.ok);
  if (plan?.checkpoint) await settleCheckpoint(req, quick, plan, plan.checkpoint.name, okTargets.length > 0);

  phase('cleaning-up');
  await CancellationScope.nonCancellable(() => quick.cleanupStaging({ backupId, stagingDir: staging.dir }));

  const result = resultOf(req, { method, startedAt, quiesced: made.quiesced, info, plan, images, targets });
  if (okTargets.length === 0) {
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

/** The activity proxies a backup uses, chosen once from its patch markers. */
interface Steps {
  /** planBackup, abortPushBackup, endPullBackup, shipVmFiles: regular activities, kept alive by the worker */
  short: ActivityProxy;
  long: ActivityProxy;
  /** quick steps: local activities since SHORT_STEPS_LOCAL_PATCH */
  quick: ActivityProxy;
  overlaySteps: ActivityProxy;
  removeUnknownOverlays: ActivityProxy;
}

/** What the image-making steps of one backup share. */
interface BackupRun {
  req: BackupRequest;
  steps: Steps;
  info: DomainInfo;
  plan: BackupPlan | undefined;
  staging: StagingArea;
  /** undo steps, newest first */
  compensations: Array<() => Promise<void>>;
  phase: (p: BackupPhase) => void;
  hardened: boolean;
  /** the backup stores the whole VM (WHOLE_VM_PATCH, decided once per backup) */
  wholeVm: boolean;
  /** the whole-VM files staged at the backup point */
  vm?: VmCapture;
}

/**
 * Copies the domain's definition, NVRAM and TPM state into staging, at the backup point: right after the push job
 * started (the disks' point in time), right before the snapshot method's overlays are created (after, the
 * persistent definition names the overlays), or before an offline copy. Staging cleanup (the first undo step)
 * removes them with the images.
 */
async function captureVm(run: BackupRun): Promise<void> {
  if (!run.wholeVm) return;
  run.vm = await run.steps.quick.captureVmState({
    backupId: run.req.backupId,
    domain: run.req.domain,
    stagingDir: run.staging.dir,
  });
}

/** The images a method wrote into staging, before they are checked and hashed. */
interface MadeImages {
  files: ImageFile[];
  quiesced: boolean;
  /** push: bytes the job processed */
  bytes?: number;
  /** push with a checkpoint: its XML, for the manifest */
  checkpointXml?: string;
}

function trackProgress(req: BackupRequest): { progress: BackupProgress; phase: (p: BackupPhase) => void } {
  const progress: BackupProgress = {
    backupId: req.backupId,
    domain: req.domain,
    host: req.host,
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
  return { progress, phase };
}

/** Which level this backup takes: reads the targets' catalogs and libvirt's checkpoints (a regular activity). */
function planLevel(req: BackupRequest, steps: Steps, method: BackupMethod, info: DomainInfo): Promise<BackupPlan> {
  return steps.short.planBackup({
    backupId: req.backupId,
    domain: req.domain,
    host: req.host,
    method,
    targets: req.targets,
    s3Options: req.options.s3,
    requested: req.options.level ?? 'auto',
    maxChain: req.options.maxChain ?? DEFAULT_MAX_CHAIN,
    ...(req.options.fullEverySeconds !== undefined ? { fullEverySeconds: req.options.fullEverySeconds } : {}),
    disks: info.disks,
    requestedAt: req.requestedAt,
  });
}

/** Push mode: QEMU writes each disk's image (whole, or the clusters changed since the parent checkpoint). */
async function pushImages(run: BackupRun): Promise<MadeImages> {
  const { req, steps, info, plan, staging, compensations } = run;
  const { backupId, domain } = req;
  run.phase('backing-up');
  let jobInput: AwaitBackupJobInput | undefined;
  if (run.hardened) {
    // Registered before the step: a beginPushBackup that fails after libvirt started the job (a timeout, a
    // crash) must still abort it, or QEMU keeps writing into a staging dir that is about to be removed.
    // abortPushBackup aborts only a job whose files are ours, so it is harmless when no job was started.
    jobInput = { backupId, domain, images: pushImageFiles(staging.dir, info.disks) };
    const undoJob = jobInput;
    compensations.unshift(() => steps.short.abortPushBackup(undoJob));
  }
  if (plan?.checkpoint) {
    // The checkpoint counts only once the backup is committed: a failed or cancelled backup deletes it, and the
    // next one builds on the last committed checkpoint. Registered before the job that creates it.
    const checkpoint = { domain, name: plan.checkpoint.name };
    compensations.splice(1, 0, () => steps.quick.dropCheckpoint(checkpoint));
  }
  const job = await steps.quick.beginPushBackup({
    backupId,
    domain,
    disks: info.disks,
    stagingDir: staging.dir,
    ...(plan?.incremental ? { incremental: plan.incremental, fullDisks: plan.fullDisks } : {}),
    ...(plan?.checkpoint ? { checkpoint: plan.checkpoint } : {}),
  });
  if (!jobInput) {
    jobInput = { backupId, domain, images: job.images };
    const undoJob = jobInput;
    compensations.unshift(() => steps.short.abortPushBackup(undoJob));
  }
  // the job's start is the disks' point in time
  await captureVm(run);
  const stats = await steps.long.awaitBackupJob(jobInput);
  compensations.shift();
  const made: MadeImages = { files: job.images, quiesced: false, bytes: stats.bytes };
  if (plan?.checkpoint) {
    // Increments name the live disk as their backing file: point them at the parent's image on the target.
    const prepared = await steps.quick.prepareChainImages({
      backupId,
      domain,
      images: job.images,
      backing: incrementBacking(plan),
      checkpoint: plan.checkpoint.name,
    });
    if (prepared.checkpointXml) made.checkpointXml = prepared.checkpointXml;
  }
  return made;
}

/**
 * Where a pull backup writes, decided by the target kind: chunk repositories take the stream (pullIntoRepositories),
 * local image trees a qcow2 per disk (pullIntoImageTrees; planBackup refused image trees on nfs:// and s3://, and a
 * mix of both kinds, before anything was created). Backups from before PULL_IMAGE_TREE_PATCH refused image trees here.
 */
function pullWriter(req: BackupRequest, plan: BackupPlan | undefined): 'repository' | 'image-tree' {
  if (plan?.chunkRepository) return 'repository';
  if (patched(PULL_IMAGE_TREE_PATCH)) return 'image-tree';
  throw ApplicationFailure.nonRetryable(
    `a pull backup of ${req.domain} cannot go to ${req.targets.length > 1 ? 'these targets' : req.targets[0]}: pull mode writes into chunk repositories only (\`vmbackup repo init\`), image-tree targets take push backups (--method push)`,
    ErrorType.InvalidInput,
  );
}

/**
 * Pull mode: begin the job (QEMU exports each disk's point-in-time view), read the exports into every repository,
 * end the job (`domjobabort`, also on failure or cancel), commit each repository's manifest, settle the checkpoint.
 */
async function pullBackup(
  run: BackupRun,
  progress: BackupProgress,
  seen: BackupSeen,
  startedAt: string,
  writer: 'repository' | 'image-tree',
): Promise<BackupResult> {
  const { req, steps, info, plan, staging, compensations } = run;
  const { backupId, domain, host } = req;
  const { quick } = steps;
  const job = {
    backupId,
    domain,
    disks: info.disks,
    stagingDir: staging.dir,
    ...(plan?.incremental ? { incremental: plan.incremental, fullDisks: plan.fullDisks } : {}),
    ...(plan?.checkpoint ? { checkpoint: plan.checkpoint } : {}),
  };
  const total = info.disks.reduce((n, d) => n + d.virtualSize, 0);
  let targets: TargetResult[];
  let pulled;
  let checkpointXml: string | undefined;
  // Whether the job may still run after its end step gave up (since PULL_JOB_LEFT_RUNNING_PATCH): then the staging
  // cleanup backUp registered (the last undo step) leaves the scratch files QEMU may still write to, and the
  // checkpoint stays.
  let jobLeftRunning = false;
  const endPullJob = async () => {
    try {
      await steps.short.endPullBackup(job);
    } catch (err) {
      if (patched(PULL_JOB_LEFT_RUNNING_PATCH)) jobLeftRunning = true;
      throw err;
    }
  };
  const cleanupStaging = compensations.pop();
  compensations.push(async () => {
    if (jobLeftRunning) {
      log.warn('the pull job may still run: its staging directory is kept for `vmbackup recover`', {
        domain,
        stagingDir: staging.dir,
      });
      return;
    }
    await cleanupStaging?.();
  });
  try {
    run.phase('backing-up');
    // Registered before the step: a begin that fails after libvirt started the job must still end it.
    compensations.unshift(endPullJob);
    if (plan?.checkpoint) {
      const checkpoint = { domain, name: plan.checkpoint.name };
      // left to the next backup's retireCheckpoints while the job may run: deleting it touches the job's disks
      // (checkpoint-delete under a job whose disk I/O hangs hangs too, and holds the domain's libvirt lock meanwhile)
      compensations.splice(1, 0, () => (jobLeftRunning ? Promise.resolve() : quick.dropCheckpoint(checkpoint)));
    }
    await quick.beginPullBackup(job);
    // the job's start is the disks' point in time
    await captureVm(run);
    run.phase('uploading');
    compensations.unshift(() => removeUncommitted(req, quick));
    setHandler(storeProgressSignal, (p: unknown) => {
      const { target, bytesDone } = (typeof p === 'object' && p !== null ? p : {}) as Record<string, unknown>;
      if (typeof target !== 'string' || typeof bytesDone !== 'number' || !Number.isFinite(bytesDone)) return;
      // one read feeds the targets in turn: the bytes count over all of them
      progress.bytesDone = Math.max(progress.bytesDone, Math.min(Math.floor(bytesDone), progress.bytesTotal));
    });
    progress.bytesTotal = total * req.targets.length;
    for (const t of req.targets) {
      const state = progress.targets[t];
      if (state) Object.assign(state, { bytesTotal: total, state: 'uploading' });
    }
    const increment = plan?.parent && plan.level !== 'full' ? plan.parent : undefined;
    pulled =
      writer === 'repository'
        ? await steps.long.pullIntoRepositories({
            job,
            targets: req.targets,
            s3Options: req.options.s3,
            ...(increment
              ? {
                  parent: {
                    backupId: increment.backupId,
                    disks: increment.disks.map((d) => ({ name: d.name, index: d.sha256 })),
                  },
                }
              : {}),
            ...(run.vm ? { vm: run.vm } : {}),
          })
        : await pullTreeStep(req).pullIntoImageTrees({
            job,
            targets: req.targets,
            s3Options: req.options.s3,
            ...(increment
              ? {
                  parent: {
                    backupId: increment.backupId,
                    disks: increment.disks.map((d) => ({ name: d.name, key: d.key, format: d.format })),
                  },
                }
              : {}),
          });
    seen.bytesRead = pulled.targets.reduce(
      (n, t) => n + (t.ok ? t.disks.reduce((m, d) => m + d.pull.readBytes, 0) : 0),
      0,
    );
    if (plan?.checkpoint) {
      const prepared = await quick.prepareChainImages({
        backupId,
        domain,
        images: [],
        backing: {},
        checkpoint: plan.checkpoint.name,
      });
      checkpointXml = prepared.checkpointXml;
    }
    // the job has served its purpose: end it before the manifests (the scratch files go with it)
    compensations.splice(compensations.indexOf(endPullJob), 1);
    await CancellationScope.nonCancellable(endPullJob);
    const chain = plan ? manifestChain(plan, checkpointXml) : undefined;
    const read = pulled;
    targets = await Promise.all(
      read.targets.map(async (t): Promise<TargetResult> => {
        const state = progress.targets[t.target];
        if (!t.ok) {
          if (state) state.state = 'failed';
          return { target: t.target, ok: false, error: t.error };
        }
        if (writer === 'image-tree') {
          return commitPulledTree(run, {
            target: t.target,
            disks: t.disks as PulledTreeDisk[],
            startedAt,
            chain,
            state,
            total,
          });
        }
        const rt = t as Extract<PulledTarget, { ok: true }>;
        try {
          await quick.writeChunkManifest({
            target: t.target,
            s3Options: req.options.s3,
            manifest: {
              backupId,
              domain,
              host,
              method: 'pull',
              startedAt,
              finishedAt: new Date().toISOString(),
              quiesced: false,
              libvirtVersion: info.libvirtVersion,
              qemuVersion: info.qemuVersion,
              disks: rt.disks.map((d) => ({
                name: d.name,
                virtualSize: d.virtualSize,
                index: d.index,
                stats: d.stats,
              })),
              ...(chain ? { chain } : {}),
              ...(rt.vm ? { vm: rt.vm } : {}),
            },
          });
        } catch (err) {
          if (isCancellation(err)) throw err;
          if (state) state.state = 'failed';
          return { target: t.target, ok: false, error: errorMessage(err) };
        }
        if (state) Object.assign(state, { state: 'done', bytesDone: total });
        const all = [...rt.disks.map((d) => d.stats), ...(rt.vmStats ? [rt.vmStats] : [])];
        const sum = (f: (s: (typeof all)[number]) => number) => all.reduce((n, s) => n + f(s), 0);
        return {
          target: t.target,
          ok: true,
          locations: Object.fromEntries(
            rt.disks.map((d) => [d.name, `${t.target.replace(/\/+$/, '')}/@chunk-repo/indexes/${d.index}`]),
          ),
          chunks: {
            uploadedBytes: sum((s) => s.uploadedBytes),
            newChunks: sum((s) => s.uploadedChunks),
            knownChunks: sum((s) => s.knownChunks),
            zeroChunks: sum((s) => s.zeroChunks),
            indexes: Object.fromEntries(rt.disks.map((d) => [d.name, d.index])),
            diskBytes: Object.fromEntries(rt.disks.map((d) => [d.name, d.stats.uploadedBytes])),
          },
        };
      }),
    );
  } catch (err) {
    await runCompensations(compensations);
    progress.error = errorMessage(err);
    upsertSearchAttributes([{ key: StateKey, value: isCancellation(err) ? 'cancelled' : 'failed' }]);
    throw err;
  }
  progress.bytesDone = progress.bytesTotal;
  const okTargets = targets.filter((t) => t.ok);
  if (plan?.checkpoint) await settleCheckpoint(req, quick, plan, plan.checkpoint.name, okTargets.length > 0);
  run.phase('cleaning-up');
  await CancellationScope.nonCancellable(() => quick.cleanupStaging({ backupId, stagingDir: staging.dir }));
  const firstOk = pulled.targets.find((t) => t.ok);
  const result: BackupResult = {
    ...resultOf(req, {
      method: 'pull',
      startedAt,
      quiesced: false,
      info,
      plan,
      images: info.disks.map((d) => {
        const tree = writer === 'image-tree' && firstOk?.ok ? (firstOk.disks as PulledTreeDisk[]) : [];
        const img = tree.find((x) => x.name === d.name);
        return {
          name: d.name,
          format: writer === 'image-tree' ? 'qcow2' : 'chunks',
          path: '',
          virtualSize: d.virtualSize,
          size: img?.size ?? 0,
          sha256: img?.content.sha256 ?? '',
        };
      }),
      targets,
    }),
    pull: {
      scratchPeakBytes: pulled.scratchPeakBytes,
      attached: pulled.attached,
      attempt: pulled.attempt,
      disks: Object.fromEntries((firstOk?.ok ? firstOk.disks : []).map((d) => [d.name, d.pull])),
    },
  };
  if (okTargets.length === 0) {
    progress.error = targets.map((t) => t.error).join('; ');
    upsertSearchAttributes([{ key: StateKey, value: 'failed' }]);
    throw ApplicationFailure.create({
      message: `backup ${backupId} of ${domain} reached no target: ${progress.error}`,
      type: 'NoTargetSucceeded',
      nonRetryable: true,
      details: [result],
    });
  }
  run.phase('done');
  upsertSearchAttributes([{ key: StateKey, value: result.status }]);
  return result;
}

/**
 * The pull-into-image-trees step: a long step whose cancellation is awaited, so that the backup's undo (which sweeps
 * the backup's directory on the target) runs only once the step stopped writing its temp image.
 */
function pullTreeStep(req: BackupRequest): Pick<ActivityProxy, 'pullIntoImageTrees'> {
  const heartbeatTimeout = `${req.options.heartbeatTimeoutSeconds ?? 30}s` as const;
  return proxyActivities<HostActivities>({
    taskQueue: hostTaskQueue(req.host),
    startToCloseTimeout: '24h',
    heartbeatTimeout,
    cancellationType: ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    retry: {
      initialInterval: '1s',
      backoffCoefficient: 2,
      maximumInterval: '60s',
      maximumAttempts: LONG_STEP_ATTEMPTS,
    },
  });
}

/**
 * Commits a pull backup on one image tree, as shipToTargets commits a push backup: the whole-VM files, then the
 * manifest (version 4: each disk's `sha256` is the content digest taken while it was written, `content` says so;
 * an increment's disks name their parent's image as `backing`, as push increments do).
 */
async function commitPulledTree(
  run: BackupRun,
  t: {
    target: string;
    disks: PulledTreeDisk[];
    startedAt: string;
    chain: ManifestInput['manifest']['chain'];
    state: BackupProgress['targets'][string] | undefined;
    total: number;
  },
): Promise<TargetResult> {
  const { req, steps, info, plan } = run;
  const { backupId, domain, host } = req;
  const backing = plan ? manifestBacking(plan) : {};
  try {
    if (run.vm) {
      await steps.short.shipVmFiles({
        backupId,
        domain,
        target: t.target,
        files: run.vm.files,
        s3Options: req.options.s3,
      });
    }
    await steps.quick.writeManifest({
      target: t.target,
      s3Options: req.options.s3,
      manifest: {
        backupId,
        domain,
        host,
        method: 'pull',
        startedAt: t.startedAt,
        finishedAt: new Date().toISOString(),
        quiesced: false,
        libvirtVersion: info.libvirtVersion,
        qemuVersion: info.qemuVersion,
        disks: t.disks.map((d) => ({
          name: d.name,
          format: 'qcow2',
          virtualSize: d.virtualSize,
          size: d.size,
          sha256: d.content.sha256,
          key: d.key,
          content: {
            scheme: d.content.scheme,
            chunkSize: d.content.chunkSize,
            chunks: d.content.chunks,
            zeroChunks: d.content.zeroChunks,
          },
          ...(backing[d.name] ? { backing: backing[d.name] } : {}),
        })),
        ...(t.chain ? { chain: t.chain } : {}),
        ...(run.vm ? { vm: run.vm.vm } : {}),
      },
    });
  } catch (err) {
    if (isCancellation(err)) throw err;
    if (t.state) t.state.state = 'failed';
    return { target: t.target, ok: false, error: errorMessage(err) };
  }
  if (t.state) Object.assign(t.state, { state: 'done', bytesDone: t.total });
  return {
    target: t.target,
    ok: true,
    locations: Object.fromEntries(t.disks.map((d) => [d.name, `${t.target.replace(/\/+$/, '')}/${d.key}`])),
  };
}

/** The snapshot method: overlays take the guest's writes while the quiet bases are copied, then commit + pivot. */
async function snapshotImages(run: BackupRun): Promise<MadeImages> {
  const { req, steps, info, staging, compensations } = run;
  const { backupId, domain } = req;
  // Just before the overlays: once they exist, libvirt's persistent definition names them, not the VM's disks.
  await captureVm(run);
  run.phase('creating-overlays');
  // Registered before the step: a createOverlays that fails after libvirt made the snapshot must still be
  // undone. commitAndPivot finds this backup's overlays on the domain itself when given none.
  const undoUnknown = async () => {
    await steps.long.commitAndPivot({ backupId, domain, overlays: [] });
    await steps.removeUnknownOverlays.removeOverlays({ backupId, domain, overlays: [] });
  };
  compensations.unshift(undoUnknown);
  const created = await steps.overlaySteps.createOverlays({
    backupId,
    domain,
    disks: info.disks,
    quiesce: req.options.quiesce ?? false,
    requireQuiesce: req.options.requireQuiesce ?? false,
  });
  const overlays: OverlayRecord[] = created.overlays;
  const undoOverlays = async () => {
    await steps.long.commitAndPivot({ backupId, domain, overlays });
    await steps.overlaySteps.removeOverlays({ backupId, domain, overlays });
  };
  compensations[0] = undoOverlays;
  run.phase('copying');
  const files = await steps.long.copyBaseImages({
    backupId,
    domain,
    overlays,
    stagingDir: staging.dir,
    copyTool: req.options.copyTool ?? 'auto',
  });
  run.phase('committing');
  // The saga step itself: from here on the VM is put back on its base whatever happens.
  compensations.shift();
  await CancellationScope.nonCancellable(undoOverlays);
  return { files, quiesced: created.quiesced };
}

/**
 * After the targets: a backup committed nowhere never counts, so its checkpoint goes; a committed one retires
 * vmbackup's older checkpoints that no chain builds on any more (each bitmap slows the guest's writes).
 */
async function settleCheckpoint(
  req: BackupRequest,
  quick: ActivityProxy,
  plan: BackupPlan,
  checkpoint: string,
  committed: boolean,
): Promise<void> {
  const { domain } = req;
  await CancellationScope.nonCancellable(async () => {
    if (!committed) {
      await quick.dropCheckpoint({ domain, name: checkpoint }).catch((e: unknown) => {
        log.warn('could not delete the checkpoint of a backup that reached no target', { error: errorMessage(e) });
      });
      return;
    }
    const keep = [checkpoint, ...(plan.level !== 'full' && plan.baseCheckpoint ? [plan.baseCheckpoint] : [])];
    await quick.retireCheckpoints({ domain, keep }).catch((e: unknown) => {
      log.warn('could not delete old checkpoints', { error: errorMessage(e) });
    });
  });
}

function resultOf(
  req: BackupRequest,
  r: {
    method: BackupMethod;
    startedAt: string;
    quiesced: boolean;
    info: DomainInfo;
    plan: BackupPlan | undefined;
    images: DiskImage[];
    targets: TargetResult[];
  },
): BackupResult {
  const okTargets = r.targets.filter((t) => t.ok);
  const first = okTargets[0];
  const { plan } = r;
  return {
    backupId: req.backupId,
    domain: req.domain,
    host: req.host,
    method: r.method,
    status: okTargets.length === r.targets.length ? 'completed' : 'partial',
    startedAt: r.startedAt,
    finishedAt: new Date().toISOString(),
    quiesced: r.quiesced,
    libvirtVersion: r.info.libvirtVersion,
    qemuVersion: r.info.qemuVersion,
    ...(plan ? { chain: chainInfo(plan) } : {}),
    disks: r.images.map((img) => {
      // a chunk repository stores the disk as an index: its id and the bytes this backup sent for it
      const index = first?.chunks?.indexes[img.name];
      return {
        name: img.name,
        format: index ? 'chunks' : img.format,
        virtualSize: img.virtualSize,
        size: index ? (first?.chunks?.diskBytes[img.name] ?? 0) : img.size,
        sha256: index ?? img.sha256,
        location: first?.locations?.[img.name] ?? '',
      };
    }),
    skipped: r.info.skipped,
    targets: r.targets,
  };
}

/**
 * Disks whose I/O runs in an IOThread. Pull mode is never used for a domain with one: on QEMU 7.2 (Debian 12, this
 * project's test hosts) QEMU aborts ("nbd_blockdev_client_closed: Assertion `qemu_in_main_thread() && nbd_server'
 * failed") as soon as any NBD client disconnects from the pull export of such a disk, killing the VM (seen with a
 * plain `qemu-img info` of the export; also abbbi/virtnbdbackup#254). No QEMU version known to be fixed is assumed.
 * DomainInfo recorded before this field existed has none: those histories replay as they ran.
 */
function iothreadDisks(info: DomainInfo): string[] {
  return info.disks.filter((d) => d.iothread).map((d) => d.name);
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
  if (req.method === 'pull' && patched(PULL_PATCH)) {
    if (!info.backupApi) {
      throw ApplicationFailure.nonRetryable(
        `pull mode needs libvirt >= 7.2 and QEMU >= 4.2, ${req.host} has libvirt ${info.libvirtVersion} and QEMU ${info.qemuVersion}: use --method snapshot`,
        ErrorType.BackupApiUnavailable,
      );
    }
    const threaded = iothreadDisks(info);
    if (threaded.length > 0) {
      throw ApplicationFailure.nonRetryable(
        `pull mode would crash ${req.domain}: disk ${threaded.join(', ')} runs in an IOThread, and QEMU ${info.qemuVersion} aborts the whole VM when a reader disconnects from such a disk's NBD export (a QEMU bug): use --method push`,
        ErrorType.UnsupportedDisk,
      );
    }
    return 'pull';
  }
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
  acts: { long: ActivityProxy; short: ActivityProxy; quick: ActivityProxy },
  staging: StagingArea,
  images: DiskImage[],
  vm: VmCapture | undefined,
  progress: BackupProgress,
  meta: {
    method: BackupMethod;
    startedAt: string;
    quiesced: boolean;
    info: DomainInfo;
    chain: ManifestInput['manifest']['chain'];
    backing: Record<string, { backupId: string; key: string; sha256: string }>;
  },
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
      // one activity for all of them: they are small
      if (vm) {
        await acts.short.shipVmFiles({ backupId, domain, target, files: vm.files, s3Options: req.options.s3 });
      }
      await acts.quick.writeManifest({
        target,
        s3Options: req.options.s3,
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
            ...(meta.backing[d.name] ? { backing: meta.backing[d.name] } : {}),
          })),
          ...(meta.chain ? { chain: meta.chain } : {}),
          ...(vm ? { vm: vm.vm } : {}),
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
        acts.quick.deleteBackupObjects({ target, domain, backupId, s3Options: req.options.s3 }).catch((e: unknown) => {
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

/**
 * Every target is a chunk repository (the plan says so): each stores the staged images as chunks, only those it does
 * not hold, then commits the backup with its manifest. Targets run in parallel; one that fails keeps no manifest (its
 * chunks stay for the next backup, or for gc).
 */
async function storeInRepositories(
  req: BackupRequest,
  acts: { long: ActivityProxy; short: ActivityProxy; quick: ActivityProxy },
  staging: StagingArea,
  images: DiskImage[],
  vm: VmCapture | undefined,
  progress: BackupProgress,
  meta: {
    method: BackupMethod;
    startedAt: string;
    quiesced: boolean;
    info: DomainInfo;
    chain: ManifestInput['manifest']['chain'];
    /** the offline method: each target reads the domain's disks in place (OFFLINE_DIRECT_PATCH) */
    readInPlace?: boolean;
  },
): Promise<TargetResult[]> {
  const { backupId, domain, host } = req;
  const total = images.reduce((n, i) => n + i.virtualSize, 0);
  // The store step reports its bytes as it goes (a signal from the activity: a heartbeat never reaches the
  // workflow). A handler is no command: histories without these signals replay unchanged. Anyone on the cluster can
  // signal: a report only moves a storing target's count forward, up to its total.
  setHandler(storeProgressSignal, (p: unknown) => {
    const { target, bytesDone } = (typeof p === 'object' && p !== null ? p : {}) as Record<string, unknown>;
    if (typeof target !== 'string' || !Object.prototype.hasOwnProperty.call(progress.targets, target)) return;
    const state = progress.targets[target];
    if (!state || state.state !== 'uploading' || typeof bytesDone !== 'number' || !Number.isFinite(bytesDone)) return;
    state.bytesDone = Math.max(state.bytesDone, Math.min(Math.floor(bytesDone), state.bytesTotal));
  });
  const storeOne = async (target: string): Promise<TargetResult> => {
    const state = progress.targets[target] ?? { bytesDone: 0, bytesTotal: total, state: 'pending' as const };
    progress.targets[target] = state;
    state.bytesTotal = total;
    state.state = 'uploading';
    try {
      const stored = meta.readInPlace
        ? await acts.long.storeOfflineDisks({
            backupId,
            domain,
            target,
            s3Options: req.options.s3,
            disks: meta.info.disks,
            stagingDir: staging.dir,
            ...(vm ? { vm } : {}),
          })
        : await acts.long.storeChunkImages({
            backupId,
            domain,
            target,
            s3Options: req.options.s3,
            images,
            ...(vm ? { vm } : {}),
          });
      await acts.quick.writeChunkManifest({
        target,
        s3Options: req.options.s3,
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
          disks: stored.disks,
          ...(meta.chain ? { chain: meta.chain } : {}),
          ...(stored.vm ? { vm: stored.vm } : {}),
        },
      });
      state.bytesDone = total;
      state.state = 'done';
      const all = [...stored.disks.map((d) => d.stats), ...(stored.vmStats ? [stored.vmStats] : [])];
      const sum = (f: (s: (typeof all)[number]) => number) => all.reduce((n, s) => n + f(s), 0);
      return {
        target,
        ok: true,
        // the index of each disk, as docs/chunk-format.md lays a repository out
        locations: Object.fromEntries(
          stored.disks.map((d) => [d.name, `${target.replace(/\/+$/, '')}/@chunk-repo/indexes/${d.index}`]),
        ),
        chunks: {
          uploadedBytes: sum((s) => s.uploadedBytes),
          newChunks: sum((s) => s.uploadedChunks),
          knownChunks: sum((s) => s.knownChunks),
          zeroChunks: sum((s) => s.zeroChunks),
          indexes: Object.fromEntries(stored.disks.map((d) => [d.name, d.index])),
          diskBytes: Object.fromEntries(stored.disks.map((d) => [d.name, d.stats.uploadedBytes])),
        },
      };
    } catch (err) {
      if (isCancellation(err)) throw err;
      state.state = 'failed';
      return { target, ok: false, error: errorMessage(err) };
    }
  };
  return Promise.all(req.targets.map(storeOne));
}

/** Per disk of an increment: its parent's image, relative to it in the target layout `<domain>/<backupId>/<disk>`. */
function incrementBacking(plan: BackupPlan): Record<string, string> {
  const out: Record<string, string> = {};
  if (!plan.parent) return out;
  for (const d of plan.parent.disks) {
    if (!plan.fullDisks.includes(d.name)) out[d.name] = `../${plan.parent.backupId}/${d.name}.${d.format}`;
  }
  return out;
}

function manifestBacking(plan: BackupPlan): Record<string, { backupId: string; key: string; sha256: string }> {
  const out: Record<string, { backupId: string; key: string; sha256: string }> = {};
  if (!plan.parent) return out;
  for (const d of plan.parent.disks) {
    if (!plan.fullDisks.includes(d.name))
      out[d.name] = { backupId: plan.parent.backupId, key: d.key, sha256: d.sha256 };
  }
  return out;
}

/** Where the backup stands in its chain, as its result says it. */
function chainInfo(plan: BackupPlan): BackupChainInfo {
  return {
    level: plan.level,
    requested: plan.requested,
    ...(plan.reason ? { reason: plan.reason } : {}),
    ...(plan.parent ? { parent: plan.parent.backupId } : {}),
    base: plan.base,
    ...(plan.checkpoint ? { checkpoint: plan.checkpoint.name } : {}),
  };
}

/** ... and as its manifest records it, with what a redefinition of its checkpoint needs. */
function manifestChain(plan: BackupPlan, checkpointXml: string | undefined): ManifestInput['manifest']['chain'] {
  return {
    ...chainInfo(plan),
    ...(plan.depth !== undefined ? { depth: plan.depth } : {}),
    ...(plan.baseStartedAt !== undefined ? { baseStartedAt: plan.baseStartedAt } : {}),
    ...(checkpointXml ? { checkpointXml } : {}),
  };
}

/** Undo of the upload phase: every target loses what this backup stored there unless its manifest was written. */
async function removeUncommitted(req: BackupRequest, quick: ActivityProxy): Promise<void> {
  const { domain, backupId } = req;
  await Promise.all(
    req.targets.map((target) =>
      quick.deleteBackupObjects({ target, domain, backupId, s3Options: req.options.s3 }).catch((e: unknown) => {
        log.warn('could not remove the uploads of a cancelled backup', { target, error: errorMessage(e) });
      }),
    ),
  );
}

/**
 * Anyone on the cluster can start this workflow: its input is checked before anything runs (the activities check
 * the paths and targets they are given again, on the host).
 */
function validateRequest(req: BackupRequest): void {
  const bad = (why: string): never => {
    throw ApplicationFailure.nonRetryable(`invalid backup request: ${why}`, ErrorType.InvalidInput);
  };
  if (typeof req !== 'object' || req === null) bad('no request');
  if (typeof req.domain !== 'string' || !DOMAIN_NAME_RE.test(req.domain))
    bad(`"${String(req.domain)}" is not a domain name`);
  if (typeof req.host !== 'string' || !HOST_NAME_RE.test(req.host)) bad(`"${String(req.host)}" is not a host name`);
  if (typeof req.backupId !== 'string' || !BACKUP_ID_RE.test(req.backupId))
    bad(`"${String(req.backupId)}" is not a backup id`);
  if (!Array.isArray(req.targets) || req.targets.length === 0 || req.targets.some((t) => typeof t !== 'string')) {
    bad('it names no target');
  }
  if (new Set(req.targets).size !== req.targets.length) bad('a target is named twice');
  const level = req.options?.level;
  if (level !== undefined && !['auto', 'full', 'inc', 'diff'].includes(level)) bad(`"${String(level)}" is not a level`);
  const maxChain = req.options?.maxChain;
  if (maxChain !== undefined && !(Number.isInteger(maxChain) && maxChain >= 1 && maxChain <= 1000)) {
    bad(`--max-chain must be a whole number from 1 to 1000, not ${String(maxChain)}`);
  }
  const fullEvery = req.options?.fullEverySeconds;
  if (fullEvery !== undefined && !(Number.isInteger(fullEvery) && fullEvery > 0)) {
    bad(`--full-every must be a positive duration, not ${String(fullEvery)} seconds`);
  }
  const notify: unknown = req.options?.notify;
  if (notify !== undefined) {
    const n = notify as { url?: unknown; onSuccess?: unknown };
    if (
      typeof n !== 'object' ||
      n === null ||
      typeof n.url !== 'string' ||
      !/^https?:\/\/[^\s]{1,2040}$/i.test(n.url)
    ) {
      bad('--notify must be an http:// or https:// URL');
    }
    if (n.onSuccess !== undefined && typeof n.onSuccess !== 'boolean') bad('notify.onSuccess must be true or false');
  }
  const hb = req.options?.heartbeatTimeoutSeconds;
  if (hb !== undefined && !(Number.isInteger(hb) && hb >= MIN_HEARTBEAT_SECONDS && hb <= MAX_HEARTBEAT_SECONDS)) {
    bad(
      `the heartbeat timeout must be a whole number of seconds from ${MIN_HEARTBEAT_SECONDS} to ${MAX_HEARTBEAT_SECONDS}, not ${String(hb)}`,
    );
  }
}

/** What the steps learnt that the end of a backup reports (metrics, events), also when they failed. */
interface BackupSeen {
  level?: BackupLevel;
  bytesRead?: number;
}

const { metrics } = proxySinks<VmbackupSinks>();

/**
 * A webhook gets a few minutes of retries: the backup's workflow (and with it the VM's next backup, which cannot
 * start while it runs) waits for them, so they are bounded.
 */
function notifier(host: string) {
  return proxyActivities<HostActivities>({
    taskQueue: hostTaskQueue(host),
    startToCloseTimeout: '30s',
    scheduleToCloseTimeout: '3m',
    retry: { initialInterval: '2s', backoffCoefficient: 2, maximumInterval: '30s' },
  });
}

/**
 * The end of a backup, whatever it was: the worker's metrics count it (a sink: nothing in the history), and a
 * webhook asked for with `notify` gets its event. A webhook that does not take it is logged; the backup's own
 * outcome stands.
 */
async function backupEnded(
  req: BackupRequest,
  seen: BackupSeen,
  result: BackupResult | undefined,
  err: unknown,
): Promise<void> {
  const failed = result === undefined;
  const targets: TargetResult[] =
    result?.targets ?? resultInFailure(err)?.targets ?? req.targets.map((target) => ({ target, ok: false }));
  const outcome: BackupOutcomeResult = failed
    ? isCancellation(err)
      ? 'cancelled'
      : 'failure'
    : result.status === 'completed'
      ? 'success'
      : 'partial';
  const storedPerTarget = (result?.disks ?? []).reduce((n, d) => n + d.size, 0);
  metrics.backupEnded({
    domain: req.domain,
    host: req.host,
    backupId: req.backupId,
    result: outcome,
    ...(seen.level ? { level: seen.level } : {}),
    bytesRead: seen.bytesRead ?? 0,
    bytesStored: storedPerTarget * targets.filter((t) => t.ok).length,
  });

  const notify = req.options.notify;
  if (!notify || outcome === 'cancelled' || (outcome === 'success' && !notify.onSuccess)) return;
  if (!patched(NOTIFY_PATCH)) return;
  const event: BackupEvent = {
    kind: outcome,
    domain: req.domain,
    host: req.host,
    backupId: req.backupId,
    ...(seen.level ? { level: seen.level } : {}),
    targets: targets.map((t) => ({ target: t.target, ok: t.ok, ...(t.error ? { error: t.error } : {}) })),
    ...(outcome === 'failure' ? { error: errorMessage(err) } : {}),
    ...(outcome === 'partial'
      ? {
          error: targets
            .filter((t) => !t.ok)
            .map((t) => `${t.target}: ${t.error ?? 'failed'}`)
            .join('; '),
        }
      : {}),
    at: new Date().toISOString(),
  };
  try {
    await notifier(req.host).notify({ url: notify.url, event });
  } catch (e) {
    log.warn('the notify webhook did not take the event', { backupId: req.backupId, error: errorMessage(e) });
  }
}

/** The result a NoTargetSucceeded failure carries (its per-target sentences). */
function resultInFailure(err: unknown): BackupResult | undefined {
  if (!(err instanceof ApplicationFailure) || err.type !== 'NoTargetSucceeded') return undefined;
  const details = err.details?.[0] as BackupResult | undefined;
  return details && Array.isArray(details.targets) ? details : undefined;
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
