/**
 * shipImage as Temporal runs it: heartbeats carry the driver's checkpoint, a retried attempt
 * resumes from the last heartbeat, cancellation leaves nothing on the target.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CancelledFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import type { ShipHeartbeat } from '../../src/activities/storage';
import type { ShippedImage } from '../../src/shared/activities';
import type { DiskImage } from '../../src/shared/types';
import { requireS3 } from '../helpers/stack';
import { stageImage, storageActivities } from '../storage/backups';
import { s3Target } from '../storage/fixtures';

const MiB = 1 << 20;
const acts = storageActivities();
let work: string;
let disk: DiskImage;

beforeAll(async () => {
  await requireS3();
  work = await mkdtemp(join(tmpdir(), 'vmbackup-acts-'));
  const bytes = randomBytes(30 * MiB);
  const path = join(work, 'vda.raw');
  await writeFile(path, bytes);
  disk = await stageImage('web-1', {
    name: 'vda',
    format: 'raw',
    path,
    virtualSize: bytes.length,
    size: bytes.length,
    sha256: createHash('sha256').update(bytes).digest('hex'),
  });
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

test('a retried shipImage resumes from the last heartbeat and sends only the rest', async () => {
  const t = await s3Target();
  try {
    const input = {
      backupId: 'web-1',
      domain: 'web',
      target: t.url,
      disk,
      s3Options: { partSizeMiB: 5, concurrency: 1 },
    };
    const first = new MockActivityEnvironment();
    let last: ShipHeartbeat | undefined;
    first.on('heartbeat', (d: ShipHeartbeat) => {
      last = d;
      // the worker dies once three parts are durable: Temporal keeps the last heartbeat
      if ((d.checkpoint?.parts as unknown[] | undefined)?.length === 3) first.cancel();
    });
    await expect(first.run(acts.shipImage, input)).rejects.toBeInstanceOf(CancelledFailure);
    // a cancel aborts the multipart upload; a crash would not, so replay the crash: upload three parts again
    expect(await t.leftovers()).toEqual([]);

    const crashed = new MockActivityEnvironment();
    let crashCheckpoint: ShipHeartbeat | undefined;
    crashed.on('heartbeat', (d: ShipHeartbeat) => {
      if ((d.checkpoint?.parts as unknown[] | undefined)?.length === 3 && !crashCheckpoint) {
        crashCheckpoint = JSON.parse(JSON.stringify(d)) as ShipHeartbeat; // what the server stored
        // a worker crash: the process is gone, nothing is cleaned up (the signal is not the cancellation path)
        throw Object.assign(new Error('worker crashed'), { code: 'ECONNRESET' });
      }
    });
    await crashed.run(acts.shipImage, input).catch(() => undefined);
    expect(crashCheckpoint).toBeDefined();
    expect(last).toBeDefined();

    const retry = new MockActivityEnvironment({ heartbeatDetails: crashCheckpoint, attempt: 2 });
    const shipped: ShippedImage = await retry.run(acts.shipImage, input);
    expect(shipped.sha256).toBe(disk.sha256);
    expect(shipped.bytesSent).toBe(disk.size - 3 * 5 * MiB);

    // and once it is there, another attempt only looks
    const idle: ShippedImage = await new MockActivityEnvironment().run(acts.shipImage, input);
    expect(idle.bytesSent).toBe(0);
  } finally {
    await t.cleanup();
    await t.target.close();
  }
});
