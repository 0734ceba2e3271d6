/**
 * What S3 Object Lock costs per backup (issue #17): the same image-tree backup (the storage activities: ship the
 * images, commit the manifest) into one Object Lock bucket on the stack's radosgw, unlocked and with
 * `--s3-object-lock`, interleaved; S3 requests counted per command from the SDK's middleware, time as a ratio.
 *
 *   npx tsc -p bench/tsconfig.json --outDir /tmp/vmb-bench && node /tmp/vmb-bench/bench/object-lock.js [reps]
 * (with the stack's environment: eval "$(bash scripts/stack.sh env)")
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CreateBucketCommand,
  DeleteBucketCommand,
  DeleteObjectCommand,
  ListObjectVersionsCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { MockActivityEnvironment } from '@temporalio/testing';
import { HostPaths } from '../src/activities/host-paths';
import { createStorageActivities } from '../src/activities/storage';
import type { ShippedImage } from '../src/shared/activities';
import type { DiskImage, S3TargetOptions } from '../src/shared/types';
import type { StorageTarget } from '../src/storage/contract';
import { openTarget } from '../src/storage/registry';

const MiB = 1 << 20;
const env = {
  AWS_ENDPOINT_URL: process.env.AWS_ENDPOINT_URL ?? 'http://127.0.0.1:7480',
  AWS_REGION: process.env.AWS_REGION ?? 'us-east-1',
  AWS_ACCESS_KEY_ID: process.env.AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY: process.env.AWS_SECRET_ACCESS_KEY,
};

interface Counted {
  client: { middlewareStack: { add(mw: unknown, opts: unknown): void } };
}

async function main(): Promise<void> {
  const reps = Number(process.argv[2] ?? 5);
  const state = await mkdtemp(join(tmpdir(), 'vmb-bench-ol-'));
  const bucket = `vmbt-ol-bench-${randomBytes(3).toString('hex')}`;
  const admin = new S3Client({
    endpoint: env.AWS_ENDPOINT_URL,
    region: env.AWS_REGION,
    forcePathStyle: true,
    credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID ?? '', secretAccessKey: env.AWS_SECRET_ACCESS_KEY ?? '' },
  });
  await admin.send(new CreateBucketCommand({ Bucket: bucket, ObjectLockEnabledForBucket: true }));
  const counts = new Map<string, number>();
  const acts = createStorageActivities({
    openTarget: (url, options) => {
      const t: StorageTarget = openTarget(url, { ...options, env });
      // the driver's client is private: count its requests from outside, by command name
      (t as unknown as Counted).client.middlewareStack.add(
        (next: (a: unknown) => Promise<unknown>, context: { commandName?: string }) => (args: unknown) => {
          const name = (context.commandName ?? '?').replace(/Command$/, '');
          counts.set(name, (counts.get(name) ?? 0) + 1);
          return next(args);
        },
        { step: 'initialize' },
      );
      return t;
    },
    paths: new HostPaths({ stateDir: state }),
  });
  const disks: Array<{ name: string; bytes: Buffer }> = [
    { name: 'vda', bytes: randomBytes(24 * MiB) },
    { name: 'vdb', bytes: randomBytes(2 * MiB) },
  ];
  const backup = async (i: number, s3Options: S3TargetOptions): Promise<number> => {
    const backupId = `web-20261130T02000${i % 10}Z-${randomBytes(2).toString('hex')}`;
    const staged: DiskImage[] = [];
    const dir = join(state, 'staging', backupId);
    await mkdir(dir, { recursive: true });
    for (const d of disks) {
      const path = join(dir, `${d.name}.raw`);
      await writeFile(path, d.bytes);
      staged.push({
        name: d.name,
        format: 'raw',
        path,
        virtualSize: d.bytes.length,
        size: d.bytes.length,
        sha256: createHash('sha256').update(d.bytes).digest('hex'),
      });
    }
    const url = `s3://${bucket}/b`;
    const started = process.hrtime.bigint();
    const ctx = new MockActivityEnvironment();
    const keys: string[] = [];
    for (const disk of staged) {
      const shipped: ShippedImage = await ctx.run(acts.shipImage, {
        backupId,
        domain: 'web',
        target: url,
        disk,
        s3Options,
      });
      keys.push(shipped.key);
    }
    await ctx.run(acts.writeManifest, {
      target: url,
      s3Options,
      manifest: {
        backupId,
        domain: 'web',
        host: 'hv1',
        method: 'push' as const,
        startedAt: new Date().toISOString(),
        finishedAt: new Date().toISOString(),
        quiesced: false,
        libvirtVersion: '9.0.0',
        qemuVersion: '7.2.0',
        disks: staged.map((d, k) => ({
          name: d.name,
          format: d.format,
          virtualSize: d.virtualSize,
          size: d.size,
          sha256: d.sha256,
          key: keys[k]!,
        })),
      },
    });
    return Number(process.hrtime.bigint() - started) / 1e6;
  };
  const lock: S3TargetOptions = {
    partSizeMiB: 8,
    objectLock: { mode: 'governance', days: 1, retainUntil: new Date(Date.now() + 120_000).toISOString() },
  };
  const times: Record<'plain' | 'locked', number[]> = { plain: [], locked: [] };
  const requests: Record<'plain' | 'locked', Record<string, number>> = { plain: {}, locked: {} };
  try {
    for (let i = 0; i < reps + 1; i++) {
      for (const kind of i % 2 ? (['locked', 'plain'] as const) : (['plain', 'locked'] as const)) {
        counts.clear();
        const ms = await backup(i, kind === 'locked' ? lock : { partSizeMiB: 8 });
        if (i === 0) continue; // warm-up
        times[kind].push(ms);
        requests[kind] = Object.fromEntries([...counts].sort());
      }
    }
    const median = (a: number[]): number => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)] ?? NaN;
    const total = (r: Record<string, number>): number => Object.values(r).reduce((n, v) => n + v, 0);
    console.log(`backup of 2 images (24 MiB in 3 parts + 2 MiB) and a manifest, ${reps} reps each, interleaved`);
    for (const kind of ['plain', 'locked'] as const) {
      console.log(
        `${kind.padEnd(7)} median ${median(times[kind]).toFixed(0)} ms, ${total(requests[kind])} requests: ${JSON.stringify(requests[kind])}`,
      );
    }
    console.log(`locked/plain time ratio: ${(median(times.locked) / median(times.plain)).toFixed(2)}`);
  } finally {
    // the bench's own bypass (never vmbackup's): remove the locked versions and the bucket
    let versions;
    do {
      versions = await admin.send(new ListObjectVersionsCommand({ Bucket: bucket }));
      for (const v of [...(versions.Versions ?? []), ...(versions.DeleteMarkers ?? [])]) {
        await admin.send(
          new DeleteObjectCommand({
            Bucket: bucket,
            Key: v.Key,
            VersionId: v.VersionId,
            BypassGovernanceRetention: true,
          }),
        );
      }
    } while (versions.IsTruncated);
    await admin.send(new DeleteBucketCommand({ Bucket: bucket }));
    admin.destroy();
    await rm(state, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
