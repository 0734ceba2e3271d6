/**
 * verify: re-read every image a backup depends on (the backup and every link of its chain, from the manifests) and
 * check each against its manifest: size, SHA-256, and `qemu-img check` in the recorded format with no backing file
 * opened (a header may name anything; the chain is the manifests' business).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createHash } from 'node:crypto';
import { HypervisorError } from '../hypervisor/errors';
import { checkImage } from '../hypervisor/qemu-img';
import type { StorageTarget } from '../storage/contract';
import { findBackup, type CatalogOptions } from './catalog';
import { lookupOn, walkChain } from './chain';
import { writeSparseFile, type WrittenFile } from './local-copy';
import { isChunkManifest, manifestVmFiles } from './manifest';
import { verifyChunkBackup, type ChunkCheck, type ChunkReadOptions } from './chunk-read';
import type { ChainLevel, Manifest, ManifestDisk, ManifestVmEntry } from './manifest';
import { StorageError } from '../storage/errors';
import { imageContentDigest } from './pull-image';

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
  /** a disk in a chunk repository: what was checked of its chunks (`expectedSha256` is then its index's id) */
  chunks?: ChunkCheck;
}

/** A whole-VM file of a backup (domain.xml, nvram.fd, a TPM state file), checked against its manifest. */
export interface VmFileVerification {
  /** domain.xml, nvram.fd, `TPM state tpm2/<file>` */
  name: string;
  key: string;
  ok: boolean;
  expectedSha256: string;
  actualSha256?: string;
  expectedSize: number;
  actualSize?: number;
  /** one sentence when not ok */
  problem?: string;
  /** a file in a chunk repository: what was checked of its chunks */
  chunks?: ChunkCheck;
}

/** One backup of the chain: the one asked for, or a link it depends on. */
export interface LinkVerification {
  backupId: string;
  /** undefined for a link whose manifest is missing */
  level?: ChainLevel;
  ok: boolean;
  disks: DiskVerification[];
  /** its whole-VM files (none for a backup made before vmbackup stored them) */
  vmFiles: VmFileVerification[];
  /** set when the link itself is missing or is not the one its child was built on */
  problem?: string;
}

export interface VerifyReport {
  backupId: string;
  domain: string;
  target: string;
  ok: boolean;
  /** the disks of the backup asked for */
  disks: DiskVerification[];
  /** the whole-VM files of the backup asked for */
  vmFiles: VmFileVerification[];
  /**
   * a chunk backup written with S3 Object Lock: how many objects it needs, and those the server retains for less
   * than its date (then `ok` is false)
   */
  lock?: {
    retainUntil: string;
    objects: number;
    shortfalls: Array<{ key: string; retainUntil?: string; missing?: boolean }>;
  };
  /** every backup it depends on and itself, oldest (the chain's full) first; a missing link comes first, not ok */
  links: LinkVerification[];
}

export interface VerifyOptions extends CatalogOptions, ChunkReadOptions {
  /**
   * a backup in a chunk repository: read and authenticate every chunk (default: check that each exists). An image
   * tree's images are always read whole.
   */
  readData?: boolean;
  /** where downloaded qcow2 images are checked; default the OS temp dir */
  tempDir?: string;
  signal?: AbortSignal;
}

/** Re-reads every image of a backup and of every link of its chain. */
export async function verifyBackup(
  target: StorageTarget,
  backupId: string,
  opts: VerifyOptions = {},
): Promise<VerifyReport> {
  const catalog = { manifestKey: opts.manifestKey };
  const entry = await findBackup(target, backupId, catalog);
  const { manifest } = entry;
  if (isChunkManifest(manifest)) {
    // a complete point: no chain to walk
    const checked = await verifyChunkBackup(target, entry, opts);
    const lockProblem = checked.lock ? describeShortfalls(backupId, checked.lock) : undefined;
    const problem = checked.problem ?? lockProblem;
    const link: LinkVerification = {
      backupId,
      level: manifest.chain.level,
      ok: !problem && [...checked.disks, ...checked.vmFiles].every((d) => d.ok),
      disks: checked.disks,
      vmFiles: checked.vmFiles,
      ...(problem ? { problem } : {}),
    };
    return {
      backupId,
      domain: manifest.domain,
      target: target.displayUrl,
      ok: link.ok,
      disks: link.disks,
      vmFiles: link.vmFiles,
      ...(checked.lock ? { lock: checked.lock } : {}),
      links: [link],
    };
  }
  const walk = await walkChain(manifest, lookupOn(target, manifest.domain, catalog), target.displayUrl);
  const links: LinkVerification[] = [];
  if (walk.broken) {
    links.push({
      backupId: walk.broken.missing,
      ok: false,
      disks: [],
      vmFiles: [],
      problem: `the chain of ${backupId} is broken: ${walk.broken.reason}`,
    });
  }
  for (const m of walk.links) links.push(await verifyLink(target, m, opts));
  const own = links.at(-1)?.backupId === backupId ? (links.at(-1) as LinkVerification) : undefined;
  return {
    backupId,
    domain: manifest.domain,
    target: target.displayUrl,
    ok: links.every((l) => l.ok),
    disks: own?.disks ?? [],
    vmFiles: own?.vmFiles ?? [],
    links,
  };
}

async function verifyLink(target: StorageTarget, m: Manifest, opts: VerifyOptions): Promise<LinkVerification> {
  const disks: DiskVerification[] = [];
  for (const disk of m.disks) disks.push(await verifyDisk(target, disk, opts));
  const vmFiles: VmFileVerification[] = [];
  for (const f of manifestVmFiles(m)) vmFiles.push(await verifyVmFile(target, f));
  return {
    backupId: m.backupId,
    level: m.chain.level,
    ok: disks.every((d) => d.ok) && vmFiles.every((f) => f.ok),
    disks,
    vmFiles,
  };
}

/**
 * Reads a whole-VM file back (never more than its cap: the object may have been replaced by another writer of the
 * bucket) and checks its size and SHA-256.
 */
async function verifyVmFile(target: StorageTarget, f: ManifestVmEntry): Promise<VmFileVerification> {
  const base = { name: f.name, key: f.key, expectedSha256: f.sha256, expectedSize: f.size };
  let body: Buffer;
  try {
    body = await target.getBuffer(f.key, { maxBytes: f.maxBytes });
  } catch (err) {
    if (err instanceof StorageError && err.kind === 'not-found') {
      return { ...base, ok: false, problem: `${f.name}: object ${f.key} is missing` };
    }
    if (err instanceof StorageError && err.kind === 'checksum') {
      return { ...base, ok: false, problem: `${f.name}: ${f.key} is larger than ${f.maxBytes} bytes` };
    }
    throw err;
  }
  const actualSha256 = createHash('sha256').update(body).digest('hex');
  const result = { ...base, ok: true, actualSha256, actualSize: body.length };
  if (body.length !== f.size) {
    return {
      ...result,
      ok: false,
      problem: `${f.name}: ${f.key} has ${body.length} bytes, the manifest says ${f.size}`,
    };
  }
  if (actualSha256 !== f.sha256) {
    return {
      ...result,
      ok: false,
      problem: `${f.name}: ${f.key} has SHA-256 ${actualSha256}, the manifest says ${f.sha256}`,
    };
  }
  return result;
}

async function verifyDisk(target: StorageTarget, disk: ManifestDisk, opts: VerifyOptions): Promise<DiskVerification> {
  const base = { name: disk.name, key: disk.key, expectedSha256: disk.sha256, expectedSize: disk.size };
  const info = await target.stat(disk.key);
  if (!info) return { ...base, ok: false, problem: `disk ${disk.name}: object ${disk.key} is missing` };
  const needsCheck = disk.format !== 'raw';
  const localPath = target.capabilities.localPath;
  let work: string | undefined;
  try {
    let got: WrittenFile;
    let checkPath: string | undefined;
    if (needsCheck && !localPath) {
      work = await mkdtemp(join(opts.tempDir ?? tmpdir(), 'vmbackup-verify-'));
      checkPath = join(work, basename(disk.key));
      got = await writeSparseFile(await target.get(disk.key), checkPath, { signal: opts.signal });
    } else {
      got = await hashStream(target, disk.key, opts.signal);
      if (needsCheck && localPath) checkPath = join(localPath, disk.key);
    }
    const result: DiskVerification = {
      ...base,
      ok: true,
      actualSha256: got.sha256,
      actualSize: got.bytes,
      imageCheck: 'skipped',
    };
    if (got.bytes !== disk.size) {
      return {
        ...result,
        ok: false,
        problem: `disk ${disk.name}: ${disk.key} has ${got.bytes} bytes, the manifest says ${disk.size}`,
      };
    }
    if (disk.content && checkPath) {
      // a pulled image: its manifest holds the digest of its guest data, recomputed from the image
      const content = await imageContentDigest(checkPath, disk.virtualSize, { signal: opts.signal });
      result.actualSha256 = content.sha256;
      if (content.sha256 !== disk.sha256) {
        return {
          ...result,
          ok: false,
          problem: `disk ${disk.name}: the guest data of ${disk.key} has content digest ${content.sha256}, the manifest says ${disk.sha256}`,
        };
      }
    } else if (got.sha256 !== disk.sha256) {
      return {
        ...result,
        ok: false,
        problem: `disk ${disk.name}: ${disk.key} has SHA-256 ${got.sha256}, the manifest says ${disk.sha256}`,
      };
    }
    if (checkPath) {
      const check = await checkStoredImage(checkPath, disk, opts.signal);
      result.imageCheck = check.result;
      if (check.problem) return { ...result, ok: false, problem: check.problem };
    }
    return result;
  } finally {
    if (work) await rm(work, { recursive: true, force: true });
  }
}

/** `qemu-img check` in the manifest's format with no backing file opened, as a result and a problem sentence. */
async function checkStoredImage(
  path: string,
  disk: ManifestDisk,
  signal?: AbortSignal,
): Promise<{ result: 'ok' | 'leaks' | 'corrupt' | 'skipped'; problem?: string }> {
  try {
    const check = await checkImage(path, { format: disk.format, signal });
    if (!check.ok)
      return { result: 'corrupt', problem: `disk ${disk.name}: qemu-img check found corruption (${check.summary})` };
    if (!check.checked) return { result: 'skipped' };
    return { result: check.leaks > 0 ? 'leaks' : 'ok' };
  } catch (err) {
    if (err instanceof HypervisorError && err.kind === 'failed') {
      return {
        result: 'corrupt',
        problem: `disk ${disk.name}: qemu-img cannot read ${disk.key} as ${disk.format} (${err.message.replace(/\.$/, '')})`,
      };
    }
    throw err;
  }
}

async function hashStream(target: StorageTarget, key: string, signal?: AbortSignal): Promise<WrittenFile> {
  const hash = createHash('sha256');
  let bytes = 0;
  await pipeline(
    await target.get(key),
    new Writable({
      write(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        bytes += chunk.length;
        cb();
      },
    }),
    { signal },
  );
  return { sha256: hash.digest('hex'), bytes };
}

/**
 * One sentence naming the objects of a locked backup that the server retains for less than its date (the first
 * three, and how many more); undefined when every one holds.
 */
function describeShortfalls(backupId: string, lock: NonNullable<VerifyReport['lock']>): string | undefined {
  const short = lock.shortfalls;
  if (short.length === 0) return undefined;
  const named = short
    .slice(0, 3)
    .map(
      (s) => `${s.key} (${s.missing ? 'missing' : s.retainUntil ? `retained until ${s.retainUntil}` : 'not retained'})`,
    )
    .join(', ');
  const more = short.length > 3 ? ` and ${short.length - 3} more` : '';
  return `backup ${backupId} is locked until ${lock.retainUntil}, but ${short.length} of the ${lock.objects} objects it needs can be deleted before that: ${named}${more}; their retention was shortened with a governance bypass or never set, and a new locked backup extends every object it shares with this one.`;
}
