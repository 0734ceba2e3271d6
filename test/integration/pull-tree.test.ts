/**
 * Pull-mode backups into LOCAL image trees (issue #16) on the real stack: libvirt's pull job exports each disk over
 * NBD, the worker writes it as a qcow2 in the backup's directory of a `file://` target (writePulledImage through a
 * private qemu-nbd), an increment with the parent's image as backing, the same chain layout as push increments.
 *
 * "While the job runs" is made certain without timing: the test finds the writable qemu-nbd of the image being
 * written (a child of the worker, by its pid in /proc: the temp image's path is in its command line) and stops it
 * with SIGSTOP; the worker's write then waits, the job stays, and the test writes into the guest's disks before it
 * lets the writer go on (SIGCONT).
 */
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { startBackup } from '../../src/client/backups';
import type { BackupResult } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { identical, reference, run } from '../helpers/images';
import { checkpoints, jobType, present, stagingDirs } from '../helpers/pull-jobs';
import { requireLibvirt, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { s3Target } from '../storage/fixtures';

jest.setTimeout(20 * 60_000);

const MiB = 1 << 20;
/** the worker's resume window in these tests (VMBACKUP_PULL_WINDOW_MIB): small, so a 128 MiB disk has 32 */
const WINDOW_MIB = 4;

interface ManifestJson {
  version: number;
  backupId: string;
  method: string;
  chain: { level: string; parent?: string; checkpoint?: string };
  disks: Array<{
    name: string;
    format: string;
    key: string;
    size: number;
    sha256: string;
    content?: { scheme: string };
    backing?: { backupId: string; key: string; sha256: string };
  }>;
}

describe('pull backups into local image trees (real stack)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let worker: WorkerProcess | undefined;
  let host: string;
  let work: string;
  const cleanups: Array<() => Promise<void>> = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-pull-tree-'));
    host = uniqueHost('pt');
    worker = await startTreeWorker(host);
  });
  afterAll(async () => {
    await worker?.stop();
    for (const c of cleanups) await c().catch(() => undefined);
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  function startTreeWorker(h: string): Promise<WorkerProcess> {
    return startWorkerProcess(h, { env: cliEnv({ VMBACKUP_PULL_WINDOW_MIB: String(WINDOW_MIB) }) });
  }

  async function newTree(): Promise<{ dir: string; url: string }> {
    const dir = await mkdtemp(join(work, 'tree-'));
    return { dir, url: pathToFileURL(dir).href };
  }

  function start(
    dom: FixtureDomain,
    targets: string[],
    level: 'full' | 'inc' | 'auto',
    opts: { onHost?: string; method?: 'pull' | 'push' } = {},
  ) {
    return startBackup(client, {
      domain: dom.name,
      host: opts.onHost ?? host,
      method: opts.method ?? 'pull',
      targets,
      options: { heartbeatTimeoutSeconds: 5, level },
    });
  }

  async function manifestOf(tree: string, dom: FixtureDomain, id: string): Promise<ManifestJson> {
    return JSON.parse(await readFile(join(tree, dom.name, id, 'manifest.json'), 'utf8')) as ManifestJson;
  }

  /** The disks as they are now, as raw files: what a backup whose job starts now must restore to. */
  async function snapshotOf(dom: FixtureDomain, tag: string): Promise<Record<string, string>> {
    const out: Record<string, string> = {};
    for (const d of dom.disks) out[d.dev] = await reference(d.path, join(work, `${dom.name}-${tag}-${d.dev}.raw`));
    return out;
  }

  /** `vmbackup restore ID --target URL` (every disk, as raw) equals EXPECTED disk by disk. */
  async function expectRestoresTo(url: string, id: string, expected: Record<string, string>): Promise<void> {
    const to = await mkdtemp(join(work, `restore-${id}-`));
    await rm(to, { recursive: true });
    const res = await runCli(['restore', id, '--target', url, '--to', to, '--format', 'raw']);
    expectOk(res);
    for (const [dev, path] of Object.entries(expected)) {
      expect(`${dev}: ${String(await identical(join(to, `${dev}.raw`), path))}`).toBe(`${dev}: true`);
    }
    await rm(to, { recursive: true, force: true });
  }

  /** A CLI run exited 0 (else its stderr is what the failure shows). */
  function expectOk(res: { code: number; stderr: string }): void {
    expect(res.code === 0 ? 0 : res.stderr).toBe(0);
  }

  /** `vmbackup verify ID --target URL --read-data` says the backup and its chain are intact. */
  async function expectVerified(url: string, id: string): Promise<void> {
    const res = await runCli(['verify', id, '--target', url, '--read-data']);
    expectOk(res);
    expect(res.stderr).toMatch(new RegExp(`Backup ${id} on .* is intact`));
  }

  /** Every file under DIR (names relative to it), dot files included. */
  async function filesUnder(dir: string): Promise<string[]> {
    const out: string[] = [];
    const walk = async (d: string, rel: string): Promise<void> => {
      for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
        if (e.isDirectory()) await walk(join(d, e.name), join(rel, e.name));
        else out.push(join(rel, e.name));
      }
    };
    await walk(dir, '');
    return out.sort();
  }

  /** The pid of the writable qemu-nbd of the image the backup writes for DISK (its temp name is in its arguments). */
  async function writerOf(backupId: string, disk: string): Promise<number | undefined> {
    for (const e of await readdir('/proc')) {
      if (!/^\d+$/.test(e)) continue;
      const argv = (await readFile(`/proc/${e}/cmdline`).catch(() => Buffer.alloc(0))).toString('utf8').split('\0');
      if (!argv[0]?.endsWith('qemu-nbd') || argv.includes('--read-only')) continue;
      if (argv.some((a) => a.includes(`/${backupId}/.${disk}.qcow2.tmp-`))) return Number(e);
    }
    return undefined;
  }

  /**
   * Runs WRITES while the backup's pull job certainly runs: the worker is stopped (SIGSTOP, for well under its
   * heartbeat timeout) as soon as libvirt created the job's scratch file, so the job cannot end meanwhile.
   */
  async function holdAtJobStart(backupId: string, dom: FixtureDomain, writes: () => Promise<void>): Promise<void> {
    const pid = worker!.child.pid!;
    const scratch = stagingDirs(backupId).map((d) => join(d, `${dom.disks[0]!.dev}.scratch.qcow2`));
    await waitFor(
      'the pull job to begin (its scratch file)',
      async () => {
        for (const f of scratch) if (await present(f)) return true;
        return undefined;
      },
      { intervalMs: 1 },
    );
    process.kill(pid, 'SIGSTOP');
    try {
      // right at backup-begin libvirt may still say "backup job data missing"
      expect(await waitFor('libvirt to show the job', async () => jobType(dom))).not.toBe('None');
      await writes();
    } finally {
      process.kill(pid, 'SIGCONT');
    }
  }

  /** Stops the writer of whichever disk is being written first (a small disk may be done before it is seen). */
  async function stopAWriter(backupId: string, disks: string[]): Promise<{ disk: string; pid: number }> {
    return waitFor(
      'a writable qemu-nbd of the backup',
      async () => {
        for (const disk of disks) {
          const pid = await writerOf(backupId, disk);
          if (pid === undefined) continue;
          try {
            process.kill(pid, 'SIGSTOP');
          } catch {
            continue; // it ended in between
          }
          return { disk, pid };
        }
        return undefined;
      },
      { intervalMs: 2 },
    );
  }

  async function heartbeatOf(
    handle: WorkflowHandle,
  ): Promise<{ targets?: Record<string, Record<string, { resumeFrom: number }>> } | undefined> {
    const d = await handle.describe();
    const act = d.raw.pendingActivities?.find((a) => a.activityType?.name === 'pullIntoImageTrees');
    const payload = act?.heartbeatDetails?.payloads?.[0];
    if (!payload?.data) return undefined;
    return JSON.parse(Buffer.from(payload.data).toString('utf8')) as {
      targets?: Record<string, Record<string, { resumeFrom: number }>>;
    };
  }

  async function ownRanges(image: string): Promise<Array<{ offset: number; length: number }>> {
    const { stdout } = await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', image]);
    const out: Array<{ offset: number; length: number }> = [];
    for (const e of JSON.parse(stdout) as Array<{
      start: number;
      length: number;
      depth: number;
      data: boolean;
      zero: boolean;
    }>) {
      if (e.depth !== 0 || (!e.data && !e.zero)) continue;
      const last = out.at(-1);
      if (last && last.offset + last.length === e.start) last.length += e.length;
      else out.push({ offset: e.start, length: e.length });
    }
    return out;
  }

  const chain: {
    tree?: { dir: string; url: string };
    dom?: FixtureDomain;
    inc?: string;
    atInc?: Record<string, string>;
  } = {};

  it('pull full, then pull incremental, of a running two-disk domain with writes during each job into a local image tree: each restores to its job start, the increment holds only the dirty clusters over the full', async () => {
    const tree = await newTree();
    const dom = await newDomain({
      prefix: 'pt',
      disks: [
        { format: 'qcow2', sizeMiB: 64, randomMiB: 48, patterns: [{ byte: 0x5a, offsetMiB: 56, lengthMiB: 2 }] },
        { format: 'qcow2', sizeMiB: 16, patterns: [{ byte: 0x33, offsetMiB: 4, lengthMiB: 1 }] },
      ],
    });
    await dom.resolveDevices();

    // full: the guest writes while a writer is stopped mid-backup
    const atFull = await snapshotOf(dom, 'full');
    const { backupId: fullId, handle: fullRun } = await start(dom, [tree.url], 'full');
    await holdAtJobStart(fullId, dom, async () => {
      await dom.writeThroughDevice('vda', 0xe1, 2, 1); // over data: QEMU copies the old blocks to the scratch file
      await dom.writeThroughDevice('vdb', 0xe2, 4, 1);
    });
    const full: BackupResult = await fullRun.result();
    expect(full.status).toBe('completed');
    expect(full.method).toBe('pull');
    expect(full.chain).toMatchObject({ level: 'full' });
    expect(full.chain?.checkpoint).toBeDefined();
    expect(full.pull!.scratchPeakBytes).toBeGreaterThanOrEqual(1 * MiB);
    const m1 = await manifestOf(tree.dir, dom, fullId);
    expect(m1).toMatchObject({
      version: 4,
      method: 'pull',
      chain: { level: 'full', checkpoint: full.chain!.checkpoint },
    });
    for (const d of m1.disks) {
      expect(d).toMatchObject({
        format: 'qcow2',
        key: `${dom.name}/${fullId}/${d.name}.qcow2`,
        content: { scheme: 'content-v1' },
      });
      expect(d.backing).toBeUndefined();
      // the sidecar holds the content digest taken while writing, and claims no file SHA-256 nobody computed
      const side = JSON.parse(
        await readFile(join(tree.dir, dom.name, fullId, `.${d.name}.qcow2.meta.json`), 'utf8'),
      ) as {
        sha256?: string;
        metadata: Record<string, string>;
      };
      expect(side.sha256).toBeUndefined();
      expect(side.metadata.sha256).toBeUndefined();
      expect(side.metadata.content).toBe(d.sha256);
    }
    // nothing but the images, their sidecars, the whole-VM files and the manifest: no temp image left
    expect((await filesUnder(join(tree.dir, dom.name, fullId))).filter((f) => f.includes('.tmp-'))).toEqual([]);
    await expectRestoresTo(tree.url, fullId, atFull);
    expect(await jobType(dom)).toBe('None');
    for (const d of stagingDirs(fullId)) expect(await present(d)).toBe(false);

    // between the backups: one more change on vda; after the job's start, writes that must not be in it
    await dom.writeThroughDevice('vda', 0x71, 9, 1);
    const atInc = await snapshotOf(dom, 'inc');
    const { backupId: incId, handle: incRun } = await start(dom, [tree.url], 'inc');
    await holdAtJobStart(incId, dom, async () => {
      await dom.writeThroughDevice('vda', 0x99, 20, 1);
      await dom.writeThroughDevice('vdb', 0x98, 8, 1);
    });
    const inc: BackupResult = await incRun.result();
    expect(inc.status).toBe('completed');
    expect(inc.chain).toMatchObject({ level: 'inc', parent: fullId });
    const m2 = await manifestOf(tree.dir, dom, incId);
    expect(m2).toMatchObject({ version: 4, method: 'pull', chain: { level: 'inc', parent: fullId } });
    for (const d of m2.disks) {
      const parent = m1.disks.find((p) => p.name === d.name)!;
      expect(d.backing).toEqual({ backupId: fullId, key: parent.key, sha256: parent.sha256 });
      const image = join(tree.dir, d.key);
      const { stdout } = await run('qemu-img', ['info', '--output=json', '-U', image]);
      expect((JSON.parse(stdout) as { 'backing-filename': string })['backing-filename']).toBe(
        `../${fullId}/${d.name}.qcow2`,
      );
    }
    // only the clusters dirty since the full's checkpoint: the writes during the full and the one after it
    expect(await ownRanges(join(tree.dir, dom.name, incId, 'vda.qcow2'))).toEqual([
      { offset: 2 * MiB, length: 1 * MiB },
      { offset: 9 * MiB, length: 1 * MiB },
    ]);
    expect(await ownRanges(join(tree.dir, dom.name, incId, 'vdb.qcow2'))).toEqual([
      { offset: 4 * MiB, length: 1 * MiB },
    ]);
    await expectRestoresTo(tree.url, incId, atInc);

    await expectVerified(tree.url, incId);
    const list = await runCli(['list', '--target', tree.url, '--json']);
    expect(list.code).toBe(0);
    expect(list.stdout).toContain(incId);
    // copied into another local tree, the images carry their file's SHA-256 and their content digest: a push
    // increment builds on the copied pulled chain there (its sidecars are accepted as what the manifests record)
    const again = await newTree();
    expectOk(await runCli(['copy', incId, '--from', tree.url, '--to', again.url, '--json']));
    const pushInc: BackupResult = await (await start(dom, [again.url], 'inc', { method: 'push' })).handle.result();
    expect(pushInc.chain).toMatchObject({ level: 'inc', parent: incId });
    chain.tree = tree;
    chain.dom = dom;
    chain.inc = incId;
    chain.atInc = atInc;
  });

  it('copy of the pulled chain to S3, then restore from S3: exact', async () => {
    await requireS3();
    const { tree, inc, atInc } = chain;
    if (!tree || !inc || !atInc) throw new Error('the first test did not leave its chain');
    const s3 = await s3Target();
    cleanups.push(() => s3.cleanup());
    const copied = await runCli(['copy', inc, '--from', tree.url, '--to', s3.url, '--json']);
    expectOk(copied);
    await expectVerified(s3.url, inc);
    await expectRestoresTo(s3.url, inc, atInc);
  });

  it('kill -9 of the worker mid-write: a new worker attaches to the same job and resumes from the heartbeated offset; exact restore, scratch removed', async () => {
    const tree = await newTree();
    const h = uniqueHost('pt');
    let w = await startTreeWorker(h);
    try {
      const dom = await newDomain({ prefix: 'pt', disks: [{ format: 'qcow2', sizeMiB: 128, randomMiB: 128 }] });
      const expected = await snapshotOf(dom, 'kill');
      const { backupId, handle } = await start(dom, [tree.url], 'full', { onHost: h });
      const { pid } = await stopAWriter(backupId, ['vda']);
      // let the writer go a few milliseconds at a time until a flushed window's offset reached the server
      const seen = await waitFor(
        'a heartbeated resume offset',
        async () => {
          const at = (await heartbeatOf(handle))?.targets?.[tree.url]?.['vda']?.resumeFrom ?? 0;
          if (at > 0) return at;
          process.kill(pid, 'SIGCONT');
          await new Promise((r) => setTimeout(r, 10));
          process.kill(pid, 'SIGSTOP');
          return undefined;
        },
        { intervalMs: 500 },
      );
      expect(seen).toBeLessThan(128 * MiB);
      await w.kill9();
      // the writer dies with the worker (it would keep the image's write lock and its stale metadata cache)
      await waitFor('the stopped writer to die with its worker', async () => !(await present(`/proc/${pid}`)));
      expect(await jobType(dom)).not.toBe('None'); // the job outlives the worker
      w = await startTreeWorker(h);
      const result: BackupResult = await handle.result();
      expect(result.status).toBe('completed');
      expect(result.pull!.attempt).toBeGreaterThan(1);
      expect(result.pull!.attached).toBe(true);
      expect(result.pull!.disks['vda']!.resumedFrom).toBeGreaterThanOrEqual(seen);
      expect(result.pull!.disks['vda']!.resumedFrom % (WINDOW_MIB * MiB)).toBe(0);
      await expectRestoresTo(tree.url, backupId, expected);
      await expectVerified(tree.url, backupId);
      expect(await jobType(dom)).toBe('None');
      for (const d of stagingDirs(backupId)) expect(await present(d)).toBe(false);
      expect((await filesUnder(tree.dir)).filter((f) => f.includes('.tmp-'))).toEqual([]);
    } finally {
      await w.stop();
    }
  });

  it('cancel mid-write: the job ends, nothing uncommitted is left on the target, no checkpoint', async () => {
    const tree = await newTree();
    const dom = await newDomain({ prefix: 'pt', disks: [{ format: 'qcow2', sizeMiB: 64, randomMiB: 48 }] });
    const before = await checkpoints(dom);
    const { backupId, handle } = await start(dom, [tree.url], 'full');
    const { pid } = await stopAWriter(backupId, ['vda']);
    expect(await present(join(tree.dir, dom.name, backupId))).toBe(true);
    await handle.cancel();
    process.kill(pid, 'SIGCONT');
    await expect(handle.result()).rejects.toThrow();
    await waitFor('the pull job to end', async () => (await jobType(dom)) === 'None');
    await waitFor('the staging dir to go', async () => {
      for (const d of stagingDirs(backupId)) if (await present(d)) return undefined;
      return true;
    });
    expect(await filesUnder(tree.dir)).toEqual([]);
    expect(await checkpoints(dom)).toEqual(before);
  });

  it('a pull increment on a push full, and a push increment on a pull full: one checkpoint lineage, each restores exactly', async () => {
    const tree = await newTree();
    const dom = await newDomain({ prefix: 'pt', disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 4 }] });
    await dom.resolveDevices();
    const pushFull: BackupResult = await (await start(dom, [tree.url], 'full', { method: 'push' })).handle.result();
    await dom.writeThroughDevice('vda', 0x41, 6, 1);
    const atPullInc = await snapshotOf(dom, 'pullinc');
    const pullInc: BackupResult = await (await start(dom, [tree.url], 'auto')).handle.result();
    expect(pullInc.method).toBe('pull');
    expect(pullInc.chain).toMatchObject({ level: 'inc', parent: pushFull.backupId });
    expect(await ownRanges(join(tree.dir, dom.name, pullInc.backupId, 'vda.qcow2'))).toEqual([
      { offset: 6 * MiB, length: 1 * MiB },
    ]);
    await expectRestoresTo(tree.url, pullInc.backupId, atPullInc);

    const pullFull: BackupResult = await (await start(dom, [tree.url], 'full')).handle.result();
    await dom.writeThroughDevice('vda', 0x42, 10, 1);
    const atPushInc = await snapshotOf(dom, 'pushinc');
    const pushInc: BackupResult = await (await start(dom, [tree.url], 'auto', { method: 'push' })).handle.result();
    expect(pushInc.chain).toMatchObject({ level: 'inc', parent: pullFull.backupId });
    await expectRestoresTo(tree.url, pushInc.backupId, atPushInc);
    await expectVerified(tree.url, pushInc.backupId);
    // prune keeps what the newest chain needs and removes the older one
    const prune = await runCli(['prune', '--target', tree.url, '--domain', dom.name, '--keep-last', '1', '--json']);
    expectOk(prune);
    await expectRestoresTo(tree.url, pushInc.backupId, atPushInc);
    expect(await present(join(tree.dir, dom.name, pushFull.backupId))).toBe(false);
  });

  it('refused with one sentence before anything is created: an image tree on S3, and an image tree mixed with a chunk repository', async () => {
    await requireS3();
    const dom = await newDomain({ prefix: 'pt', disks: [{ format: 'qcow2', sizeMiB: 16 }] });
    const s3 = await s3Target();
    cleanups.push(() => s3.cleanup());
    const res = await runCli(['backup', dom.name, '--method', 'pull', '--target', s3.url, '--host', host, '--wait']);
    expect(res.code).not.toBe(0);
    expect(res.stderr).toContain(
      `A pull backup cannot write an image tree on ${s3.url}: it writes the qcow2 in place through a local qemu-nbd, so only file:// image trees take it; use a chunk repository there, or --method push.`,
    );
    expect(await checkpoints(dom)).toEqual([]);
    expect(await jobType(dom)).toBe('None');

    const tree = await newTree();
    const repoDir = await mkdtemp(join(work, 'repo-'));
    const init = await runCli(['repo', 'init', pathToFileURL(repoDir).href, '--encryption', 'none']);
    expectOk(init);
    const { handle } = await start(dom, [tree.url, pathToFileURL(repoDir).href], 'auto');
    const said = await handle.result().then(
      () => [],
      (e: unknown) => {
        const out: string[] = [];
        for (let c = e as { cause?: unknown; message?: string } | undefined; c; c = c.cause as typeof c)
          out.push(c.message ?? '');
        return out;
      },
    );
    expect(said).toContainEqual(
      expect.stringMatching(/mixing an image tree and a chunk repository in one backup is not supported/),
    );
    expect(await filesUnder(tree.dir)).toEqual([]);
    expect(await checkpoints(dom)).toEqual([]);
  });
});
