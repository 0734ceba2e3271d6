/**
 * Pull-mode backups into chunk repositories (issue #16): libvirt's `<domainbackup mode='pull'>` makes QEMU export
 * each disk's point-in-time view over NBD on a Unix socket (the guest's writes meanwhile go on; QEMU keeps the old
 * blocks in a sparse scratch file), and pullIntoRepositories reads the exports with our NBD client straight into
 * ingestDisk: no staging image, each chunk hashed once as it is read, only chunks a repository lacks uploaded.
 *
 * - full: `base:allocation`, holes never read;
 * - increment: the dirty bitmap `qemu:dirty-bitmap:backup-<disk>` (writes since the parent checkpoint) picks the
 *   chunks to read, intersected with allocation; every other chunk takes the parent backup's index entry, checked
 *   to exist (`has()`, which also keeps it fresh for gc), so each backup's index is whole and restorable alone.
 *
 * Crash safety: every few seconds the settled prefix of each disk's index goes to a journal in the backup's staging
 * directory (and the offset to the heartbeat); a retried attempt on this host that finds the same job (the same
 * scratch files) resumes after it. When libvirt lost the job (libvirtd restarted, the domain restarted), the attempt
 * begins a new one and reads from 0: the journal of another job's point in time is never used.
 *
 * Where things are: staging `<root>/<backupId>/` (0711, like push staging) holds the scratch files
 * `<disk>.scratch.qcow2` and the journal; the socket is `<staging>/nbd/backup.sock` in a directory only root and
 * QEMU can enter (docs/security.md), or under /run/vmbackup-nbd when that path is too long for a Unix socket.
 */
import { createHash } from 'node:crypto';
import { chown, lstat, mkdir, readFile, realpath, rename, rm, stat, writeFile, chmod } from 'node:fs/promises';
import { join } from 'node:path';
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { HypervisorError } from '../hypervisor/errors';
import type { Hypervisor, JobInfo } from '../hypervisor/port';
import { qemuUserOf } from '../hypervisor/qemu-user';
import { NbdClient, extents, isNbdError, pooledReads, STATE_DIRTY, STATE_HOLE, STATE_ZERO } from '../nbd';
import type { BlockExtent } from '../nbd';
import { ChunkStore, chunkBackupKeys, holdChunkObjects, ingestDisk, putSmallFile } from '../repository/chunks';
import { ALLOCATION_CONTEXT, pullImageTreeSupport, writePulledImage } from '../repository/pull-image';
import type { StorageTarget } from '../storage/contract';
import { imageKey } from '../storage/keys';
import { tempName } from '../storage/sidecar';
import { fileStamp } from '../shared/file-stamp';
import type { ByteRange, DiskSource, IndexEntry, IngestProgress } from '../repository/chunks';
import type {
  BeginPullInput,
  ChunkStoreStats,
  PullDiskResult,
  PullIntoRepositoriesInput,
  PullJob,
  PulledImageTrees,
  PulledRepositories,
  PulledTarget,
  PulledTree,
  PulledTreeDisk,
  PullIntoImageTreesInput,
  VmFilesRecord,
} from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { makeDirs, QEMU_DIR_MODE } from '../shared/file-modes';
import { chunkFailure, openWorkerRepository } from './chunk-repository';
import type { ChunkRepositoryDeps } from './chunk-repository';
import { hypervisorFailure, permanent } from './failures';
import type { HostPaths } from './host-paths';
import { pullSocketDir, scratchFile, SHORT_SOCKET_ROOT, SOCKET_NAME } from './pull-paths';
import { withTarget } from './storage';
import { spacedProgress } from './progress-report';
import { withUploadPlace } from './upload-slots';

export interface PullDeps extends ChunkRepositoryDeps {
  hypervisor: Hypervisor;
  /** where the socket directory goes when `<staging>/nbd/backup.sock` is too long (default /run/vmbackup-nbd) */
  shortSocketRoot?: string;
  /**
   * a pull into an image tree flushes the new image and heartbeats a resume offset after each this many bytes of a
   * disk (VMBACKUP_PULL_WINDOW_MIB; default 1 GiB, a multiple of 4 MiB): what a killed worker writes again at most
   */
  pullWindowBytes?: number;
}

const ACTIVE: ReadonlySet<JobInfo['type']> = new Set(['Bounded', 'Unbounded']);
const JOURNAL = 'pull-journal.json';
/**
 * Chunks of one disk being hashed, encoded and stored at once (the push/offline store keeps 4). A pull reads 8
 * requests ahead; with 4 chunks in the store the reader waited for them: measured on a 2 GiB pull into a local
 * repository (bench/pull.ts, 2 cores), 4 -> 8 -> 16 took the backup from 11.8-13.9 s to 10.6 s to 9.7 s. 8 holds
 * at most ~16 chunk buffers (plaintext and object) per disk.
 */
const PULL_CHUNK_CONCURRENCY = 8;
/** how often the settled prefix of the indexes is written to the journal */
const JOURNAL_EVERY_MS = 2_000;
/** how long endPullBackup waits for an aborted pull job to end before the attempt fails (and is retried) */
const JOB_END_WAIT_MS = 10_000;

/** What pullIntoRepositories heartbeats: where it is per target and disk. */
export interface PullHeartbeat {
  target: string;
  disk: string;
  /** bytes of the disk whose index entries are final (the journal has them) */
  offset: number;
  bytesDone: number;
  bytesTotal: number;
  scratchPeakBytes: number;
  /** true while it waits for a place on the target (`--max-concurrent-uploads`); the job and its scratch go on */
  waitingForUpload?: boolean;
}

interface JournalDisk {
  /** chunks whose entries are final */
  chunks: number;
  entries: IndexEntry[];
}
interface Journal {
  /** the job this journal belongs to: its scratch files' identity (libvirt creates them at backup-begin) */
  job: string;
  /** target -> disk -> progress */
  targets: Record<string, Record<string, JournalDisk>>;
  scratchPeakBytes: number;
}

/**
 * Tells the running backup's workflow how far each target is: best effort (a report that fails is dropped), and
 * spaced per target (progress-report.ts): never one history event per chunk or window read.
 */
function progressReport(
  deps: PullDeps,
  ctx: Context,
  total: number,
): { update(target: string, bytesDone: number): void; flush(): Promise<void> } {
  const execution = ctx.info.workflowExecution;
  const send = deps.reportProgress;
  const run = execution ? { workflowId: execution.workflowId, runId: execution.runId } : undefined;
  const perTarget = new Map<string, ReturnType<typeof spacedProgress>>();
  return {
    update(target, bytesDone) {
      if (!send || !run) return;
      let r = perTarget.get(target);
      if (!r) {
        r = spacedProgress((bytes) => send(run, { target, bytesDone: bytes }), total);
        perTarget.set(target, r);
      }
      r.update(bytesDone);
    },
    flush: async () => {
      await Promise.all([...perTarget.values()].map((r) => r.flush()));
    },
  };
}

export function createPullActivities(deps: PullDeps) {
  const { paths } = deps;
  const hv = deps.hypervisor;

  /** The staging dir, scratch files and socket of a backup, all derived from its checked staging dir. */
  async function layout(input: BeginPullInput, activity: string) {
    const dir = await paths.stagingDir(input.stagingDir, input.backupId, activity);
    paths.domainName(input.domain, activity);
    if (!Array.isArray(input.disks) || input.disks.length === 0)
      throw permanent(`${activity}: no disk of ${input.domain} to back up`, ErrorType.InvalidInput);
    const disks = input.disks.map((d) => ({
      name: paths.diskName(d.name, activity),
      virtualSize: d.virtualSize,
      scratch: scratchFile(dir, paths.diskName(d.name, activity)),
    }));
    // derived from the staging dir alone: recovery finds a dead backup's socket dir from its staging dir
    const socketDir = pullSocketDir(dir, deps.shortSocketRoot ?? SHORT_SOCKET_ROOT);
    return { dir, disks, socketDir, socket: join(socketDir, SOCKET_NAME), journal: join(dir, JOURNAL) };
  }
  type Layout = Awaited<ReturnType<typeof layout>>;

  /**
   * The socket's directory: 0700 when QEMU runs as root; else 0770 with QEMU's group. QEMU creates the socket in it,
   * so it needs write and search (0710 gives "nbd-server-start: Failed to bind socket to ...: Permission denied");
   * nobody else may connect and read the disks.
   */
  async function makeSocketDir(l: Layout, domain: string): Promise<void> {
    await rm(l.socketDir, { recursive: true, force: true });
    await makeDirs(join(l.socketDir, '..'), 0o700);
    await mkdir(l.socketDir, { mode: 0o700 });
    await chmod(l.socketDir, 0o700);
    const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
    if (!isRoot) return; // a session daemon's QEMU runs as us
    const qemu = await qemuUserOf(await hv.domainXml(domain));
    if (!qemu) return;
    const gid = await groupId(qemu.group);
    await chown(l.socketDir, 0, gid);
    await chmod(l.socketDir, 0o770);
  }

  /** Starts the pull job unless ours already runs; a dead attempt's leftovers are removed first. */
  async function ensureJob(input: BeginPullInput, l: Layout, activity: string): Promise<boolean> {
    const job = await hv.jobInfo(input.domain);
    if (ACTIVE.has(job.type)) {
      // our job: its socket and scratch files exist (libvirt creates the scratch files at backup-begin)
      if ((await exists(l.socket)) && (await allExist(l.disks.map((d) => d.scratch)))) return true;
      throw permanent(
        `another job (${job.operation ?? 'unknown'}) is running on ${input.domain}: wait for it to end or abort it with \`virsh domjobabort ${input.domain}\``,
        ErrorType.BackupJobFailed,
      );
    }
    // libvirt refuses an existing scratch file, and a journal belongs to the job it was written for
    await Promise.all([...l.disks.map((d) => rm(d.scratch, { force: true })), rm(l.journal, { force: true })]);
    await makeDirs(l.dir, QEMU_DIR_MODE);
    await makeSocketDir(l, input.domain);
    const begin = () =>
      hv.beginPullBackup(input.domain, {
        socket: l.socket,
        disks: l.disks.map((d) => ({ dev: d.name, scratch: d.scratch })),
        allDisks: input.disks.map((d) => d.name),
        ...(input.incremental ? { incremental: input.incremental, fullDisks: input.fullDisks ?? [] } : {}),
        ...(input.checkpoint ? { checkpoint: input.checkpoint } : {}),
      });
    try {
      await begin();
    } catch (err) {
      // the checkpoint of a job that is gone ("domain moment ... already exists"): this backup's own, never counted
      const name = input.checkpoint?.name;
      if (!(err instanceof HypervisorError && err.kind === 'checkpoint-exists' && name && err.checkpoint === name))
        throw err;
      await hv.deleteCheckpoint(input.domain, name);
      await begin();
    }
    Context.current().log.info(`${activity}: pull job begun`, { domain: input.domain, socket: l.socket });
    return false;
  }

  async function beginPullBackup(input: BeginPullInput): Promise<PullJob> {
    const l = await layout(input, 'beginPullBackup');
    try {
      const attached = await ensureJob(input, l, 'beginPullBackup');
      return { socket: l.socket, scratch: l.disks.map((d) => d.scratch), attached };
    } catch (err) {
      hypervisorFailure(err);
    }
  }

  /**
   * Undo and end of a pull job: `domjobabort` (how a pull job ends), then scratch files, socket dir, journal. A job
   * still running after the wait keeps all of them (QEMU still writes the old blocks into its scratch files) and
   * fails the attempt as retryable: a later attempt finds it ended, or aborts it again, and cleans up.
   */
  async function endPullBackup(input: BeginPullInput): Promise<void> {
    const l = await layout(input, 'endPullBackup');
    /** our job (its socket is ours), still running after domjobabort and the wait */
    let running = false;
    try {
      const job = await hv.jobInfo(input.domain);
      if (ACTIVE.has(job.type) && (await exists(l.socket))) {
        await hv.abortJob(input.domain);
        running = !(await jobEnds(input.domain, JOB_END_WAIT_MS));
      }
    } catch (err) {
      if (!(err instanceof HypervisorError && (err.kind === 'not-found' || err.kind === 'not-running')))
        hypervisorFailure(err);
    }
    if (running)
      throw ApplicationFailure.create({
        message: `the pull backup job of domain ${input.domain} did not end within ${JOB_END_WAIT_MS / 1000} s of domjobabort; its scratch files are kept and the step is retried (if the backup fails, \`vmbackup recover --domain ${input.domain}\` ends the job and removes them)`,
        type: ErrorType.BackupJobFailed,
        nonRetryable: false,
      });
    await Promise.all([
      ...l.disks.map((d) => rm(d.scratch, { force: true })),
      rm(l.socketDir, { recursive: true, force: true }),
      rm(l.journal, { force: true }),
    ]);
  }

  async function pullIntoRepositories(input: PullIntoRepositoriesInput): Promise<PulledRepositories> {
    const activity = 'pullIntoRepositories';
    const l = await layout(input.job, activity);
    const targets = paths.checkTargets(input.targets, activity);
    const ctx = Context.current();
    let attached: boolean;
    try {
      attached = await ensureJob(input.job, l, activity);
    } catch (err) {
      hypervisorFailure(err);
    }
    const jobId = await scratchIdentity(l.disks.map((d) => d.scratch));
    let journal = attached ? await readJournal(l.journal) : undefined;
    if (!journal || journal.job !== jobId) journal = { job: jobId, targets: {}, scratchPeakBytes: 0 };
    const j = journal;
    let dirtyJournal = false;
    const saveJournal = async () => {
      if (!dirtyJournal) return;
      dirtyJournal = false;
      const tmp = `${l.journal}.tmp`;
      await writeFile(tmp, JSON.stringify(j), { mode: 0o600 });
      await rename(tmp, l.journal);
    };
    const measureScratch = async () => {
      let sum = 0;
      for (const d of l.disks)
        sum += await stat(d.scratch).then(
          (s) => s.blocks * 512,
          () => 0,
        );
      if (sum > j.scratchPeakBytes) {
        j.scratchPeakBytes = sum;
        dirtyJournal = true;
      }
    };
    await measureScratch();
    const total = l.disks.reduce((n, d) => n + d.virtualSize, 0) * targets.length;
    const beat: PullHeartbeat = {
      target: '',
      disk: '',
      offset: 0,
      bytesDone: 0,
      bytesTotal: total,
      scratchPeakBytes: j.scratchPeakBytes,
    };
    const timer = setInterval(() => {
      void measureScratch()
        .then(saveJournal)
        .catch(() => undefined);
      beat.scratchPeakBytes = j.scratchPeakBytes;
      ctx.heartbeat(beat);
    }, JOURNAL_EVERY_MS);
    const report = progressReport(deps, ctx, total);
    const waiting = (waits: boolean) => {
      if (waits) beat.waitingForUpload = true;
      else delete beat.waitingForUpload;
      ctx.heartbeat(beat);
    };
    let before = 0;
    const results: PulledTarget[] = [];
    try {
      for (const target of targets) {
        beat.target = target;
        const done = (j.targets[target] ??= {});
        try {
          results.push(
            await withUploadPlace(deps.uploads, target, ctx.cancellationSignal, waiting, () =>
              withTarget(deps, target, input.s3Options, async (t) => {
                const repo = await openWorkerRepository(t, deps.repositoryPassword);
                const store = new ChunkStore(repo, { concurrency: deps.chunkConcurrency ?? PULL_CHUNK_CONCURRENCY });
                const disks: PullDiskResult[] = [];
                for (const disk of l.disks) {
                  beat.disk = disk.name;
                  const parentIndex = input.parent?.disks.find((d) => d.name === disk.name)?.index;
                  const dirty = input.job.incremental !== undefined && !(input.job.fullDisks ?? []).includes(disk.name);
                  const resumed = done[disk.name];
                  const out = await pullDisk({
                    socket: l.socket,
                    disk,
                    store,
                    dirtyBitmap: dirty && parentIndex ? `qemu:dirty-bitmap:backup-${disk.name}` : undefined,
                    parentIndex: dirty ? parentIndex : undefined,
                    resume: resumed,
                    signal: ctx.cancellationSignal,
                    onProgress: (p) => {
                      done[disk.name] = { chunks: p.settledChunks, entries: p.entries.slice(0, p.settledChunks) };
                      dirtyJournal = true;
                      beat.offset = Math.min(p.settledChunks * repo.config.chunkSize, disk.virtualSize);
                      beat.bytesDone = before + p.bytesDone;
                      ctx.heartbeat(beat);
                      report.update(target, beat.bytesDone);
                    },
                  });
                  const id = await store.putIndex(out.index);
                  await holdChunkObjects(t, await chunkBackupKeys([id], () => Promise.resolve(out.index)));
                  done[disk.name] = { chunks: out.index.entries.length, entries: out.index.entries };
                  dirtyJournal = true;
                  disks.push({
                    name: disk.name,
                    virtualSize: disk.virtualSize,
                    index: id,
                    stats: out.stats,
                    pull: {
                      readChunks: out.readChunks,
                      carriedChunks: out.carriedChunks,
                      readBytes: out.readBytes,
                      resumedFrom: resumed ? Math.min(resumed.chunks * repo.config.chunkSize, disk.virtualSize) : 0,
                    },
                  });
                  before += disk.virtualSize;
                }
                const stored = input.vm ? await storeVmFiles(store, t, input, paths) : undefined;
                return { target, ok: true as const, disks, ...(stored ?? {}) };
              }),
            ),
          );
        } catch (err) {
          // the export or the job failed: the step is retried (resuming from the journal); a target's own failure
          // is that target's
          if (isNbdError(err) || err instanceof HypervisorError || ctx.cancellationSignal.aborted) throw err;
          const failure = chunkFailure(err);
          if (failure instanceof ApplicationFailure && !failure.nonRetryable) throw failure;
          results.push({ target, ok: false, error: err instanceof Error ? err.message : String(err) });
        }
        await saveJournal();
      }
    } catch (err) {
      // a lost job: the next attempt begins a new one (ensureJob) and reads from 0
      await saveJournal().catch(() => undefined);
      if (isNbdError(err)) throw ApplicationFailure.retryable(err.message, 'NbdFailed');
      if (err instanceof HypervisorError) hypervisorFailure(err);
      throw err;
    } finally {
      clearInterval(timer);
      await report.flush();
    }
    await measureScratch();
    await saveJournal();
    return { targets: results, scratchPeakBytes: j.scratchPeakBytes, attached, attempt: ctx.info.attempt };
  }

  /**
   * Pull mode into LOCAL image trees: per target and disk, writePulledImage reads the export (`base:allocation` for a
   * full, the disk's dirty bitmap for an increment, with the parent's image as backing by the relative name push
   * uses) into a temp name in the backup's directory on the target, then the image is committed by a rename whose
   * sidecar holds the content digest taken while writing (never a file SHA-256: the file is never read again).
   *
   * Resume: each flushed window's offset goes to the heartbeat, with the job it belongs to (its scratch files). A
   * retried attempt that attaches to the same job reopens the temp image from there; a new job (libvirt lost the old
   * one) is another point in time, so every disk is written again from 0, committed ones included. A cancelled
   * attempt removes its temp image (the workflow's undo sweeps the backup's directory as well).
   */
  async function pullIntoImageTrees(input: PullIntoImageTreesInput): Promise<PulledImageTrees> {
    const activity = 'pullIntoImageTrees';
    const l = await layout(input.job, activity);
    const targets = paths.checkTargets(input.targets, activity);
    const { domain, backupId } = input.job;
    const ctx = Context.current();
    let attached: boolean;
    try {
      attached = await ensureJob(input.job, l, activity);
    } catch (err) {
      hypervisorFailure(err);
    }
    const jobId = await scratchIdentity(l.disks.map((d) => d.scratch));
    const before = ctx.info.heartbeatDetails as PullTreeHeartbeat | undefined;
    const same = attached && before?.job === jobId && typeof before.targets === 'object' && before.targets !== null;
    const beat: PullTreeHeartbeat = {
      job: jobId,
      target: '',
      disk: '',
      targets: same ? before.targets : {},
      bytesDone: 0,
      bytesTotal: l.disks.reduce((n, d) => n + d.virtualSize, 0) * targets.length,
      scratchPeakBytes: same && Number.isSafeInteger(before.scratchPeakBytes) ? before.scratchPeakBytes : 0,
    };
    const measureScratch = async () => {
      let sum = 0;
      for (const d of l.disks)
        sum += await stat(d.scratch).then(
          (st) => st.blocks * 512,
          () => 0,
        );
      beat.scratchPeakBytes = Math.max(beat.scratchPeakBytes, sum);
    };
    await measureScratch();
    // a write that waits on a slow disk must not look like a dead worker
    const timer = setInterval(() => {
      void measureScratch()
        .then(() => ctx.heartbeat(beat))
        .catch(() => undefined);
    }, JOURNAL_EVERY_MS);
    const report = progressReport(deps, ctx, beat.bytesTotal);
    const waiting = (waits: boolean) => {
      if (waits) beat.waitingForUpload = true;
      else delete beat.waitingForUpload;
      ctx.heartbeat(beat);
    };
    const results: PulledTree[] = [];
    let done = 0;
    try {
      for (const target of targets) {
        beat.target = target;
        const progress = (beat.targets[target] ??= {});
        let temp: string | undefined;
        try {
          const disks = await withUploadPlace(deps.uploads, target, ctx.cancellationSignal, waiting, () =>
            withTarget(deps, target, input.s3Options, async (t) => {
              const support = pullImageTreeSupport(t);
              if (!support.supported) throw permanent(support.reason, ErrorType.InvalidInput);
              const dir = await backupDirOn(support.localPath, domain, backupId, t.displayUrl);
              const out: PulledTreeDisk[] = [];
              for (const disk of l.disks) {
                beat.disk = disk.name;
                const key = imageKey(domain, backupId, disk.name, 'qcow2');
                const had = progress[disk.name];
                const committed = had?.committed;
                if (committed) {
                  const there = await t.stat(key);
                  if (there?.size === committed.size && there.metadata?.content === committed.content.sha256) {
                    out.push(committed);
                    done += disk.virtualSize;
                    continue;
                  }
                }
                temp = join(dir, tempName(`${disk.name}.qcow2`, tempSuffix(backupId)));
                // resumed only where the image of that window is still there (else written anew from 0)
                const from =
                  !committed && had && Number.isSafeInteger(had.resumeFrom) && (await exists(temp))
                    ? had.resumeFrom
                    : 0;
                const increment =
                  input.job.incremental !== undefined && !(input.job.fullDisks ?? []).includes(disk.name);
                const backing = increment
                  ? await parentImage(t, support.localPath, input, disk.name, activity)
                  : undefined;
                const img = await writePulledImage({
                  source: { socketPath: l.socket, exportName: disk.name },
                  context: backing ? `qemu:dirty-bitmap:backup-${disk.name}` : ALLOCATION_CONTEXT,
                  virtualSize: disk.virtualSize,
                  dest: temp,
                  ...(backing ? { backing } : {}),
                  from,
                  ...(deps.pullWindowBytes ? { window: deps.pullWindowBytes } : {}),
                  signal: ctx.cancellationSignal,
                  onProgress: (p) => {
                    progress[disk.name] = { resumeFrom: p.resumeFrom };
                    beat.bytesDone = done + p.resumeFrom;
                    ctx.heartbeat(beat);
                    report.update(target, beat.bytesDone);
                  },
                });
                // committed by a rename: the sidecar holds the content digest taken while writing, no file SHA-256
                await t.putImage(key, temp, {
                  allowMove: true,
                  sourceStamp: fileStamp(await stat(temp)),
                  metadata: {
                    content: img.content.sha256,
                    domain,
                    backupid: backupId,
                    disk: disk.name,
                    format: 'qcow2',
                  },
                });
                temp = undefined;
                const record: PulledTreeDisk = {
                  name: disk.name,
                  virtualSize: disk.virtualSize,
                  key,
                  size: img.size,
                  content: {
                    sha256: img.content.sha256,
                    scheme: 'content-v1',
                    chunkSize: img.content.chunkSize,
                    chunks: img.content.chunks,
                    zeroChunks: img.content.zeroChunks,
                  },
                  pull: { readBytes: img.copiedBytes, zeroedBytes: img.zeroedBytes, resumedFrom: from },
                };
                progress[disk.name] = { resumeFrom: disk.virtualSize, committed: record };
                done += disk.virtualSize;
                beat.bytesDone = done;
                ctx.heartbeat(beat);
                out.push(record);
              }
              return out;
            }),
          );
          results.push({ target, ok: true, disks });
        } catch (err) {
          // cancelled, or this target failed for good: its temp image goes (a retry would begin it anew)
          const retried =
            !ctx.cancellationSignal.aborted &&
            (isNbdError(err) ||
              err instanceof HypervisorError ||
              (err instanceof ApplicationFailure && !err.nonRetryable));
          if (temp && !retried) await rm(temp, { force: true }).catch(() => undefined);
          if (ctx.cancellationSignal.aborted || isNbdError(err) || err instanceof HypervisorError) throw err;
          if (err instanceof ApplicationFailure && !err.nonRetryable) throw err;
          delete beat.targets[target];
          results.push({ target, ok: false, error: err instanceof Error ? err.message : String(err) });
        }
      }
    } catch (err) {
      if (isNbdError(err)) throw ApplicationFailure.retryable(err.message, 'NbdFailed');
      if (err instanceof HypervisorError) hypervisorFailure(err);
      throw err;
    } finally {
      clearInterval(timer);
      await report.flush();
    }
    await measureScratch();
    return { targets: results, scratchPeakBytes: beat.scratchPeakBytes, attached, attempt: ctx.info.attempt };
  }

  /**
   * Whether the job running on `domain` ends within `ms`: libvirt ends an aborted job asynchronously, once QEMU has
   * cancelled its block jobs (a QEMU whose disk I/O hangs takes as long as the I/O does).
   */
  async function jobEnds(domain: string, ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (ACTIVE.has((await hv.jobInfo(domain)).type)) {
      if (Date.now() >= deadline) return false;
      await new Promise((r) => setTimeout(r, 100));
    }
    return true;
  }

  return { beginPullBackup, pullIntoRepositories, pullIntoImageTrees, endPullBackup };
}

/** What pullIntoImageTrees heartbeats: the job it writes for and, per target and disk, how far it got. */
export interface PullTreeHeartbeat {
  /** the job's identity (its scratch files): offsets of another job's point in time are never resumed from */
  job: string;
  target: string;
  disk: string;
  /** target -> disk -> everything before `resumeFrom` is written and flushed in the temp image; or committed */
  targets: Record<string, Record<string, { resumeFrom: number; committed?: PulledTreeDisk }>>;
  bytesDone: number;
  bytesTotal: number;
  scratchPeakBytes: number;
  /** true while it waits for a place on the target (`--max-concurrent-uploads`); the job and its scratch go on */
  waitingForUpload?: boolean;
}

/** The temp name's suffix of a backup's pulled images: the same in every attempt, so a retry finds its image. */
function tempSuffix(backupId: string): string {
  return createHash('sha256').update(`pull-image:${backupId}`).digest('hex').slice(0, 16);
}

/**
 * `<root>/<domain>/<backupId>`, made 0700 and checked to be that very directory: a link someone planted in the target
 * (the domain's directory pointing elsewhere) is never written through.
 */
async function backupDirOn(root: string, domain: string, backupId: string, displayUrl: string): Promise<string> {
  const dir = join(root, imageKey(domain, backupId, 'x', 'qcow2'), '..');
  await makeDirs(dir, 0o700);
  const [real, realRoot] = await Promise.all([realpath(dir), realpath(root)]);
  if (real !== join(realRoot, domain, backupId)) {
    throw permanent(
      `the backup directory ${domain}/${backupId} on ${displayUrl} leads outside the target (a symbolic link); remove the link`,
      ErrorType.InvalidInput,
    );
  }
  return dir;
}

/** An increment's backing: the parent backup's image of DISK on this target, by the name push increments use. */
async function parentImage(
  t: StorageTarget,
  root: string,
  input: PullIntoImageTreesInput,
  disk: string,
  activity: string,
): Promise<{ name: string; path: string; format: 'qcow2' }> {
  const parent = input.parent;
  const d = parent?.disks.find((x) => x.name === disk);
  if (!parent || !d)
    throw permanent(`${activity}: the increment names no parent image of disk ${disk}`, ErrorType.InvalidInput);
  const key = imageKey(input.job.domain, parent.backupId, disk, 'qcow2');
  if (d.format !== 'qcow2' || d.key !== key)
    throw permanent(
      `${activity}: the parent image of disk ${disk} is not ${key} (${d.key}, ${d.format}); take a full backup (--level full)`,
      ErrorType.InvalidInput,
    );
  // stat refuses a key that is (or lies behind) a link
  if (!(await t.stat(key)))
    throw permanent(
      `${activity}: the parent image ${key} of disk ${disk} is missing on ${t.displayUrl}; take a full backup (--level full)`,
      ErrorType.InvalidInput,
    );
  return { name: `../${parent.backupId}/${disk}.qcow2`, path: join(root, key), format: 'qcow2' };
}

/** The whole-VM files captured into staging, stored as small indexes (as storeChunkImages does). */
async function storeVmFiles(
  store: ChunkStore,
  target: Parameters<typeof holdChunkObjects>[0],
  input: PullIntoRepositoriesInput,
  paths: HostPaths,
): Promise<{ vm: VmFilesRecord; vmStats: ChunkStoreStats }> {
  const vm = input.vm!;
  if (!Array.isArray(vm.files) || vm.files.length > 32)
    throw permanent('pullIntoRepositories: the whole-VM files are not a list of at most 32', ErrorType.InvalidInput);
  const vmStats: ChunkStoreStats = { chunks: 0, zeroChunks: 0, knownChunks: 0, uploadedChunks: 0, uploadedBytes: 0 };
  const ids = new Map<string, string>();
  for (const f of vm.files) {
    const path = await paths.stagingVmFile(f.path, input.job.backupId, f.name, 'pullIntoRepositories');
    const body = await readFile(path);
    if (body.length !== f.size) throw new Error(`the staged file ${f.name} changed since it was captured`);
    const put = await putSmallFile(store, body);
    for (const k of Object.keys(vmStats) as Array<keyof ChunkStoreStats>) vmStats[k] += put.stats[k];
    await holdChunkObjects(target, await chunkBackupKeys([put.sha256], (id) => store.getIndex(id)));
    ids.set(f.name, put.sha256);
  }
  const swap = <F extends { key: string; sha256: string }>(f: F): F => {
    const name = f.key.slice(f.key.lastIndexOf('/') + 1);
    const id = ids.get(name);
    if (!id) throw permanent(`the whole-VM file ${name} was not captured into staging`, ErrorType.InvalidInput);
    return { ...f, key: `@chunk-repo/indexes/${id}`, sha256: id };
  };
  return {
    vm: {
      xml: swap(vm.vm.xml),
      ...(vm.vm.nvram ? { nvram: swap(vm.vm.nvram) } : {}),
      ...(vm.vm.tpm ? { tpm: { version: vm.vm.tpm.version, files: vm.vm.tpm.files.map(swap) } } : {}),
    },
    vmStats,
  };
}

interface PullDiskOptions {
  socket: string;
  disk: { name: string; virtualSize: number };
  store: ChunkStore;
  /** an increment: the dirty bitmap context to read, and the parent backup's index of the disk */
  dirtyBitmap?: string;
  parentIndex?: string;
  resume?: JournalDisk;
  signal: AbortSignal;
  onProgress: (p: IngestProgress) => void;
}

/** One disk of the job into one repository. */
async function pullDisk(o: PullDiskOptions) {
  const { store, disk } = o;
  const chunkSize = store.repo.config.chunkSize;
  const contexts = ['base:allocation', ...(o.dirtyBitmap ? [o.dirtyBitmap] : [])];
  const client = await NbdClient.connect({ socketPath: o.socket, exportName: disk.name, metaContexts: contexts });
  try {
    if (client.info.size !== disk.virtualSize)
      throw permanent(
        `the pull export of disk ${disk.name} holds ${client.info.size} bytes, not its ${disk.virtualSize}`,
        ErrorType.ImageCorrupt,
      );
    const count = Math.ceil(disk.virtualSize / chunkSize);
    // chunks to read: all of them for a full; for an increment, those the bitmap marks and those whose parent entry
    // is gone from the repository (a gc, or a repository someone else changed)
    let carry: { entries: readonly IndexEntry[]; changed(n: number): boolean } | undefined;
    let carriedChunks = 0;
    if (o.dirtyBitmap && o.parentIndex) {
      const parent = await store.getIndex(o.parentIndex);
      if (parent.virtualSize !== disk.virtualSize || parent.chunkSize !== chunkSize)
        throw permanent(
          `the previous backup's index of disk ${disk.name} does not fit the disk now; take a full backup (--level full)`,
          ErrorType.InvalidInput,
        );
      const changed = new Uint8Array(count);
      for await (const e of extents(client, { context: o.dirtyBitmap })) {
        if ((e.flags & STATE_DIRTY) === 0) continue;
        for (let n = Math.floor(e.offset / chunkSize); n * chunkSize < e.offset + e.length; n++) changed[n] = 1;
      }
      await inParallel(count, 16, async (n) => {
        const id = parent.entries[n]!;
        if (changed[n] || id === 'zero') return;
        if (!(await store.has(id))) changed[n] = 1;
      });
      for (let n = 0; n < count; n++) if (!changed[n]) carriedChunks++;
      carry = { entries: parent.entries, changed: (n) => changed[n] === 1 };
    }
    const from = o.resume ? Math.min(o.resume.chunks, count) : 0;
    let readBytes = 0;
    const readChunks = new Set<number>();
    const reads = pooledReads(client, { inFlight: 8 });
    const source: DiskSource = {
      size: disk.virtualSize,
      dataRanges: () =>
        clip(
          extents(client, { context: 'base:allocation', offset: from * chunkSize }),
          chunkSize,
          carry ? (n) => carry.changed(n) : () => true,
        ),
      read: (ranges) =>
        (async function* () {
          for await (const piece of reads.read(ranges)) {
            readBytes += piece.data.length;
            readChunks.add(Math.floor(piece.offset / chunkSize));
            yield piece;
          }
        })(),
      release: reads.release,
    };
    const out = await ingestDisk(store, source, {
      signal: o.signal,
      onProgress: o.onProgress,
      ...(carry ? { carry } : {}),
      ...(o.resume && from > 0 ? { resume: { chunks: from, entries: o.resume.entries } } : {}),
    });
    return { ...out, readChunks: readChunks.size, carriedChunks, readBytes };
  } finally {
    await client.disconnect().catch(() => undefined);
  }
}

/** The allocated ranges (neither hole nor zero) inside chunks `want` accepts, cut at chunk boundaries. */
async function* clip(
  source: AsyncIterable<BlockExtent>,
  chunkSize: number,
  want: (n: number) => boolean,
): AsyncGenerator<ByteRange> {
  for await (const e of source) {
    if ((e.flags & (STATE_HOLE | STATE_ZERO)) !== 0) continue;
    let at = e.offset;
    const end = e.offset + e.length;
    while (at < end) {
      const n = Math.floor(at / chunkSize);
      const stop = Math.min(end, (n + 1) * chunkSize);
      if (want(n)) yield { offset: at, length: stop - at };
      at = stop;
    }
  }
}

async function inParallel(count: number, limit: number, fn: (n: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, count) }, async () => {
      while (next < count) await fn(next++);
    }),
  );
}

async function readJournal(path: string): Promise<Journal | undefined> {
  try {
    const j = JSON.parse(await readFile(path, 'utf8')) as Journal;
    if (typeof j.job !== 'string' || typeof j.targets !== 'object' || j.targets === null) return undefined;
    for (const disks of Object.values(j.targets))
      for (const d of Object.values(disks))
        if (!Number.isInteger(d.chunks) || !Array.isArray(d.entries) || d.entries.length < d.chunks) return undefined;
    return j;
  } catch {
    return undefined;
  }
}

/** The job's identity: its scratch files (libvirt creates them anew at each backup-begin). */
async function scratchIdentity(files: string[]): Promise<string> {
  const parts = [];
  for (const f of files) {
    const s = await lstat(f).catch(() => undefined);
    parts.push(s ? `${s.ino}:${s.birthtimeMs || s.ctimeMs}` : 'none');
  }
  return parts.join(',');
}

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(
    () => true,
    () => false,
  );
}

async function allExist(files: string[]): Promise<boolean> {
  for (const f of files) if (!(await exists(f))) return false;
  return true;
}

/** The numeric id of group `spec` (a name from /etc/group, or `+<gid>`). */
async function groupId(spec: string): Promise<number> {
  const plain = spec.replace(/^\+/, '');
  if (/^\d+$/.test(plain)) return Number(plain);
  const line = (await readFile('/etc/group', 'utf8')).split('\n').find((l) => l.split(':')[0] === spec);
  const gid = line?.split(':')[2];
  if (gid === undefined || !/^\d+$/.test(gid))
    throw permanent(`QEMU's group ${spec} (qemu.conf) is not in /etc/group`, ErrorType.InvalidInput);
  return Number(gid);
}
