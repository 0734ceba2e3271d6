/**
 * A snapshot-method backup killed for good (worker kill -9, workflow terminated) leaves the VM
 * on an overlay. `vmbackup recover` (and a worker when it starts) commits it: the VM ends on
 * its base image with every write, and the overlay is gone.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import type { Client } from '@temporalio/client';
import { qemuWritableDir } from '../../src/activities/qemu-paths';
import { startBackup } from '../../src/client/backups';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { exists, holds } from '../helpers/images';

const run = promisify(execFile);

async function diskSource(domain: string): Promise<string> {
  const { stdout } = await run('virsh', ['-c', stackEnv().libvirt.uri, 'domblklist', domain]);
  const line = stdout.split('\n').find((l) => /^\s*vda\s/.test(l));
  return line?.trim().split(/\s+/)[1] ?? '';
}

describe('recovery of overlays left by dead backups', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let work: string;
  let overlayRoot: string;
  const workers: WorkerProcess[] = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-recover-'));
    overlayRoot = join(await qemuWritableDir(stackEnv().stateDir, '.'), 'overlays');
  });
  afterAll(async () => {
    for (const w of workers) await w.stop();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** Starts a snapshot backup, and kills it for good once the VM runs on the overlay. */
  async function abandonedBackup(host: string): Promise<{ dom: FixtureDomain; base: string; overlay: string }> {
    const dom = await newDomain({ prefix: 'rec', disks: [{ format: 'qcow2', sizeMiB: 1024, randomMiB: 512 }] });
    const base = dom.disks[0]!.path;
    const worker = await startWorkerProcess(host);
    workers.push(worker);
    const { handle, backupId } = await startBackup(client, {
      domain: dom.name,
      host,
      method: 'snapshot',
      targets: [pathToFileURL(join(work, host)).href],
      options: { heartbeatTimeoutSeconds: 5 },
    });
    const overlay = join(overlayRoot, backupId, `${dom.name}.vda.qcow2`);
    await waitFor('the VM to run on its overlay', async () => (await diskSource(dom.name)) === overlay, {
      intervalMs: 20,
    });
    await worker.kill9();
    await handle.terminate('test: the backup is abandoned for good');
    await dom.writeThroughDevice('vda', 0x7e, 600, 8); // lands in the overlay
    expect(await diskSource(dom.name)).toBe(overlay);
    return { dom, base, overlay };
  }

  test('vmbackup recover commits the overlay: VM on its base with every write, overlay removed', async () => {
    const host = uniqueHost('rec');
    const { dom, base, overlay } = await abandonedBackup(host);
    workers.push(await startWorkerProcess(host)); // --no-recover: the command does it
    const res = await runCli(['recover', '--host', host, '--json']);
    expect(res.code).toBe(0);
    const actions = JSON.parse(res.stdout) as Array<{ domain: string; disk: string; action: string; overlay: string }>;
    expect(actions).toContainEqual(
      expect.objectContaining({ domain: dom.name, disk: 'vda', action: 'committed', overlay }),
    );
    expect(await diskSource(dom.name)).toBe(base);
    expect(await holds(base, 0x7e, 600, 8)).toBe(true);
    expect(await exists(overlay)).toBe(false);
    expect(await dom.state()).toBe('running');

    // Nothing left: a second run has nothing to do.
    const again = await runCli(['recover', '--host', host, '--json']);
    expect(JSON.parse(again.stdout).filter((a: { domain: string }) => a.domain === dom.name)).toEqual([]);
  });

  test('a worker commits leftover overlays when it starts', async () => {
    const host = uniqueHost('rec');
    const { dom, base, overlay } = await abandonedBackup(host);
    workers.push(await startWorkerProcess(host, { recover: true }));
    await waitFor('the worker to pivot the VM back to its base', async () => (await diskSource(dom.name)) === base, {
      timeoutMs: 180_000,
      intervalMs: 250,
    });
    expect(await holds(base, 0x7e, 600, 8)).toBe(true);
    await waitFor('the overlay to be removed', async () => !(await exists(overlay)));
  });
});
