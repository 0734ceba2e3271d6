/**
 * Push-mode backups end to end: real Temporal dev server, real libvirt/QEMU (TCG) domains,
 * a worker process per host that we kill -9, libvirtd and Temporal restarts, cancel.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { WorkflowFailedError } from '@temporalio/client';
import type { Client } from '@temporalio/client';
import { startBackup } from '../../src/client/backups';
import type { BackupResult } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv, stackScript } from '../helpers/stack';
import { runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { holds, identical, virsh } from '../helpers/images';
import { activityTimeline, runsOf } from '../helpers/history';

const run = promisify(execFile);

async function jobActive(domain: string): Promise<boolean> {
  const out = await virsh('domjobinfo', domain);
  return /Job type:\s+(Bounded|Unbounded)/.test(out);
}

/** A reference copy of a disk as it is now (the domain has no guest OS, so nothing writes to it). */
async function snapshotOf(path: string, dir: string, name: string): Promise<string> {
  const ref = join(dir, `${name}.ref.raw`);
  await run('qemu-img', ['convert', '-U', '-O', 'raw', path, ref]);
  return ref;
}

function imagePath(result: BackupResult, disk: string): string {
  const d = result.disks.find((x) => x.name === disk);
  if (!d) throw new Error(`no disk ${disk} in result`);
  return fileURLToPath(d.location);
}

describe('push-mode backup workflow', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let work: string;
  let worker: WorkerProcess | undefined;
  let host: string;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-push-'));
  });
  afterAll(async () => {
    await worker?.stop();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });
  beforeEach(async () => {
    host = uniqueHost('push');
    worker = await startWorkerProcess(host);
  });
  afterEach(async () => {
    await worker?.stop();
    worker = undefined;
  });

  async function backup(dom: FixtureDomain, target: string) {
    return startBackup(client, {
      domain: dom.name,
      host,
      method: 'push',
      targets: [target],
      options: { heartbeatTimeoutSeconds: 5 },
    });
  }

  async function newTarget(name: string): Promise<string> {
    return pathToFileURL(await mkdtemp(join(work, `${name}-`))).href;
  }

  test('two disks (qcow2 + raw) equal their state at job start while writes arrive during the job', async () => {
    const dom = await newDomain({
      prefix: 'push',
      disks: [
        // 2 GiB of data: under TCG the monitor answers slowly while the job runs (seen: 0.2-0.8 s per write),
        // so the job must outlast a few of them
        { format: 'qcow2', sizeMiB: 2048, randomMiB: 2048 },
        { format: 'raw', sizeMiB: 512, patterns: [{ byte: 0xab, offsetMiB: 0, lengthMiB: 256 }] },
      ],
    });
    const [vda, vdb] = dom.disks;
    if (!vda || !vdb) throw new Error('fixture has two disks');
    const refA = await snapshotOf(vda.path, work, `${dom.name}-vda`);
    const refB = await snapshotOf(vdb.path, work, `${dom.name}-vdb`);

    // A cold page cache makes the job read from disk: it then runs for seconds, not a blink. Still, the first
    // write must land quickly (seen: a job over before a dumpxml + monitor command went through): the device
    // aliases are read beforehand, so each write is a single monitor command.
    await dom.resolveDevices();
    await run('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches']).catch(() => undefined);
    const { handle } = await backup(dom, await newTarget('two-disks'));
    await waitFor('the backup job to start', () => jobActive(dom.name), { intervalMs: 5 });
    // Keep writing to both disks while the job runs; a write followed by a still-running job certainly
    // arrived during the job. The backup must hold none of them, the live disks all of them.
    const during = { vda: 0, vdb: 0 };
    let written = 0;
    for (let active = true; active && written < 16; written++) {
      for (const dev of ['vda', 'vdb'] as const) {
        await dom.writeThroughDevice(dev, 0xee, 100 + written * 4, 4);
        active = await jobActive(dom.name);
        if (active) during[dev]++;
      }
    }
    const result = await handle.result();
    console.log(`push two-disk test: ${during.vda} + ${during.vdb} writes landed while the job ran`);

    expect(during.vda).toBeGreaterThan(0); // the writes really landed while the job ran
    expect(result.status).toBe('completed');
    expect(result.method).toBe('push');
    expect(result.disks.map((d) => d.name).sort()).toEqual(['vda', 'vdb']);
    expect(await identical(imagePath(result, 'vda'), refA)).toBe(true);
    expect(await identical(imagePath(result, 'vdb'), refB)).toBe(true);
    // ... and the live disks hold the new writes, which the backup does not.
    expect(await holds(vda.path, 0xee, 100, written * 4)).toBe(true);
    expect(await holds(vdb.path, 0xee, 100, written * 4)).toBe(true);
    expect(await holds(imagePath(result, 'vdb'), 0xee, 100, 4)).toBe(false);
    expect(await dom.state()).toBe('running');
  });

  test('kill -9 of the worker during awaitBackupJob: a new worker finishes it with one backup job', async () => {
    const dom = await newDomain({ prefix: 'push', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const ref = await snapshotOf(dom.disks[0]!.path, work, `${dom.name}-vda`);
    const { handle } = await backup(dom, await newTarget('kill-worker'));
    await waitFor('the backup job to start', () => jobActive(dom.name), { intervalMs: 20 });
    await waitFor('awaitBackupJob to run', async () => {
      const d = await handle.describe();
      return d.raw.pendingActivities?.some((a) => a.activityType?.name === 'awaitBackupJob');
    });
    await worker!.kill9();
    worker = await startWorkerProcess(host);
    const result = await handle.result();

    expect(await identical(imagePath(result, 'vda'), ref)).toBe(true);
    const timeline = activityTimeline((await handle.fetchHistory()).events ?? []);
    expect(runsOf(timeline, 'beginPushBackup')).toHaveLength(1); // one backup job was ever started
    const awaits = runsOf(timeline, 'awaitBackupJob');
    expect(awaits).toHaveLength(1);
    // The retry after the kill is the same activity started again with attempt > 1.
    expect(awaits[0]?.attempts).toBeGreaterThan(1);
    expect(awaits[0]?.outcome).toBe('completed');
  });

  test('kill -9 of libvirtd during the job, then start it again: the backup completes', async () => {
    const dom = await newDomain({ prefix: 'push', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const ref = await snapshotOf(dom.disks[0]!.path, work, `${dom.name}-vda`);
    const { handle } = await backup(dom, await newTarget('kill-libvirtd'));
    await waitFor('the backup job to start', () => jobActive(dom.name), { intervalMs: 20 });
    const { stdout: pid } = await run('cat', ['/run/libvirtd.pid']);
    await run('kill', ['-9', pid.trim()]);
    await new Promise((r) => setTimeout(r, 2000));
    await stackScript('up', 'libvirt');
    const result = await handle.result();
    expect(result.status).toBe('completed');
    expect(await identical(imagePath(result, 'vda'), ref)).toBe(true);
    expect(await dom.state()).toBe('running');
  });

  test('restart of the Temporal server (same SQLite file) during a backup: it completes', async () => {
    const dom = await newDomain({ prefix: 'push', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const ref = await snapshotOf(dom.disks[0]!.path, work, `${dom.name}-vda`);
    const { handle, backupId } = await backup(dom, await newTarget('restart-temporal'));
    await waitFor('the backup job to start', () => jobActive(dom.name), { intervalMs: 20 });
    await stackScript('restart', 'temporal');
    // The client connection reconnects; the result call retries until the server answers again.
    const fresh = await temporalClient();
    try {
      const result = await waitFor(
        'the workflow result after the restart',
        async () => fresh.client.workflow.getHandle(handle.workflowId).result(),
        { timeoutMs: 300_000, intervalMs: 1000 },
      );
      expect(result.backupId).toBe(backupId);
      expect(await identical(imagePath(result, 'vda'), ref)).toBe(true);
    } finally {
      await fresh.close();
    }
  });

  test('domain destroyed mid-job: the workflow fails with a clear message and no staging file is left', async () => {
    const dom = await newDomain({ prefix: 'push', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const target = await newTarget('destroyed');
    const { handle } = await backup(dom, target);
    await waitFor('the backup job to start', () => jobActive(dom.name), { intervalMs: 20 });
    await dom.destroy();
    const err = await handle.result().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(WorkflowFailedError);
    expect(messages(err)).toMatch(new RegExp(`${dom.name}.*(stopped|disappeared|ended)`));
    expect(await leftovers(fileURLToPath(target))).toEqual([]);
  });

  test('cancel mid-job: job aborted, staging removed, VM still running on its disks', async () => {
    const dom = await newDomain({ prefix: 'push', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const before = await virsh('domblklist', dom.name);
    const target = await newTarget('cancel');
    const { handle, backupId } = await backup(dom, target);
    await waitFor('the backup job to start', () => jobActive(dom.name), { intervalMs: 20 });
    const cancelled = await runCli(['cancel', backupId, '--wait', '--json']);
    expect(cancelled.code).toBe(0);
    expect(JSON.parse(cancelled.stdout)).toEqual({ backupId, status: 'cancelled' });
    const err = await handle.result().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(WorkflowFailedError);
    expect((await handle.describe()).status.name).toBe('CANCELLED');
    expect(await jobActive(dom.name)).toBe(false);
    expect(await virsh('domjobinfo', dom.name, '--completed', '--keep-completed')).toMatch(/Job type:\s+Cancelled/);
    expect(await leftovers(fileURLToPath(target))).toEqual([]);
    expect(await dom.state()).toBe('running');
    expect(await virsh('domblklist', dom.name)).toEqual(before);
  });

  test('a shut-off domain is copied directly and the copy equals its disks', async () => {
    const dom = await newDomain({
      prefix: 'push',
      start: false,
      disks: [
        { format: 'qcow2', sizeMiB: 128, patterns: [{ byte: 0x5a, offsetMiB: 8, lengthMiB: 16 }] },
        { format: 'raw', sizeMiB: 64, patterns: [{ byte: 0x17, offsetMiB: 0, lengthMiB: 8 }] },
      ],
    });
    const { handle } = await backup(dom, await newTarget('offline'));
    const result = await handle.result();
    expect(result.method).toBe('offline');
    for (const d of dom.disks) expect(await identical(imagePath(result, d.dev), d.path)).toBe(true);
    expect(await dom.state()).toBe('shut off');
  });
});

function messages(err: unknown): string {
  const parts: string[] = [];
  for (let cur: unknown = err; cur instanceof Error; cur = (cur as { cause?: unknown }).cause) parts.push(cur.message);
  return parts.join(' | ');
}

/** Files under the target other than committed backups' own (staging debris). */
async function leftovers(dir: string): Promise<string[]> {
  const all = (await readdir(dir, { recursive: true })) as string[];
  return all.filter((p) => p.startsWith('.staging') && !p.endsWith('.staging'));
}
