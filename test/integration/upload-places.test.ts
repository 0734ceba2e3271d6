/**
 * `vmbackup worker --max-concurrent-uploads N`, as shipImage runs under Temporal: with one place per target, a second
 * upload to the same target heartbeats that it waits and sends nothing until the first put ended; an upload to
 * another target does not wait; a cancelled waiter takes no place. Real local targets, real images.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CancelledFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createStorageActivities, type ShipHeartbeat } from '../../src/activities/storage';
import { uploadSlots } from '../../src/activities/upload-slots';
import type { ShippedImage } from '../../src/shared/activities';
import type { DiskImage } from '../../src/shared/types';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';
import { stageImage, testHostPaths } from '../storage/backups';
import { localTarget } from '../storage/fixtures';

const MiB = 1 << 20;

interface Put {
  url: string;
  key: string;
  start: number;
  end: number;
}

let work: string;
const targets: Array<Awaited<ReturnType<typeof localTarget>>> = [];

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmbackup-upload-places-'));
});

afterAll(async () => {
  for (const t of targets) await t.cleanup();
  await rm(work, { recursive: true, force: true });
});

async function image(backupId: string): Promise<DiskImage> {
  const bytes = randomBytes(8 * MiB);
  const path = join(work, `${backupId}.raw`);
  await writeFile(path, bytes);
  return stageImage(backupId, {
    name: 'vda',
    format: 'raw',
    path,
    virtualSize: bytes.length,
    size: bytes.length,
    sha256: createHash('sha256').update(bytes).digest('hex'),
  });
}

/** the storage activities with `places` per target, over real local targets whose puts are timed */
function activities(places: number, puts: Put[]) {
  return createStorageActivities({
    paths: testHostPaths(),
    uploads: uploadSlots(places),
    openTarget: (url, options) => {
      const target = openTarget(url, { ...options, env: {} });
      const putImage: StorageTarget['putImage'] = async (key, source, opts) => {
        const put: Put = { url, key, start: Date.now(), end: Number.POSITIVE_INFINITY };
        puts.push(put);
        // long enough that an upload which did not wait would overlap it
        await new Promise((r) => setTimeout(r, 300));
        try {
          return await target.putImage(key, source, opts);
        } finally {
          put.end = Date.now();
        }
      };
      return Object.assign(Object.create(target) as StorageTarget, { putImage });
    },
  });
}

test('one place per target: the second upload to a target waits (and says so) until the first put ended; another target does not wait', async () => {
  const [t1, t2] = [await localTarget(), await localTarget()];
  targets.push(t1, t2);
  const puts: Put[] = [];
  const acts = activities(1, puts);
  const input = async (n: number, url: string) => ({
    backupId: `vm${n}-20261130T000000Z-000${n}`,
    domain: `vm${n}`,
    target: url,
    disk: await image(`vm${n}-20261130T000000Z-000${n}`),
  });
  const waited: boolean[] = [false, false, false];
  const envs = [0, 1, 2].map((i) => {
    const env = new MockActivityEnvironment();
    env.on('heartbeat', (d: ShipHeartbeat) => {
      if (d.waitingForUpload) waited[i] = true;
    });
    return env;
  });
  const [in0, in1, in2] = [await input(0, t1.url), await input(1, t1.url), await input(2, t2.url)];
  const ship = (i: number, input: typeof in0): Promise<ShippedImage> => envs[i]!.run(acts.shipImage, input);
  const shipped = await Promise.all([ship(0, in0), ship(1, in1), ship(2, in2)]);
  expect(shipped.map((s) => s.sha256)).toEqual([in0.disk.sha256, in1.disk.sha256, in2.disk.sha256]);
  const onT1 = puts.filter((p) => p.url === t1.url).sort((a, b) => a.start - b.start);
  const onT2 = puts.filter((p) => p.url === t2.url);
  expect(onT1).toHaveLength(2);
  expect(onT2).toHaveLength(1);
  // never two puts at once on t1
  expect(onT1[1]!.start).toBeGreaterThanOrEqual(onT1[0]!.end);
  // t2's put ran while t1's first one did
  expect(onT2[0]!.start).toBeLessThan(onT1[0]!.end);
  // every upload heartbeats whether it waits: exactly one of the two on t1 waited, the one on t2 did not
  expect(waited.slice(0, 2).filter(Boolean)).toHaveLength(1);
  expect(waited[2]).toBe(false);
});

test('an upload cancelled while it waits for a place sends nothing and takes no place', async () => {
  const t = await localTarget();
  targets.push(t);
  const puts: Put[] = [];
  const acts = activities(1, puts);
  const first = {
    backupId: 'vm5-20261130T000000Z-0005',
    domain: 'vm5',
    target: t.url,
    disk: await image('vm5-20261130T000000Z-0005'),
  };
  const second = {
    backupId: 'vm6-20261130T000000Z-0006',
    domain: 'vm6',
    target: t.url,
    disk: await image('vm6-20261130T000000Z-0006'),
  };
  const waiting = new MockActivityEnvironment();
  waiting.on('heartbeat', (d: ShipHeartbeat) => {
    if (d.waitingForUpload) waiting.cancel();
  });
  const running = new MockActivityEnvironment().run(acts.shipImage, first);
  await new Promise((r) => setTimeout(r, 50)); // the first holds the place
  await expect(waiting.run(acts.shipImage, second)).rejects.toBeInstanceOf(CancelledFailure);
  await running;
  expect(puts.map((p) => p.key)).toEqual([expect.stringContaining('vm5-20261130T000000Z-0005')]);
  // the place is free again: the cancelled backup's upload, run again, goes through at once
  const again: ShippedImage = await new MockActivityEnvironment().run(acts.shipImage, second);
  expect(again.sha256).toBe(second.disk.sha256);
});
