/**
 * Pull-mode backups into chunk repositories (issue #16, tests 1-3, and the S3 image-tree refusal) on the real stack:
 * libvirt's pull job exports each disk over NBD, the worker reads it straight into the repository.
 *
 * Writes during a job: the fixture domains have no OS, so the test writes through the device while the job runs and
 * expects every backup to equal the disk at the job's START (QEMU's copy-before-write keeps the old blocks in the
 * scratch file). "While the job runs" is made certain without timing: the S3 endpoint the worker uses is a proxy that
 * holds the chunk uploads back until the test releases them, so the read is stopped mid-disk (ingest waits for its
 * uploads) while the test writes.
 */
import { chmod, mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Client } from '@temporalio/client';
import { backupStatus, startBackup } from '../../src/client/backups';
import { REPORT_MIN_MS } from '../../src/activities/progress-report';
import { progressQuery } from '../../src/shared/queries';
import { ChunkStore, initRepository } from '../../src/repository/chunks';
import type { OpenRepository } from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import type { BackupResult } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { identical, reference, virsh } from '../helpers/images';
import { startS3FaultProxy } from '../helpers/s3-fault-proxy';
import type { S3FaultProxy } from '../helpers/s3-fault-proxy';
import { anyPresent, checkpoints, jobType, stagingDirs } from '../helpers/pull-jobs';
import { requireLibvirt, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { localTarget, s3Target } from '../storage/fixtures';

jest.setTimeout(20 * 60_000);

const PASSWORD = 'pull mode reads only what changed';
const SCRYPT = { N: 1 << 12, r: 8, p: 1 };
const MiB = 1 << 20;
/** libvirt's images directory: QEMU running as libvirt-qemu can reach a fixture domain's files under it */
const QEMU_REACHABLE_ROOT = '/var/lib/libvirt/images';

interface ManifestJson {
  backupId: string;
  method: string;
  chain: { level: string; parent?: string; base?: string; checkpoint?: string; depth?: number };
  disks: Array<{ name: string; virtualSize: number; sha256: string }>;
}

/** a chunk object's upload (not an index's, not a HEAD) */
const chunkPut = (method: string, url: string) => method === 'PUT' && /chunk-repo\/chunks\//.test(decodeURI(url));

describe('pull backups into chunk repositories (real stack)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let proxy: S3FaultProxy;
  let worker: WorkerProcess | undefined;
  let host: string;
  let work: string;
  let passwordFile: string;
  const cleanups: Array<() => Promise<void>> = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-pull-'));
    passwordFile = join(work, 'password');
    await writeFile(passwordFile, `${PASSWORD}\n`, { mode: 0o600 });
    proxy = await startS3FaultProxy(stackEnv().s3.endpoint);
    host = uniqueHost('pl');
    worker = await startPullWorker(host);
  });
  afterEach(() => proxy?.releaseAll());
  afterAll(async () => {
    await worker?.stop();
    for (const c of cleanups) await c().catch(() => undefined);
    await proxy?.close();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  function startPullWorker(h: string): Promise<WorkerProcess> {
    return startWorkerProcess(h, {
      env: cliEnv({ AWS_ENDPOINT_URL: proxy.url }),
      args: ['--password-file', passwordFile],
    });
  }

  /** An encrypted, compressed repository on a fresh S3 prefix (or local directory), removed after the suite. */
  async function newRepository(
    where: 's3' | 'local' = 's3',
  ): Promise<{ url: string; target: StorageTarget; repo: OpenRepository }> {
    const t = where === 's3' ? await s3Target() : await localTarget();
    cleanups.push(() => t.cleanup());
    const repo = await initRepository(t.target, {
      encryption: 'aes-256-gcm',
      compression: 'zstd',
      password: PASSWORD,
      scrypt: SCRYPT,
    });
    return { url: t.url, target: t.target, repo };
  }

  function start(dom: FixtureDomain, targets: string[], level: 'full' | 'inc' | 'auto', onHost = host) {
    return startBackup(client, {
      domain: dom.name,
      host: onHost,
      method: 'pull',
      targets,
      options: { heartbeatTimeoutSeconds: 5, level },
    });
  }

  async function manifestOf(target: StorageTarget, dom: FixtureDomain, id: string): Promise<ManifestJson> {
    return JSON.parse((await target.getBuffer(`${dom.name}/${id}/manifest.json`)).toString('utf8')) as ManifestJson;
  }

  /** Every disk of a backup read back through ChunkStore into a sparse raw file (what a restore does). */
  async function readBack(repo: OpenRepository, m: ManifestJson): Promise<Record<string, string>> {
    const store = new ChunkStore(repo);
    const out: Record<string, string> = {};
    for (const d of m.disks) {
      const index = await store.getIndex(d.sha256);
      const path = join(work, `${m.backupId}-${d.name}.raw`);
      const fh = await open(path, 'w');
      try {
        await fh.truncate(d.virtualSize);
        await store.readDisk(index, async (offset, data) => {
          await fh.write(data, 0, data.length, offset);
        });
      } finally {
        await fh.close();
      }
      out[d.name] = path;
    }
    return out;
  }

  /** The disks as they are now, as raw files: what a backup whose job starts now must restore to. */
  async function snapshotOf(dom: FixtureDomain, tag: string): Promise<Record<string, string>> {
    const out: Record<string, string> = {};
    for (const d of dom.disks) out[d.dev] = await reference(d.path, join(work, `${dom.name}-${tag}-${d.dev}.raw`));
    return out;
  }

  async function expectRestoresTo(repo: OpenRepository, m: ManifestJson, expected: Record<string, string>) {
    const restored = await readBack(repo, m);
    expect(Object.keys(restored).sort()).toEqual(Object.keys(expected).sort());
    for (const [dev, path] of Object.entries(expected)) {
      expect(`${dev}: ${String(await identical(restored[dev]!, path))}`).toBe(`${dev}: true`);
    }
  }

  it('pull full, then pull incremental after writes, of a running two-disk domain into S3: each restore equals the disks at its job start; the increment reads only the changed chunks', async () => {
    const { url, target, repo } = await newRepository();
    const dom = await newDomain({
      prefix: 'pl',
      disks: [
        { format: 'qcow2', sizeMiB: 32, randomMiB: 12, patterns: [{ byte: 0x5a, offsetMiB: 20, lengthMiB: 2 }] },
        { format: 'qcow2', sizeMiB: 16, patterns: [{ byte: 0x33, offsetMiB: 4, lengthMiB: 1 }] },
      ],
    });
    await dom.resolveDevices();

    // full: the guest writes while the read is held mid-disk
    const atFull = await snapshotOf(dom, 'full');
    let hold = proxy.hold(chunkPut);
    const { handle: fullRun } = await start(dom, [url], 'full');
    await waitFor('the pull read to wait on its first chunk upload', async () => hold.held() > 0);
    expect(await jobType(dom)).not.toBe('None');
    await dom.writeThroughDevice('vda', 0xe1, 2, 1); // chunk 0 of vda
    // over data the disk holds: QEMU copies the old blocks to the scratch file (a hole needs no copy)
    await dom.writeThroughDevice('vdb', 0xe2, 4, 1); // chunk 1 of vdb
    hold.release();
    const full: BackupResult = await fullRun.result();
    expect(full.status).toBe('completed');
    expect(full.method).toBe('pull');
    expect(full.chain?.level).toBe('full');
    expect(full.chain?.checkpoint).toBeDefined();
    // the writes went into QEMU's copy-before-write scratch files while the job ran
    expect(full.pull!.scratchPeakBytes).toBeGreaterThanOrEqual(2 * MiB);
    const m1 = await manifestOf(target, dom, full.backupId);
    expect(m1.method).toBe('pull');
    expect(m1.chain).toMatchObject({ level: 'full', checkpoint: full.chain!.checkpoint });
    await expectRestoresTo(repo, m1, atFull);
    expect(await jobType(dom)).toBe('None');
    for (const d of stagingDirs(full.backupId)) expect(await anyPresent([d])).toBeUndefined();

    // between the backups: one more changed chunk on vda (chunk 2); with the writes during the full, the dirty
    // chunks since the full's checkpoint are vda 0 and 2, vdb 1
    await dom.writeThroughDevice('vda', 0x71, 9, 1);
    const atInc = await snapshotOf(dom, 'inc');
    hold = proxy.hold(chunkPut);
    const { handle: incRun } = await start(dom, [url], 'inc');
    await waitFor('the incremental read to wait on a chunk upload', async () => hold.held() > 0);
    await dom.writeThroughDevice('vda', 0x99, 20, 1); // after the job's start: not in this backup
    hold.release();
    const inc: BackupResult = await incRun.result();
    expect(inc.status).toBe('completed');
    expect(inc.method).toBe('pull');
    expect(inc.chain).toMatchObject({ level: 'inc', parent: full.backupId });
    expect(inc.pull!.disks).toMatchObject({
      vda: { readChunks: 2, carriedChunks: 6, resumedFrom: 0 },
      vdb: { readChunks: 1, carriedChunks: 3, resumedFrom: 0 },
    });
    expect(inc.targets[0]!.chunks!.newChunks).toBeLessThanOrEqual(3);
    const m2 = await manifestOf(target, dom, inc.backupId);
    expect(m2.method).toBe('pull');
    expect(m2.chain).toMatchObject({ level: 'inc', parent: full.backupId, checkpoint: inc.chain!.checkpoint });
    // whole and restorable alone: the unchanged chunks are the full's
    await expectRestoresTo(repo, m2, atInc);
    expect(await checkpoints(dom)).toContain(inc.chain!.checkpoint);

    // an increment on the increment (the nightly case): it continues the chain (it used to be taken for broken, and
    // every second night was a full read), reads the chunks dirty since the increment's checkpoint (vda 5, written
    // during that job, and vda 7), and `vmbackup restore` gives back the disks at its job start
    await dom.writeThroughDevice('vda', 0x17, 28, 1);
    const atInc2 = await snapshotOf(dom, 'inc2');
    const inc2: BackupResult = await (await start(dom, [url], 'auto')).handle.result();
    expect(inc2.status).toBe('completed');
    expect(inc2.chain).toMatchObject({ level: 'inc', parent: inc.backupId, base: full.backupId });
    expect(inc2.pull!.disks).toMatchObject({
      vda: { readChunks: 2, carriedChunks: 6 },
      vdb: { readChunks: 0, carriedChunks: 4 },
    });
    const m3 = await manifestOf(target, dom, inc2.backupId);
    expect(m3.chain).toMatchObject({ level: 'inc', parent: inc.backupId, base: full.backupId, depth: 2 });
    for (const [id, expected] of [
      [inc.backupId, atInc],
      [inc2.backupId, atInc2],
    ] as const) {
      const to = join(work, `restored-${id}`);
      const restored = await runCli(['restore', id, '--target', url, '--to', to, '--format', 'raw'], {
        env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }),
      });
      // stderr may carry the AWS SDK's warning about Node 20; nothing of vmbackup's own
      expect([id, restored.code, restored.stderr.match(/vmbackup:.*/)?.[0]]).toEqual([id, 0, undefined]);
      for (const dev of ['vda', 'vdb'])
        expect(`${id} ${dev}: ${String(await identical(join(to, `${dev}.raw`), expected[dev]!))}`).toBe(
          `${id} ${dev}: true`,
        );
      const verified = await runCli(['verify', id, '--target', url], { env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }) });
      expect([id, verified.code, verified.stderr.match(/vmbackup:.*/)?.[0]]).toEqual([id, 0, undefined]);
    }
  });

  it("prune removes the chain's full from a local repository: the next pull increment still continues the chain, retires the full's checkpoint, and restores exactly", async () => {
    const { url, target, repo } = await newRepository('local');
    const dom = await newDomain({
      prefix: 'pl',
      disks: [{ format: 'qcow2', sizeMiB: 32, randomMiB: 16 }],
    });
    await dom.resolveDevices();
    const full: BackupResult = await (await start(dom, [url], 'full')).handle.result();
    expect(full.chain?.level).toBe('full');
    await dom.writeThroughDevice('vda', 0x21, 1, 1);
    const inc1: BackupResult = await (await start(dom, [url], 'auto')).handle.result();
    expect(inc1.chain).toMatchObject({ level: 'inc', parent: full.backupId, base: full.backupId });

    const pruned = await runCli(['prune', '--target', url, '--domain', dom.name, '--keep-last', '1', '--json'], {
      env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }),
    });
    expect([pruned.code, pruned.stderr.match(/vmbackup:.*/)?.[0]]).toEqual([0, undefined]);
    expect(await target.stat(`${dom.name}/${full.backupId}/manifest.json`)).toBeUndefined();

    await dom.writeThroughDevice('vda', 0x22, 13, 1);
    const atInc2 = await snapshotOf(dom, 'after-prune');
    const inc2: BackupResult = await (await start(dom, [url], 'auto')).handle.result();
    expect(inc2.status).toBe('completed');
    // the chain goes on from inc1; its full is gone from the repository but still named, and counted
    expect(inc2.chain).toMatchObject({ level: 'inc', parent: inc1.backupId, base: full.backupId });
    expect(inc2.pull!.disks['vda']).toMatchObject({ readChunks: 1, carriedChunks: 7 });
    const m = await manifestOf(target, dom, inc2.backupId);
    expect(m.chain).toMatchObject({ level: 'inc', parent: inc1.backupId, base: full.backupId, depth: 2 });
    await expectRestoresTo(repo, m, atInc2);
    // the pruned full's checkpoint is retired: libvirt keeps only what the next increment builds on
    expect(await checkpoints(dom)).toEqual([inc2.chain!.checkpoint]);
  });

  it("a pull reports its progress spaced, not once per chunk: a bounded number of storeProgress events in the backup's history", async () => {
    const { url } = await newRepository('local');
    // 128 MiB of random data: 32 chunks, each of which sent a signal (one history event) before the spacing
    const dom = await newDomain({ prefix: 'pl', disks: [{ format: 'qcow2', sizeMiB: 128, randomMiB: 128 }] });
    const { handle } = await start(dom, [url], 'full');
    const result: BackupResult = await handle.result();
    expect(result.status).toBe('completed');
    expect(result.pull!.disks['vda']!.readChunks).toBe(32);
    const events = (await handle.fetchHistory()).events ?? [];
    const reports = events.filter((e) => e.workflowExecutionSignaledEventAttributes?.signalName === 'storeProgress');
    const at = (e: (typeof events)[number]) =>
      Number(e.eventTime?.seconds ?? 0) * 1000 + (e.eventTime?.nanos ?? 0) / 1e6;
    const spanMs = at(events[events.length - 1]!) - at(events[0]!);
    // at most one per REPORT_MIN_MS (2 s) over the workflow's whole run
    expect(reports.length).toBeLessThanOrEqual(Math.floor(spanMs / REPORT_MIN_MS) + 1);
    expect(reports.length).toBeLessThan(32);
  });

  it('kill -9 of the worker mid-read: a new worker attaches to the same job and resumes from the journal, not from 0', async () => {
    const { url, target, repo } = await newRepository();
    const h = uniqueHost('pl');
    let w = await startPullWorker(h);
    try {
      // 128 MiB of random data: 32 chunks; the read is held after 12 uploads, so it is mid-disk when the worker dies.
      // Up to 8 chunks are stored at once and their uploads finish in any order: 12 uploads let chunks 0-3 be among
      // them (the journal records only the chunks below the lowest one still pending), where 6 often did not
      const dom = await newDomain({ prefix: 'pl', disks: [{ format: 'qcow2', sizeMiB: 128, randomMiB: 128 }] });
      const expected = await snapshotOf(dom, 'kill');
      const hold = proxy.hold(chunkPut, { after: 12 });
      const { backupId, handle } = await start(dom, [url], 'full', h);
      // A low chunk's upload can still be among the held ones (its HEAD or PUT came late), and then the settled prefix
      // stays below 4 for as long as it is held: after 5 s without the prefix, the longest-held upload goes on
      let stuckSince = Date.now();
      const journal = await waitFor('the journal of the held read', async () => {
        for (const d of stagingDirs(backupId)) {
          const j = JSON.parse(await readFile(join(d, 'pull-journal.json'), 'utf8').catch(() => '{}')) as {
            targets?: Record<string, Record<string, { chunks: number }>>;
          };
          const chunks = j.targets?.[url]?.['vda']?.chunks ?? 0;
          if (chunks >= 4 && hold.held() > 0) return { dir: d, chunks };
        }
        if (hold.held() === 0 || Date.now() - stuckSince < 5_000) return undefined;
        hold.releaseOldest();
        stuckSince = Date.now();
        return undefined;
      });
      // the step tells the workflow how far it is while it reads (the progress query `status` shows; one read feeds
      // the targets in turn, so the bytes are the backup's, not a target's)
      const told = await waitFor('the progress query to show the bytes read', async () => {
        const p = await handle.query(progressQuery).catch(() => undefined);
        const bytes = p?.bytesDone ?? 0;
        return bytes > 0 ? bytes : undefined;
      });
      expect(told).toBeLessThanOrEqual(128 * MiB);
      await w.kill9();
      hold.release();
      expect(await jobType(dom)).not.toBe('None'); // the job outlives the worker
      w = await startPullWorker(h);
      const result: BackupResult = await handle.result();
      expect(result.status).toBe('completed');
      // the same job (its scratch files, so the journal's point in time) was attached to, and the read resumed
      expect(result.pull!.attempt).toBeGreaterThan(1);
      expect(result.pull!.attached).toBe(true);
      expect(result.pull!.disks['vda']!.resumedFrom).toBeGreaterThanOrEqual(4 * 4 * MiB);
      expect(result.pull!.disks['vda']!.resumedFrom).toBeLessThanOrEqual(journal.chunks * 4 * MiB);
      await expectRestoresTo(repo, await manifestOf(target, dom, result.backupId), expected);
      expect(await jobType(dom)).toBe('None');
      expect(await anyPresent(stagingDirs(backupId))).toBeUndefined();
    } finally {
      proxy.releaseAll(); // a failed wait must not leave the worker's stop waiting on held uploads
      await w.stop();
    }
  });

  it('libvirt lost the job mid-read (ended behind our back): the retried step begins a new job cleanly and reads from 0', async () => {
    const { url, target, repo } = await newRepository();
    // 128 MiB: more than the read holds in flight and in its upload queue when the job goes (about 60 MiB)
    const dom = await newDomain({ prefix: 'pl', disks: [{ format: 'qcow2', sizeMiB: 128, randomMiB: 128 }] });
    const expected = await snapshotOf(dom, 'lost');
    const hold = proxy.hold(chunkPut, { after: 2 });
    const { handle } = await start(dom, [url], 'full');
    await waitFor('the pull read to wait on a chunk upload', async () => hold.held() > 0);
    await virsh('domjobabort', dom.name); // what a libvirtd or domain restart does to the job
    hold.release();
    const result: BackupResult = await handle.result();
    expect(result.status).toBe('completed');
    // a retried step (the first one's read failed) that began a new job, not one that attached
    expect(result.pull!.attempt).toBeGreaterThan(1);
    expect(result.pull!.attached).toBe(false);
    expect(result.pull!.disks['vda']!.resumedFrom).toBe(0);
    expect(result.chain?.checkpoint).toBeDefined();
    expect(await checkpoints(dom)).toEqual([result.chain!.checkpoint]);
    await expectRestoresTo(repo, await manifestOf(target, dom, result.backupId), expected);
    expect(await jobType(dom)).toBe('None');
  });

  it('cancel mid-read: the job ends, scratch and socket are removed, nothing is committed and no checkpoint is left', async () => {
    const { url, target } = await newRepository();
    const dom = await newDomain({ prefix: 'pl', disks: [{ format: 'qcow2', sizeMiB: 32, randomMiB: 24 }] });
    const before = await checkpoints(dom);
    const hold = proxy.hold(chunkPut);
    const { backupId, handle } = await start(dom, [url], 'full');
    await waitFor('the pull read to wait on a chunk upload', async () => hold.held() > 0);
    const staging = await anyPresent(stagingDirs(backupId));
    expect(staging).toBeDefined();
    expect(await anyPresent([join(staging!, 'vda.scratch.qcow2')])).toBeDefined();
    await handle.cancel();
    hold.release();
    await expect(handle.result()).rejects.toThrow();
    await waitFor('the pull job to end', async () => (await jobType(dom)) === 'None');
    await waitFor('the staging dir (scratch files, socket dir, journal) to go', async () =>
      (await anyPresent(stagingDirs(backupId))) === undefined ? true : undefined,
    );
    expect(await target.stat(`${dom.name}/${backupId}/manifest.json`)).toBeUndefined();
    expect(await checkpoints(dom)).toEqual(before);
  });

  it('a domain whose QEMU runs as libvirt-qemu: the socket directory admits only root and QEMU, and the backup completes', async () => {
    const { url, target, repo } = await newRepository();
    const parent = await mkdtemp(join(QEMU_REACHABLE_ROOT, 'vmbt-pl-'));
    cleanups.push(() => rm(parent, { recursive: true, force: true }));
    await chmod(parent, 0o711);
    const dom = await newDomain({
      prefix: 'pl',
      runAsRoot: false,
      parentDir: parent,
      disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 8 }],
    });
    const expected = await snapshotOf(dom, 'user');
    const hold = proxy.hold(chunkPut);
    const { backupId, handle } = await start(dom, [url], 'full');
    await waitFor('the pull read to wait on a chunk upload', async () => hold.held() > 0);
    const staging = await anyPresent(stagingDirs(backupId));
    const st = await stat(join(staging!, 'nbd'));
    hold.release();
    expect((st.mode & 0o777).toString(8)).toBe('770');
    expect(st.uid).toBe(0);
    expect(st.gid).not.toBe(0); // QEMU's group: QEMU creates the socket in it
    const result: BackupResult = await handle.result();
    expect(result.status).toBe('completed');
    await expectRestoresTo(repo, await manifestOf(target, dom, result.backupId), expected);
  });

  it('--max-concurrent-uploads 1: a second pull into the same repository waits for the place (status says so) while its job runs, then completes', async () => {
    const { url, target, repo } = await newRepository();
    const h = uniqueHost('pl');
    const w = await startWorkerProcess(h, {
      env: cliEnv({ AWS_ENDPOINT_URL: proxy.url }),
      args: ['--password-file', passwordFile, '--max-concurrent-uploads', '1'],
    });
    let hold: ReturnType<S3FaultProxy['hold']> | undefined;
    try {
      const [a, b] = [
        await newDomain({ prefix: 'pl', disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 8 }] }),
        await newDomain({ prefix: 'pl', disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 8 }] }),
      ];
      const [atA, atB] = [await snapshotOf(a, 'place'), await snapshotOf(b, 'place')];
      // the first pull holds the place: its uploads are held by the proxy
      const held = proxy.hold(chunkPut);
      hold = held;
      const first = await start(a, [url], 'full', h);
      await waitFor('the first pull to upload', async () => held.held() > 0);
      const second = await start(b, [url], 'full', h);
      await waitFor(
        'the second pull to say it waits for an upload place',
        async () => {
          const view = await backupStatus(client, second.handle, second.backupId);
          return view.activity?.name === 'pullIntoRepositories' && view.activity.waitingForUpload === true;
        },
        { timeoutMs: 60_000 },
      );
      // its job runs meanwhile: QEMU keeps the point in time while the pull waits
      expect(await jobType(b)).not.toBe('None');
      held.release();
      const [ra, rb] = (await Promise.all([first.handle.result(), second.handle.result()])) as [
        BackupResult,
        BackupResult,
      ];
      expect([ra.status, rb.status]).toEqual(['completed', 'completed']);
      await expectRestoresTo(repo, await manifestOf(target, a, ra.backupId), atA);
      await expectRestoresTo(repo, await manifestOf(target, b, rb.backupId), atB);
    } finally {
      hold?.release(); // a failed wait must not leave the worker's stop waiting on held uploads
      await w.stop();
    }
  });

  it('a pull backup to an image tree on S3 is refused with one sentence, before anything is created', async () => {
    const dom = await newDomain({ prefix: 'pl', disks: [{ format: 'qcow2', sizeMiB: 16 }] });
    const s3 = await s3Target();
    cleanups.push(() => s3.cleanup());
    const { backupId, handle } = await start(dom, [s3.url], 'auto');
    const said = await handle.result().then(
      () => [],
      (e: unknown) => {
        const out: string[] = [];
        for (let c = e as { cause?: unknown; message?: string } | undefined; c; c = c.cause as typeof c)
          out.push(c.message ?? '');
        return out;
      },
    );
    expect(said).toContain(
      `A pull backup cannot write an image tree on ${s3.url}: it writes the qcow2 in place through a local qemu-nbd, so only file:// image trees take it; use a chunk repository there, or --method push.`,
    );
    expect(await anyPresent(stagingDirs(backupId))).toBeUndefined();
    expect(await checkpoints(dom)).toEqual([]);
    expect(await jobType(dom)).toBe('None');
  });
});
