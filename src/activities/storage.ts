/**
 * Storage activities: ship an image to a target, commit a backup by writing its manifest, and
 * clean up the images of a backup that failed before its manifest was written.
 *
 * Each activity looks at the target first and does only what is missing, so a retry after a
 * worker crash is safe. shipImage heartbeats the driver's checkpoint and resumes from it.
 */
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import type {
  DeleteBackupObjectsInput,
  HostActivities,
  ManifestInput,
  ShipImageInput,
  ShippedImage,
} from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { resolvedLock } from '../shared/object-lock';
import type { S3TargetOptions } from '../shared/types';
import { deleteObjectsUnder, findBackup } from '../repository/catalog';
import type { PutCheckpoint, StorageTarget } from '../storage/contract';
import { StorageError, type StorageErrorKind } from '../storage/errors';
import { imageKey, manifestKey } from '../storage/keys';
import {
  buildManifest,
  encodeManifest,
  manifestVmFiles,
  signManifest,
  storedDigest,
  type Manifest,
} from '../repository/manifest';
import type { HostPaths } from './host-paths';
import type { UploadSlots } from './upload-slots';
import { withUploadPlace } from './upload-slots';

export interface StorageActivityDeps {
  openTarget: (url: string, options?: { s3?: S3TargetOptions }) => StorageTarget;
  /** the user's manifest signing key (VMBACKUP_MANIFEST_KEY_FILE): every manifest written is signed with it */
  manifestKey?: Buffer;
  /** this host's staging roots and allowed targets: inputs are checked against them */
  paths: HostPaths;
  /** this worker's places per target (`--max-concurrent-uploads`); none: no cap */
  uploads?: UploadSlots;
}

/** What shipImage heartbeats: the driver's resume point and the bytes done so far. */
export interface ShipHeartbeat {
  checkpoint?: PutCheckpoint;
  bytesDone: number;
  /** true while the upload waits for a place on its target (`--max-concurrent-uploads`) */
  waitingForUpload?: boolean;
}

const FAILURE_TYPE: Record<StorageErrorKind, string> = {
  'not-found': ErrorType.NotFound,
  permission: ErrorType.PermissionDenied,
  'no-space': ErrorType.NoSpace,
  unreachable: ErrorType.Unreachable,
  'invalid-key': ErrorType.InvalidInput,
  'invalid-target': ErrorType.InvalidTarget,
  checksum: ErrorType.ChecksumMismatch,
  failed: 'StorageFailed',
};

/** Permanent storage errors become non-retryable; transient ones keep their sentence and reach the retry policy. */
export function toActivityFailure(err: unknown): unknown {
  if (!(err instanceof StorageError)) return err;
  const type = FAILURE_TYPE[err.kind];
  return err.permanent
    ? ApplicationFailure.nonRetryable(err.message, type)
    : ApplicationFailure.retryable(err.message, type);
}

/**
 * The backup workflow fixes the lock date (its start + days); a caller that did not (an older workflow) gets one date
 * per activity. `resolvedLock` is what the driver would do; doing it here lets writeManifest record the same date.
 */
function withLockDate(s3: S3TargetOptions): S3TargetOptions {
  return s3.objectLock ? { ...s3, objectLock: resolvedLock(s3.objectLock, new Date()) } : s3;
}

/** Opens `url` with the backup's S3 options, runs `fn`, closes it; storage errors become what Temporal should do. */
export async function withTarget<T>(
  deps: StorageActivityDeps,
  url: string,
  s3: S3TargetOptions | undefined,
  fn: (t: StorageTarget) => Promise<T>,
): Promise<T> {
  let target: StorageTarget | undefined;
  try {
    target = deps.openTarget(url, s3 ? { s3: withLockDate(s3) } : {});
    return await fn(target);
  } catch (err) {
    throw toActivityFailure(err);
  } finally {
    await target?.close().catch(() => undefined);
  }
}

/**
 * A locked backup is committed only when every object it points at is retained at least until its date: an image
 * shipped by a put that crashed before its retention was set (or by a server that ignored the lock headers of a
 * multipart upload) gets it now.
 */
async function holdObject(target: StorageTarget, key: string, retainUntil: Date | undefined): Promise<void> {
  const lock = target.objectLock?.writeLock;
  if (!lock || (retainUntil && retainUntil.getTime() >= Date.parse(lock.retainUntil))) return;
  await target.objectLock.hold(key);
}

/**
 * An incremental or differential backup is only as safe as the links it is built on: every object of its chain
 * (each parent's images, whole-VM files and manifest, up to the full) gets the new backup's date too, so a locked
 * link never depends on a parent whose lock passed. Extending a retention needs no bypass permission.
 */
async function holdChain(target: StorageTarget, manifest: Manifest): Promise<void> {
  if (!target.objectLock?.writeLock) return;
  const seen = new Set<string>([manifest.backupId]);
  let parentId = manifest.chain.parent;
  while (parentId && !seen.has(parentId)) {
    seen.add(parentId);
    const parent = (await findBackup(target, parentId)).manifest;
    const keys = [
      manifestKey(parent.domain, parent.backupId),
      ...parent.disks.map((d) => d.key),
      ...manifestVmFiles(parent).map((f) => f.key),
    ];
    for (const k of keys) await holdObject(target, k, (await target.stat(k))?.retainUntil);
    parentId = parent.chain.parent;
  }
}

export function createStorageActivities(
  deps: StorageActivityDeps,
): Pick<HostActivities, 'shipImage' | 'writeManifest' | 'deleteBackupObjects'> {
  return {
    async shipImage(input: ShipImageInput): Promise<ShippedImage> {
      const { backupId, domain } = input;
      deps.paths.checkTarget(input.target, 'shipImage');
      // only an image this host staged for this backup is shipped (never /etc/shadow because an input says so)
      const disk = {
        ...input.disk,
        path: await deps.paths.stagingImage(input.disk.path, backupId, input.disk, 'shipImage'),
      };
      return withTarget(deps, input.target, input.s3Options, async (target) => {
        const key = imageKey(domain, backupId, disk.name, disk.format);
        const there = await target.stat(key);
        if (there && there.size === disk.size && there.metadata?.sha256 === disk.sha256) {
          return { key, size: there.size, sha256: disk.sha256, bytesSent: 0 };
        }
        const ctx = Context.current();
        const previous = ctx.info.heartbeatDetails as ShipHeartbeat | undefined;
        const beat: ShipHeartbeat = {
          bytesDone: previous?.bytesDone ?? 0,
          ...(previous?.checkpoint ? { checkpoint: previous.checkpoint } : {}),
        };
        // Drivers report progress per part or chunk; a slow part must not look like a dead worker.
        const keepAlive = setInterval(() => ctx.heartbeat(beat), 5_000);
        const waiting = (waits: boolean) => {
          if (waits) beat.waitingForUpload = true;
          else delete beat.waitingForUpload;
          ctx.heartbeat(beat);
        };
        const result = await withUploadPlace(deps.uploads, input.target, ctx.cancellationSignal, waiting, () =>
          target.putImage(key, disk.path, {
            ...(beat.checkpoint ? { resume: beat.checkpoint } : {}),
            signal: ctx.cancellationSignal,
            allowMove: Boolean(input.allowMove),
            ...(disk.stamp ? { sourceStamp: disk.stamp } : {}),
            // the driver fails with 'checksum' unless the bytes it stored hash to this
            metadata: { sha256: disk.sha256, domain, backupid: backupId, disk: disk.name, format: disk.format },
            onCheckpoint: (checkpoint) => {
              beat.checkpoint = checkpoint;
              ctx.heartbeat(beat);
            },
            onProgress: (bytesDone) => {
              beat.bytesDone = bytesDone;
              ctx.heartbeat(beat);
            },
          }),
        ).finally(() => clearInterval(keepAlive));
        if (result.sha256 !== disk.sha256 || result.size !== disk.size) {
          throw ApplicationFailure.nonRetryable(
            `Disk ${disk.name} of ${domain} was stored on ${target.displayUrl} with SHA-256 ${result.sha256} (${result.size} bytes) instead of ${disk.sha256} (${disk.size} bytes); the image changed while it was shipped, run the backup again.`,
            ErrorType.ChecksumMismatch,
          );
        }
        return result;
      });
    },

    async writeManifest(input: ManifestInput): Promise<void> {
      deps.paths.checkTarget(input.target, 'writeManifest');
      await withTarget(deps, input.target, input.s3Options, async (target) => {
        const lock = target.objectLock?.writeLock;
        const built = buildManifest({ ...input.manifest, ...(lock ? { objectLock: lock } : {}) });
        const manifest = deps.manifestKey ? signManifest(built, deps.manifestKey) : built;
        const key = manifestKey(manifest.domain, manifest.backupId);
        const body = encodeManifest(manifest);
        const existing = await target.stat(key);
        if (existing && (await target.getBuffer(key)).equals(body)) return;
        // the manifest commits the backup: it may only point at images that are there, whole
        for (const disk of manifest.disks) {
          const info = await target.stat(disk.key);
          const stored = storedDigest(disk, info?.metadata);
          if (!info || info.size !== disk.size || (stored !== undefined && stored !== disk.sha256)) {
            throw new StorageError(
              'not-found',
              `Backup ${manifest.backupId} cannot be committed on ${target.displayUrl}: disk ${disk.name} (${disk.key}) is ${info ? 'not the image that was shipped' : 'missing'}; run the backup again.`,
              { driver: 'catalog' },
            );
          }
          await holdObject(target, disk.key, info.retainUntil);
        }
        for (const f of manifestVmFiles(manifest)) {
          const info = await target.stat(f.key);
          const stored = info?.metadata?.sha256;
          if (!info || info.size !== f.size || (stored !== undefined && stored !== f.sha256)) {
            throw new StorageError(
              'not-found',
              `Backup ${manifest.backupId} cannot be committed on ${target.displayUrl}: ${f.key} is ${info ? 'not the file that was shipped' : 'missing'}; run the backup again.`,
              { driver: 'catalog' },
            );
          }
          await holdObject(target, f.key, info.retainUntil);
        }
        await holdChain(target, manifest);
        await target.putManifest(key, body);
      });
    },

    async deleteBackupObjects(input: DeleteBackupObjectsInput): Promise<void> {
      deps.paths.checkTarget(input.target, 'deleteBackupObjects');
      await withTarget(deps, input.target, input.s3Options, async (target) => {
        // a committed backup is never removed here (only `prune` removes those, manifest first)
        if (await target.stat(manifestKey(input.domain, input.backupId))) return;
        await deleteObjectsUnder(target, input.domain, input.backupId);
      });
    },
  };
}
