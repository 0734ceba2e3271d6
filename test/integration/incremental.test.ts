/**
 * Incremental and differential push backups end to end (issue #12): real Temporal, real libvirt/QEMU (TCG), real
 * local, NFS and S3 targets, a worker process per test. Every restore is compared with a copy of the disk taken
 * while the domain was paused at that backup's point; chains that cannot continue become full backups with their
 * reason; a checkpoint counts only once its backup is committed.
 */
import { copyFile, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { WorkflowFailedError } from '@temporalio/client';
import { startBackup } from '../../src/client/backups';
import type { BackupOptions, BackupResult } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { pausedCopy, run, virsh } from '../helpers/images';
import { requireLibvirt, requireNfs, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { nfsTarget, s3Target } from '../storage/fixtures';

const MiB = 1 << 20;

interface ManifestJson {
  backupId: string;
  chain: {
    level: string;
    parent?: string;
    base?: string;
    checkpoint?: string;
    checkpointXml?: string;
    reason?: string;
  };
  disks: Array<{ name: string; size: number; virtualSize: number; backing?: { backupId: string } }>;
}

async function jobActive(domain: string): Promise<boolean> {
  return /Job type:\s+(Bounded|Unbounded)/.test(await virsh('domjobinfo', domain));
}

async function checkpoints(domain: string): Promise<string[]> {
  return (await virsh('checkpoint-list', domain, '--name'))
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
}

async function sameContents(a: string, b: string): Promise<boolean> {
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]).then(
    () => 0,
    (e: { code?: number }) => e.code ?? -1,
  );
  if (r !== 0 && r !== 1) throw new Error(`qemu-img compare ${a} ${b} failed (${r})`);
  return r === 0;
}

describe('incremental and differential chains (real stack)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let worker: WorkerProcess | undefined;
  let host: string;
  let work: string;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    await requireNfs();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-incremental-'));
    // One host and its worker for every test of the file: each test backs up a domain of its own to targets of its
    // own, one backup at a time, so the tests do not interfere; the kill -9 test starts the host's worker again.
    host = uniqueHost('inc');
    worker = await startWorkerProcess(host);
  });
  afterAll(async () => {
    await worker?.stop();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });
  beforeEach(async () => {
    // a test that failed between its kill -9 and the restart leaves no worker: the next test starts one
    if (!worker || worker.child.exitCode !== null || worker.child.signalCode !== null)
      worker = await startWorkerProcess(host);
  });

  async function localTarget(name: string): Promise<string> {
    return pathToFileURL(await mkdtemp(join(work, `${name}-`))).href;
  }

  async function backup(dom: FixtureDomain, targets: string[], options: BackupOptions = {}): Promise<BackupResult> {
    const { handle } = await start(dom, targets, options);
    return handle.result();
  }

  async function start(dom: FixtureDomain, targets: string[], options: BackupOptions = {}) {
    return startBackup(client, {
      domain: dom.name,
      host,
      method: 'push',
      targets,
      options: { heartbeatTimeoutSeconds: 5, ...options },
    });
  }

  async function manifestAt(target: string, dom: FixtureDomain, id: string): Promise<ManifestJson> {
    return JSON.parse(
      await readFile(join(fileURLToPath(target), dom.name, id, 'manifest.json'), 'utf8'),
    ) as ManifestJson;
  }

  /** `qemu-img convert` of the newest link in a local target: the chain resolves with qemu-img alone. */
  async function convertChain(target: string, dom: FixtureDomain, id: string, disk: string): Promise<string> {
    const out = join(work, `${id}.${disk}.qemu-img.raw`);
    await run('qemu-img', [
      'convert',
      '-f',
      'qcow2',
      '-O',
      'raw',
      join(fileURLToPath(target), dom.name, id, `${disk}.qcow2`),
      out,
    ]);
    return out;
  }

  /** `vmbackup restore` of one disk of one backup from any target, as a standalone raw image. */
  async function restore(target: string, id: string, disk: string): Promise<string> {
    const out = join(work, `${id}.${disk}.${Math.random().toString(16).slice(2, 8)}.raw`);
    const r = await runCli(['restore', id, '--target', target, '--disk', disk, '--format', 'raw', '--to', out]);
    if (r.code !== 0) throw new Error(`restore ${id} from ${target} failed: ${r.stderr}`);
    return out;
  }

  test('full, inc, inc, diff: each restore (local with qemu-img alone, NFS and S3 with vmbackup) equals the disk at its point', async () => {
    const dom = await newDomain({
      prefix: 'inc',
      disks: [{ format: 'qcow2', sizeMiB: 256, patterns: [{ byte: 0x11, offsetMiB: 0, lengthMiB: 32 }] }],
    });
    const local = await localTarget('chain');
    const nfs = await nfsTarget();
    const s3 = await s3Target();
    const targets = [local, nfs.url, s3.url];
    try {
      const refs: Record<string, string> = {};
      const steps: Array<{ level?: 'diff'; writes: Array<[number, number, number]> }> = [
        { writes: [] },
        {
          writes: [
            [0x22, 100, 4],
            [0x23, 200, 1],
          ],
        },
        {
          writes: [
            [0x33, 10, 2],
            [0x34, 150, 8],
          ],
        },
        { level: 'diff', writes: [[0x44, 60, 3]] },
      ];
      const results: BackupResult[] = [];
      for (const [i, step] of steps.entries()) {
        for (const [byte, off, len] of step.writes) await dom.writeThroughDevice('vda', byte, off, len);
        const ref = await pausedCopy(dom, 'vda', join(work, `${dom.name}-${i}.ref.raw`));
        const r = await backup(dom, targets, step.level ? { level: step.level } : {});
        expect(r.status).toBe('completed');
        refs[r.backupId] = ref;
        results.push(r);
      }
      const [full, inc1, inc2, diff] = results as [BackupResult, BackupResult, BackupResult, BackupResult];
      expect(full.chain).toMatchObject({ level: 'full', requested: 'auto', base: full.backupId });
      expect(full.chain?.reason).toMatch(/no earlier backup/);
      expect(inc1.chain).toMatchObject({ level: 'inc', parent: full.backupId, base: full.backupId });
      expect(inc1.chain?.reason).toBeUndefined();
      expect(inc2.chain).toMatchObject({ level: 'inc', parent: inc1.backupId, base: full.backupId });
      expect(diff.chain).toMatchObject({ level: 'diff', parent: full.backupId, base: full.backupId });

      // the increments hold the changed clusters only
      const m1 = await manifestAt(local, dom, inc1.backupId);
      expect(m1.disks[0]!.backing?.backupId).toBe(full.backupId);
      expect(m1.disks[0]!.size).toBeLessThan(16 * MiB);
      expect(m1.chain.checkpointXml).toMatch(/<domaincheckpoint>/);
      // libvirt keeps the newest checkpoint and the chain's full's, nothing older
      expect((await checkpoints(dom.name)).sort()).toEqual([diff.chain!.checkpoint!, full.chain!.checkpoint!].sort());

      for (const r of results) {
        const ref = refs[r.backupId]!;
        expect(await sameContents(await convertChain(local, dom, r.backupId, 'vda'), ref)).toBe(true);
        expect(await sameContents(await restore(nfs.url, r.backupId, 'vda'), ref)).toBe(true);
        expect(await sameContents(await restore(s3.url, r.backupId, 'vda'), ref)).toBe(true);
      }
    } finally {
      await nfs.cleanup();
      await s3.cleanup();
    }
  });

  test('QEMU killed with -9: the next auto backup is full with the bitmap reason; after virsh destroy the chain continues', async () => {
    const dom = await newDomain({
      prefix: 'inc',
      disks: [{ format: 'qcow2', sizeMiB: 128, patterns: [{ byte: 0x51, offsetMiB: 0, lengthMiB: 16 }] }],
    });
    const target = await localTarget('kill9');
    const full = await backup(dom, [target]);
    await dom.writeThroughDevice('vda', 0x52, 40, 2);
    const inc = await backup(dom, [target]);
    expect(inc.chain?.level).toBe('inc');

    const pid = Number((await readFile(`/run/libvirt/qemu/${dom.name}.pid`, 'utf8')).trim());
    process.kill(pid, 'SIGKILL');
    await waitFor('QEMU to be gone', async () => (await dom.state()) === 'shut off');
    await dom.start();
    await dom.writeThroughDevice('vda', 0x53, 70, 1);
    const ref = await pausedCopy(dom, 'vda', join(work, `${dom.name}-after-kill.ref.raw`));
    const after = await backup(dom, [target]);
    expect(after.chain?.level).toBe('full');
    expect(after.chain?.reason).toMatch(/dirty bitmap of vda was lost or broken/);
    expect(await sameContents(await convertChain(target, dom, after.backupId, 'vda'), ref)).toBe(true);

    // the chain after it continues, and restores
    await dom.writeThroughDevice('vda', 0x54, 90, 1);
    const ref2 = await pausedCopy(dom, 'vda', join(work, `${dom.name}-after-kill-inc.ref.raw`));
    const next = await backup(dom, [target]);
    expect(next.chain).toMatchObject({ level: 'inc', parent: after.backupId });
    expect(await sameContents(await convertChain(target, dom, next.backupId, 'vda'), ref2)).toBe(true);

    // a clean stop (SIGTERM: QEMU stores its bitmaps) does not break it
    await dom.destroy();
    await dom.start();
    await dom.writeThroughDevice('vda', 0x55, 20, 1);
    const ref3 = await pausedCopy(dom, 'vda', join(work, `${dom.name}-after-destroy.ref.raw`));
    const cont = await backup(dom, [target]);
    expect(cont.chain).toMatchObject({ level: 'inc', parent: next.backupId });
    expect(await sameContents(await convertChain(target, dom, cont.backupId, 'vda'), ref3)).toBe(true);
    expect(full.chain?.level).toBe('full');
  });

  test('checkpoint metadata lost, or the domain undefined and defined again: the chain continues after a redefine', async () => {
    const dom = await newDomain({
      prefix: 'inc',
      disks: [{ format: 'qcow2', sizeMiB: 128, patterns: [{ byte: 0x61, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const target = await localTarget('redefine');
    const full = await backup(dom, [target]);
    await virsh('checkpoint-delete', dom.name, full.chain!.checkpoint!, '--metadata');
    expect(await checkpoints(dom.name)).toEqual([]);
    await dom.writeThroughDevice('vda', 0x62, 30, 2);
    const ref = await pausedCopy(dom, 'vda', join(work, `${dom.name}-meta.ref.raw`));
    const inc = await backup(dom, [target]);
    expect(inc.chain).toMatchObject({ level: 'inc', parent: full.backupId });
    expect(await sameContents(await convertChain(target, dom, inc.backupId, 'vda'), ref)).toBe(true);

    // undefine (checkpoint metadata with it) and define again, as after a move to a rebuilt host
    const xml = join(work, `${dom.name}.xml`);
    await writeFile(xml, await virsh('dumpxml', '--inactive', dom.name));
    await dom.destroy();
    await virsh('undefine', dom.name, '--checkpoints-metadata');
    await virsh('define', xml);
    await dom.start();
    expect(await checkpoints(dom.name)).toEqual([]);
    await dom.writeThroughDevice('vda', 0x63, 50, 2);
    const ref2 = await pausedCopy(dom, 'vda', join(work, `${dom.name}-redefined.ref.raw`));
    const inc2 = await backup(dom, [target]);
    expect(inc2.chain).toMatchObject({ level: 'inc', parent: inc.backupId });
    expect(await sameContents(await convertChain(target, dom, inc2.backupId, 'vda'), ref2)).toBe(true);
  });

  test('kill -9 of the worker during an incremental job resumes it; a cancelled increment leaves no checkpoint', async () => {
    const dom = await newDomain({ prefix: 'inc', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 64 }] });
    const target = await localTarget('crash');
    await backup(dom, [target]);
    // a big change, so the incremental job runs long enough to be caught
    await dom.writeThroughDevice('vda', 0x71, 100, 1536);
    const ref = await pausedCopy(dom, 'vda', join(work, `${dom.name}-crash.ref.raw`));
    await run('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches']).catch(() => undefined);
    const { handle } = await start(dom, [target]);
    await waitFor('the incremental job to run', () => jobActive(dom.name), { intervalMs: 10, timeoutMs: 120_000 });
    await worker!.kill9();
    // the job outlived the worker that started it: the new worker must attach to it, not start another
    expect(await jobActive(dom.name)).toBe(true);
    worker = await startWorkerProcess(host);
    const resumed = await handle.result();
    expect(resumed.chain?.level).toBe('inc');
    expect(await sameContents(await convertChain(target, dom, resumed.backupId, 'vda'), ref)).toBe(true);

    // cancel an increment while its job runs: its checkpoint goes, the committed ones stay
    const before = await checkpoints(dom.name);
    await dom.writeThroughDevice('vda', 0x72, 100, 1536);
    await run('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches']).catch(() => undefined);
    const cancelled = await start(dom, [target]);
    await waitFor('the incremental job to run', () => jobActive(dom.name), { intervalMs: 10, timeoutMs: 120_000 });
    await (cancelled.handle as WorkflowHandle).cancel();
    const cancelledWhileRunning = await jobActive(dom.name);
    await expect(cancelled.handle.result()).rejects.toThrow(WorkflowFailedError);
    expect(cancelledWhileRunning).toBe(true);
    // the job was aborted, and the checkpoint it created is gone
    expect(await virsh('domjobinfo', dom.name, '--completed')).toMatch(/Job type:\s+Cancelled/);
    expect(await checkpoints(dom.name)).toEqual(before);
    await dom.writeThroughDevice('vda', 0x73, 5, 1);
    const ref2 = await pausedCopy(dom, 'vda', join(work, `${dom.name}-after-cancel.ref.raw`));
    const next = await backup(dom, [target]);
    expect(next.chain).toMatchObject({ level: 'inc', parent: resumed.backupId });
    expect(await sameContents(await convertChain(target, dom, next.backupId, 'vda'), ref2)).toBe(true);
  });

  test('a disk hot-added between backups is copied whole inside the increment; the other disk is incremental', async () => {
    const dom = await newDomain({
      prefix: 'inc',
      acpi: true,
      disks: [{ format: 'qcow2', sizeMiB: 128, patterns: [{ byte: 0x81, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const target = await localTarget('hotadd');
    const full = await backup(dom, [target]);
    await dom.attachDisk({ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x82, offsetMiB: 0, lengthMiB: 4 }] });
    await dom.resolveDevices();
    await dom.writeThroughDevice('vda', 0x83, 20, 1);
    const refA = await pausedCopy(dom, 'vda', join(work, `${dom.name}-hot-vda.ref.raw`));
    const refB = await pausedCopy(dom, 'vdb', join(work, `${dom.name}-hot-vdb.ref.raw`));
    const inc = await backup(dom, [target]);
    expect(inc.chain).toMatchObject({ level: 'inc', parent: full.backupId });
    const m = await manifestAt(target, dom, inc.backupId);
    expect(m.disks.find((d) => d.name === 'vda')?.backing?.backupId).toBe(full.backupId);
    expect(m.disks.find((d) => d.name === 'vdb')?.backing).toBeUndefined();
    expect(await sameContents(await convertChain(target, dom, inc.backupId, 'vda'), refA)).toBe(true);
    expect(await sameContents(await convertChain(target, dom, inc.backupId, 'vdb'), refB)).toBe(true);
  });

  test('the parent deleted from one target: the next auto backup is a full, with the reason', async () => {
    const dom = await newDomain({
      prefix: 'inc',
      disks: [{ format: 'qcow2', sizeMiB: 128, patterns: [{ byte: 0x91, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const a = await localTarget('keep');
    const b = await localTarget('lose');
    await backup(dom, [a, b]);
    await dom.writeThroughDevice('vda', 0x92, 10, 1);
    const inc = await backup(dom, [a, b]);
    expect(inc.chain?.level).toBe('inc');
    await rm(join(fileURLToPath(b), dom.name, inc.backupId), { recursive: true, force: true });
    await dom.writeThroughDevice('vda', 0x93, 11, 1);
    const ref = await pausedCopy(dom, 'vda', join(work, `${dom.name}-lost-parent.ref.raw`));
    const next = await backup(dom, [a, b]);
    expect(next.chain?.level).toBe('full');
    expect(next.chain?.reason).toMatch(/targets disagree on the newest backup/);
    for (const t of [a, b])
      expect(await sameContents(await convertChain(t, dom, next.backupId, 'vda'), ref)).toBe(true);

    // and an image of a link damaged on the only target: full too
    await dom.writeThroughDevice('vda', 0x94, 12, 1);
    const inc2 = await backup(dom, [a]);
    expect(inc2.chain?.level).toBe('inc');
    const image = join(fileURLToPath(a), dom.name, inc2.backupId, 'vda.qcow2');
    await copyFile(image, `${image}.orig`);
    await run('truncate', ['-s', '+4096', image]);
    const after = await backup(dom, [a]);
    expect(after.chain?.level).toBe('full');
    expect(after.chain?.reason).toMatch(/is not the image its manifest records/);
  });
});
