/**
 * `vmbackup gc` (issue #11, item 5): what dead backups left on a target goes, nothing a committed or running backup
 * owns does. On local, NFS and S3 through the repository function (real drivers, a running-check callback), and
 * through the built CLI with a real running `backupDomain` workflow in Temporal's visibility.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { CreateMultipartUploadCommand, type S3Client } from '@aws-sdk/client-s3';
import { MockActivityEnvironment } from '@temporalio/testing';
import { isBackupRunning } from '../../src/client/backups';
import { collectGarbage, listBackups, type GcEntry } from '../../src/repository';
import { BackupIdKey } from '../../src/shared/search';
import type { DiskImage } from '../../src/shared/types';
import type { StorageTarget } from '../../src/storage/contract';
import { tempName } from '../../src/storage/sidecar';
import { requireNfs, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import { backUp, makeImage, stageImage, storageActivities } from '../storage/backups';
import { localTarget, nfsTarget, s3Target } from '../storage/fixtures';
import type { ConformanceTarget } from '../storage/conformance';

const DAY = 86_400_000;
const activities = storageActivities();

type Made = ConformanceTarget & { url: string; dir?: string; prefix?: string; client?: S3Client };

const ids = {
  committed: 'web-20261120T010000Z-00c0',
  fresh: 'web-20261121T010000Z-0f4e',
  old: 'web-20261122T010000Z-001d',
  running: 'web-20261123T010000Z-0a11',
};

let work: string;
let vdb: DiskImage;

beforeAll(async () => {
  await requireS3();
  await requireNfs();
  work = await mkdtemp(join(tmpdir(), 'vmbackup-gc-'));
  vdb = await makeImage(work, 'vdb', 'raw', 0x6c);
});
afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

/** An image shipped for a backup that never got its manifest: what a cut-off upload leaves. */
async function shipOnly(url: string, backupId: string): Promise<void> {
  await new MockActivityEnvironment().run(activities.shipImage, {
    backupId,
    domain: 'web',
    target: url,
    disk: await stageImage(backupId, vdb),
    s3Options: { partSizeMiB: 5 },
  });
}

/** Makes every file under the backup's prefix (on a local or NFS target) two days old. */
async function age(made: Made, backupId: string): Promise<void> {
  const dir = join(made.dir as string, 'web', backupId);
  const old = new Date(Date.now() - 2 * DAY);
  for (const name of await readdir(dir)) await utimes(join(dir, name), old, old);
}

/** What an interrupted put leaves besides objects: a temp file (local, NFS) or a multipart upload (S3). */
async function unfinishedUpload(made: Made, backupId: string): Promise<void> {
  if (made.client && made.prefix) {
    await made.client.send(
      new CreateMultipartUploadCommand({
        Bucket: stackEnv().s3.bucket,
        Key: `${made.prefix}/web/${backupId}/vda.qcow2`,
      }),
    );
  } else {
    await writeFile(join(made.dir as string, 'web', backupId, tempName('vda.qcow2', 'abcdef12')), 'partial');
  }
}

async function keys(t: StorageTarget): Promise<string[]> {
  const out: string[] = [];
  for await (const o of t.list('')) out.push(o.key);
  return out.sort();
}

const actions = (entries: GcEntry[]): Record<string, string> =>
  Object.fromEntries(entries.map((e) => [e.backupId, e.action]));

const kinds: Array<[string, () => Promise<Made>]> = [
  ['local', localTarget],
  ['nfs', nfsTarget],
  ['s3', () => s3Target()],
];

describe.each(kinds)('gc on a %s target', (kind, make) => {
  let made: Made;
  beforeEach(async () => {
    made = await make();
  });
  afterEach(async () => {
    await made.cleanup();
    await made.target.close();
  });

  test('only the old dead prefix goes (with its unfinished upload); committed, fresh and running ones stay', async () => {
    const t = made.target;
    await backUp(made.url, 'web', ids.committed, '2026-11-20T01:00:00.000Z', [vdb]);
    for (const id of [ids.old, ids.running, ids.fresh]) await shipOnly(made.url, id);
    await unfinishedUpload(made, ids.old);
    const isRunning = (id: string): Promise<boolean> => Promise.resolve(id === ids.running);
    // S3 objects cannot be backdated: there the policy says 0 s, and "fresh" is shown with the default age below
    const olderThanMs = kind === 's3' ? 0 : DAY;
    if (kind !== 's3') for (const id of [ids.old, ids.running]) await age(made, id);
    else {
      const young = await collectGarbage(t, { olderThanMs: DAY }, isRunning);
      expect(actions(young.entries)).toEqual({
        [ids.fresh]: 'too young',
        [ids.old]: 'too young',
        [ids.running]: 'too young',
      });
    }
    const before = await keys(t);

    const dry = await collectGarbage(t, { olderThanMs, dryRun: true }, isRunning);
    expect(dry.dryRun).toBe(true);
    expect(actions(dry.entries)).toEqual({
      [ids.fresh]: kind === 's3' ? 'would remove' : 'too young',
      [ids.old]: 'would remove',
      [ids.running]: 'running',
    });
    expect(dry.entries.find((e) => e.backupId === ids.old)).toMatchObject({
      prefix: `web/${ids.old}/`,
      objects: 1,
      bytes: vdb.size,
    });
    expect(await keys(t)).toEqual(before);

    const done = await collectGarbage(t, { olderThanMs }, isRunning);
    const gone = kind === 's3' ? [ids.fresh, ids.old] : [ids.old];
    for (const id of gone) {
      expect(done.entries.find((e) => e.backupId === id)).toMatchObject({
        action: 'removed',
        removedKeys: [`web/${id}/vdb.raw`],
        unfinishedRemoved: id === ids.old ? 1 : 0,
      });
    }
    expect(await keys(t)).toEqual(before.filter((k) => !gone.some((id) => k.startsWith(`web/${id}/`))));
    expect((await made.leftovers()).filter((n) => n.includes(ids.old))).toEqual([]);
    // the committed backup is whole and still listed
    expect((await listBackups(t)).map((b) => b.manifest.backupId)).toEqual([ids.committed]);
    expect(await keys(t)).toEqual(
      expect.arrayContaining([`web/${ids.committed}/manifest.json`, `web/${ids.committed}/vdb.raw`]),
    );
    // idempotent: nothing more goes
    const again = await collectGarbage(t, { olderThanMs }, isRunning);
    expect(again.entries.filter((e) => e.action === 'removed')).toEqual([]);
  });

  test('a chunk repository beside the image tree is never a dead backup: its objects are not gc candidates', async () => {
    const t = made.target;
    const repoKeys = ['@chunk-repo/config', '@chunk-repo/chunks/ab/ab01', '@chunk-repo/indexes/cd02'];
    for (const k of repoKeys) await t.putManifest(k, Buffer.from('chunk repository object'));
    if (made.dir) {
      const old = new Date(Date.now() - 2 * DAY);
      for (const k of repoKeys) await utimes(join(made.dir, k), old, old);
    }
    const done = await collectGarbage(t, { olderThanMs: 0 }, () => Promise.resolve(false));
    expect(done.entries).toEqual([]);
    expect(await keys(t)).toEqual(repoKeys.sort());
  });
});

describe('vmbackup gc (CLI, Temporal asked which backups run)', () => {
  test('a backup Temporal lists as running is kept; without Temporal gc says so and goes by age alone', async () => {
    await requireTemporal();
    const made = await localTarget();
    const { client, close } = await temporalClient();
    const running = `web-20261123T010000Z-${randomBytes(2).toString('hex')}`;
    // a real running backupDomain execution with that id: started on a task queue no worker polls, so it just waits
    const handle = await client.workflow.start('backupDomain', {
      taskQueue: `vmbackup-host-${uniqueHost('gc')}`,
      workflowId: `vmbackup-test-gc-${running}`,
      args: [{}],
      typedSearchAttributes: [{ key: BackupIdKey, value: running }],
    });
    try {
      await waitFor('the running backup in visibility', () => isBackupRunning(client, running));
      await backUp(made.url, 'web', ids.committed, '2026-11-20T01:00:00.000Z', [vdb]);
      for (const id of [ids.old, running, ids.fresh]) await shipOnly(made.url, id);
      for (const id of [ids.old, running]) await age(made, id);
      const before = await keys(made.target);

      const dry = await runCli(['gc', '--target', made.url, '--dry-run', '--json']);
      expect(dry.code).toBe(0);
      const report = JSON.parse(dry.stdout) as { entries: GcEntry[]; dryRun: boolean };
      expect(actions(report.entries)).toEqual({
        [ids.fresh]: 'too young',
        [ids.old]: 'would remove',
        [running]: 'running',
      });
      expect(await keys(made.target)).toEqual(before);

      const res = await runCli(['gc', '--target', made.url]);
      expect(res.code).toBe(0);
      expect(res.stdout.split('\n')[0]).toMatch(/^PREFIX\s+NEWEST\s+OBJECTS\s+SIZE\s+ACTION$/);
      expect(res.stdout).toMatch(new RegExp(`^web/${ids.old}/ .* removed$`, 'm'));
      expect(res.stdout).toMatch(new RegExp(`^web/${running}/ .* kept \\(a backup with this id runs\\)$`, 'm'));
      expect(res.stderr).toMatch(/^Removed 1 dead backup prefix\(es\) \(16\.0 MiB\) on file:\/\/\S+, kept 2\.$/m);
      expect(await keys(made.target)).toEqual(before.filter((k) => !k.startsWith(`web/${ids.old}/`)));

      // Temporal unreachable: one sentence saying so, and the old "running" prefix would go by age
      const blind = await runCli(['gc', '--target', made.url, '--dry-run'], {
        env: cliEnv({ TEMPORAL_ADDRESS: '127.0.0.1:1' }),
      });
      expect(blind.code).toBe(0);
      expect(blind.stderr).toMatch(
        /^vmbackup: Temporal cannot be reached \(.*\), so gc cannot tell which backups are running: it removes dead backups by --older-than alone\.$/m,
      );
      expect(blind.stdout).toMatch(new RegExp(`^web/${running}/ .* would remove$`, 'm'));
      expect(await keys(made.target)).toEqual(before.filter((k) => !k.startsWith(`web/${ids.old}/`)));
    } finally {
      await handle.terminate('test over').catch(() => undefined);
      await close();
      await made.cleanup();
      await made.target.close();
    }
  });

  test('bad input: one sentence, exit 1, nothing removed', async () => {
    const made = await localTarget();
    try {
      await shipOnly(made.url, ids.old);
      await age(made, ids.old);
      const before = await keys(made.target);
      const bad = await runCli(['gc', '--target', made.url, '--older-than', 'abc']);
      expect([bad.code, bad.stderr]).toEqual([
        1,
        'vmbackup: --older-than must be an age like 30m, 12h, 1d or 2w (or 0s), not "abc".\n',
      ]);
      const missing = pathToFileURL(join(work, 'no-such-target')).href;
      const nowhere = await runCli(['gc', '--target', missing]);
      expect(nowhere.code).toBe(1);
      expect(nowhere.stderr).toMatch(
        /^vmbackup: Target .* does not exist: there is no directory .*; check the URL\.$/m,
      );
      expect((await runCli(['gc'])).code).toBe(1); // --target is required
      expect(await keys(made.target)).toEqual(before);
    } finally {
      await made.cleanup();
    }
  });
});
