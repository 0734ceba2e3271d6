/** Real backups on a target for catalog and CLI tests: qemu-io-written images, shipped and committed by the activities. */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { copyFile, link, mkdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { MockActivityEnvironment } from '@temporalio/testing';
import { HostPaths } from '../../src/activities/host-paths';
import { createStorageActivities } from '../../src/activities/storage';
import type { ShippedImage } from '../../src/shared/activities';
import type { DiskImage } from '../../src/shared/types';
import { openTarget } from '../../src/storage/registry';
import { s3Env } from './fixtures';

const run = promisify(execFile);
const MiB = 1 << 20;

let testState: string | undefined;

/**
 * A state dir of this test process: the storage activities ship only images staged in it
 * (`<state>/staging/<backupId>/<disk>.<format>`), as a worker ships only what it staged.
 */
export function testStateDir(): string {
  if (!testState) {
    const dir = mkdtempSync(join(tmpdir(), 'vmbackup-test-state-'));
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
    testState = dir;
  }
  return testState;
}

export function testHostPaths(): HostPaths {
  return new HostPaths({ stateDir: testStateDir() });
}

export function storageActivities(): ReturnType<typeof createStorageActivities> {
  return createStorageActivities({
    openTarget: (url, options) => openTarget(url, { ...options, env: s3Env() }),
    paths: testHostPaths(),
  });
}

/** `disk` as the backup `backupId` staged it: a hard link (or a copy) in this process's staging dir. */
export async function stageImage(backupId: string, disk: DiskImage): Promise<DiskImage> {
  const dir = join(testStateDir(), 'staging', backupId);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const path = join(dir, `${disk.name}.${disk.format}`);
  await rm(path, { force: true });
  await link(disk.path, path).catch(() => copyFile(disk.path, path));
  const { stamp: _stamp, ...rest } = disk;
  return { ...rest, path };
}

const activities = storageActivities();

export async function sha256Of(path: string): Promise<string> {
  return createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
}

export async function makeImage(
  dir: string,
  name: string,
  format: 'qcow2' | 'raw',
  pattern: number,
): Promise<DiskImage> {
  const path = join(dir, `${name}.${format}`);
  // raw images are stored whole: keep them small
  const virtualSize = format === 'raw' ? 16 * MiB : 64 * MiB;
  await run('qemu-img', ['create', '-q', '-f', format, path, String(virtualSize)]);
  await run('qemu-io', ['-f', format, '-c', `write -P ${pattern} 0 4M`, '-c', `write -P ${pattern + 1} 8M 1M`, path]);
  return { name, format, path, virtualSize, size: (await stat(path)).size, sha256: await sha256Of(path) };
}

/** What the backup workflow does per target: ship every disk, then write the manifest. */
export async function backUp(
  url: string,
  domain: string,
  backupId: string,
  startedAt: string,
  disks: DiskImage[],
): Promise<void> {
  const env = new MockActivityEnvironment();
  const shipped: ShippedImage[] = [];
  for (const disk of disks)
    shipped.push(
      await env.run(activities.shipImage, {
        backupId,
        domain,
        target: url,
        disk: await stageImage(backupId, disk),
        s3Options: { partSizeMiB: 5 },
      }),
    );
  await env.run(activities.writeManifest, {
    target: url,
    manifest: {
      backupId,
      domain,
      host: 'hv1',
      method: 'push' as const,
      startedAt,
      finishedAt: startedAt,
      quiesced: false,
      libvirtVersion: '9.0.0',
      qemuVersion: '7.2.0',
      disks: disks.map((d, i) => ({
        name: d.name,
        format: d.format,
        virtualSize: d.virtualSize,
        size: d.size,
        sha256: d.sha256,
        key: shipped[i]!.key,
      })),
    },
  });
}
