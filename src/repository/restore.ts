/** restore: write backed-up images back to files; a file appears only once its SHA-256 matched the manifest. */
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { link, mkdir, open, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { StorageTarget } from '../storage/contract';
import { StorageError, errnoCode } from '../storage/errors';
import { findBackup, type CatalogOptions } from './catalog';
import type { ManifestDisk } from './manifest';
export interface RestoreOptions extends CatalogOptions {
  /** restore only this disk, to a file (or into `to` when it is a directory) */
  disk?: string;
  /** a file path for one disk; a directory for all disks */
  to: string;
  force?: boolean;
  signal?: AbortSignal;
  onProgress?: (disk: string, bytesDone: number, bytesTotal: number) => void;
}

export interface RestoredDisk {
  name: string;
  path: string;
  size: number;
  sha256: string;
}

function restoreError(message: string, kind: 'not-found' | 'failed' | 'checksum' = 'failed'): StorageError {
  return new StorageError(kind, message, { driver: 'catalog', permanent: true });
}

/** Writes images back to files; a file is visible only once its SHA-256 matched the manifest. */
export async function restoreBackup(
  target: StorageTarget,
  backupId: string,
  opts: RestoreOptions,
): Promise<RestoredDisk[]> {
  const { manifest } = await findBackup(target, backupId, { manifestKey: opts.manifestKey });
  let plan: Array<{ disk: ManifestDisk; path: string }>;
  const toStat = await stat(opts.to).catch(() => undefined);
  if (opts.disk) {
    const disk = manifest.disks.find((d) => d.name === opts.disk);
    if (!disk) {
      throw restoreError(
        `Backup ${backupId} has no disk ${opts.disk} (it has ${manifest.disks.map((d) => d.name).join(', ')}); pick one of those with --disk.`,
        'not-found',
      );
    }
    plan = [{ disk, path: toStat?.isDirectory() ? join(opts.to, `${disk.name}.${disk.format}`) : opts.to }];
  } else {
    if (toStat && !toStat.isDirectory()) {
      throw restoreError(
        `${opts.to} is a file, but backup ${backupId} restores all its disks into a directory; pass a directory, or --disk to restore one disk to a file.`,
      );
    }
    await mkdir(opts.to, { recursive: true });
    plan = manifest.disks.map((disk) => ({ disk, path: join(opts.to, `${disk.name}.${disk.format}`) }));
  }
  if (!opts.force) {
    for (const { path } of plan) {
      if (await stat(path).catch(() => undefined))
        throw restoreError(`${path} already exists; remove it or pass --force to overwrite it.`);
    }
  }
  const restored: RestoredDisk[] = [];
  for (const { disk, path } of plan) restored.push(await restoreDisk(target, disk, path, opts));
  return restored;
}

async function restoreDisk(
  target: StorageTarget,
  disk: ManifestDisk,
  path: string,
  opts: RestoreOptions,
): Promise<RestoredDisk> {
  const dir = dirname(path);
  await mkdir(dir, { recursive: true });
  const temp = join(dir, `.${basename(path)}.restore-${randomBytes(6).toString('hex')}`);
  const hash = createHash('sha256');
  const count = { n: 0 };
  try {
    const progress = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        count.n += chunk.length;
        opts.onProgress?.(disk.name, count.n, disk.size);
        cb(null, chunk);
      },
    });
    await pipeline(await target.get(disk.key), progress, createWriteStream(temp, { flags: 'wx', mode: 0o600 }), {
      signal: opts.signal,
    });
    const sha256 = hash.digest('hex');
    if (sha256 !== disk.sha256 || count.n !== disk.size) {
      throw restoreError(
        `Disk ${disk.name} of backup ${disk.key.split('/')[1]} on ${target.displayUrl} is corrupt (SHA-256 ${sha256}, ${count.n} bytes; the manifest says ${disk.sha256}, ${disk.size} bytes); restore it from another copy.`,
        'checksum',
      );
    }
    const fh = await open(temp, 'r+');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    if (opts.force) {
      await rename(temp, path);
    } else {
      // link(2) refuses to replace: an image someone created meanwhile is never overwritten
      try {
        await link(temp, path);
      } catch (err) {
        if (errnoCode(err) === 'EEXIST')
          throw restoreError(`${path} already exists; remove it or pass --force to overwrite it.`);
        throw err;
      }
      await unlink(temp);
    }
    return { name: disk.name, path, size: count.n, sha256 };
  } catch (err) {
    await unlink(temp).catch(() => undefined);
    if (err instanceof StorageError) throw err;
    const code = errnoCode(err);
    if (code === 'ENOSPC')
      throw restoreError(
        `There is no space left to restore disk ${disk.name} to ${path}; free space there or restore elsewhere.`,
      );
    if (code === 'EACCES' || code === 'EPERM')
      throw restoreError(`Permission denied writing ${path}; restore somewhere you can write.`);
    throw err;
  }
}
