/**
 * Push-mode backup (virDomainBackupBegin) and the steps every method shares: inspect the
 * domain, prepare and clean the staging directory. Each activity looks at the world first
 * and does only what is missing, so a retry after a worker or host crash is safe.
 */
import { rm, rmdir, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import type { Hypervisor, JobInfo } from '../hypervisor/port';
import { HypervisorError } from '../hypervisor/errors';
import type {
  AwaitBackupJobInput,
  BackupJobStats,
  CleanupStagingInput,
  ImageFile,
  InspectDomainInput,
  PrepareStagingInput,
  PushBackupInput,
  PushBackupJob,
  StagingArea,
} from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { makeDirs, makeFilePrivate, PRIVATE_DIR_MODE, QEMU_DIR_MODE } from '../shared/file-modes';
import { pushImageFiles } from '../shared/names';
import type { DomainInfo } from '../shared/types';
import { hypervisorFailure, permanent } from './failures';
import { HostPaths } from './host-paths';
import { pollDelays } from './poll';
import { qemuWritableDir } from './qemu-paths';

export interface PushDeps {
  hypervisor: Hypervisor;
  stateDir: string;
  /** how often awaitBackupJob asks libvirt (ms); small, since it bounds the end-to-end overhead */
  pollIntervalMs?: number;
  /** where QEMU-written files go when the state dir is private (default /var/lib/vmbackup) */
  systemQemuDir?: string;
  /** this host's roots and allowed targets: every path and target in an input is checked against them */
  paths?: HostPaths;
}

/** Progress a long activity heartbeats; the client reads it from the pending activity. */
export interface ByteProgress {
  bytesDone: number;
  bytesTotal: number;
}

const ACTIVE: ReadonlySet<JobInfo['type']> = new Set(['Bounded', 'Unbounded']);

export function createPushActivities(deps: PushDeps) {
  const hv = deps.hypervisor;
  const pollMs = deps.pollIntervalMs ?? 200;
  const paths = deps.paths ?? new HostPaths({ stateDir: deps.stateDir, systemQemuDir: deps.systemQemuDir });

  async function inspectDomain(input: InspectDomainInput): Promise<DomainInfo> {
    try {
      return await hv.inspect(input.domain, { includeAllDisks: input.includeAllDisks });
    } catch (err) {
      hypervisorFailure(err);
    }
  }

  /**
   * The staging directory lives inside the first local (file://) target when there is one, so
   * shipping to it is a rename and a push backup costs no extra copy; else under the state dir.
   * Staging roots are 0711 (a push backup's directory in them must be reachable by QEMU); a backup's
   * own directory is 0700, or 0711 when QEMU writes into it.
   */
  async function prepareStaging(input: PrepareStagingInput): Promise<StagingArea> {
    const backupId = paths.backupId(input.backupId, 'prepareStaging');
    const targets = paths.checkTargets(input.targets, 'prepareStaging');
    const localTarget = targets.find((t) => t.startsWith('file://'));
    let root = join(paths.stateDir, 'staging');
    if (localTarget) {
      const inTarget = join(paths.targetStagingRoot(localTarget), backupId);
      try {
        await paths.stagingDir(inTarget, backupId, 'prepareStaging');
        root = dirname(inTarget);
      } catch (err) {
        // e.g. a target directory other users may write to: staging there could be swapped under us
        if (!(err instanceof ApplicationFailure)) throw err;
        Context.current().log.warn('staging under the state dir instead of the local target', {
          backupId,
          reason: err.message,
        });
      }
    }
    const preferred = join(root, backupId);
    let dir: string;
    try {
      // checked before anything is created, and again once it exists
      await paths.stagingDir(preferred, backupId, 'prepareStaging');
      if (input.writtenByQemu) {
        dir = await qemuWritableDir(preferred, join('staging', backupId), paths.systemQemuDir);
      } else {
        await makeDirs(dirname(root), PRIVATE_DIR_MODE);
        await makeDirs(root, QEMU_DIR_MODE);
        await makeDirs(preferred, PRIVATE_DIR_MODE);
        dir = preferred;
      }
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EACCES' || code === 'EROFS' || code === 'ENOSPC' || code === 'ENOTDIR') {
        throw permanent(
          `cannot create the staging directory for ${backupId} (${code}): check that ${localTarget ?? deps.stateDir} is writable`,
          code === 'ENOSPC' ? ErrorType.NoSpace : ErrorType.PermissionDenied,
        );
      }
      throw err;
    }
    // A fallback staging dir outside the target still lets the target take the images by rename when both
    // are on one filesystem; the local driver copies otherwise.
    return { dir: await paths.stagingDir(dir, backupId, 'prepareStaging'), localTarget };
  }

  async function cleanupStaging(input: CleanupStagingInput): Promise<void> {
    const dir = await paths.stagingDir(input.stagingDir, input.backupId, 'cleanupStaging');
    await rm(dir, { recursive: true, force: true });
    // Drop the staging root too when nothing else is in it (ignore races with other backups).
    try {
      await rmdir(dirname(dir));
    } catch {
      /* another backup is using it, or it is gone already */
    }
  }

  /** The images a push job writes: `<stagingDir>/<disk>.qcow2`, each checked to be in the backup's staging dir. */
  async function imagesFor(input: PushBackupInput): Promise<ImageFile[]> {
    const dir = await paths.stagingDir(input.stagingDir, input.backupId, 'beginPushBackup');
    if (!Array.isArray(input.disks) || input.disks.length === 0) {
      throw permanent(`beginPushBackup: no disk of ${input.domain} to back up`, ErrorType.InvalidInput);
    }
    for (const d of input.disks) paths.diskName(d.name, 'beginPushBackup');
    return Promise.all(
      pushImageFiles(dir, input.disks).map(async (i) => ({
        ...i,
        path: await paths.stagingImage(i.path, input.backupId, i, 'beginPushBackup'),
      })),
    );
  }

  /** The images of a job, each checked to be a staging image of the backup. */
  async function checkedImages(input: AwaitBackupJobInput, activity: string): Promise<ImageFile[]> {
    if (!Array.isArray(input.images)) throw permanent(`${activity}: no images given`, ErrorType.InvalidInput);
    return Promise.all(
      input.images.map(async (i) => ({ ...i, path: await paths.stagingImage(i.path, input.backupId, i, activity) })),
    );
  }

  async function beginPushBackup(input: PushBackupInput): Promise<PushBackupJob> {
    const images = await imagesFor(input);
    try {
      const job = await hv.jobInfo(input.domain);
      if (ACTIVE.has(job.type)) {
        // After a retry our own job may already run: libvirt creates every target file at job start.
        const ours = await allExist(images.map((i) => i.path));
        if (ours) return { images, attached: true };
        throw permanent(
          `another job (${job.operation ?? 'unknown'}) is running on ${input.domain}: wait for it to end or abort it with \`virsh domjobabort ${input.domain}\``,
          ErrorType.BackupJobFailed,
        );
      }
      // A staging file of a dead attempt makes libvirt refuse ("store ... for backup of 'vda' exists").
      await Promise.all(images.map((i) => rm(i.path, { force: true })));
      await makeDirs(dirname(images[0]?.path ?? input.stagingDir), QEMU_DIR_MODE);
      const begin = () =>
        hv.beginPushBackup(
          input.domain,
          images.map((i) => ({ disk: i.name, file: i.path })),
          {
            disks: input.disks.map((d) => d.name), // as inspectDomain read them: no second dumpxml
            ...(input.incremental ? { incremental: input.incremental } : {}),
            ...(input.checkpoint ? { checkpoint: input.checkpoint } : {}),
            ...(input.fullDisks?.length ? { fullDisks: input.fullDisks } : {}),
          },
        );
      try {
        await begin();
      } catch (err) {
        // So does the checkpoint a dead attempt's job created ("domain moment ... already exists"), before it
        // creates a file or starts a job: the name is this backup's own, and that job is over (no job runs), so it
        // never counted. Deleted when libvirt says so, not asked for first: that cost every backup a virsh run.
        const name = input.checkpoint?.name;
        if (!(err instanceof HypervisorError && err.kind === 'checkpoint-exists' && name && err.checkpoint === name)) {
          throw err;
        }
        await hv.deleteCheckpoint(input.domain, name);
        await begin();
      }
      return { images, attached: false };
    } catch (err) {
      hypervisorFailure(err);
    }
  }

  async function awaitBackupJob(input: AwaitBackupJobInput): Promise<BackupJobStats> {
    const ctx = Context.current();
    const images = await checkedImages(input, 'awaitBackupJob');
    const total = images.reduce((n, i) => n + i.virtualSize, 0);
    let lastSeenActive = false;
    let quietSince: number | undefined;
    const nextWait = pollDelays(pollMs);
    for (;;) {
      let job: JobInfo;
      try {
        job = await hv.jobInfo(input.domain);
      } catch (err) {
        if (err instanceof HypervisorError && err.kind === 'not-found') {
          throw permanent(`${input.domain} disappeared during the backup (undefined)`, ErrorType.DomainGone);
        }
        // "Requested operation is not valid: domain is not running": destroyed or shut down mid-job.
        if ((await hv.state(input.domain).catch(() => undefined)) === 'shut off') {
          throw permanent(`${input.domain} stopped during the backup; nothing was kept`, ErrorType.DomainGone);
        }
        hypervisorFailure(err); // libvirtd restarting: transient, Temporal retries and we attach again
      }
      if (ACTIVE.has(job.type)) {
        lastSeenActive = true;
        quietSince = undefined;
        ctx.heartbeat({ bytesDone: job.dataProcessed ?? 0, bytesTotal: job.dataTotal ?? total } satisfies ByteProgress);
      } else {
        const done = await hv.completedJobInfo(input.domain).catch((err: unknown) => hypervisorFailure(err));
        if (done.type === 'Completed') {
          const missing = await firstMissing(images.map((i) => i.path));
          if (missing) {
            throw permanent(
              `the backup job of ${input.domain} completed but ${missing} is missing`,
              ErrorType.BackupJobFailed,
            );
          }
          // QEMU created them with its own mode (0644 through libvirt): private before anything ships them
          await Promise.all(images.map((i) => makeFilePrivate(i.path)));
          ctx.heartbeat({ bytesDone: done.dataProcessed ?? total, bytesTotal: done.dataTotal ?? total });
          return { bytes: done.dataProcessed ?? total, elapsedMs: done.timeElapsedMs ?? 0 };
        }
        if (done.type === 'Failed' || done.type === 'Cancelled') {
          const state = await hv.state(input.domain).catch(() => 'other' as const);
          const why =
            state === 'shut off' ? `${input.domain} stopped during the backup` : (done.errorMessage ?? done.type);
          throw permanent(
            `the backup job of ${input.domain} ended ${done.type.toLowerCase()}: ${why}`,
            state === 'shut off' ? ErrorType.DomainGone : ErrorType.BackupJobFailed,
          );
        }
        // No job and no completed stats: either the stats are not published yet (libvirt needs a moment after
        // the job ends) or the domain went away with its job.
        const state = await hv.state(input.domain).catch((err: unknown) => hypervisorFailure(err));
        if (state === 'shut off') {
          throw permanent(`${input.domain} stopped during the backup; nothing was kept`, ErrorType.DomainGone);
        }
        quietSince ??= Date.now();
        if (Date.now() - quietSince > 30_000) {
          throw permanent(
            `the backup job of ${input.domain} is gone and libvirt kept no result${lastSeenActive ? '' : ' (it was never seen running)'}`,
            ErrorType.BackupJobFailed,
          );
        }
        ctx.heartbeat({ bytesDone: 0, bytesTotal: total });
      }
      await ctx.sleep(nextWait()); // throws CancelledFailure when the workflow cancels us
    }
  }

  /** Undo of beginPushBackup: abort our job if it runs, remove the staging files. Idempotent. */
  async function abortPushBackup(input: AwaitBackupJobInput): Promise<void> {
    const images = await checkedImages(input, 'abortPushBackup');
    try {
      const job = await hv.jobInfo(input.domain);
      if (ACTIVE.has(job.type) && (await allExist(images.map((i) => i.path)))) {
        await hv.abortJob(input.domain);
        // domjobabort returns at once; libvirt removes the partial file a moment later.
        for (let i = 0; i < 100 && ACTIVE.has((await hv.jobInfo(input.domain)).type); i++) {
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    } catch (err) {
      if (!(err instanceof HypervisorError && err.kind === 'not-found')) hypervisorFailure(err);
    }
    await Promise.all(images.map((i) => rm(i.path, { force: true })));
  }

  return { inspectDomain, prepareStaging, cleanupStaging, beginPushBackup, awaitBackupJob, abortPushBackup };
}

async function allExist(paths: string[]): Promise<boolean> {
  return (await firstMissing(paths)) === undefined;
}

async function firstMissing(paths: string[]): Promise<string | undefined> {
  for (const p of paths) {
    try {
      await stat(p);
    } catch {
      return p;
    }
  }
  return undefined;
}
