/**
 * A target that runs out of space: a 32 MiB ext4 filesystem on a loop device (or, where loop
 * mounts are not allowed, a 32 MiB tmpfs). The copy fails with one sentence naming the target,
 * the temp file is gone, nothing is listed, and the activity fails without retrying.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { HostPaths } from '../../src/activities/host-paths';
import { createStorageActivities } from '../../src/activities/storage';
import { ErrorType } from '../../src/shared/errors';
import { listBackups } from '../../src/repository';
import { StorageError } from '../../src/storage/errors';
import { openTarget } from '../../src/storage/registry';
import { filesUnder } from '../storage/fixtures';

const run = promisify(execFile);
const MiB = 1 << 20;

let work: string;
let mnt: string;
let how: string;

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmbackup-nospace-'));
  mnt = join(work, 'mnt');
  await run('mkdir', ['-p', mnt]);
  const fsImage = join(work, 'fs.img');
  try {
    await run('truncate', ['-s', '32M', fsImage]);
    await run('mkfs.ext4', ['-q', '-F', fsImage]);
    await run('mount', ['-o', 'loop', fsImage, mnt]);
    how = 'ext4 on a loop device';
  } catch (loopErr) {
    // containers often forbid loop devices; a size-limited tmpfs runs out of space the same way
    try {
      await run('mount', ['-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', mnt]);
      how = 'tmpfs size=32m';
    } catch (tmpfsErr) {
      throw new Error(
        `cannot make a small filesystem for the no-space test: loop mount (${(loopErr as Error).message.trim()}) and tmpfs (${(tmpfsErr as Error).message.trim()}) both failed; run the tests as root`,
      );
    }
  }
});

afterAll(async () => {
  await run('umount', [mnt]).catch(() => undefined);
  await rm(work, { recursive: true, force: true });
});

test('a full target: one sentence naming it, no temp file left, nothing listed, non-retryable activity failure', async () => {
  // staged where a worker with state dir `work` stages the images of this backup
  const image = join(work, 'staging', 'web-20261128T010000Z-0001', 'vda.raw');
  await mkdir(dirname(image), { recursive: true });
  await writeFile(image, randomBytes(48 * MiB));
  const url = `file://${mnt}/backups`;
  const target = openTarget(url, { env: {} });
  const err = await target.putImage('web/web-20261128T010000Z-0001/vda.raw', image).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(StorageError);
  expect((err as StorageError).kind).toBe('no-space');
  expect((err as StorageError).permanent).toBe(true);
  expect((err as StorageError).message).toBe(
    `Target ${url} ran out of space while trying to write web/web-20261128T010000Z-0001/vda.raw; free space on the target or prune old backups.`,
  );
  expect(await filesUnder(join(mnt, 'backups'))).toEqual([]);
  expect(await listBackups(target)).toEqual([]);

  const acts = createStorageActivities({
    openTarget: (u, o) => openTarget(u, { ...o, env: {} }),
    paths: new HostPaths({ stateDir: work }),
  });
  const failure = await new MockActivityEnvironment()
    .run(acts.shipImage, {
      backupId: 'web-20261128T010000Z-0001',
      domain: 'web',
      target: url,
      disk: { name: 'vda', format: 'raw', path: image, virtualSize: 48 * MiB, size: 48 * MiB, sha256: 'a'.repeat(64) },
    })
    .catch((e: unknown) => e);
  expect(failure).toBeInstanceOf(ApplicationFailure);
  expect((failure as ApplicationFailure).nonRetryable).toBe(true);
  expect((failure as ApplicationFailure).type).toBe(ErrorType.NoSpace);
  expect(await filesUnder(join(mnt, 'backups'))).toEqual([]);
  process.stderr.write(`no-space test ran on ${how}\n`);
  await target.close();
});
