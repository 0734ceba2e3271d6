/** copy: one committed backup from one target to another, resumable, manifest last. */
import { createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { StorageTarget } from '../storage/contract';
import { findBackup } from './catalog';
import type { ManifestDisk } from './manifest';
export interface CopyOptions {
  /** where images from a remote source are staged; default the OS temp dir */
  tempDir?: string;
  signal?: AbortSignal;
  onProgress?: (disk: string, bytesDone: number, bytesTotal: number) => void;
}

export interface CopyReport {
  backupId: string;
  from: string;
  to: string;
  copied: string[];
  /** objects already present on `to` with the right SHA-256 */
  skipped: string[];
}

/**
 * Copies one committed backup to another target. Resumable by construction: images already on
 * `to` with the manifest's SHA-256 are skipped, and the manifest goes last.
 */
export async function copyBackup(
  from: StorageTarget,
  to: StorageTarget,
  backupId: string,
  opts: CopyOptions = {},
): Promise<CopyReport> {
  // the stored bytes, not a re-encoding: a signature and fields this version does not know survive the copy
  const { manifest, key: mKey, body } = await findBackup(from, backupId);
  const report: CopyReport = { backupId, from: from.displayUrl, to: to.displayUrl, copied: [], skipped: [] };
  for (const disk of manifest.disks) {
    const there = await to.stat(disk.key);
    if (there && there.size === disk.size && there.metadata?.sha256 === disk.sha256) {
      report.skipped.push(disk.key);
      continue;
    }
    await copyImage(from, to, disk, opts);
    report.copied.push(disk.key);
  }
  const existing = await to.stat(mKey);
  if (existing && existing.size === body.length && (await to.getBuffer(mKey)).equals(body)) report.skipped.push(mKey);
  else {
    await to.putManifest(mKey, body);
    report.copied.push(mKey);
  }
  return report;
}

async function copyImage(from: StorageTarget, to: StorageTarget, disk: ManifestDisk, opts: CopyOptions): Promise<void> {
  const metadata = { sha256: disk.sha256 };
  const onProgress = (done: number, total: number): void => opts.onProgress?.(disk.name, done, total);
  const local = from.capabilities.localPath;
  if (local) {
    // the source is a file already: putImage verifies the SHA-256 while it streams
    await to.putImage(disk.key, join(local, disk.key), { metadata, signal: opts.signal, onProgress });
    return;
  }
  const work = await mkdtemp(join(opts.tempDir ?? tmpdir(), 'vmbackup-copy-'));
  try {
    const staged = join(work, basename(disk.key));
    await pipeline(await from.get(disk.key), createWriteStream(staged), { signal: opts.signal });
    await to.putImage(disk.key, staged, { metadata, signal: opts.signal, onProgress });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}
