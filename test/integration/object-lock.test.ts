/**
 * S3 Object Lock for image-tree backups (issue #17) on the real radosgw: a locked backup cannot be deleted or
 * overwritten with the host's own credentials and still restores; prune keeps what is locked and says until when,
 * and removes every version once the date passed; a bucket without Object Lock is refused before anything is written.
 *
 * Each run creates its own buckets (one with Object Lock, one without) and removes them at the end, the locked
 * versions with BypassGovernanceRetention: a permission only this test uses, never vmbackup.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CreateBucketCommand,
  DeleteBucketCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectVersionsCommand,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { MockActivityEnvironment } from '@temporalio/testing';
import type { ShippedImage } from '../../src/shared/activities';
import type { DiskImage, S3TargetOptions } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireS3, requireTemporal, s3ClientConfig } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, uniqueHost } from '../helpers/vmbackup';
import { makeImage, stageImage, storageActivities } from '../storage/backups';

const acts = storageActivities();
const client = new S3Client(s3ClientConfig());
const run = randomBytes(3).toString('hex');
const lockedBucket = `vmbt-ol-${run}`;
const plainBucket = `vmbt-ol-plain-${run}`;
let work: string;
let disks: DiskImage[];

interface Version {
  Key: string;
  VersionId: string;
}

async function versions(bucket: string, prefix = ''): Promise<{ versions: Version[]; markers: Version[] }> {
  const out = await client.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: prefix }));
  const pick = (list: Array<{ Key?: string; VersionId?: string }> | undefined): Version[] =>
    (list ?? []).map((v) => ({ Key: v.Key ?? '', VersionId: v.VersionId ?? '' }));
  return { versions: pick(out.Versions), markers: pick(out.DeleteMarkers) };
}

/** The S3 error a request failed with (its code), or 'ok'. */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (err) {
    return (err as { Code?: string; name?: string }).Code ?? (err as Error).name;
  }
}

async function sha256Of(stream: AsyncIterable<Uint8Array>): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of stream) h.update(chunk);
  return h.digest('hex');
}

/** A real backup of `disks` through the storage activities, as the backup workflow runs them on one target. */
async function lockedBackup(
  url: string,
  backupId: string,
  startedAt: string,
  s3Options: S3TargetOptions,
): Promise<ShippedImage[]> {
  const env = new MockActivityEnvironment();
  const shipped: ShippedImage[] = [];
  for (const disk of disks) {
    shipped.push(
      await env.run(acts.shipImage, {
        backupId,
        domain: 'web',
        target: url,
        disk: await stageImage(backupId, disk),
        s3Options,
      }),
    );
  }
  await env.run(acts.writeManifest, {
    target: url,
    s3Options,
    manifest: {
      backupId,
      domain: 'web',
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
  return shipped;
}

function backupIdAt(at: Date): string {
  return `web-${at
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z')}-${randomBytes(2).toString('hex')}`;
}

beforeAll(async () => {
  await requireS3();
  await client.send(new CreateBucketCommand({ Bucket: lockedBucket, ObjectLockEnabledForBucket: true }));
  await client.send(new CreateBucketCommand({ Bucket: plainBucket }));
  work = await mkdtemp(join(tmpdir(), 'vmbackup-ol-'));
  // a qcow2 image bigger than a part (a multipart upload) and a raw one: both go up in parts of 5 MiB
  disks = [await makeImage(work, 'vda', 'qcow2', 0x41), await makeImage(work, 'vdb', 'raw', 0x61)];
});

afterAll(async () => {
  // the test's own bypass: vmbackup never sends BypassGovernanceRetention
  for (const bucket of [lockedBucket, plainBucket]) {
    const all = await versions(bucket).catch(() => ({ versions: [], markers: [] }));
    for (const v of [...all.versions, ...all.markers]) {
      await client.send(
        new DeleteObjectCommand({
          Bucket: bucket,
          Key: v.Key,
          VersionId: v.VersionId,
          BypassGovernanceRetention: true,
        }),
      );
    }
    await client.send(new DeleteBucketCommand({ Bucket: bucket })).catch(() => undefined);
  }
  client.destroy();
  await rm(work, { recursive: true, force: true });
});

test('a locked backup cannot be deleted or overwritten with the same credentials, and still restores', async () => {
  const url = `s3://${lockedBucket}/t1`;
  const started = new Date();
  const startedAt = started.toISOString();
  const backupId = backupIdAt(started);
  const retainUntil = new Date(started.getTime() + 86_400_000).toISOString();
  // as the backup workflow sends it: the date is the backup's start + 1 day
  await lockedBackup(url, backupId, startedAt, {
    partSizeMiB: 5,
    objectLock: { mode: 'governance', days: 1, retainUntil },
  });

  // every object of the backup (two multipart images, the manifest) is locked until start + 1 day
  const { versions: stored } = await versions(lockedBucket, `t1/web/${backupId}/`);
  expect(stored.map((v) => v.Key.split('/').pop()).sort()).toEqual(['manifest.json', 'vda.qcow2', 'vdb.raw']);
  for (const v of stored) {
    const head = await client.send(new HeadObjectCommand({ Bucket: lockedBucket, Key: v.Key, VersionId: v.VersionId }));
    expect({ key: v.Key, mode: head.ObjectLockMode, until: head.ObjectLockRetainUntilDate?.toISOString() }).toEqual({
      key: v.Key,
      mode: 'GOVERNANCE',
      until: retainUntil,
    });
  }

  // list shows the lock date (table and --json), from the manifest
  const list = await runCli(['list', '--target', url, '--json']);
  expect(list.code).toBe(0);
  const listed = (JSON.parse(list.stdout) as { backups: Array<{ backupId: string; objectLock?: unknown }> }).backups;
  expect(listed.find((b) => b.backupId === backupId)?.objectLock).toEqual({ mode: 'governance', retainUntil });
  const table = await runCli(['list', '--target', url]);
  expect(table.stdout).toMatch(/LOCKED UNTIL/);
  expect(table.stdout).toContain(retainUntil);

  // an attacker with the host's credentials: deleting a locked version is refused by the server
  for (const v of stored) {
    expect(
      await outcome(client.send(new DeleteObjectCommand({ Bucket: lockedBucket, Key: v.Key, VersionId: v.VersionId }))),
    ).toBe('AccessDenied');
  }
  // overwriting only adds a version: the locked one keeps its bytes
  const image = stored.find((v) => v.Key.endsWith('vdb.raw'))!;
  const garbage = Buffer.alloc(1024, 0xee);
  await client.send(
    new PutObjectCommand({
      Bucket: lockedBucket,
      Key: image.Key,
      Body: garbage,
      ContentMD5: createHash('md5').update(garbage).digest('base64'),
    }),
  );
  const original = await client.send(
    new GetObjectCommand({ Bucket: lockedBucket, Key: image.Key, VersionId: image.VersionId }),
  );
  expect(await sha256Of(original.Body as AsyncIterable<Uint8Array>)).toBe(disks[1]!.sha256);

  // restore refuses the overwritten image (its digest is in the manifest) ...
  const to = join(work, 'restore-1');
  const refused = await runCli(['restore', backupId, '--target', url, '--to', to]);
  expect(refused.code).not.toBe(0);
  expect(refused.stderr).toMatch(/SHA-256|checksum|changed/i);
  // ... and once the attacker's version (not locked) is deleted, the locked version is current again and restores
  const after = await versions(lockedBucket, image.Key);
  const attackers = after.versions.filter((v) => v.VersionId !== image.VersionId);
  expect(attackers).toHaveLength(1);
  await client.send(
    new DeleteObjectCommand({ Bucket: lockedBucket, Key: image.Key, VersionId: attackers[0]!.VersionId }),
  );
  const to2 = join(work, 'restore-2');
  const restored = await runCli(['restore', backupId, '--target', url, '--to', to2]);
  expect(restored.code).toBe(0);
  for (const d of disks) {
    const bytes = await readFile(join(to2, `${d.name}.${d.format}`));
    expect(createHash('sha256').update(bytes).digest('hex')).toBe(d.sha256);
  }
});

test('prune keeps a locked backup and says until when, and removes every version once the date passed', async () => {
  const url = `s3://${lockedBucket}/t2`;
  const older = new Date(Date.now() - 3 * 86_400_000);
  const newer = new Date(Date.now() - 86_400_000);
  const oldId = backupIdAt(older);
  const newId = backupIdAt(newer);
  // the old backup's lock passes in half a minute (room for two backups and two CLI runs on a loaded machine: 8 s was
  // too little once): a date the activities take as the workflow would send it
  const soon = new Date(Date.now() + 30_000).toISOString();
  await lockedBackup(url, oldId, older.toISOString(), {
    partSizeMiB: 5,
    objectLock: { mode: 'governance', days: 1, retainUntil: soon },
  });
  await lockedBackup(url, newId, newer.toISOString(), {
    partSizeMiB: 5,
    objectLock: { mode: 'governance', days: 1, retainUntil: new Date(Date.now() + 86_400_000).toISOString() },
  });
  // a plain delete (what a prune that ignores versions would do) leaves a delete marker on the image: the versions
  // below it must go too
  await client.send(new DeleteObjectCommand({ Bucket: lockedBucket, Key: `t2/web/${oldId}/vdb.raw` }));

  const dry = await runCli(['prune', '--target', url, '--keep-last', '1', '--dry-run', '--json']);
  expect(dry.code).toBe(0);
  type Decision = { backupId: string; reasons: string[]; lockedUntil?: string };
  const dryReport = JSON.parse(dry.stdout) as { keep: Decision[]; remove: Decision[] };
  expect(dryReport.remove).toEqual([]);
  expect(dryReport.keep.find((d) => d.backupId === oldId)).toMatchObject({
    lockedUntil: soon,
    reasons: [`locked until ${soon}`],
  });
  const table = await runCli(['prune', '--target', url, '--keep-last', '1']);
  expect(table.code).toBe(0);
  expect(table.stdout).toContain(`keep (locked until ${soon})`);
  expect((await versions(lockedBucket, `t2/web/${oldId}/`)).versions).toHaveLength(3);

  // after the date, a later prune removes it: no version and no delete marker left
  const wait = Date.parse(soon) - Date.now() + 1_500;
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  const later = await runCli(['prune', '--target', url, '--keep-last', '1', '--json']);
  expect(later.code).toBe(0);
  const report = JSON.parse(later.stdout) as { keep: Decision[]; remove: Decision[] };
  expect(report.remove.map((d) => d.backupId)).toEqual([oldId]);
  expect(await versions(lockedBucket, `t2/web/${oldId}/`)).toEqual({ versions: [], markers: [] });
  // the newer one is untouched
  expect((await versions(lockedBucket, `t2/web/${newId}/`)).versions).toHaveLength(3);
});

test('a bucket without Object Lock is refused with one sentence, and nothing is written', async () => {
  const url = `s3://${plainBucket}/t4`;
  const started = new Date();
  const backupId = backupIdAt(started);
  const env = new MockActivityEnvironment();
  const failure = await env
    .run(acts.shipImage, {
      backupId,
      domain: 'web',
      target: url,
      disk: await stageImage(backupId, disks[0]!),
      s3Options: { partSizeMiB: 5, objectLock: { mode: 'governance' as const, days: 30 } },
    })
    .then(
      () => undefined,
      (err: unknown) => err as Error,
    );
  expect(failure?.message).toBe(
    `S3 target ${url} at ${cliEnv().AWS_ENDPOINT_URL} cannot upload web/${backupId}/vda.qcow2 with --s3-object-lock: bucket "${plainBucket}" does not have Object Lock enabled, and it can only be enabled when a bucket is created; create a new bucket with \`aws s3api create-bucket --bucket NAME --object-lock-enabled-for-bucket\` and back up there.`,
  );
  expect((failure as { nonRetryable?: boolean }).nonRetryable).toBe(true);
  expect(await versions(plainBucket)).toEqual({ versions: [], markers: [] });
  // the CLI says the same for a copy into it, and writes nothing either
  const src = `s3://${lockedBucket}/t4src`;
  const at = new Date();
  const id = backupIdAt(at);
  await lockedBackup(src, id, at.toISOString(), { partSizeMiB: 5 });
  const copy = await runCli(['copy', id, '--from', src, '--to', url, '--s3-object-lock', '30']);
  expect(copy.code).not.toBe(0);
  expect(copy.stderr).toContain(`bucket "${plainBucket}" does not have Object Lock enabled`);
  expect(copy.stderr).toContain('--object-lock-enabled-for-bucket');
  expect(await versions(plainBucket)).toEqual({ versions: [], markers: [] });
  const bad = await runCli(['list', '--target', url, '--s3-object-lock', '30:forever']);
  expect(bad.code).not.toBe(0);
  expect(bad.stderr).toContain(
    '--s3-object-lock "30:forever" is not a lock: give DAYS (1 to 36500) and optionally :governance or :compliance, e.g. 30 or 365:compliance.',
  );
});

test('a schedule whose retention is shorter than its lock is refused with one sentence', async () => {
  const name = `ol-short-${run}`;
  const res = await runCli([
    'schedule',
    'create',
    name,
    '--domain',
    'web',
    '--target',
    `s3://${lockedBucket}/t5`,
    '--every',
    '1d',
    '--keep-daily',
    '7',
    '--s3-object-lock',
    '30',
  ]);
  expect(res.code).toBe(1);
  expect(res.stderr.trim()).toBe(
    'vmbackup: the retention policy keeps backups about 7 day(s) but --s3-object-lock locks them for 30: prune could not remove what the policy drops until the lock passes; keep them at least as long (e.g. --keep-daily 30) or lock them for fewer days',
  );
  const list = await runCli(['schedule', 'list']);
  expect(list.stdout).not.toContain(name);
});

test('--s3-object-lock without an s3:// target is refused with one sentence (it would lock nothing)', async () => {
  const res = await runCli(['backup', 'web', '--target', `file://${work}/t6`, '--s3-object-lock', '30']);
  expect(res.code).toBe(1);
  expect(res.stderr.trim()).toBe(
    'vmbackup: --s3-object-lock locks objects on s3:// targets only, and no --target is one: give an s3:// target in a bucket with Object Lock, or drop --s3-object-lock',
  );
});

describe('a locked backup of a running VM through the workflow', () => {
  const newDomain = useFixtureDomains();
  const host = uniqueHost('ol');
  let worker: Awaited<ReturnType<typeof startWorkerProcess>> | undefined;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    worker = await startWorkerProcess(host);
  });
  afterAll(async () => {
    await worker?.stop();
  });

  test("every object (images, whole-VM files, manifest) is locked until the backup's start + DAYS; an increment holds its full", async () => {
    const dom = await newDomain({ prefix: 'ol', disks: [{ format: 'qcow2', sizeMiB: 64, randomMiB: 12 }] });
    const url = `s3://${lockedBucket}/t3`;
    const res = await runCli([
      'backup',
      dom.name,
      '--host',
      host,
      '--target',
      url,
      '--s3-part-size',
      '5',
      '--s3-object-lock',
      '2',
      '--wait',
      '--json',
    ]);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const { backupId } = JSON.parse(res.stdout) as { backupId: string };
    const list = await runCli(['list', '--target', url, '--json']);
    const manifest = (
      JSON.parse(list.stdout) as { backups: Array<{ backupId: string; startedAt: string; objectLock?: unknown }> }
    ).backups.find((b) => b.backupId === backupId)!;
    const retainUntil = new Date(Date.parse(manifest.startedAt) + 2 * 86_400_000).toISOString();
    expect(manifest.objectLock).toEqual({ mode: 'governance', retainUntil });
    const { versions: stored } = await versions(lockedBucket, `t3/${dom.name}/${backupId}/`);
    expect(stored.map((v) => v.Key.split('/').pop())).toEqual(expect.arrayContaining(['manifest.json', 'vda.qcow2']));
    expect(stored.length).toBeGreaterThan(2); // the domain XML (and NVRAM/TPM when the VM has them)
    for (const v of stored) {
      const head = await client.send(
        new HeadObjectCommand({ Bucket: lockedBucket, Key: v.Key, VersionId: v.VersionId }),
      );
      expect({ key: v.Key, mode: head.ObjectLockMode, until: head.ObjectLockRetainUntilDate?.toISOString() }).toEqual({
        key: v.Key,
        mode: 'GOVERNANCE',
        until: retainUntil,
      });
    }

    // an incremental on top, locked for longer: the full it needs is held until the increment's date too
    const inc = await runCli([
      'backup',
      dom.name,
      '--host',
      host,
      '--target',
      url,
      '--level',
      'inc',
      '--s3-object-lock',
      '3',
      '--wait',
      '--json',
    ]);
    expect(inc.stderr).toBe('');
    expect(inc.code).toBe(0);
    const incId = (JSON.parse(inc.stdout) as { backupId: string }).backupId;
    const after = await runCli(['list', '--target', url, '--json']);
    const incManifest = (
      JSON.parse(after.stdout) as {
        backups: Array<{ backupId: string; startedAt: string; chain: { level: string; parent?: string } }>;
      }
    ).backups.find((b) => b.backupId === incId)!;
    expect(incManifest.chain).toMatchObject({ level: 'inc', parent: backupId });
    const incUntil = new Date(Date.parse(incManifest.startedAt) + 3 * 86_400_000).toISOString();
    for (const v of stored) {
      const head = await client.send(
        new HeadObjectCommand({ Bucket: lockedBucket, Key: v.Key, VersionId: v.VersionId }),
      );
      expect({ key: v.Key, until: head.ObjectLockRetainUntilDate?.toISOString() }).toEqual({
        key: v.Key,
        until: incUntil,
      });
    }
  });
});
