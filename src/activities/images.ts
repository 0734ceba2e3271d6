/**
 * Image steps shared by every method: copying the disks of a shut-off domain, and the final
 * check + SHA-256 of each image before it is shipped.
 */
import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Context } from '@temporalio/activity';
import { HypervisorError } from '../hypervisor/errors';
import type { Hypervisor } from '../hypervisor/port';
import { checkImage, convertImage, imageInfo } from '../hypervisor/qemu-img';
import { fileStamp as stampOf } from '../shared/file-stamp';
import { sha256File } from '../shared/sha256-file';
import type { FinalizeImagesInput, ImageFile, OfflineCopyInput } from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { makeFilePrivate } from '../shared/file-modes';
import type { DiskImage } from '../shared/types';
import { hypervisorFailure, permanent } from './failures';
import type { HostPaths } from './host-paths';
import { offlineGuard, sourceStamp, startedDuringCopy } from './offline-guard';
import type { ByteProgress } from './push';

export interface ImageDeps {
  hypervisor: Hypervisor;
  /** this host's roots: image paths in an input are checked against them */
  paths: HostPaths;
}

interface FinalizeCheckpoint extends ByteProgress {
  done: DiskImage[];
}

export function createImageActivities(deps: ImageDeps) {
  const hv = deps.hypervisor;
  const paths = deps.paths;
  const guard = offlineGuard(hv, paths);

  /**
   * A shut-off domain has no QEMU process, so no backup job: copy each disk with
   * `qemu-img convert` (sparse). A start during the copy would make a mixed image, so the
   * domain state and the source files are watched, and the copy is discarded if either moves.
   */
  async function copyOfflineDisks(input: OfflineCopyInput): Promise<ImageFile[]> {
    const ctx = Context.current();
    const stagingDir = await paths.stagingDir(input.stagingDir, input.backupId, 'copyOfflineDisks');
    const disks = await guard.disksOfDomain(input, 'copyOfflineDisks');
    const total = disks.reduce((n, d) => n + d.virtualSize, 0);
    const images: ImageFile[] = [];
    let before = 0;
    for (const disk of disks) {
      const dst = await paths.stagingImage(
        join(stagingDir, `${disk.name}.qcow2`),
        input.backupId,
        { name: disk.name, format: 'qcow2' },
        'copyOfflineDisks',
      );
      const stamp = await sourceStamp(disk.source);
      await guard.assertShutOff(input.domain);
      await rm(dst, { force: true });
      const watch = guard.watchShutOff(input.domain, ctx.cancellationSignal);
      try {
        await convertImage({ path: disk.source, format: disk.format, backing: 'from-header' }, dst, {
          dstFormat: 'qcow2',
          signal: watch.signal,
          onProgress: (fraction) =>
            ctx.heartbeat({ bytesDone: before + Math.round(fraction * disk.virtualSize), bytesTotal: total }),
        });
      } catch (err) {
        await rm(dst, { force: true });
        if (watch.started()) throw startedDuringCopy(input.domain);
        throw err;
      } finally {
        watch.stop();
      }
      await guard.assertShutOff(input.domain).catch(async (err: unknown) => {
        await rm(dst, { force: true });
        throw err;
      });
      if ((await sourceStamp(disk.source)) !== stamp) {
        await rm(dst, { force: true });
        throw startedDuringCopy(input.domain);
      }
      // qemu-img creates the copy 0644 (less the umask)
      await makeFilePrivate(dst);
      before += disk.virtualSize;
      images.push({ name: disk.name, format: 'qcow2', path: dst, virtualSize: disk.virtualSize });
    }
    return images;
  }

  /** `qemu-img check` and SHA-256 of each image; resumes after the last image finished. */
  async function finalizeImages(input: FinalizeImagesInput): Promise<DiskImage[]> {
    const ctx = Context.current();
    if (!Array.isArray(input.images) || input.images.length === 0) {
      throw permanent('finalizeImages: no images given', ErrorType.InvalidInput);
    }
    const checked: ImageFile[] = await Promise.all(
      input.images.map(async (i) => ({
        ...i,
        path: await paths.stagingImage(i.path, input.backupId, i, 'finalizeImages'),
      })),
    );
    // Whoever wrote them (QEMU, qemu-img, rsync, cp): private before they are shipped or renamed into a target.
    await Promise.all(checked.map((i) => makeFilePrivate(i.path)));
    const prior = ctx.info.heartbeatDetails as FinalizeCheckpoint | undefined;
    const done: DiskImage[] = prior?.done ?? [];
    const sizes = await Promise.all(checked.map((i) => stat(i.path).then((s) => s.size)));
    const total = sizes.reduce((n, s) => n + s, 0);
    let before = done.reduce((n, d) => n + d.size, 0);
    for (const [idx, image] of checked.entries()) {
      if (done.some((d) => d.name === image.name)) continue;
      const stampBefore = stampOf(await stat(image.path));
      // qemu-img check and info read the metadata, the hash reads the data: run them side by side. The snapshot
      // copy was already hashed against its base, so then the data is not read a second time. Both name the format
      // we wrote and open no backing file: a copy of a raw disk starts with whatever the guest wrote, e.g. a qcow2
      // header naming /etc/hostname or an NBD server, which a probing qemu-img would open.
      const [check, info, sha256] = await Promise.all([
        checkImage(image.path, { format: image.format, forceShare: true }).catch((err: unknown) =>
          unreadableImage(image, err),
        ),
        imageInfo(image.path, { format: image.format, forceShare: true }).catch((err: unknown) =>
          unreadableImage(image, err),
        ),
        // a chunk repository hashes each chunk as it stores it: the file's own hash would be a second full read
        image.sha256 ??
          (input.skipFileHash
            ? ''
            : sha256File(image.path, {
                signal: ctx.cancellationSignal,
                onProgress: (bytes) => ctx.heartbeat({ done, bytesDone: before + bytes, bytesTotal: total }),
              })),
      ]);
      if (!check.ok) {
        throw permanent(
          `the backup image of disk ${image.name} (${image.path}) failed qemu-img check: ${check.summary}`,
          ErrorType.ImageCorrupt,
        );
      }
      const size = sizes[idx] ?? 0;
      if (stampOf(await stat(image.path)) !== stampBefore) {
        throw new Error(`the backup image of disk ${image.name} changed while it was being hashed`);
      }
      done.push({
        stamp: stampBefore,
        name: image.name,
        format: image.format,
        path: image.path,
        virtualSize: info.virtualSize,
        size,
        sha256,
      });
      before += size;
      ctx.heartbeat({ done, bytesDone: before, bytesTotal: total } satisfies FinalizeCheckpoint);
    }
    return checked.map((i) => done.find((d) => d.name === i.name)).filter((d): d is DiskImage => !!d);
  }

  return { copyOfflineDisks, finalizeImages };
}

/**
 * qemu-img could not open or read a backup image in the format we wrote ("Image is not in qcow2 format", a bad
 * header): the same bytes fail the same way on every retry, so the failure is permanent. A lock held by a running
 * QEMU, or qemu-img missing, stays what the hypervisor port says.
 */
function unreadableImage(image: ImageFile, err: unknown): never {
  if (err instanceof HypervisorError && err.kind === 'failed') {
    throw permanent(
      `the backup image of disk ${image.name} (${image.path}) cannot be read as ${image.format}: ${err.message}`,
      ErrorType.ImageCorrupt,
    );
  }
  hypervisorFailure(err);
}
