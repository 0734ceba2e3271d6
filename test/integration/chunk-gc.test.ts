/**
 * prune + gc of a chunk repository on the real local, NFS (ganesha) and S3 (radosgw) targets (issue #15 test 4).
 * Backups are made directly with the chunk core (ChunkStore, putIndex, putSmallFile, buildManifest with a repository
 * section, signed), as the backup path will write them. The gc's windows are shrunk (freshness 2 s, grace 5 s) so
 * that real time passes instead of a fake clock: touch sets the storage's own time, which no fake clock would move.
 *
 * The "running backup" is ChunkStore calls interleaved with gc: it reuses (has() touches) a chunk only a pruned
 * backup referenced, gc runs before its manifest is written, then the manifest is written and the backup restores
 * exactly. (H1's backup path is not on main yet; a real concurrent backup replaces this when it is.)
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, utimes } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createChunkGcActivities } from '../../src/activities/chunk-gc';
import { HostPaths } from '../../src/activities/host-paths';
import { openTarget } from '../../src/storage/registry';
import {
  ChunkGcError,
  buildManifest,
  collectChunkGarbage,
  encodeManifest,
  findBackup,
  pruneBackups,
  signRepositoryManifest,
} from '../../src/repository';
import {
  ChunkStore,
  REPOSITORY_ROOT,
  chunkKey,
  getSmallFile,
  indexKey,
  openRepository,
  putSmallFile,
  type DiskIndex,
  type OpenRepository,
} from '../../src/repository/chunks';
import { chunkGcWorkflowId } from '../../src/shared/chunk-gc';
import { hostTaskQueue } from '../../src/shared/names';
import { manifestKey } from '../../src/storage/keys';
import { initTestRepository, keysUnder, readDiskToBuffer } from '../helpers/chunk-repo';
import { requireNfs, requireS3, requireTemporal } from '../helpers/stack';
import type { ConformanceTarget } from '../storage/conformance';
import {
  cliEnv,
  embeddedEnv,
  runCli,
  startWorkerProcess,
  temporalClient,
  uniqueHost,
  waitFor,
} from '../helpers/vmbackup';
import { hostWorkerSeen } from '../../src/client/workers';
import { localTarget, nfsTarget, s3Target } from '../storage/fixtures';

const KiB = 1024;
const CHUNK = 64 * KiB;
const PASSWORD = 'chunk-gc integration password';
const FRESH = 2;
const GRACE = 5;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

interface MadeBackup {
  backupId: string;
  diskIndex: string;
  xmlIndex: string;
}

/** Stores `disk` (and a domain XML) through `store`, then writes the signed version-3 manifest last. */
async function storeDisk(store: ChunkStore, disk: Buffer): Promise<{ index: DiskIndex; id: string }> {
  const { index } = await store.storeDisk(Readable.from([disk]), disk.length);
  return { index, id: await store.putIndex(index) };
}

async function writeManifest(
  repo: OpenRepository,
  domain: string,
  startedAt: string,
  disk: { id: string; index: DiskIndex },
  xml: { sha256: string; key: string; size: number },
): Promise<MadeBackup> {
  const backupId = `${domain}-${startedAt.replace(/[-:]/g, '').replace(/\.\d+/, '')}-${randomBytes(3).toString('hex')}`;
  let m = buildManifest({
    backupId,
    domain,
    host: 'cg-host',
    method: 'push',
    startedAt,
    finishedAt: startedAt,
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    disks: [
      {
        name: 'vda',
        format: 'chunks',
        virtualSize: disk.index.virtualSize,
        size: 0,
        sha256: disk.id,
        key: indexKey(disk.id),
        chunks: {
          chunkSize: CHUNK,
          count: disk.index.entries.length,
          zeroChunks: disk.index.entries.filter((e) => e === 'zero').length,
          uploadedChunks: 0,
        },
      },
    ],
    vm: { xml },
    repository: {
      id: repo.config.repositoryId,
      chunkSize: CHUNK,
      encryption: repo.config.encryption,
      compression: repo.config.compression,
    },
  });
  if (repo.keys) m = signRepositoryManifest(m, repo.keys.authKey);
  await repo.target.putManifest(manifestKey(domain, backupId), encodeManifest(m));
  return { backupId, diskIndex: disk.id, xmlIndex: xml.sha256 };
}

async function backup(repo: OpenRepository, domain: string, startedAt: string, disk: Buffer): Promise<MadeBackup> {
  const store = new ChunkStore(repo, { freshSeconds: FRESH });
  const d = await storeDisk(store, disk);
  const xml = await putSmallFile(
    store,
    Buffer.from(`<domain><name>${domain}</name><uuid>${startedAt}</uuid></domain>`),
  );
  return writeManifest(repo, domain, startedAt, d, xml);
}

const backends: Array<[string, () => Promise<void>, () => Promise<ConformanceTarget>]> = [
  ['local', async () => undefined, () => localTarget()],
  ['nfs', requireNfs, () => nfsTarget()],
  ['s3', requireS3, () => s3Target()],
];

describe.each(backends)('chunk repository prune + gc on %s', (_name, requireBackend, makeTarget) => {
  let t: ConformanceTarget;
  beforeEach(async () => {
    await requireBackend();
    t = await makeTarget();
  });
  afterEach(async () => {
    await t?.target.close();
    await t?.cleanup();
  });

  test('prune removes only <domain>/<backupId>/; gc then removes exactly what only the pruned backup used and is older than grace, keeps young chunks and a chunk a running backup reused, and everything kept restores', async () => {
    await initTestRepository(t.target, PASSWORD, { chunkSize: CHUNK });
    const repo = await openRepository(t.target, PASSWORD);
    const store = new ChunkStore(repo, { freshSeconds: FRESH });
    const shared = randomBytes(2 * CHUNK);
    const onlyOld = randomBytes(CHUNK); // used only by the backup prune removes
    const reused = randomBytes(CHUNK); // used only by the pruned backup, then reused by the running one
    const onlyNew = randomBytes(CHUNK);
    const zero = Buffer.alloc(CHUNK);
    const oldDisk = Buffer.concat([shared, onlyOld, reused, zero]);
    const newDisk = Buffer.concat([shared, onlyNew, zero]);
    const old = await backup(repo, 'cg-web', '2026-11-01T02:00:00Z', oldDisk);
    const kept = await backup(repo, 'cg-web', '2026-11-02T02:00:00Z', newDisk);
    const idOf = (b: Buffer) => store.idOf(b) as string;

    // prune: the old backup's prefix goes, not one object of the repository (its disk keys are index keys)
    const repoBefore = await keysUnder(t.target, `${REPOSITORY_ROOT}/`);
    const pruned = await pruneBackups(t.target, { keepLast: 1 });
    expect(pruned.remove.map((d) => d.backupId)).toEqual([old.backupId]);
    expect(await keysUnder(t.target, 'cg-web/')).toEqual([manifestKey('cg-web', kept.backupId)]);
    expect(await keysUnder(t.target, `${REPOSITORY_ROOT}/`)).toEqual(repoBefore);
    expect(repoBefore).toEqual(
      expect.arrayContaining([indexKey(old.diskIndex), indexKey(old.xmlIndex), chunkKey(idOf(onlyOld))]),
    );

    // everything stored so far becomes older than grace
    await sleep((GRACE + 1.5) * 1000);

    // a backup starts and reuses `reused` (has() finds it old and touches it); its manifest is not written yet
    const running = new ChunkStore(repo, { freshSeconds: FRESH });
    const runningDisk = Buffer.concat([reused, randomBytes(CHUNK)]);
    const runningStored = await storeDisk(running, runningDisk);
    expect(running.touched).toBeGreaterThanOrEqual(1);
    const runningXml = await putSmallFile(running, Buffer.from('<domain><name>cg-db</name></domain>'));
    // an unreferenced chunk younger than grace (a backup that has not reached its index yet)
    const young = randomBytes(CHUNK);
    await store.put(young);

    // what only the pruned backup used: its disk index, its domain XML's index and chunk, the chunk no one reused
    const oldXmlChunks = (await store.getIndex(old.xmlIndex)).entries.filter((e) => e !== 'zero').map(chunkKey);
    expect(oldXmlChunks).toHaveLength(1);
    const gone = [indexKey(old.diskIndex), indexKey(old.xmlIndex), chunkKey(idOf(onlyOld)), ...oldXmlChunks].sort();
    const policy = { graceSeconds: GRACE, freshSeconds: FRESH };
    const dry = await collectChunkGarbage(repo, { ...policy, dryRun: true });
    expect(dry.removed.map((o) => o.key).sort()).toEqual(gone);
    expect(await keysUnder(t.target, `${REPOSITORY_ROOT}/`)).toEqual(
      expect.arrayContaining([...gone, chunkKey(idOf(reused))]),
    );

    const report = await collectChunkGarbage(repo, policy);
    expect(report.removed.map((o) => o.key).sort()).toEqual(gone);
    expect(report).toMatchObject({ backups: 1, removedChunks: 2, removedIndexes: 2, dryRun: false });
    expect(report.removedBytes).toBe(report.removed.reduce((n, o) => n + o.size, 0));
    // young and reused (touched) objects were kept: the young chunk, the running backup's chunks and indexes
    expect(report.keptYoung).toBeGreaterThanOrEqual(5);
    const left = await keysUnder(t.target, `${REPOSITORY_ROOT}/`);
    for (const key of gone) expect(left).not.toContain(key);
    for (const b of [shared.subarray(0, CHUNK), shared.subarray(CHUNK), onlyNew, reused, young])
      expect(left).toContain(chunkKey(idOf(b)));

    // the running backup now writes its manifest: it restores exactly
    const late = await writeManifest(repo, 'cg-db', '2026-11-03T02:00:00Z', runningStored, runningXml);
    const reader = new ChunkStore(await openRepository(t.target, PASSWORD));
    const lateEntry = await findBackup(t.target, late.backupId);
    const lateIndex = await reader.getIndex(lateEntry.manifest.disks[0]?.sha256 as string);
    expect((await readDiskToBuffer(reader, lateIndex)).equals(runningDisk)).toBe(true);
    expect((await getSmallFile(reader, runningXml.sha256, runningXml.size, 1 << 20)).toString()).toContain('cg-db');
    // and the backup prune kept still restores
    const keptIndex = await reader.getIndex(kept.diskIndex);
    expect((await readDiskToBuffer(reader, keptIndex)).equals(newDisk)).toBe(true);

    // a second gc finds nothing more to remove (the young chunk is still young or unreferenced-but-kept)
    const again = await collectChunkGarbage(repo, policy);
    expect(again.removed.filter((o) => o.key !== chunkKey(idOf(young)))).toEqual([]);
  });

  test('a manifest gc cannot read or verify stops it before it deletes anything; a grace not above twice the freshness window is refused', async () => {
    await initTestRepository(t.target, PASSWORD, { chunkSize: CHUNK });
    const repo = await openRepository(t.target, PASSWORD);
    const store = new ChunkStore(repo, { freshSeconds: FRESH });
    const b = await backup(repo, 'cg-app', '2026-11-01T02:00:00Z', randomBytes(2 * CHUNK));
    const orphan = (await store.put(randomBytes(CHUNK))).id as string;
    await sleep((GRACE + 1.5) * 1000);
    const policy = { graceSeconds: GRACE, freshSeconds: FRESH };

    // someone who can write the target copies the manifest without the repository signature
    const body = await t.target.getBuffer(manifestKey('cg-app', b.backupId));
    const forged = JSON.parse(body.toString()) as Record<string, unknown>;
    delete forged.repositorySignature;
    forged.backupId = b.backupId.replace(/-[0-9a-f]{6}$/, '-ffffff');
    forged.chain = { ...(forged.chain as object), base: forged.backupId };
    await t.target.putManifest(manifestKey('cg-app', forged.backupId as string), Buffer.from(JSON.stringify(forged)));
    const before = await keysUnder(t.target, `${REPOSITORY_ROOT}/`);
    const err = await collectChunkGarbage(repo, policy).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChunkGcError);
    expect((err as Error).message).toMatch(
      /^gc deleted nothing on .*: the manifest cg-app\/.*ffffff\/manifest.json is not signed with this repository's key/,
    );
    expect((err as Error).message).not.toMatch(/\n/);
    await t.target.delete(manifestKey('cg-app', forged.backupId as string));

    // a manifest that is not JSON
    await t.target.putManifest('cg-app/cg-app-20261102T020000Z-abcdef/manifest.json', Buffer.from('{not json'));
    await expect(collectChunkGarbage(repo, policy)).rejects.toThrow(/cannot be read .*not valid JSON/);
    expect(await keysUnder(t.target, `${REPOSITORY_ROOT}/`)).toEqual(before);
    expect(before).toContain(chunkKey(orphan));
    await t.target.delete('cg-app/cg-app-20261102T020000Z-abcdef/manifest.json');

    // the grace rule
    await expect(collectChunkGarbage(repo, { graceSeconds: 4, freshSeconds: FRESH })).rejects.toThrow(
      'The gc grace period must be longer than 4 s (twice the 2 s a running backup may rely on a chunk without touching it), not 4 s.',
    );
    await expect(collectChunkGarbage(repo, { graceSeconds: 7200 })).rejects.toThrow(/longer than 2 h .* not 2 h\.$/);

    // with the bad manifests gone, gc removes the orphan and keeps the backup's objects
    const report = await collectChunkGarbage(repo, policy);
    expect(report.removed.map((o) => o.key)).toEqual([chunkKey(orphan)]);
    expect(await keysUnder(t.target, `${REPOSITORY_ROOT}/`)).toEqual(before.filter((k) => k !== chunkKey(orphan)));
  });
});

describe('vmbackup gc on a chunk repository (the gcChunkRepository workflow, one per repository)', () => {
  let t: Awaited<ReturnType<typeof localTarget>>;
  let repo: OpenRepository;
  let repositoryId: string;
  const host = uniqueHost('cg');
  const env = () => embeddedEnv(host, { VMBACKUP_PASSWORD: PASSWORD });
  beforeEach(async () => {
    t = await localTarget();
    await initTestRepository(t.target, PASSWORD, { chunkSize: CHUNK });
    repo = await openRepository(t.target, PASSWORD);
    repositoryId = repo.config.repositoryId;
  });
  afterEach(async () => {
    await t?.target.close();
    await t?.cleanup();
  });

  /** Sets an object's mtime back, as if it had been stored `hours` ago (local target: its own directory). */
  async function age(key: string, hours: number): Promise<void> {
    const when = new Date(Date.now() - hours * 3600_000);
    await utimes(join(t.dir, key), when, when);
  }

  test('the CLI runs the gc as a workflow with its own password: dry run lists, then removes what no backup references and is older than --grace, keeps the rest', async () => {
    const store = new ChunkStore(repo);
    const disk = randomBytes(2 * CHUNK);
    const b = await backup(repo, 'cg-web', '2026-11-01T02:00:00Z', disk);
    const oldOrphan = (await store.put(randomBytes(CHUNK))).id as string;
    const youngOrphan = (await store.put(randomBytes(CHUNK))).id as string;
    for (const key of await keysUnder(t.target, `${REPOSITORY_ROOT}/`)) await age(key, 48);
    await age(chunkKey(youngOrphan), 12); // younger than the 1d grace
    const before = await keysUnder(t.target, `${REPOSITORY_ROOT}/`);

    const dry = await runCli(['gc', '--target', t.url, '--dry-run'], { env: env() });
    expect(dry.stderr).toContain('Would remove 1 chunk(s) and 0 index(es)');
    expect(dry.code).toBe(0);
    expect(dry.stdout).toContain(`would remove ${chunkKey(oldOrphan)}`);
    expect(await keysUnder(t.target, `${REPOSITORY_ROOT}/`)).toEqual(before);

    const res = await runCli(['gc', '--target', t.url, '--json'], { env: env() });
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const out = JSON.parse(res.stdout) as { entries: unknown[]; chunkRepository: Record<string, unknown> };
    expect(out.entries).toEqual([]); // no dead backup prefix, and @chunk-repo/ is none
    expect(out.chunkRepository).toMatchObject({
      repositoryId,
      backups: 1,
      removedChunks: 1,
      removedIndexes: 0,
      keptYoung: 1,
      removedKeys: [chunkKey(oldOrphan)],
    });
    expect(await keysUnder(t.target, `${REPOSITORY_ROOT}/`)).toEqual(before.filter((k) => k !== chunkKey(oldOrphan)));
    const reader = new ChunkStore(repo);
    expect((await readDiskToBuffer(reader, await reader.getIndex(b.diskIndex))).equals(disk)).toBe(true);
  });

  test('a second gc of one repository while one runs says so; a grace too short and a wrong password are one sentence each', async () => {
    const { client, close } = await temporalClient();
    const workflowId = chunkGcWorkflowId(repositoryId);
    try {
      // a gc of this repository that is running (queued on a host no worker serves yet)
      const first = await client.workflow.start('gcChunkRepository', {
        taskQueue: hostTaskQueue(uniqueHost('cg')),
        workflowId,
        args: [{ host: uniqueHost('cg'), target: t.url, graceSeconds: 86400 }],
      });
      try {
        const second = await runCli(['gc', '--target', t.url], { env: env() });
        expect(second.code).toBe(1);
        // the dead-backup gc's line comes first, then the chunk gc's refusal
        expect(second.stderr.trim().split('\n').pop()).toBe(
          `vmbackup: A gc of the chunk repository on ${t.url} is already running (workflow ${workflowId}); run this gc again once it has finished.`,
        );
      } finally {
        await first.terminate('test done');
      }

      const short = await runCli(['gc', '--target', t.url, '--grace', '2h'], { env: env() });
      expect(short.code).toBe(1);
      expect(short.stderr.trim()).toBe(
        'vmbackup: --grace must be longer than 2 h (twice the 1 h a running backup may rely on a chunk without touching it), not 2 h.',
      );

      const wrong = await runCli(['gc', '--target', t.url], { env: embeddedEnv(host, { VMBACKUP_PASSWORD: 'nope' }) });
      expect(wrong.code).toBe(1);
      expect(wrong.stderr.trim().split('\n').pop()).toBe(
        `vmbackup: The password does not open any key of the chunk repository on ${t.url}.`,
      );
      expect(wrong.stderr).not.toMatch(/\n\s+at /); // no stack trace
    } finally {
      await close();
    }
  });
  test('with TEMPORAL_ADDRESS (a cluster): a host without a worker is refused at once, nothing is queued; --host names the worker that runs it', async () => {
    await requireTemporal(); // the stack's server (a cluster), not the embedded default
    const store = new ChunkStore(repo);
    const orphan = (await store.put(randomBytes(CHUNK))).id as string;
    for (const key of await keysUnder(t.target, `${REPOSITORY_ROOT}/`)) await age(key, 48);
    const { client, close } = await temporalClient();
    const nobody = uniqueHost('cgnone');
    try {
      // it used to start the workflow on vmbackup-host-<nobody> and wait there for ever
      const started = Date.now();
      const refused = await runCli(['gc', '--target', t.url, '--json'], {
        env: cliEnv({ VMBACKUP_HOST: nobody, VMBACKUP_PASSWORD: PASSWORD }),
        timeoutMs: 120_000,
      });
      expect(refused.code).toBe(1);
      expect(Date.now() - started).toBeLessThan(60_000);
      expect(refused.stderr.trim().split('\n').pop()).toMatch(
        new RegExp(
          `^vmbackup: No vmbackup worker for host ${nobody} is connected to Temporal at [^ ]+ \\(nothing polls task queue ${hostTaskQueue(nobody)}\\): run gc where a worker runs, or name a host whose worker runs with --host; the chunk repository's gc was not started\\.$`,
        ),
      );
      await expect(client.workflow.getHandle(chunkGcWorkflowId(repositoryId)).describe()).rejects.toThrow(/not found/i);
      expect(await store.has(orphan)).toBe(true);

      // a bad --host is refused before anything is removed
      const bad = await runCli(['gc', '--target', t.url, '--host', '../x'], { env: cliEnv() });
      expect([bad.code, bad.stderr.trim()]).toEqual([
        1,
        'vmbackup: "../x" is not a valid host name; nothing was removed.',
      ]);

      // a worker for host H runs it when the command names H (the command's own host has none)
      const h = uniqueHost('cgw');
      const worker = await startWorkerProcess(h, { env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }) });
      try {
        // a worker that has started but not polled yet is not seen: wait for its first poll, as a user would see it
        await waitFor(
          `the worker of ${h} to poll its task queue`,
          async () => (await hostWorkerSeen(client, h)) || undefined,
        );
        const res = await runCli(['gc', '--target', t.url, '--host', h, '--grace', '1d', '--json'], {
          env: cliEnv({ VMBACKUP_HOST: nobody }),
        });
        expect([res.code, res.stderr.match(/vmbackup:.*/)?.[0]]).toEqual([0, undefined]);
        const out = JSON.parse(res.stdout) as { chunkRepository: { removedKeys: string[] } };
        expect(out.chunkRepository.removedKeys).toEqual([chunkKey(orphan)]);
      } finally {
        await worker.stop();
      }
    } finally {
      await close();
    }
  });
});

describe('the collectChunkGarbage activity: what a workflow input cannot make it do', () => {
  let t: Awaited<ReturnType<typeof localTarget>>;
  let stateDir: string;
  let repositoryId: string;
  beforeEach(async () => {
    t = await localTarget();
    stateDir = await mkdtemp(join(tmpdir(), 'vmbackup-cg-state-'));
    await initTestRepository(t.target, PASSWORD, { chunkSize: CHUNK });
    repositoryId = (await openRepository(t.target, PASSWORD)).config.repositoryId;
  });
  afterEach(async () => {
    await t?.target.close();
    await t?.cleanup();
    await rm(stateDir, { recursive: true, force: true });
  });

  const activities = (allowTargets?: string[], repositoryPassword: string | undefined = PASSWORD) =>
    createChunkGcActivities({
      openTarget: (url) => openTarget(url, { env: {} }),
      paths: new HostPaths({ stateDir, ...(allowTargets ? { allowTargets } : {}) }),
      ...(repositoryPassword !== undefined ? { repositoryPassword } : {}),
    });
  const asWorkflow = (workflowId: string) =>
    new MockActivityEnvironment({
      workflowExecution: { workflowId, runId: 'r' },
    } as unknown as ConstructorParameters<typeof MockActivityEnvironment>[0]);

  test("runs only under its repository's workflow id, on an allowed target, with a grace above 2 h and the worker's password", async () => {
    const orphan = (await new ChunkStore(await openRepository(t.target, PASSWORD)).put(randomBytes(CHUNK)))
      .id as string;
    const old = new Date(Date.now() - 48 * 3600_000);
    await utimes(join(t.dir, chunkKey(orphan)), old, old);
    const input = { host: 'cg-host', target: t.url, graceSeconds: 86400 };

    const foreign = await asWorkflow(chunkGcWorkflowId('0'.repeat(64)))
      .run(activities().collectChunkGarbage, input)
      .catch((e: unknown) => e);
    expect((foreign as Error).message).toBe(
      `collectChunkGarbage: the gc of the chunk repository on ${t.url} runs only as workflow ${chunkGcWorkflowId(repositoryId)}.`,
    );
    const outside = await asWorkflow(chunkGcWorkflowId(repositoryId))
      .run(activities(['file:///nowhere']).collectChunkGarbage, input)
      .catch((e: unknown) => e);
    expect((outside as Error).message).toMatch(/this worker does not write to .* outside the targets it allows/);
    const short = await asWorkflow(chunkGcWorkflowId(repositoryId))
      .run(activities().collectChunkGarbage, { ...input, graceSeconds: 3600 })
      .catch((e: unknown) => e);
    expect((short as Error).message).toMatch(/grace period must be longer than 2 h/);
    const nopw = await asWorkflow(chunkGcWorkflowId(repositoryId))
      .run(activities(undefined, '').collectChunkGarbage, input)
      .catch((e: unknown) => e);
    expect((nopw as Error).message).toBe(`The chunk repository on ${t.url} is encrypted: give its password.`);
    expect(await keysUnder(t.target, chunkKey(orphan))).toEqual([chunkKey(orphan)]);

    const done = await asWorkflow(chunkGcWorkflowId(repositoryId)).run(activities().collectChunkGarbage, input);
    expect(done).toMatchObject({ removedChunks: 1, removedKeys: [chunkKey(orphan)], moreRemoved: 0 });
    expect(await keysUnder(t.target, chunkKey(orphan))).toEqual([]);
  });
});
