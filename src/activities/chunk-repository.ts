/**
 * Backups into a chunk repository (docs/chunk-format.md): storeChunkImages reads each staged image's guest data
 * through a read-only `qemu-nbd` export (holes are never read), stores the chunks the repository does not hold and
 * each disk's index, and the whole-VM files as small indexes; writeChunkManifest then commits the backup with its
 * version-3 manifest, signed with the repository's key when it is encrypted, written last.
 *
 * The password is this worker's own (VMBACKUP_PASSWORD, VMBACKUP_PASSWORD_FILE, `vmbackup worker --password-file`),
 * never part of an activity's input: Temporal's history is readable by anyone on the cluster.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { toolEnv } from '../hypervisor/exec';
import { NbdClient, extents, isNbdError, pooledReads, rangesWhere, STATE_HOLE, STATE_ZERO } from '../nbd';
import {
  ChunkStore,
  chunkBackupKeys,
  holdChunkObjects,
  indexKey,
  ingestDisk,
  isChunkFormatError,
  openRepository,
  putSmallFile,
} from '../repository/chunks';
import type { DiskIndex, DiskSource, IngestOptions, OpenRepository, StoreStats } from '../repository/chunks';
import { buildManifest, encodeManifest, signManifest, signRepositoryManifest } from '../repository/manifest';
import type { ManifestInput as RepositoryManifestInput } from '../repository/manifest';
import type { StoreProgress } from '../shared/queries';
import type {
  ChunkManifestInput,
  ChunkStoreStats,
  StoredChunkDisk,
  StoredChunkImages,
  StoreChunkImagesInput,
  StoreOfflineDisksInput,
  VmFilesRecord,
} from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { fileStamp } from '../shared/file-stamp';
import type { Hypervisor } from '../hypervisor/port';
import type { StorageTarget } from '../storage/contract';
import { manifestKey } from '../storage/keys';
import { permanent } from './failures';
import type { HostPaths } from './host-paths';
import { offlineGuard, sourceStamp, startedDuringCopy } from './offline-guard';
import { spacedProgress } from './progress-report';
import { withTarget } from './storage';
import type { StorageActivityDeps } from './storage';
import { withUploadPlace } from './upload-slots';
import type { UploadSlots } from './upload-slots';

export interface ChunkRepositoryDeps {
  openTarget: StorageActivityDeps['openTarget'];
  /** the user's manifest signing key: signs after the repository's signature */
  manifestKey?: Buffer;
  paths: HostPaths;
  /** the offline method reads a shut-off domain's disks in place (storeOfflineDisks) */
  hypervisor?: Hypervisor;
  /** this worker's repository password (read once at its start); undefined: none given */
  repositoryPassword?: string;
  /** chunks hashed, encoded or uploaded at once per disk (default 4) */
  chunkConcurrency?: number;
  /** NBD reads in flight per disk (default 8) */
  nbdInFlight?: number;
  /**
   * tells the running backup's workflow how far a target's store is (the progress query shows it); best effort: a
   * report that fails is dropped. Undefined: the workflow sees the bytes only once the target is done.
   */
  reportProgress?: StoreProgressReporter;
  /**
   * this worker's upload places per target (`--max-concurrent-uploads`), shared with shipImage: a store into a chunk
   * repository holds one of its target's places while it stores; none: no cap
   */
  uploads?: UploadSlots;
}

/** Sends `progress` to the workflow run the activity belongs to (a signal on the worker's Temporal client). */
export type StoreProgressReporter = (
  execution: { workflowId: string; runId: string },
  progress: StoreProgress,
) => Promise<void>;

/** What storeChunkImages heartbeats: where it is, for `status` and for a person reading the history. */
export interface ChunkStoreHeartbeat {
  disk: string;
  bytesDone: number;
  bytesTotal: number;
  uploadedChunks: number;
  knownChunks: number;
  /** true while the store waits for a place on its target (`--max-concurrent-uploads`) */
  waitingForUpload?: boolean;
}

const PASSWORD_HINT =
  "give this host's worker the repository's password: VMBACKUP_PASSWORD or VMBACKUP_PASSWORD_FILE in its environment, or `vmbackup worker --password-file FILE` (`vmbackup backup --password-file FILE` for the embedded default)";

/** Opens the chunk repository on `target` with the worker's password; its failures are one non-retryable sentence. */
export async function openWorkerRepository(
  target: StorageTarget,
  password: string | undefined,
): Promise<OpenRepository> {
  try {
    return await openRepository(target, password);
  } catch (err) {
    if (isChunkFormatError(err)) {
      if (err.kind === 'wrong-password') {
        const why = err.message.replace(/\.$/, '');
        const said = password === undefined ? `${why}, and this worker has no password` : why;
        throw permanent(`${said}: ${PASSWORD_HINT}.`, ErrorType.RepositoryPassword);
      }
      throw permanent(err.message, ErrorType.RepositoryInvalid);
    }
    throw err;
  }
}

function addStats(into: ChunkStoreStats, s: StoreStats): void {
  into.chunks += s.chunks;
  into.zeroChunks += s.zeroChunks;
  into.knownChunks += s.knownChunks;
  into.uploadedChunks += s.uploadedChunks;
  into.uploadedBytes += s.uploadedBytes;
}

function noStats(): ChunkStoreStats {
  return { chunks: 0, zeroChunks: 0, knownChunks: 0, uploadedChunks: 0, uploadedBytes: 0 };
}

/** A chunk format failure while storing: corrupt or foreign data in the repository is permanent; the rest is not ours. */
export function chunkFailure(err: unknown): unknown {
  if (isChunkFormatError(err)) return permanent(err.message, ErrorType.RepositoryInvalid);
  if (isNbdError(err)) return ApplicationFailure.retryable(err.message, 'NbdFailed');
  return err;
}

/** One disk a store step stores: how to read it into the store (ingestDisk over some read-only source). */
interface DiskToStore {
  name: string;
  virtualSize: number;
  ingest(store: ChunkStore, opts: IngestOptions): Promise<{ index: DiskIndex; stats: StoreStats }>;
}

export function createChunkRepositoryActivities(deps: ChunkRepositoryDeps) {
  const { paths } = deps;

  async function storeChunkImages(input: StoreChunkImagesInput): Promise<StoredChunkImages> {
    const activity = 'storeChunkImages';
    paths.checkTarget(input.target, activity);
    const backupId = paths.backupId(input.backupId, activity);
    paths.domainName(input.domain, activity);
    if (!Array.isArray(input.images) || input.images.length === 0)
      throw permanent(`${activity}: no images given`, ErrorType.InvalidInput);
    const images = await Promise.all(
      input.images.map(async (i) => ({ ...i, path: await paths.stagingImage(i.path, backupId, i, activity) })),
    );
    const disks: DiskToStore[] = images.map((image) => ({
      name: image.name,
      virtualSize: image.virtualSize,
      async ingest(store, opts) {
        const stampBefore = image.stamp ?? fileStamp(await stat(image.path));
        const stored = await readImage(image, 'the staged image', stagingDirOf(image.path), (source) =>
          ingestDisk(store, source, opts),
        );
        if (fileStamp(await stat(image.path)) !== stampBefore)
          throw new Error(`the staged image of disk ${image.name} changed while it was stored; the step is retried`);
        return stored;
      },
    }));
    return storeDisks(input, backupId, disks, activity);
  }

  /**
   * The offline method into a chunk repository: the shut-off domain's own disks are read where they are, each
   * through a read-only `qemu-nbd -f <format>` export, and chunked; nothing is copied into staging. The guarantee is
   * copyOfflineDisks': the disks are the ones libvirt has for the domain, the domain stays shut off while they are
   * read (a start aborts the read), and a source file that changed meanwhile discards the read. Only then is the
   * disk's index stored: the manifest (a later step) can only name a disk read whole from a shut-off domain.
   */
  async function storeOfflineDisks(input: StoreOfflineDisksInput): Promise<StoredChunkImages> {
    const activity = 'storeOfflineDisks';
    paths.checkTarget(input.target, activity);
    const backupId = paths.backupId(input.backupId, activity);
    const domain = paths.domainName(input.domain, activity);
    const stagingDir = await paths.stagingDir(input.stagingDir, backupId, activity);
    const hv = deps.hypervisor;
    if (!hv) throw permanent(`${activity}: this worker has no hypervisor connection`, ErrorType.InvalidInput);
    const guard = offlineGuard(hv, paths);
    const live = await guard.disksOfDomain({ domain, disks: input.disks }, activity);
    const ctx = Context.current();
    const disks: DiskToStore[] = live.map((disk) => ({
      name: disk.name,
      virtualSize: disk.virtualSize,
      async ingest(store, opts) {
        const stamp = await sourceStamp(disk.source);
        await guard.assertShutOff(domain);
        const watch = guard.watchShutOff(domain, ctx.cancellationSignal);
        let stored: { index: DiskIndex; stats: StoreStats };
        try {
          // the format libvirt names, never probed; a qcow2's backing chain as its header says (as qemu-img convert
          // in copyOfflineDisks opens it)
          stored = await readImage(
            { name: disk.name, format: disk.format, path: disk.source, virtualSize: disk.virtualSize },
            `disk ${disk.name} of ${domain}`,
            stagingDir,
            (source) => ingestDisk(store, source, { ...opts, signal: watch.signal }),
          );
        } catch (err) {
          if (watch.started()) throw startedDuringCopy(domain);
          throw err;
        } finally {
          watch.stop();
        }
        await guard.assertShutOff(domain);
        if ((await sourceStamp(disk.source)) !== stamp) throw startedDuringCopy(domain);
        return stored;
      },
    }));
    return storeDisks(input, backupId, disks, activity);
  }

  /** Stores each disk's chunks and index, then the whole-VM files; heartbeats and reports progress as it goes. */
  async function storeDisks(
    input: Pick<StoreChunkImagesInput, 'target' | 's3Options' | 'vm'>,
    backupId: string,
    images: DiskToStore[],
    activity: string,
  ): Promise<StoredChunkImages> {
    if (input.vm && (!Array.isArray(input.vm.files) || input.vm.files.length > 32))
      throw permanent(`${activity}: the input's whole-VM files are not a list of at most 32`, ErrorType.InvalidInput);
    const vmFiles = await Promise.all(
      (input.vm?.files ?? []).map(async (f) => ({
        ...f,
        path: await paths.stagingVmFile(f.path, backupId, f.name, activity),
      })),
    );
    const ctx = Context.current();
    const total = images.reduce((n, i) => n + i.virtualSize, 0);
    return withTarget(deps, input.target, input.s3Options, async (target) => {
      const repo = await openWorkerRepository(target, deps.repositoryPassword);
      const store = new ChunkStore(repo, { concurrency: deps.chunkConcurrency ?? 4 });
      // a file tree answers which chunks it holds with one listing instead of a stat per chunk
      if (target.capabilities.fileTree) await store.loadKnown();
      const disks: StoredChunkDisk[] = [];
      let before = 0;
      const beat: ChunkStoreHeartbeat = {
        disk: '',
        bytesDone: 0,
        bytesTotal: total,
        uploadedChunks: 0,
        knownChunks: 0,
      };
      const execution = ctx.info.workflowExecution;
      const { reportProgress } = deps;
      const report = spacedProgress(
        reportProgress && execution
          ? (bytesDone) =>
              reportProgress(
                { workflowId: execution.workflowId, runId: execution.runId },
                { target: input.target, bytesDone },
              )
          : undefined,
        total,
      );
      // a slow upload must not look like a dead worker
      const keepAlive = setInterval(() => ctx.heartbeat(beat), 5_000);
      const waiting = (waits: boolean) => {
        if (waits) beat.waitingForUpload = true;
        else delete beat.waitingForUpload;
        ctx.heartbeat(beat);
      };
      try {
        return await withUploadPlace(deps.uploads, input.target, ctx.cancellationSignal, waiting, () => storeAll());
      } finally {
        clearInterval(keepAlive);
        await report.flush();
      }
      async function storeAll(): Promise<StoredChunkImages> {
        for (const image of images) {
          beat.disk = image.name;
          const { index, stats } = await image
            .ingest(store, {
              signal: ctx.cancellationSignal,
              onProgress: (p) => {
                beat.bytesDone = before + p.bytesDone;
                beat.uploadedChunks = p.stats.uploadedChunks;
                beat.knownChunks = p.stats.knownChunks;
                ctx.heartbeat(beat);
                report.update(beat.bytesDone);
              },
            })
            .catch((err: unknown) => {
              throw chunkFailure(err);
            });
          if (index.virtualSize !== image.virtualSize)
            throw permanent(
              `the staged image of disk ${image.name} holds ${index.virtualSize} bytes, not its ${image.virtualSize}`,
              ErrorType.ImageCorrupt,
            );
          const id = await store.putIndex(index);
          // S3 Object Lock: every chunk this disk reuses gets the backup's date here, in this heartbeating step (one
          // HeadObject per chunk is far too long for the manifest's short step on a large disk)
          await holdChunkObjects(target, await chunkBackupKeys([id], () => Promise.resolve(index)));
          disks.push({ name: image.name, virtualSize: index.virtualSize, index: id, stats: { ...stats } });
          before += image.virtualSize;
        }
        if (!input.vm) return { disks };
        const vmStats = noStats();
        const stored = new Map<string, string>();
        for (const f of vmFiles) {
          const body = await readFile(f.path);
          if (body.length !== f.size) throw new Error(`the staged file ${f.name} changed since it was captured`);
          const put = await putSmallFile(store, body).catch((err: unknown) => {
            throw chunkFailure(err);
          });
          addStats(vmStats, put.stats);
          await holdChunkObjects(target, await chunkBackupKeys([put.sha256], (id) => store.getIndex(id)));
          stored.set(f.name, put.sha256);
        }
        return { disks, vm: indexedVmRecord(input.vm.vm, stored), vmStats };
      }
    });
  }

  async function writeChunkManifest(input: ChunkManifestInput): Promise<void> {
    const activity = 'writeChunkManifest';
    paths.checkTarget(input.target, activity);
    const { disks, ...rest } = input.manifest;
    if (!Array.isArray(disks) || disks.length === 0)
      throw permanent(`${activity}: the manifest lists no disk`, ErrorType.InvalidInput);
    await withTarget(deps, input.target, input.s3Options, async (target) => {
      const repo = await openWorkerRepository(target, deps.repositoryPassword);
      const store = new ChunkStore(repo);
      const { config } = repo;
      // the manifest commits the backup: every index it names must be in this repository and hold what it says
      try {
        for (const d of disks) {
          const index = await store.getIndex(d.index);
          if (index.virtualSize !== d.virtualSize || index.entries.length !== d.stats.chunks)
            throw permanent(
              `Backup ${rest.backupId} cannot be committed on ${target.displayUrl}: the index of disk ${d.name} does not hold that disk.`,
              ErrorType.InvalidInput,
            );
        }
        for (const f of vmEntries(rest.vm)) await store.getIndex(f.sha256);
        // S3 Object Lock: storeChunkImages gave every index and chunk of this backup (most stored by earlier
        // backups) its date; the indexes are checked again here (a few objects), so the manifest is never written
        // naming an index retained for less than the backup
        const ids = [...disks.map((d) => d.index), ...vmEntries(rest.vm).map((f) => f.sha256)];
        await holdChunkObjects(target, [...new Set(ids)].map(indexKey));
      } catch (err) {
        throw chunkFailure(err);
      }
      const lock = target.objectLock?.writeLock;
      const manifestInput: RepositoryManifestInput = {
        ...rest,
        disks: disks.map((d) => ({
          name: d.name,
          format: 'chunks',
          virtualSize: d.virtualSize,
          size: d.stats.uploadedBytes,
          sha256: d.index,
          key: indexKey(d.index),
          chunks: {
            chunkSize: config.chunkSize,
            count: d.stats.chunks,
            zeroChunks: d.stats.zeroChunks,
            uploadedChunks: d.stats.uploadedChunks,
          },
        })),
        repository: {
          id: config.repositoryId,
          chunkSize: config.chunkSize,
          encryption: config.encryption,
          compression: config.compression,
        },
        ...(lock ? { objectLock: lock } : {}),
      };
      let manifest = buildManifest(manifestInput);
      if (repo.keys) manifest = signRepositoryManifest(manifest, repo.keys.authKey);
      if (deps.manifestKey) manifest = signManifest(manifest, deps.manifestKey);
      const key = manifestKey(manifest.domain, manifest.backupId);
      const body = encodeManifest(manifest);
      if ((await target.stat(key)) && (await target.getBuffer(key)).equals(body)) return;
      await target.putManifest(key, body);
    });
  }

  return { storeChunkImages, storeOfflineDisks, writeChunkManifest };
}

/** The whole-VM files a manifest `vm` record names. */
function vmEntries(vm: VmFilesRecord | undefined): Array<{ key: string; sha256: string }> {
  if (!vm) return [];
  return [vm.xml, ...(vm.nvram ? [vm.nvram] : []), ...(vm.tpm?.files ?? [])];
}

/** The capture's `vm` record with each file's key and sha256 its index (the staged file of the same name). */
function indexedVmRecord(vm: VmFilesRecord, stored: Map<string, string>): VmFilesRecord {
  const swap = <F extends { key: string; sha256: string }>(f: F): F => {
    const name = f.key.slice(f.key.lastIndexOf('/') + 1);
    const id = stored.get(name);
    if (!id) throw permanent(`the whole-VM file ${name} was not captured into staging`, ErrorType.InvalidInput);
    return { ...f, key: indexKey(id), sha256: id };
  };
  return {
    xml: swap(vm.xml),
    ...(vm.nvram ? { nvram: swap(vm.nvram) } : {}),
    ...(vm.tpm ? { tpm: { version: vm.tpm.version, files: vm.tpm.files.map(swap) } } : {}),
  };
}

function stagingDirOf(path: string): string {
  return path.slice(0, path.lastIndexOf('/'));
}

/** A Unix socket path must fit sockaddr_un (108 bytes with its NUL). */
const MAX_SOCKET_PATH = 100;

/**
 * Runs `fn` over the guest data of a staged image, or of a shut-off domain's own disk (`what` names it):
 * `qemu-nbd --read-only -f <format>` (the format we wrote or libvirt names, never probed: a raw disk starts with
 * whatever the guest wrote) on a Unix socket of its own in the staging directory (two targets read one disk at once), one client
 * with `base:allocation`. qemu-nbd is stopped whatever happens (also on cancel): it serves one client and exits
 * when it disconnects, and is killed if it is still there.
 */
async function readImage<T>(
  image: { name: string; format: string; path: string; virtualSize: number },
  what: string,
  stagingDir: string,
  fn: (source: DiskSource) => Promise<T>,
): Promise<T> {
  let socketDir = stagingDir;
  let ownDir: string | undefined;
  const socketName = `nbd-${image.name}-${randomBytes(4).toString('hex')}.sock`;
  if (join(stagingDir, socketName).length > MAX_SOCKET_PATH) {
    ownDir = await mkdtemp(join(tmpdir(), 'vmbackup-nbd-'));
    socketDir = ownDir;
  }
  const socket = join(socketDir, socketName);
  await rm(socket, { force: true });
  const server = startQemuNbd(image, socket);
  let client: NbdClient | undefined;
  try {
    client = await connectWhenListening(socket, image.name, server, what);
    if (client.info.size !== image.virtualSize)
      throw permanent(
        `qemu-nbd exports ${client.info.size} bytes of ${what === 'the staged image' ? `the staged image of disk ${image.name}` : what}, not its ${image.virtualSize}`,
        ErrorType.ImageCorrupt,
      );
    const c = client;
    const source: DiskSource = {
      size: c.info.size,
      dataRanges: () =>
        rangesWhere(extents(c, { context: 'base:allocation' }), (f) => (f & (STATE_HOLE | STATE_ZERO)) === 0),
      ...pooledReads(c, { inFlight: 8 }),
    };
    return await fn(source);
  } finally {
    await client?.disconnect().catch(() => undefined);
    await server.stop();
    await rm(socket, { force: true });
    if (ownDir) await rm(ownDir, { recursive: true, force: true });
  }
}

interface QemuNbd {
  process: ChildProcess;
  exited: () => number | null | undefined;
  stderr: () => string;
  stop(): Promise<void>;
}

function startQemuNbd(image: { name: string; format: string; path: string }, socket: string): QemuNbd {
  const args = ['--read-only', '-f', image.format, '-k', socket, '-x', image.name, image.path];
  const child = spawn('qemu-nbd', args, { stdio: ['ignore', 'ignore', 'pipe'], env: toolEnv() });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => {
    if (stderr.length < 4096) stderr += d.toString();
  });
  let exited: number | null | undefined;
  let spawnError: Error | undefined;
  const exit = new Promise<void>((resolve) => {
    child.once('exit', (code) => {
      exited = code;
      resolve();
    });
    child.once('error', (err) => {
      spawnError = err;
      exited = -1;
      resolve();
    });
  });
  return {
    process: child,
    exited: () => exited,
    stderr: () => (spawnError ? `qemu-nbd cannot run: ${spawnError.message}` : stderr.trim()),
    async stop() {
      if (exited === undefined) {
        child.kill('SIGTERM');
        const killed = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exit;
        clearTimeout(killed);
      }
    },
  };
}

/** Connects once qemu-nbd listens (it creates the socket after opening the image); its exit is one sentence. */
async function connectWhenListening(
  socket: string,
  exportName: string,
  server: QemuNbd,
  what: string,
): Promise<NbdClient> {
  // a deadline for qemu-nbd to come up, not a measurement
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (server.exited() !== undefined)
      throw new Error(`qemu-nbd could not export ${what}: ${server.stderr() || `exit ${server.exited()}`}`);
    try {
      return await NbdClient.connect({
        socketPath: socket,
        metaContexts: ['base:allocation'],
        exportName,
      });
    } catch (err) {
      const code = (err as { cause?: NodeJS.ErrnoException }).cause?.code;
      const notYet = isNbdError(err) && (code === 'ENOENT' || code === 'ECONNREFUSED');
      if (!notYet || Date.now() > deadline) throw err;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
