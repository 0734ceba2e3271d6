/**
 * S3 Object Lock for chunk repositories (issue #17, test 3) on the real radosgw and the real backup path: a second
 * locked backup that reuses every chunk extends their retention to its own date before its manifest is written;
 * verify names an object whose retention was shortened (with the test's own governance bypass); gc keeps an
 * unreferenced object that is still retained, says until when, and deletes every version of one whose date passed.
 * `repo init --s3-object-lock` refuses a bucket without Object Lock and writes nothing there.
 *
 * Each run creates its own buckets and removes them at the end, the locked versions with BypassGovernanceRetention:
 * a permission only this test uses, never vmbackup.
 */
import { randomBytes } from 'node:crypto';
import {
  CreateBucketCommand,
  DeleteBucketCommand,
  DeleteObjectCommand,
  HeadObjectCommand,
  ListObjectVersionsCommand,
  ListObjectsV2Command,
  PutObjectRetentionCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import type { Client } from '@temporalio/client';
import { startBackup } from '../../src/client/backups';
import { deleteObjectsUnder } from '../../src/repository/catalog';
import { collectChunkGarbage } from '../../src/repository/chunk-gc';
import { collectGarbage } from '../../src/repository/gc';
import { ChunkStore, chunkKey, openRepository } from '../../src/repository/chunks';
import { openTarget } from '../../src/storage/registry';
import type { BackupResult, S3TargetOptions } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { manifestOf } from '../helpers/chunk-repo';
import { requireLibvirt, requireS3, requireTemporal, s3ClientConfig } from '../helpers/stack';
import { runCli, startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { s3Env } from '../storage/fixtures';

jest.setTimeout(15 * 60_000);

const s3 = new S3Client(s3ClientConfig());
const run = randomBytes(3).toString('hex');
const lockedBucket = `vmbt-lk-${run}`;
const plainBucket = `vmbt-lk-plain-${run}`;

interface ManifestJson {
  backupId: string;
  objectLock?: { mode: string; retainUntil: string };
  disks: Array<{ sha256: string; key: string }>;
  vm?: { xml: { key: string } };
}

async function allVersions(bucket: string, prefix = ''): Promise<Array<{ Key: string; VersionId: string }>> {
  const out = await s3.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: prefix }));
  return [...(out.Versions ?? []), ...(out.DeleteMarkers ?? [])].map((v) => ({
    Key: v.Key ?? '',
    VersionId: v.VersionId ?? '',
  }));
}

/** key (under the bucket) -> the date its current version is retained until ('none' when it is not) */
async function retention(keys: string[]): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const key of keys) {
    const head = await s3.send(new HeadObjectCommand({ Bucket: lockedBucket, Key: key }));
    out[key] = head.ObjectLockRetainUntilDate?.toISOString() ?? 'none';
  }
  return out;
}

function sameDate(keys: string[], date: string): Record<string, string> {
  return Object.fromEntries(keys.map((k) => [k, date]));
}

describe('S3 Object Lock in a chunk repository (real radosgw)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let worker: WorkerProcess | undefined;
  let host: string;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    await s3.send(new CreateBucketCommand({ Bucket: lockedBucket, ObjectLockEnabledForBucket: true }));
    await s3.send(new CreateBucketCommand({ Bucket: plainBucket }));
    ({ client, close: closeClient } = await temporalClient());
    host = uniqueHost('lk');
    worker = await startWorkerProcess(host);
  });

  afterAll(async () => {
    await worker?.stop();
    await closeClient?.();
    // the test's own bypass: vmbackup never sends BypassGovernanceRetention
    for (const bucket of [lockedBucket, plainBucket]) {
      for (;;) {
        const all = await allVersions(bucket).catch(() => []);
        if (all.length === 0) break;
        for (const v of all)
          await s3.send(
            new DeleteObjectCommand({
              Bucket: bucket,
              Key: v.Key,
              VersionId: v.VersionId,
              BypassGovernanceRetention: true,
            }),
          );
      }
      await s3.send(new DeleteBucketCommand({ Bucket: bucket })).catch(() => undefined);
    }
    s3.destroy();
  });

  async function backup(dom: FixtureDomain, url: string, s3Options: S3TargetOptions): Promise<BackupResult> {
    const { handle } = await startBackup(client, {
      domain: dom.name,
      host,
      method: 'auto',
      targets: [url],
      options: { heartbeatTimeoutSeconds: 5, s3: s3Options },
    });
    return handle.result();
  }

  async function lockedManifest(prefix: string, dom: FixtureDomain, id: string): Promise<ManifestJson> {
    const target = openTarget(`s3://${lockedBucket}/${prefix}`, { env: s3Env() });
    try {
      return (await manifestOf<ManifestJson>(target, dom.name, id)).m;
    } finally {
      await target.close();
    }
  }

  async function keysUnder(prefix: string): Promise<string[]> {
    const out = await s3.send(new ListObjectsV2Command({ Bucket: lockedBucket, Prefix: prefix }));
    return (out.Contents ?? []).map((o) => o.Key ?? '').sort();
  }

  test('repo init --s3-object-lock on a bucket without Object Lock: one sentence, nothing written', async () => {
    const r = await runCli([
      'repo',
      'init',
      `s3://${plainBucket}/repo`,
      '--encryption',
      'none',
      '--s3-object-lock',
      '1',
    ]);
    expect(r.code).not.toBe(0);
    // the CLI's own words (the AWS SDK may print a Node version notice of its own)
    const said = r.stderr.split('\n').filter((l) => l.startsWith('vmbackup:'));
    expect(said).toHaveLength(1);
    expect(said[0]).toMatch(/its bucket does not have Object Lock enabled/);
    expect(await allVersions(plainBucket)).toEqual([]);
  });

  test('a reused chunk gets the new backup’s date; verify names a shortened object; gc keeps what is locked', async () => {
    const prefix = 'repo';
    const url = `s3://${lockedBucket}/${prefix}`;
    const init = await runCli(['repo', 'init', url, '--encryption', 'none', '--s3-object-lock', '1']);
    expect(init.code).toBe(0);
    expect(init.stdout).toMatch(/^Created an unencrypted chunk repository/);
    // init's own writes are locked like any object written with the option
    expect((await retention([`${prefix}/@chunk-repo/config`]))[`${prefix}/@chunk-repo/config`]).not.toBe('none');

    const dom = await newDomain({ prefix: 'lk', start: false, disks: [{ format: 'raw', sizeMiB: 12, randomMiB: 8 }] });
    const first = await backup(dom, url, { objectLock: { mode: 'governance', days: 1 } });
    expect(first.status).toBe('completed');
    const m1 = await lockedManifest(prefix, dom, first.backupId);
    const until1 = m1.objectLock?.retainUntil as string;
    expect(m1.objectLock?.mode).toBe('governance');
    const chunks = await keysUnder(`${prefix}/@chunk-repo/chunks/`);
    const indexes = [...m1.disks.map((d) => d.key), m1.vm!.xml.key].map((k) => `${prefix}/${k}`);
    expect(chunks.length).toBeGreaterThanOrEqual(2); // 8 MiB of random data in 4 MiB chunks
    const objects = [...indexes, ...chunks];
    // every object of the first backup is locked until its date (before the second backup)
    expect(await retention(objects)).toEqual(sameDate(objects, until1));

    // the second backup reuses every chunk and index (nothing changed) and locks for longer: all extended
    const second = await backup(dom, url, { objectLock: { mode: 'governance', days: 2 } });
    expect(second.status).toBe('completed');
    expect(second.targets[0]!.chunks).toMatchObject({ newChunks: 0 });
    const m2 = await lockedManifest(prefix, dom, second.backupId);
    const until2 = m2.objectLock?.retainUntil as string;
    expect(Date.parse(until2)).toBeGreaterThan(Date.parse(until1));
    expect(m2.disks.map((d) => d.sha256)).toEqual(m1.disks.map((d) => d.sha256));
    expect(await keysUnder(`${prefix}/@chunk-repo/chunks/`)).toEqual(chunks);
    expect(await retention(objects)).toEqual(sameDate(objects, until2));
    expect(await retention([`${prefix}/${dom.name}/${second.backupId}/manifest.json`])).toEqual({
      [`${prefix}/${dom.name}/${second.backupId}/manifest.json`]: until2,
    });

    // report: the last good backup's lock date (JSON and table)
    const report = await runCli(['report', '--target', url, '--host', host, '--json']);
    const vms = (JSON.parse(report.stdout) as { vms: Array<{ domain: string; lastGood: { lockedUntil?: string } }> })
      .vms;
    expect(vms.find((v) => v.domain === dom.name)?.lastGood.lockedUntil).toBe(until2);
    const table = await runCli(['report', '--target', url, '--host', host]);
    expect(table.stdout).toMatch(/LOCKED UNTIL/);
    expect(table.stdout).toContain(until2);

    // verify: every object holds; then one chunk's retention is shortened (the test's bypass) and verify names it
    const ok = await runCli(['verify', second.backupId, '--target', url]);
    expect(ok.code).toBe(0);
    const shortened = chunks[0]!;
    const earlier = new Date(Date.now() + 3_600_000);
    await s3.send(
      new PutObjectRetentionCommand({
        Bucket: lockedBucket,
        Key: shortened,
        Retention: { Mode: 'GOVERNANCE', RetainUntilDate: earlier },
        BypassGovernanceRetention: true,
      }),
    );
    const bad = await runCli(['verify', second.backupId, '--target', url]);
    expect(bad.code).not.toBe(0);
    const relative = shortened.slice(prefix.length + 1);
    expect(bad.stderr).toContain(`is locked until ${until2}, but 1 of the`);
    expect(bad.stderr).toContain(`${relative} (retained until ${earlier.toISOString()})`);

    // gc: two chunks no backup references, one retained for a day, one for a few seconds
    // the date is taken once the repository is open, right before the put: on a loaded machine opening it can take
    // longer than a short lock, and a retain-until date already past is refused by the server (InvalidArgument)
    const store = async (lockMs: number): Promise<{ key: string; until: Date }> => {
      const repo = await openRepository(openTarget(url, { env: s3Env() }), undefined);
      await repo.target.close();
      const until = new Date(Date.now() + lockMs);
      const t = openTarget(url, {
        env: s3Env(),
        s3: { objectLock: { mode: 'governance', days: 1, retainUntil: until.toISOString() } },
      });
      try {
        const put = await new ChunkStore({ ...repo, target: t }).put(randomBytes(4096));
        return { key: `${prefix}/${chunkKey(put.id)}`, until };
      } finally {
        await t.close();
      }
    };
    const long = await store(86_400_000);
    const longLocked = long.key;
    const dayUntil = long.until.toISOString();
    const { key: shortLocked, until: shortUntil } = await store(5_000);
    // wait for the short lock to pass (a wait, not a measurement)
    while (Date.now() <= shortUntil.getTime() + 1_000) await new Promise((r) => setTimeout(r, 250));

    const gcTarget = openTarget(url, { env: s3Env() });
    try {
      const repo = await openRepository(gcTarget, undefined);
      // ages measured from a minute ahead, so both new chunks are past a grace of a few seconds
      const report = await collectChunkGarbage(repo, {
        graceSeconds: 3,
        freshSeconds: 1,
        now: new Date(Date.now() + 60_000),
      });
      expect(report.backups).toBe(2);
      expect(report.keptLocked.map((o) => ({ key: o.key, retainUntil: o.retainUntil }))).toEqual([
        { key: longLocked.slice(prefix.length + 1), retainUntil: dayUntil },
      ]);
      expect(report.removed.map((o) => o.key)).toEqual([shortLocked.slice(prefix.length + 1)]);
    } finally {
      await gcTarget.close();
    }
    // the passed one is gone for good (no version, no delete marker); the locked one and every referenced chunk stay
    expect(await allVersions(lockedBucket, shortLocked)).toEqual([]);
    expect(await keysUnder(`${prefix}/@chunk-repo/chunks/`)).toEqual([...chunks, longLocked].sort());
  });

  test('dead backups in a locked bucket: cleanup and gc leave retained versions alone, then delete every version', async () => {
    const prefix = 'dead';
    const url = `s3://${lockedBucket}/${prefix}`;
    // two backups that never committed (an image, no manifest), one retained for a day, one for a few seconds; each
    // date is taken right before its put (a date already past is refused by the server)
    const write = async (backupId: string, lockMs: number): Promise<Date> => {
      const until = new Date(Date.now() + lockMs);
      const t = openTarget(url, {
        env: s3Env(),
        s3: { objectLock: { mode: 'governance', days: 1, retainUntil: until.toISOString() } },
      });
      try {
        await t.putManifest(`web/${backupId}/vda.raw`, randomBytes(1024));
      } finally {
        await t.close();
      }
      return until;
    };
    const longId = 'web-20261130T100000Z-aaaa';
    const shortId = 'web-20261130T100000Z-bbbb';
    const dayUntil = (await write(longId, 86_400_000)).toISOString();
    const shortUntil = await write(shortId, 5_000);

    const target = openTarget(url, { env: s3Env() });
    try {
      // the failed backup's cleanup (deleteBackupObjects) cannot delete a retained version, and does not hide it
      // behind a delete marker either: it stays listed for gc
      expect(await deleteObjectsUnder(target, 'web', longId)).toEqual([]);
      expect(await keysUnder(`${prefix}/web/${longId}/`)).toEqual([`${prefix}/web/${longId}/vda.raw`]);

      // wait for the short lock to pass (a wait, not a measurement)
      while (Date.now() <= shortUntil.getTime() + 1_000) await new Promise((r) => setTimeout(r, 250));
      const dry = await collectGarbage(target, { olderThanMs: 0, dryRun: true }, () => Promise.resolve(false));
      expect(dry.entries.map((e) => [e.backupId, e.action, e.lockedUntil])).toEqual([
        [longId, 'locked', dayUntil],
        [shortId, 'would remove', undefined],
      ]);
      const report = await collectGarbage(target, { olderThanMs: 0 }, () => Promise.resolve(false));
      expect(report.entries.map((e) => [e.backupId, e.action, e.lockedUntil])).toEqual([
        [longId, 'locked', dayUntil],
        [shortId, 'removed', undefined],
      ]);
    } finally {
      await target.close();
    }
    // the passed one is gone for good: no version and no delete marker left
    expect(await allVersions(lockedBucket, `${prefix}/web/${shortId}/`)).toEqual([]);
    expect(await keysUnder(`${prefix}/web/`)).toEqual([`${prefix}/web/${longId}/vda.raw`]);
  });
});
