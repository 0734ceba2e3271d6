/**
 * copy: one committed backup from one target to another, with every link of its chain it depends on that the
 * destination lacks, oldest first (so the destination never holds a committed increment whose parent is missing).
 * Resumable, each link's manifest last.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import type { StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import { brokenChainError, lookupOn, walkChain } from './chain';
import { findBackup, MAX_MANIFEST_BYTES, type CatalogOptions } from './catalog';
import { hashFile, writeSparseFile } from './local-copy';
import { imageContentDigest } from './pull-image';
import { isChunkManifest, manifestVmFiles, storedDigest } from './manifest';
import type { PasswordSource } from './chunk-read';
import { copyChunkToChunk, copyChunkToTree, copyTreeToChunk } from './chunk-copy';
import { isChunkRepository } from './chunks';
import type { ChainLevel, Manifest, ManifestDisk, ManifestVmEntry } from './manifest';

export interface CopyOptions extends CatalogOptions {
  /** where images from a remote source are staged; default the OS temp dir */
  tempDir?: string;
  signal?: AbortSignal;
  onProgress?: (disk: string, bytesDone: number, bytesTotal: number) => void;
  /** the source's chunk repository password (asked only when the source is one) */
  password?: PasswordSource;
  /** the destination's chunk repository password (asked only when the destination is one) */
  toPassword?: PasswordSource;
}

export interface CopiedLink {
  backupId: string;
  level: ChainLevel;
  /** skipped: the destination already held this link (same manifest, every image there) */
  action: 'copied' | 'skipped';
}

export interface CopyReport {
  backupId: string;
  from: string;
  to: string;
  copied: string[];
  /** objects already present on `to` with the right SHA-256 */
  skipped: string[];
  /** the backup and the links of its chain it needed, oldest first */
  links: CopiedLink[];
}

/**
 * Copies one committed backup, and first every link of its chain that `to` lacks, oldest first. A broken chain on
 * `from` (a parent missing or not the one its child was built on) is refused before anything is written.
 */
export async function copyBackup(
  from: StorageTarget,
  to: StorageTarget,
  backupId: string,
  opts: CopyOptions = {},
): Promise<CopyReport> {
  const catalog = { manifestKey: opts.manifestKey };
  const entry = await findBackup(from, backupId, catalog);
  const { manifest } = entry;
  const toChunks = await isChunkRepository(to);
  // a chunk repository on either side: chunk-copy.ts (a chunk backup is always a full, there is no chain to walk)
  if (isChunkManifest(manifest))
    return toChunks ? copyChunkToChunk(from, to, entry, opts) : copyChunkToTree(from, to, entry, opts);
  if (toChunks) return copyTreeToChunk(from, to, manifest, opts);
  const walk = await walkChain(manifest, lookupOn(from, manifest.domain, catalog), from.displayUrl);
  if (walk.broken) throw brokenChainError(`Cannot copy backup ${backupId} from ${from.displayUrl}`, walk.broken, from);
  const report: CopyReport = { backupId, from: from.displayUrl, to: to.displayUrl, copied: [], skipped: [], links: [] };
  for (const link of walk.links) await copyLink(from, to, link, report, opts);
  return report;
}

async function copyLink(
  from: StorageTarget,
  to: StorageTarget,
  m: Manifest,
  report: CopyReport,
  opts: CopyOptions,
): Promise<void> {
  // the stored bytes, not a re-encoding: a signature and fields this version does not know stay as they are
  const { key: mKey, body, manifest: again } = await findBackup(from, m.backupId, { manifestKey: opts.manifestKey });
  if (JSON.stringify(again) !== JSON.stringify(m)) {
    throw new StorageError(
      'checksum',
      `The manifest ${mKey} on ${from.displayUrl} changed while it was being copied; run the copy again.`,
      { driver: 'catalog', permanent: true },
    );
  }
  const existing = (await to.stat(mKey))
    ? await to.getBuffer(mKey, { maxBytes: MAX_MANIFEST_BYTES }).catch(() => undefined)
    : undefined;
  const sameManifest = existing?.equals(body) ?? false;
  const copiedBefore = report.copied.length;
  for (const disk of m.disks) {
    const there = await to.stat(disk.key);
    // a pulled image is stored with, as `content`, the digest the manifest names (and here its file's SHA-256)
    const stored = storedDigest(disk, there?.metadata);
    if (there && there.size === disk.size && stored === disk.sha256) {
      report.skipped.push(disk.key);
      continue;
    }
    await copyImage(from, to, disk, opts);
    report.copied.push(disk.key);
  }
  for (const f of manifestVmFiles(m)) {
    const there = await to.stat(f.key);
    if (there && there.size === f.size && there.metadata?.sha256 === f.sha256) {
      report.skipped.push(f.key);
      continue;
    }
    await copyVmFile(from, to, f, opts);
    report.copied.push(f.key);
  }
  if (sameManifest) report.skipped.push(mKey);
  else {
    await to.putManifest(mKey, body);
    report.copied.push(mKey);
  }
  report.links.push({
    backupId: m.backupId,
    level: m.chain.level,
    action: report.copied.length === copiedBefore ? 'skipped' : 'copied',
  });
}

/**
 * A whole-VM file: read whole (never more than its cap: another writer of the bucket may have replaced it), checked
 * against the manifest before anything is written, then stored with its SHA-256 like an image.
 */
async function copyVmFile(
  from: StorageTarget,
  to: StorageTarget,
  f: ManifestVmEntry,
  opts: CopyOptions,
): Promise<void> {
  const body = await from.getBuffer(f.key, { maxBytes: f.maxBytes });
  const sha256 = createHash('sha256').update(body).digest('hex');
  if (body.length !== f.size || sha256 !== f.sha256) {
    throw new StorageError(
      'checksum',
      `Cannot copy ${f.name} (${f.key}) from ${from.displayUrl}: it has ${body.length} bytes and SHA-256 ${sha256}, the manifest says ${f.size} bytes and ${f.sha256}; run verify there.`,
      { driver: 'catalog', permanent: true },
    );
  }
  const work = await mkdtemp(join(opts.tempDir ?? tmpdir(), 'vmbackup-copy-'));
  try {
    const staged = join(work, basename(f.key));
    await writeFile(staged, body, { mode: 0o600 });
    await to.putImage(f.key, staged, { metadata: { sha256: f.sha256 }, signal: opts.signal });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

async function copyImage(from: StorageTarget, to: StorageTarget, disk: ManifestDisk, opts: CopyOptions): Promise<void> {
  const onProgress = (done: number, total: number): void => opts.onProgress?.(disk.name, done, total);
  const local = from.capabilities.localPath;
  if (local) {
    // the source is a file already: putImage verifies the SHA-256 while it streams. stat first: it refuses a key
    // that is (or lies behind) a link, which the path alone would follow
    if (!(await from.stat(disk.key))) {
      throw new StorageError(
        'not-found',
        `Image ${disk.key} is missing on ${from.displayUrl}; the backup is damaged.`,
        {
          driver: 'catalog',
        },
      );
    }
    const path = join(local, disk.key);
    await to.putImage(disk.key, path, {
      metadata: await imageMetadata(disk, path, opts),
      signal: opts.signal,
      onProgress,
    });
    return;
  }
  const work = await mkdtemp(join(opts.tempDir ?? tmpdir(), 'vmbackup-copy-'));
  try {
    const staged = join(work, basename(disk.key));
    await writeSparseFile(await from.get(disk.key), staged, { signal: opts.signal });
    await to.putImage(disk.key, staged, {
      metadata: await imageMetadata(disk, staged, opts),
      signal: opts.signal,
      onProgress,
    });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/**
 * What putImage checks the copied bytes against. A pulled image's manifest `sha256` is the content digest of its
 * guest data, not of the file: the source file's guest data is checked against it first (a damaged source is never
 * copied), then the file's own SHA-256 guards the transfer.
 */
async function imageMetadata(disk: ManifestDisk, path: string, opts: CopyOptions): Promise<Record<string, string>> {
  if (!disk.content) return { sha256: disk.sha256 };
  const content = await imageContentDigest(path, disk.virtualSize, { signal: opts.signal });
  if (content.sha256 !== disk.sha256)
    throw new StorageError(
      'checksum',
      `Cannot copy disk ${disk.name} (${disk.key}): its guest data has content digest ${content.sha256}, the manifest says ${disk.sha256}; run verify there.`,
      { driver: 'catalog', permanent: true },
    );
  return { sha256: (await hashFile(path, { signal: opts.signal })).sha256, content: disk.sha256 };
}
