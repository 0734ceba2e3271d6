/**
 * `vmbackup worker --max-concurrent-uploads N`, as shipImage runs under Temporal: with one place per target, a second
 * upload to the same target heartbeats that it waits and sends nothing until the first put ended; an upload to
 * another target does not wait; a cancelled waiter takes no place. Stores into chunk repositories (and pulls, which
 * use the same places) share them with shipImage. Real local targets, real images.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CancelledFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createActivities } from '../../src/activities';
import { createStorageActivities, type ShipHeartbeat } from '../../src/activities/storage';
import { uploadSlots } from '../../src/activities/upload-slots';
import { initRepository } from '../../src/repository/chunks';
import type { ShippedImage, StoredChunkImages } from '../../src/shared/activities';
import type { DiskImage } from '../../src/shared/types';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';
import { stageImage, testHostPaths, testStateDir } from '../storage/backups';
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

/**
 * The worker's activities as `vmbackup worker --max-concurrent-uploads 1` builds them, over real local targets; each
 * target an activity opens records when its first write began and its last one ended (the first waits 300 ms, long
 * enough that a write that did not wait would overlap it).
 */
function workerActivities(writes: Array<{ url: string; start: number; end: number }>) {
  return createActivities({
    hypervisor: {} as never,
    stateDir: testStateDir(),
    maxConcurrentUploads: 1,
    openTarget: (url, options) => {
      const target = openTarget(url, { ...options, env: {} });
      let span: { url: string; start: number; end: number } | undefined;
      const timed =
        <A extends unknown[], R>(fn: (...a: A) => Promise<R>) =>
        async (...a: A): Promise<R> => {
          if (!span) {
            span = { url, start: Date.now(), end: Date.now() };
            writes.push(span);
            await new Promise((r) => setTimeout(r, 300));
          }
          try {
            return await fn(...a);
          } finally {
            span.end = Date.now();
          }
        };
      return Object.assign(Object.create(target) as StorageTarget, {
        putImage: timed(target.putImage.bind(target)),
        putBatched: timed(target.putBatched.bind(target)),
        putManifest: timed(target.putManifest.bind(target)),
      });
    },
  });
}

test('chunk repositories share the places: a store waits (and says so) for a store or an upload on its target, not for another target', async () => {
  const [t1, t2] = [await localTarget(), await localTarget()];
  targets.push(t1, t2);
  for (const t of [t1, t2]) {
    const target = openTarget(t.url, { env: {} });
    await initRepository(target, { encryption: 'none', compression: 'none' });
    await target.close();
  }
  const writes: Array<{ url: string; start: number; end: number }> = [];
  const acts = workerActivities(writes);
  const store = async (n: number, url: string) => {
    const backupId = `vm${n}-20261130T000000Z-000${n}`;
    return { backupId, domain: `vm${n}`, target: url, images: [await image(backupId)] };
  };
  const [s0, s1, s2] = [await store(7, t1.url), await store(8, t1.url), await store(9, t2.url)];
  const ship = {
    backupId: 'vm4-20261130T000000Z-0004',
    domain: 'vm4',
    target: t1.url,
    disk: await image('vm4-20261130T000000Z-0004'),
  };
  const waited = [false, false, false, false];
  const env = (i: number) => {
    const e = new MockActivityEnvironment({ heartbeatTimeoutMs: 30_000 });
    e.on('heartbeat', (d: { waitingForUpload?: boolean }) => {
      if (d?.waitingForUpload) waited[i] = true;
    });
    return e;
  };
  const [r0, r1, r2, r3] = await Promise.all([
    env(0).run(acts.storeChunkImages, s0),
    env(1).run(acts.storeChunkImages, s1),
    env(2).run(acts.storeChunkImages, s2),
    env(3).run(acts.shipImage, ship),
  ]);
  for (const r of [r0, r1, r2] as StoredChunkImages[]) expect(r.disks[0]!.stats.chunks).toBeGreaterThan(0);
  expect((r3 as ShippedImage).sha256).toBe(ship.disk.sha256);
  const onT1 = writes.filter((w) => w.url === t1.url).sort((a, b) => a.start - b.start);
  const onT2 = writes.filter((w) => w.url === t2.url);
  expect(onT1).toHaveLength(3);
  expect(onT2).toHaveLength(1);
  // one at a time on t1, the upload among them
  for (let i = 1; i < onT1.length; i++) expect(onT1[i]!.start).toBeGreaterThanOrEqual(onT1[i - 1]!.end);
  // two of the three on t1 waited and said so; the one on t2 found its place free
  expect([waited[0], waited[1], waited[3]].filter(Boolean)).toHaveLength(2);
  expect(waited[2]).toBe(false);
});
