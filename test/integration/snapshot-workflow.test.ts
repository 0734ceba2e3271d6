/**
 * Snapshot-method backups end to end: real Temporal dev server, real libvirt/QEMU (TCG) domains, a
 * worker process we kill -9 at the dangerous moments (during the copy, right after the overlays were
 * made, right after the pivot). Whatever happens, the backup equals the disk at the snapshot, the VM
 * ends on its original images with every write, and no overlay is left.
 */
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { qemuWritableDir } from '../../src/activities/qemu-paths';
import { startBackup } from '../../src/client/backups';
import type { BackupResult } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { domblklist, exists, holds, identical, reference } from '../helpers/images';
import { activityTimeline, runsOf, slowToNoticeDeadWorker } from '../helpers/history';

const MiB = 1 << 20;

function imagePath(result: BackupResult, disk: string): string {
  const d = result.disks.find((x) => x.name === disk);
  if (!d) throw new Error(`no disk ${disk} in the result`);
  return fileURLToPath(d.location);
}

type Handle = WorkflowHandle;

async function timeline(handle: Handle) {
  return activityTimeline((await handle.fetchHistory()).events ?? []);
}

/** How often an activity (regular or local) was scheduled, and the highest attempt any of its runs reached. */
async function activityRuns(handle: Handle, name: string): Promise<{ scheduled: number; maxAttempt: number }> {
  const runs = runsOf(await timeline(handle), name);
  return { scheduled: runs.length, maxAttempt: Math.max(0, ...runs.map((r) => r.attempts)) };
}

async function completed(handle: Handle, name: string): Promise<boolean> {
  return runsOf(await timeline(handle), name).some((r) => r.outcome === 'completed');
}

describe('snapshot-method backup workflow', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let work: string;
  let worker: WorkerProcess | undefined;
  let host: string;
  /** 1 GiB of random data: a copy and a SHA-256 take seconds. Shared: each backup ends on the base again. */
  let big: FixtureDomain;
  let refs = 0;
  /** The worker keeps overlays where QEMU can open them (the state dir, or /var/lib/vmbackup when that is private). */
  let qemuStateDir: string;
  const overlaysOf = (backupId: string) => join(qemuStateDir, 'overlays', backupId);

  beforeAll(async () => {
    qemuStateDir = await qemuWritableDir(stackEnv().stateDir, '.');
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-snapwf-'));
    big = await newDomain({ prefix: 'snap', disks: [{ format: 'raw', sizeMiB: 1024, randomMiB: 1024 }] });
  });
  afterAll(async () => {
    await worker?.stop();
    await closeClient?.();
    await rm(work, { recursive: true, force: true });
  });
  beforeEach(async () => {
    host = uniqueHost('snap');
    worker = await startWorkerProcess(host);
  });
  afterEach(async () => {
    await worker?.stop();
    worker = undefined;
  });

  async function backup(dom: FixtureDomain) {
    const target = pathToFileURL(await mkdtemp(join(work, 'target-'))).href;
    const started = await startBackup(client, {
      domain: dom.name,
      host,
      method: 'snapshot',
      targets: [target],
      options: { heartbeatTimeoutSeconds: 5 },
    });
    return { ...started, staging: join(fileURLToPath(target), '.staging', started.backupId) };
  }

  async function restartWorker(): Promise<void> {
    await worker!.kill9();
    worker = await startWorkerProcess(host);
  }

  test('kill -9 of the worker during the copy: the copy resumes, the backup is the disk at the snapshot', async () => {
    const dom = big;
    const vda = dom.disks[0]!.path;
    const ref = await reference(vda, join(work, `ref-${++refs}.raw`));
    const { handle, backupId, staging } = await backup(dom);
    const overlay = join(overlaysOf(backupId), `${dom.name}.vda.qcow2`);
    await waitFor('the disk to run on its overlay', async () => (await domblklist(dom.name)).vda === overlay, {
      intervalMs: 20,
    });
    await dom.writeThroughDevice('vda', 0xee, 100, 4);
    await waitFor('a third of the copy', async () => (await stat(join(staging, 'vda.raw'))).size > 300 * MiB, {
      intervalMs: 10,
    });
    await restartWorker();
    await dom.writeThroughDevice('vda', 0xef, 200, 4);
    const result = await handle.result();

    expect(result.status).toBe('completed');
    expect(result.method).toBe('snapshot');
    expect(await identical(imagePath(result, 'vda'), ref)).toBe(true);
    expect(await domblklist(dom.name)).toEqual({ vda });
    expect(await holds(vda, 0xee, 100, 4)).toBe(true);
    expect(await holds(vda, 0xef, 200, 4)).toBe(true);
    expect(await exists(overlaysOf(backupId))).toBe(false);
    expect((await activityRuns(handle, 'createOverlays')).scheduled).toBe(1);
    expect((await activityRuns(handle, 'copyBaseImages')).maxAttempt).toBeGreaterThan(1);
  });

  test('kill -9 right after the overlays were created: no second overlay, the backup completes', async () => {
    const dom = await newDomain({
      prefix: 'snap',
      disks: [
        { format: 'qcow2', sizeMiB: 512, randomMiB: 256, patterns: [{ byte: 0x3c, offsetMiB: 400, lengthMiB: 8 }] },
      ],
    });
    const vda = dom.disks[0]!.path;
    const ref = await reference(vda, join(work, `ref-${++refs}.raw`));
    const { handle, backupId } = await backup(dom);
    await waitFor('createOverlays to complete', () => completed(handle, 'createOverlays'), { intervalMs: 20 });
    await restartWorker();
    await dom.writeThroughDevice('vda', 0xd2, 420, 4);
    const result = await handle.result();

    expect(await identical(imagePath(result, 'vda'), ref)).toBe(true);
    expect(await domblklist(dom.name)).toEqual({ vda });
    expect(await holds(vda, 0xd2, 420, 4)).toBe(true);
    expect(await holds(vda, 0x3c, 400, 8)).toBe(true);
    expect(await exists(overlaysOf(backupId))).toBe(false);
    expect((await activityRuns(handle, 'createOverlays')).scheduled).toBe(1);
  });

  test('kill -9 right after the pivot: the new worker finishes without a second commit', async () => {
    const dom = big;
    const vda = dom.disks[0]!.path;
    const ref = await reference(vda, join(work, `ref-${++refs}.raw`));
    const { handle, backupId } = await backup(dom);
    await waitFor('the disk to run on its overlay', async () => (await domblklist(dom.name)).vda !== vda, {
      intervalMs: 20,
    });
    await dom.writeThroughDevice('vda', 0xab, 300, 8);
    // Right after the pivot the workflow goes on at once (finalizeImages, shipImage, shipVmFiles, writeManifest:
    // each a few ms to seconds here), so the kill lands in whichever step runs then. Each of them must be retried
    // within seconds by the new worker, and none may commit a second time.
    await waitFor('commitAndPivot to complete', () => completed(handle, 'commitAndPivot'), {
      intervalMs: 20,
      timeoutMs: 240_000,
    });
    expect(await domblklist(dom.name)).toEqual({ vda });
    await restartWorker();
    const result = await handle.result();

    expect(await identical(imagePath(result, 'vda'), ref)).toBe(true);
    expect(await holds(vda, 0xab, 300, 8)).toBe(true);
    expect(await domblklist(dom.name)).toEqual({ vda });
    expect(await exists(overlaysOf(backupId))).toBe(false);
    expect(await activityRuns(handle, 'commitAndPivot')).toEqual({ scheduled: 1, maxAttempt: 1 });
    // every step the dead worker could have held is noticed within its heartbeat timeout (5 s here) or a minute; a
    // short step without one once held a CI run for its whole 5-minute start-to-close timeout
    expect(slowToNoticeDeadWorker((await handle.fetchHistory()).events ?? [], 60_000)).toEqual([]);
  });

  test('cancel during the copy: the undo step commits and pivots, no overlay is left', async () => {
    const dom = big;
    const vda = dom.disks[0]!.path;
    const { handle, backupId, staging } = await backup(dom);
    await waitFor('the copy to run', async () => (await stat(join(staging, 'vda.raw'))).size > 100 * MiB, {
      intervalMs: 10,
    });
    await dom.writeThroughDevice('vda', 0x99, 500, 4);
    await handle.cancel();
    await expect(handle.result()).rejects.toThrow();
    expect((await handle.describe()).status.name).toBe('CANCELLED');
    expect(await domblklist(dom.name)).toEqual({ vda });
    expect(await holds(vda, 0x99, 500, 4)).toBe(true);
    expect(await exists(overlaysOf(backupId))).toBe(false);
    expect(await exists(staging)).toBe(false);
    expect(await dom.state()).toBe('running');
  });
});
