/** verify: re-read every image of a backup and check it against its manifest (size, SHA-256, qemu-img check). */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { StorageTarget } from '../storage/contract';
import { findBackup, type CatalogOptions } from './catalog';
import type { ManifestDisk } from './manifest';
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

export interface VerifyOptions extends CatalogOptions {
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
  const { manifest } = await findBackup(target, backupId, { manifestKey: opts.manifestKey });
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
