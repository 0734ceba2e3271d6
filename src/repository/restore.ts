/**
 * restore: ONE standalone image per disk (no backing file), equal to the disk at the backup's point, whether the
 * backup is a full, an increment or a differential.
 *
 * - A full restored to its own format is streamed: hashed while it is written, holes kept.
 * - Anything else (a link of a chain, or a full in another --format) is one `qemu-img convert` pass over the chain
 *   built from the MANIFESTS (explicit backing in a `json:` spec, so a header naming /etc/hostname or an NBD server
 *   is never followed), after each link's SHA-256 was checked against its manifest: a local target's images are
 *   hashed in place, a remote target's are downloaded (hashing while they arrive) into a hidden directory next to
 *   the destination, so they are on its filesystem and never in a small /tmp.
 * - Nothing is visible until every disk is done: each disk is written to a hidden temp file, and the files are put
 *   in place only at the end. On any failure or interruption (the signal) every file and directory this run created
 *   is removed again.
 */
import { imageContentDigest } from './pull-image';
import { randomBytes } from 'node:crypto';
import { link, mkdir, open, rename, rm, rmdir, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { HypervisorError } from '../hypervisor/errors';
import { chainSpec, convertImage } from '../hypervisor/qemu-img';
import type { StorageTarget } from '../storage/contract';
import { StorageError, errnoCode, isAbortError } from '../storage/errors';
import type { CatalogOptions } from './catalog';
import { diskChain, resolveChain, type DiskLink } from './chain';
import { hashFile, writeSparseFile, type WrittenFile } from './local-copy';
import { CHUNKS_FORMAT, isChunkManifest, type Manifest, type ManifestDisk } from './manifest';
import { openChunkBackup, writeChunkDisk, type ChunkReadOptions } from './chunk-read';
import type { ChunkStore } from './chunks';
import { fsyncDir } from '../shared/fsync';

export type RestoreFormat = 'qcow2' | 'raw';
export const RESTORE_FORMATS: readonly RestoreFormat[] = ['qcow2', 'raw'];

export interface RestoreOptions extends CatalogOptions, ChunkReadOptions {
  /** restore only this disk, to a file (or into `to` when it is a directory) */
  disk?: string;
  /** a file path for one disk; a directory for all disks */
  to: string;
  force?: boolean;
  /** format of every restored image; default the stored one (qcow2 for every link of a chain and a chunk backup) */
  format?: RestoreFormat;
  /** aborts the restore; every file it created is removed before it rejects */
  signal?: AbortSignal;
  onProgress?: (disk: string, bytesDone: number, bytesTotal: number) => void;
}

export interface RestoredDisk {
  name: string;
  path: string;
  format: string;
  /** bytes of the restored file */
  size: number;
  /** SHA-256 of the restored file when it is the stored image byte for byte (a full in its own format) */
  sha256?: string;
  /** the backups whose images it was built from, top first */
  links: string[];
}

function restoreError(message: string, kind: 'not-found' | 'failed' | 'checksum' = 'failed'): StorageError {
  return new StorageError(kind, message, { driver: 'catalog', permanent: true });
}

interface PlannedDisk {
  disk: ManifestDisk;
  path: string;
  format: string;
}

/** A disk written to its hidden temp file, waiting for the others before it is put in place. */
interface StagedDisk extends PlannedDisk {
  temp: string;
  size: number;
  sha256?: string;
  links: string[];
}

/** What this run created, so that a failure or an interruption removes exactly that. */
class CreatedFiles {
  readonly files = new Set<string>();
  readonly trees = new Set<string>();
  /** directories this run made, parents first */
  readonly dirs: string[] = [];

  async undo(): Promise<void> {
    for (const f of this.files) await unlink(f).catch(() => undefined);
    for (const t of this.trees) await rm(t, { recursive: true, force: true }).catch(() => undefined);
    // only directories that are empty again: a file someone else put there meanwhile stays
    for (const d of [...this.dirs].reverse()) await rmdir(d).catch(() => undefined);
  }
}

/**
 * Writes one standalone image per disk of `backupId` (any link of a chain). Files become visible only when every
 * disk is done; a failure or an abort leaves nothing behind that this run created.
 */
export async function restoreBackup(
  target: StorageTarget,
  backupId: string,
  opts: RestoreOptions,
): Promise<RestoredDisk[]> {
  const where = `Cannot restore backup ${backupId} from ${target.displayUrl}`;
  const { top, links } = await resolveChain(target, backupId, where, { manifestKey: opts.manifestKey });
  // a chunk backup: the repository is opened (password, manifest signature) before anything is written
  const store = isChunkManifest(top.manifest) ? await openChunkBackup(target, top, opts) : undefined;
  const created = new CreatedFiles();
  try {
    const plan = await planRestore(top.manifest, opts, created);
    const staged: StagedDisk[] = [];
    for (const item of plan) {
      opts.signal?.throwIfAborted();
      staged.push(
        store
          ? await stageChunkDisk(store, top.manifest, item, opts, created)
          : await stageDisk(target, links, item, opts, created),
      );
    }
    opts.signal?.throwIfAborted();
    for (const s of staged) await putInPlace(s, opts, created);
    await fsyncDir(dirname(staged[0]?.path ?? opts.to)).catch(() => undefined);
    return staged.map((s) => ({
      name: s.disk.name,
      path: s.path,
      format: s.format,
      size: s.size,
      ...(s.sha256 ? { sha256: s.sha256 } : {}),
      links: s.links,
    }));
  } catch (err) {
    await created.undo();
    throw restoreFailure(err, backupId, opts);
  }
}

/** Which disk goes to which file in which format; makes the destination directory and refuses existing files. */
async function planRestore(manifest: Manifest, opts: RestoreOptions, created: CreatedFiles): Promise<PlannedDisk[]> {
  const backupId = manifest.backupId;
  // a chunk backup is restored as qcow2 unless raw is asked for, like an image tree's default
  const formatOf = (disk: ManifestDisk): string =>
    opts.format ?? (disk.format === CHUNKS_FORMAT ? 'qcow2' : disk.format);
  const toStat = await stat(opts.to).catch(() => undefined);
  let plan: PlannedDisk[];
  if (opts.disk) {
    const disk = manifest.disks.find((d) => d.name === opts.disk);
    if (!disk) {
      throw restoreError(
        `Backup ${backupId} has no disk ${opts.disk} (it has ${manifest.disks.map((d) => d.name).join(', ')}); pick one of those with --disk.`,
        'not-found',
      );
    }
    const path = toStat?.isDirectory() ? join(opts.to, `${disk.name}.${formatOf(disk)}`) : opts.to;
    plan = [{ disk, path, format: formatOf(disk) }];
  } else {
    if (toStat && !toStat.isDirectory()) {
      throw restoreError(
        `${opts.to} is a file, but backup ${backupId} restores all its disks into a directory; pass a directory, or --disk to restore one disk to a file.`,
      );
    }
    plan = manifest.disks.map((disk) => ({
      disk,
      path: join(opts.to, `${disk.name}.${formatOf(disk)}`),
      format: formatOf(disk),
    }));
  }
  const dir = dirname(plan[0]?.path ?? opts.to);
  created.dirs.push(...(await makeDirs(dir, opts.to)));
  if (!opts.force) {
    for (const { path } of plan) {
      if (await stat(path).catch(() => undefined))
        throw restoreError(`${path} already exists; remove it or pass --force to overwrite it.`);
    }
  }
  return plan;
}

/**
 * `mkdir -p` that names what is wrong in one sentence, returns the directories it made (parents first), and
 * terminates: Node's recursive mkdir spins forever on a path under /proc (its ENOENT never goes away).
 */
async function makeDirs(dir: string, asked: string): Promise<string[]> {
  const missing: string[] = [];
  let d = dir;
  for (;;) {
    let s: Awaited<ReturnType<typeof stat>> | undefined;
    try {
      s = await stat(d);
    } catch (err) {
      const code = errnoCode(err);
      if (code !== 'ENOENT' && code !== 'ENOTDIR') throw err;
    }
    if (s) {
      if (!s.isDirectory()) throw restoreError(`Cannot restore to ${asked}: ${d} is a file, not a directory.`);
      break;
    }
    missing.unshift(d);
    const up = dirname(d);
    if (up === d) break;
    d = up;
  }
  const made: string[] = [];
  for (const m of missing) {
    try {
      await mkdir(m, { mode: 0o700 });
      made.push(m);
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'EEXIST' && (await stat(m).catch(() => undefined))?.isDirectory()) continue;
      for (const x of made.reverse()) await rmdir(x).catch(() => undefined);
      if (code && ['ENOENT', 'ENOTDIR', 'EEXIST', 'EPERM', 'EROFS', 'EACCES'].includes(code)) {
        throw restoreError(
          `Cannot restore to ${asked}: the directory ${m} cannot be created there (${code}); restore to a directory on a writable filesystem.`,
        );
      }
      throw err;
    }
  }
  return made;
}

/** Writes one disk to its hidden temp file next to its destination, from its chain's links. */
async function stageDisk(
  target: StorageTarget,
  links: readonly Manifest[],
  item: PlannedDisk,
  opts: RestoreOptions,
  created: CreatedFiles,
): Promise<StagedDisk> {
  const chain = diskChain(links, item.disk.name);
  const dir = dirname(item.path);
  const temp = join(dir, `.${basename(item.path)}.restore-${randomBytes(6).toString('hex')}`);
  const total =
    chain.reduce((n, l) => n + l.disk.size, 0) +
    (chain.length > 1 || item.format !== item.disk.format ? item.disk.virtualSize : 0);
  let before = 0;
  const progress = (done: number): void => opts.onProgress?.(item.disk.name, before + done, total);
  const ids = chain.map((l) => l.backupId);
  const [top] = chain;
  if (chain.length === 1 && top && item.format === top.disk.format) {
    // a whole image in the format asked for: stream it, hashing as it is written
    created.files.add(temp);
    const got = await writeSparseFile(await target.get(top.disk.key), temp, { signal: opts.signal, onBytes: progress });
    await checkDigest(got, top, target, temp, opts.signal);
    return { ...item, temp, size: got.bytes, sha256: got.sha256, links: ids };
  }
  const local = target.capabilities.localPath;
  let work: string | undefined;
  const files: Array<{ path: string; format: string }> = [];
  try {
    for (const l of chain) {
      let path: string;
      let got: WrittenFile;
      if (local) {
        // a local target is read in place: hash it, then hand the same file to qemu-img. stat first: it refuses a
        // key that is (or lies behind) a link, which the path alone would follow
        if (!(await target.stat(l.disk.key))) throw missingImage(l, target);
        path = join(local, l.disk.key);
        got = await hashFile(path, { signal: opts.signal, onBytes: progress }).catch((err: unknown) => {
          if (errnoCode(err) === 'ENOENT') throw missingImage(l, target);
          throw err;
        });
      } else {
        work ??= await makeWorkDir(dir, created);
        path = join(work, `${l.backupId}.${l.disk.name}.${l.disk.format}`);
        got = await writeSparseFile(await target.get(l.disk.key), path, { signal: opts.signal, onBytes: progress });
      }
      await checkDigest(got, l, target, path, opts.signal);
      before += got.bytes;
      files.push({ path, format: l.disk.format });
    }
    created.files.add(temp);
    await (await open(temp, 'wx', 0o600)).close(); // qemu-img writes into it and keeps the mode
    const virtualSize = item.disk.virtualSize;
    await convertImage(chainSpec(files), temp, {
      dstFormat: item.format as RestoreFormat,
      signal: opts.signal,
      onProgress: (fraction) => progress(Math.round(fraction * virtualSize)),
    });
    const fh = await open(temp, 'r+');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    return { ...item, temp, size: (await stat(temp)).size, links: ids };
  } finally {
    if (work) {
      await rm(work, { recursive: true, force: true });
      created.trees.delete(work);
    }
  }
}

/**
 * Writes one disk of a chunk backup to its hidden temp file: a sparse raw file (holes for zero chunks and all-zero
 * blocks), converted by `qemu-img convert` when qcow2 is asked for (which keeps the holes unallocated). The raw file
 * is then a work file next to the destination, so a qcow2 restore needs room for both for a while.
 */
async function stageChunkDisk(
  store: ChunkStore,
  manifest: Manifest,
  item: PlannedDisk,
  opts: RestoreOptions,
  created: CreatedFiles,
): Promise<StagedDisk> {
  const dir = dirname(item.path);
  const temp = join(dir, `.${basename(item.path)}.restore-${randomBytes(6).toString('hex')}`);
  const virtualSize = item.disk.virtualSize;
  const total = item.format === 'raw' ? virtualSize : 2 * virtualSize;
  const progress = (done: number): void => opts.onProgress?.(item.disk.name, done, total);
  const links = [manifest.backupId];
  if (item.format === 'raw') {
    created.files.add(temp);
    await writeChunkDisk(store, manifest, item.disk, temp, { signal: opts.signal, onBytes: progress });
    return { ...item, temp, size: (await stat(temp)).size, links };
  }
  const work = await makeWorkDir(dir, created);
  try {
    const raw = join(work, `${item.disk.name}.raw`);
    await writeChunkDisk(store, manifest, item.disk, raw, { signal: opts.signal, onBytes: progress });
    created.files.add(temp);
    await (await open(temp, 'wx', 0o600)).close(); // qemu-img writes into it and keeps the mode
    await convertImage({ path: raw, format: 'raw', backing: null }, temp, {
      dstFormat: item.format as RestoreFormat,
      signal: opts.signal,
      onProgress: (fraction) => progress(virtualSize + Math.round(fraction * virtualSize)),
    });
    const fh = await open(temp, 'r+');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    return { ...item, temp, size: (await stat(temp)).size, links };
  } finally {
    await rm(work, { recursive: true, force: true });
    created.trees.delete(work);
  }
}

async function makeWorkDir(dir: string, created: CreatedFiles): Promise<string> {
  const work = join(dir, `.vmbackup-restore-${randomBytes(6).toString('hex')}`);
  await mkdir(work, { mode: 0o700 });
  created.trees.add(work);
  return work;
}

function missingImage(l: DiskLink, target: StorageTarget): StorageError {
  return restoreError(
    `Disk ${l.disk.name} of backup ${l.backupId} is missing on ${target.displayUrl} (${l.disk.key}); restore it from another copy.`,
    'not-found',
  );
}

/**
 * A link is used only when its bytes are exactly what its manifest recorded: the file's SHA-256, or for a pulled
 * image (`content`) the content digest of its guest data, recomputed from the image at PATH.
 */
async function checkDigest(
  got: WrittenFile,
  l: DiskLink,
  target: StorageTarget,
  path: string,
  signal?: AbortSignal,
): Promise<void> {
  if (l.disk.content && got.bytes === l.disk.size) {
    const content = await imageContentDigest(path, l.disk.virtualSize, { signal });
    if (content.sha256 === l.disk.sha256) return;
    throw restoreError(
      `Disk ${l.disk.name} of backup ${l.backupId} on ${target.displayUrl} is corrupt (the guest data of ${l.disk.key} has content digest ${content.sha256}; the manifest says ${l.disk.sha256}); restore it from another copy.`,
      'checksum',
    );
  }
  if (!l.disk.content && got.sha256 === l.disk.sha256 && got.bytes === l.disk.size) return;
  throw restoreError(
    `Disk ${l.disk.name} of backup ${l.backupId} on ${target.displayUrl} is corrupt (SHA-256 ${got.sha256}, ${got.bytes} bytes; the manifest says ${l.disk.sha256}, ${l.disk.size} bytes); restore it from another copy.`,
    'checksum',
  );
}

/** Moves a finished temp file to its name; without --force an existing file is never replaced. */
async function putInPlace(s: StagedDisk, opts: RestoreOptions, created: CreatedFiles): Promise<void> {
  if (opts.force) {
    await rename(s.temp, s.path);
  } else {
    // link(2) refuses to replace: an image someone created meanwhile is never overwritten
    try {
      await link(s.temp, s.path);
    } catch (err) {
      if (errnoCode(err) === 'EEXIST')
        throw restoreError(`${s.path} already exists; remove it or pass --force to overwrite it.`);
      throw err;
    }
    created.files.add(s.path);
    await unlink(s.temp);
  }
  created.files.delete(s.temp);
  created.files.add(s.path);
}

/** One sentence for whatever stopped the restore (the files are already removed). */
function restoreFailure(err: unknown, backupId: string, opts: RestoreOptions): unknown {
  if (opts.signal?.aborted || isAbortError(err)) {
    return restoreError(`The restore of backup ${backupId} was interrupted; the files it had written were removed.`);
  }
  if (err instanceof StorageError) return err;
  if (err instanceof HypervisorError) {
    return restoreError(`Cannot restore backup ${backupId}: qemu-img failed (${err.message.replace(/\.$/, '')}).`);
  }
  const code = errnoCode(err);
  const path = (err as { path?: unknown }).path;
  const at = typeof path === 'string' ? path : opts.to;
  if (code === 'ENOSPC' || code === 'EDQUOT')
    return restoreError(
      `There is no space left to restore backup ${backupId} to ${at}; free space there or restore elsewhere.`,
    );
  if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS')
    return restoreError(`Permission denied writing ${at} (${code}); restore somewhere you can write.`);
  if (code === 'ENOENT' || code === 'ENOTDIR')
    return restoreError(
      `Cannot restore to ${opts.to}: files cannot be created in ${dirname(at)} (${code}); restore to a directory on a writable filesystem.`,
    );
  return err;
}
