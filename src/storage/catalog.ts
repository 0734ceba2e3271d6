/**
 * The catalog: what a target holds, read from the manifests alone (no database). Listing,
 * verification, restore, copy between targets and pruning all go through the StorageTarget
 * contract, so they work the same on local, NFS and S3 targets.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { link, mkdir, mkdtemp, open, rename, rm, stat, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { StorageTarget } from './contract';
import { StorageError, errnoCode } from './errors';
import { backupPrefix, manifestKey, parseManifestKey } from './keys';
import { decodeManifest, encodeManifest, type Manifest, type ManifestDisk } from './manifest';

export interface BackupEntry {
  manifest: Manifest;
  /** key of manifest.json */
  key: string;
  /** bytes of all images */
  size: number;
}

export interface ListBackupsOptions {
  domain?: string;
  /** called for manifests that cannot be read; they are left out of the result */
  onInvalid?: (key: string, error: StorageError) => void;
}

/** Committed backups (those with a manifest), oldest first. */
export async function listBackups(target: StorageTarget, opts: ListBackupsOptions = {}): Promise<BackupEntry[]> {
  const keys: string[] = [];
  for await (const obj of target.list(opts.domain ? `${opts.domain}/` : '')) {
    const parsed = parseManifestKey(obj.key);
    if (parsed && (!opts.domain || parsed.domain === opts.domain)) keys.push(obj.key);
  }
  const entries: BackupEntry[] = [];
  for (const key of keys) {
    const entry = await readEntry(target, key).catch((err: unknown) => {
      if (err instanceof StorageError && (err.kind === 'checksum' || err.kind === 'not-found' || err.permanent)) {
        opts.onInvalid?.(key, err);
        return undefined;
      }
      throw err;
    });
    if (entry) entries.push(entry);
  }
  return entries.sort(
    (a, b) =>
      a.manifest.startedAt.localeCompare(b.manifest.startedAt) ||
      a.manifest.backupId.localeCompare(b.manifest.backupId),
  );
}

async function readEntry(target: StorageTarget, key: string): Promise<BackupEntry> {
  const manifest = decodeManifest(await target.getBuffer(key), `${key} on ${target.displayUrl}`);
  const where = parseManifestKey(key);
  if (where && (where.domain !== manifest.domain || where.backupId !== manifest.backupId)) {
    throw new StorageError(
      'checksum',
      `The manifest ${key} on ${target.displayUrl} describes ${manifest.domain}/${manifest.backupId}; it was moved or damaged.`,
      {
        driver: 'catalog',
      },
    );
  }
  return { manifest, key, size: manifest.disks.reduce((n, d) => n + d.size, 0) };
}

/** Backup ids are `<domain>-<yyyymmddThhmmssZ>-<hex>`: try that domain first, then search every domain. */
export async function findBackup(target: StorageTarget, backupId: string): Promise<BackupEntry> {
  const guess = /^(.+)-\d{8}T\d{6}Z-[0-9a-f]+$/.exec(backupId)?.[1];
  if (guess) {
    const key = safeManifestKey(guess, backupId);
    if (key && (await target.stat(key))) return readEntry(target, key);
  }
  for await (const obj of target.list('')) {
    const parsed = parseManifestKey(obj.key);
    if (parsed?.backupId === backupId) return readEntry(target, obj.key);
  }
  throw new StorageError(
    'not-found',
    `Backup ${backupId} is not on ${target.displayUrl} (no committed manifest); run \`vmbackup list --target ${target.displayUrl}\` to see the backups there.`,
    { driver: 'catalog' },
  );
}

function safeManifestKey(domain: string, backupId: string): string | undefined {
  try {
    return manifestKey(domain, backupId);
  } catch {
    return undefined;
  }
}

// ------------------------------------------------------------------------------------- verify

export interface DiskVerification {
  name: string;
  key: string;
  ok: boolean;
  expectedSha256: string;
  actualSha256?: string;
  expectedSize: number;
  actualSize?: number;
  /** one sentence when not ok */
  problem?: string;
  /** `qemu-img check` outcome for qcow2 */
  imageCheck?: 'ok' | 'leaks' | 'corrupt' | 'skipped';
}

export interface VerifyReport {
  backupId: string;
  domain: string;
  target: string;
  ok: boolean;
  disks: DiskVerification[];
}

export interface VerifyOptions {
  /** where downloaded qcow2 images are checked; default the OS temp dir */
  tempDir?: string;
  signal?: AbortSignal;
}

function hashingTap(hash: ReturnType<typeof createHash>, count: { n: number }): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk);
      count.n += chunk.length;
      cb(null, chunk);
    },
  });
}

/** Runs `qemu-img check`; exit 0 clean, 3 leaked clusters only (harmless), 2 corruption, 1 could not check. */
export function qemuImgCheck(
  path: string,
  format: string,
): Promise<{ result: 'ok' | 'leaks' | 'corrupt'; detail: string }> {
  return new Promise((resolve, reject) => {
    execFile('qemu-img', ['check', '-f', format, path], { maxBuffer: 4 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      const detail = `${stdout}${stderr}`.trim().split('\n').filter(Boolean).slice(-1)[0] ?? '';
      if (code === 0) resolve({ result: 'ok', detail });
      else if (code === 3) resolve({ result: 'leaks', detail });
      else if (code === 2 || code === 1)
        resolve({ result: 'corrupt', detail: detail || `qemu-img check exited ${code}` });
      else reject(err);
    });
  });
}

/** Re-reads every image of a backup: size, SHA-256 against the manifest, and `qemu-img check` for qcow2. */
export async function verifyBackup(
  target: StorageTarget,
  backupId: string,
  opts: VerifyOptions = {},
): Promise<VerifyReport> {
  const { manifest } = await findBackup(target, backupId);
  const disks: DiskVerification[] = [];
  for (const disk of manifest.disks) disks.push(await verifyDisk(target, disk, opts));
  return { backupId, domain: manifest.domain, target: target.displayUrl, ok: disks.every((d) => d.ok), disks };
}

async function verifyDisk(target: StorageTarget, disk: ManifestDisk, opts: VerifyOptions): Promise<DiskVerification> {
  const base = { name: disk.name, key: disk.key, expectedSha256: disk.sha256, expectedSize: disk.size };
  const info = await target.stat(disk.key);
  if (!info) return { ...base, ok: false, problem: `disk ${disk.name}: object ${disk.key} is missing` };
  const needsCheck = disk.format === 'qcow2';
  const localPath = target.capabilities.localPath;
  let work: string | undefined;
  try {
    const hash = createHash('sha256');
    const count = { n: 0 };
    let checkPath: string | undefined;
    const source = await target.get(disk.key);
    if (needsCheck && !localPath) {
      work = await mkdtemp(join(opts.tempDir ?? tmpdir(), 'vmbackup-verify-'));
      checkPath = join(work, basename(disk.key));
      await pipeline(source, hashingTap(hash, count), createWriteStream(checkPath), { signal: opts.signal });
    } else {
      await pipeline(
        source,
        hashingTap(hash, count),
        async (src: AsyncIterable<Buffer>) => {
          for await (const _chunk of src);
        },
        { signal: opts.signal },
      );
      if (needsCheck && localPath) checkPath = join(localPath, disk.key);
    }
    const actualSha256 = hash.digest('hex');
    const result: DiskVerification = { ...base, ok: true, actualSha256, actualSize: count.n, imageCheck: 'skipped' };
    if (count.n !== disk.size) {
      return {
        ...result,
        ok: false,
        problem: `disk ${disk.name}: ${disk.key} has ${count.n} bytes, the manifest says ${disk.size}`,
      };
    }
    if (actualSha256 !== disk.sha256) {
      return {
        ...result,
        ok: false,
        problem: `disk ${disk.name}: ${disk.key} has SHA-256 ${actualSha256}, the manifest says ${disk.sha256}`,
      };
    }
    if (checkPath) {
      const check = await qemuImgCheck(checkPath, disk.format);
      result.imageCheck = check.result;
      if (check.result === 'corrupt')
        return {
          ...result,
          ok: false,
          problem: `disk ${disk.name}: qemu-img check found corruption (${check.detail})`,
        };
    }
    return result;
  } finally {
    if (work) await rm(work, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------------------------- restore

export interface RestoreOptions {
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
  const { manifest } = await findBackup(target, backupId);
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

// ------------------------------------------------------------------------------------- copy

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
  const { manifest, key: mKey } = await findBackup(from, backupId);
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
  const body = encodeManifest(manifest);
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

// ------------------------------------------------------------------------------------- prune

export interface PrunePolicy {
  keepLast?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
}

export interface PruneOptions extends PrunePolicy {
  domain?: string;
  dryRun?: boolean;
}

export interface PruneDecision {
  backupId: string;
  domain: string;
  startedAt: string;
  /** why it is kept: 'last', 'daily', 'weekly', 'monthly', 'only backup'; empty when removed */
  reasons: string[];
}

export interface PruneReport {
  target: string;
  dryRun: boolean;
  keep: PruneDecision[];
  remove: PruneDecision[];
}

/** ISO 8601 week, e.g. 2026-W48 (weeks start on Monday; week 1 holds the year's first Thursday). */
function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const day = t.getUTCDay() || 7;
  t.setUTCDate(t.getUTCDate() + 4 - day);
  const yearStart = Date.UTC(t.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((t.getTime() - yearStart) / 86_400_000 + 1) / 7);
  return `${t.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}

/**
 * restic's policy for one domain's backups: keep the newest `keepLast`, and the newest backup of
 * each of the last `keepDaily` days / `keepWeekly` ISO weeks / `keepMonthly` months (UTC) that
 * have backups. The newest backup is always kept, so a domain never loses its only backup.
 */
export function applyPolicy(
  backups: Manifest[],
  policy: PrunePolicy,
): { keep: PruneDecision[]; remove: PruneDecision[] } {
  const newestFirst = [...backups].sort(
    (a, b) => b.startedAt.localeCompare(a.startedAt) || b.backupId.localeCompare(a.backupId),
  );
  const rules: Array<{ name: string; limit: number; bucket: (d: Date, i: number) => string }> = [
    { name: 'last', limit: policy.keepLast ?? 0, bucket: (_d, i) => String(i) },
    { name: 'daily', limit: policy.keepDaily ?? 0, bucket: (d) => d.toISOString().slice(0, 10) },
    { name: 'weekly', limit: policy.keepWeekly ?? 0, bucket: isoWeek },
    { name: 'monthly', limit: policy.keepMonthly ?? 0, bucket: (d) => d.toISOString().slice(0, 7) },
  ];
  const state = rules.map(() => ({ count: 0, last: undefined as string | undefined }));
  const keep: PruneDecision[] = [];
  const remove: PruneDecision[] = [];
  newestFirst.forEach((m, i) => {
    const at = new Date(m.startedAt);
    const reasons: string[] = [];
    rules.forEach((rule, r) => {
      const s = state[r] as { count: number; last: string | undefined };
      if (s.count >= rule.limit) return;
      const b = rule.bucket(at, i);
      if (b !== s.last) {
        s.last = b;
        s.count += 1;
        reasons.push(rule.name);
      }
    });
    if (i === 0 && reasons.length === 0) reasons.push('only backup');
    (reasons.length > 0 ? keep : remove).push({
      backupId: m.backupId,
      domain: m.domain,
      startedAt: m.startedAt,
      reasons,
    });
  });
  return { keep, remove };
}

/**
 * Applies the policy per domain and deletes what it does not keep: the manifest FIRST (the backup
 * stops being listed as valid at once), then its images. Backups without a manifest (running or
 * failed uploads) are never touched.
 */
export async function pruneBackups(target: StorageTarget, opts: PruneOptions): Promise<PruneReport> {
  const policy: PrunePolicy = {
    keepLast: opts.keepLast,
    keepDaily: opts.keepDaily,
    keepWeekly: opts.keepWeekly,
    keepMonthly: opts.keepMonthly,
  };
  for (const [name, value] of Object.entries(policy)) {
    if (value !== undefined && (!Number.isInteger(value) || value < 0)) {
      throw new StorageError(
        'failed',
        `--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} must be a whole number of 0 or more, not ${value}.`,
        {
          driver: 'catalog',
          permanent: true,
        },
      );
    }
  }
  if (!Object.values(policy).some((v) => (v ?? 0) > 0)) {
    throw new StorageError(
      'failed',
      'Prune needs a policy: give at least one of --keep-last, --keep-daily, --keep-weekly or --keep-monthly greater than 0.',
      {
        driver: 'catalog',
        permanent: true,
      },
    );
  }
  const entries = await listBackups(target, opts.domain ? { domain: opts.domain } : {});
  const byDomain = new Map<string, Manifest[]>();
  for (const e of entries) byDomain.set(e.manifest.domain, [...(byDomain.get(e.manifest.domain) ?? []), e.manifest]);
  const report: PruneReport = { target: target.displayUrl, dryRun: Boolean(opts.dryRun), keep: [], remove: [] };
  for (const manifests of [...byDomain.values()]) {
    const { keep, remove } = applyPolicy(manifests, policy);
    report.keep.push(...keep);
    report.remove.push(...remove);
  }
  if (opts.dryRun) return report;
  for (const victim of report.remove) await deleteBackup(target, victim.domain, victim.backupId);
  return report;
}

/** Deletes a committed backup: manifest first, then every object under its prefix. */
export async function deleteBackup(target: StorageTarget, domain: string, backupId: string): Promise<void> {
  await target.delete(manifestKey(domain, backupId));
  await deleteObjectsUnder(target, domain, backupId);
}

/**
 * Removes every object under `<domain>/<backupId>/` (images of an uncommitted backup), and what unfinished puts
 * left there: temp files and S3 multipart uploads, which no listing shows and S3 bills until they are aborted.
 */
export async function deleteObjectsUnder(target: StorageTarget, domain: string, backupId: string): Promise<string[]> {
  const prefix = backupPrefix(domain, backupId);
  const keys: string[] = [];
  for await (const obj of target.list(prefix)) keys.push(obj.key);
  for (const key of keys) await target.delete(key);
  await target.removeUnfinished(prefix);
  return keys;
}
