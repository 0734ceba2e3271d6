/**
 * A snapshot-method backup killed for good (worker kill -9, workflow terminated) leaves the VM
 * on an overlay, and its staging directory. `vmbackup recover` (and a worker when it starts) commits
 * the overlay: the VM ends on its base image with every write, and the overlay is gone; the staging
 * directory is removed. What a backup that is still running owns is never touched, even when the
 * backup started after recovery did.
 */
import { execFile } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { chmod, lstat, lutimes, mkdir, mkdtemp, readdir, rm, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { tmpdir } from 'node:os';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { Client } from '@temporalio/client';
import type { WorkflowHandle } from '@temporalio/client';
import { NativeConnection, Worker } from '@temporalio/worker';
import { createActivities } from '../../src/activities';
import { HostPaths } from '../../src/activities/host-paths';
import { qemuWritableDir } from '../../src/activities/qemu-paths';
import { startBackup } from '../../src/client/backups';
import type { Hypervisor } from '../../src/hypervisor/port';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { RecoveryAction } from '../../src/shared/activities';
import { hostTaskQueue } from '../../src/shared/names';
import { openTarget } from '../../src/storage/registry';
import { temporalBackupStates } from '../../src/worker/backup-states';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { exists, holds } from '../helpers/images';

const run = promisify(execFile);

async function diskSource(domain: string): Promise<string> {
  const { stdout } = await run('virsh', ['-c', stackEnv().libvirt.uri, 'domblklist', domain]);
  const line = stdout.split('\n').find((l) => /^\s*vda\s/.test(l));
  return line?.trim().split(/\s+/)[1] ?? '';
}

/** Where a backup to the file:// target URL stages its images: `<target>/.staging/<backupId>/`. */
function stagingRoot(target: string): string {
  return join(fileURLToPath(target), '.staging');
}

/**
 * The real hypervisor, except that its first disks() call waits until released: a recovery that has started
 * (and, before per-backup checks, had already taken its list of running backups) but looked at no domain yet.
 */
function pausedBeforeFirstScan(hv: Hypervisor): { hypervisor: Hypervisor; reached: Promise<void>; release(): void } {
  let reach = () => {};
  let release = () => {};
  const reached = new Promise<void>((r) => (reach = r));
  const released = new Promise<void>((r) => (release = r));
  let first = true;
  const hypervisor = new Proxy(hv, {
    get(target, prop) {
      if (prop === 'disks') {
        return async (...args: Parameters<Hypervisor['disks']>) => {
          if (first) {
            first = false;
            reach();
            await released;
          }
          return target.disks(...args);
        };
      }
      const value: unknown = Reflect.get(target, prop, target);
      return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
    },
  });
  return { hypervisor, reached, release };
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
  const scratch: string[] = [];
  /** backups a failed test could leave running for good (their workers stop after this file) */
  const started: WorkflowHandle[] = [];
  afterAll(async () => {
    for (const h of started) await h.terminate('test over').catch(() => undefined);
    for (const w of workers) await w.stop();
    for (const dir of scratch) await rm(dir, { recursive: true, force: true });
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /**
   * Starts a snapshot backup, and kills it for good once the VM runs on the overlay (and, with `midCopy`,
   * once the copy into its staging directory has begun).
   */
  async function abandonedBackup(
    host: string,
    opts: { stateDir?: string; target?: string; midCopy?: boolean } = {},
  ): Promise<{ dom: FixtureDomain; base: string; overlay: string; backupId: string }> {
    const dom = await newDomain({ prefix: 'rec', disks: [{ format: 'qcow2', sizeMiB: 1024, randomMiB: 512 }] });
    const base = dom.disks[0]!.path;
    const env = opts.stateDir ? cliEnv({ VMBACKUP_STATE_DIR: opts.stateDir }) : undefined;
    const worker = await startWorkerProcess(host, { env });
    workers.push(worker);
    const { handle, backupId } = await startBackup(client, {
      domain: dom.name,
      host,
      method: 'snapshot',
      targets: [opts.target ?? pathToFileURL(join(work, host)).href],
      options: { heartbeatTimeoutSeconds: 5 },
    });
    const root = opts.stateDir ? join(opts.stateDir, 'overlays') : overlayRoot;
    const overlay = join(root, backupId, `${dom.name}.vda.qcow2`);
    await waitFor('the VM to run on its overlay', async () => (await diskSource(dom.name)) === overlay, {
      intervalMs: 20,
    });
    if (opts.midCopy) {
      const staging = join(stagingRoot(opts.target!), backupId, 'vda.qcow2');
      await waitFor('the copy to begin', async () => ((await stat(staging).catch(() => undefined))?.size ?? 0) > 0, {
        intervalMs: 20,
      });
    }
    await worker.kill9();
    await handle.terminate('test: the backup is abandoned for good');
    await dom.writeThroughDevice('vda', 0x7e, 600, 8); // lands in the overlay
    expect(await diskSource(dom.name)).toBe(overlay);
    return { dom, base, overlay, backupId };
  }

  test('vmbackup recover commits the overlay: VM on its base with every write, overlay removed', async () => {
    const host = uniqueHost('rec');
    const { dom, base, overlay } = await abandonedBackup(host);
    workers.push(await startWorkerProcess(host)); // --no-recover: the command does it
    // --domain: other test runs share this libvirt and state dir; their leftovers are theirs to recover
    const res = await runCli(['recover', '--host', host, '--domain', dom.name, '--json']);
    expect({ code: res.code, stderr: res.stderr }).toMatchObject({ code: 0 });
    const actions = JSON.parse(res.stdout) as Array<{ domain: string; disk: string; action: string; overlay: string }>;
    expect(actions).toContainEqual(
      expect.objectContaining({ domain: dom.name, disk: 'vda', action: 'committed', overlay }),
    );
    expect(await diskSource(dom.name)).toBe(base);
    expect(await holds(base, 0x7e, 600, 8)).toBe(true);
    expect(await exists(overlay)).toBe(false);
    expect(await dom.state()).toBe('running');

    // Nothing left: a second run has nothing to do.
    const again = await runCli(['recover', '--host', host, '--domain', dom.name, '--json']);
    expect(JSON.parse(again.stdout).filter((a: { domain: string }) => a.domain === dom.name)).toEqual([]);
  });

  test('a worker commits leftover overlays when it starts', async () => {
    const host = uniqueHost('rec');
    const { dom, base, overlay } = await abandonedBackup(host);
    const worker = await startWorkerProcess(host, { recover: true });
    workers.push(worker);
    await waitFor(
      'the worker to pivot the VM back to its base',
      async () => {
        if (/recover at start failed/.test(worker.output())) throw new Error(worker.output());
        return (await diskSource(dom.name)) === base;
      },
      { timeoutMs: 180_000, intervalMs: 250 },
    );
    expect(await holds(base, 0x7e, 600, 8)).toBe(true);
    await waitFor('the overlay to be removed', async () => !(await exists(overlay)));
  });

  test('a backup that starts while recover runs keeps its overlay and staging and completes; a dead one is undone', async () => {
    const { address, namespace } = stackEnv().temporal;
    const states = temporalBackupStates(client);
    // A state dir of this test's own (QEMU can reach it): nothing another test run leaves is in it.
    const state = await mkdtemp(join(tmpdir(), 'vmbt-rec-state-'));
    scratch.push(state);
    await chmod(state, 0o755);
    const env = cliEnv({ VMBACKUP_STATE_DIR: state });
    const target = pathToFileURL(join(state, 'backups')).href; // the default target: its .staging is scanned
    const roots = new HostPaths({ stateDir: state, systemQemuDir: join(state, 'system') }).recoveryStagingRoots(
      join(state, 'backups'),
    );

    // 1. a backup killed for good in the middle of its copy: a VM on an overlay, a half-full staging dir
    const dead = await abandonedBackup(uniqueHost('recd'), { stateDir: state, target, midCopy: true });
    const deadStaging = join(stagingRoot(target), dead.backupId);
    expect(await exists(deadStaging)).toBe(true);
    await waitFor('Temporal to show the dead backup closed', async () => (await states(dead.backupId)) === 'closed');

    // Staging-like entries: backups Temporal never knew, quiet for two hours (abandoned) or new (perhaps just
    // started: visibility can lag); a link and a file named like backups, which are no staging dirs of ours.
    const [stateStaging] = roots as [string];
    const gone = (n: number) => join(stateStaging, `vmbt-rec-gone-20200101T000000Z-000${n}`);
    const outside = join(state, 'outside');
    await mkdir(outside);
    await writeFile(join(outside, 'keep'), 'not staging');
    for (const dir of [gone(1), gone(2)]) {
      await mkdir(dir, { recursive: true });
      await writeFile(join(dir, 'vda.qcow2'), 'partial');
    }
    await symlink(outside, gone(3));
    await writeFile(gone(4), 'a file');
    const twoHoursAgo = new Date(Date.now() - 2 * 3600_000);
    for (const p of [join(gone(1), 'vda.qcow2'), gone(1), join(gone(2), 'vda.qcow2')]) {
      await utimes(p, twoHoursAgo, twoHoursAgo);
    }
    for (const p of [gone(3), gone(4), outside]) await lutimes(p, twoHoursAgo, twoHoursAgo);
    await utimes(gone(2), new Date(), new Date());

    // 2. the VM a backup will start on during the recovery, with data from before its backup point
    const dom = await newDomain({
      prefix: 'recl',
      disks: [
        { format: 'qcow2', sizeMiB: 1024, randomMiB: 512, patterns: [{ byte: 0x3c, offsetMiB: 700, lengthMiB: 8 }] },
      ],
    });
    const liveHost = uniqueHost('recl');
    workers.push(await startWorkerProcess(liveHost, { env }));

    // 3. recovery, served by a worker in this process whose first look at a domain waits for the test
    const recoverHost = uniqueHost('recr');
    const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri });
    const gate = pausedBeforeFirstScan(hv);
    const connection = await NativeConnection.connect({ address });
    let live: { backupId: string; handle: WorkflowHandle } | undefined;
    try {
      const worker = await Worker.create({
        connection,
        namespace,
        taskQueue: hostTaskQueue(recoverHost),
        workflowsPath: require.resolve('../../src/workflows'),
        activities: createActivities({
          hypervisor: gate.hypervisor,
          stateDir: state,
          qemuStateDir: state,
          openTarget: (url, options) => openTarget(url, options),
          backupStates: temporalBackupStates(new Client({ connection, namespace })),
          stagingRoots: roots,
        }),
      });
      const serving = worker.run();
      try {
        const recovery = runCli(['recover', '--host', recoverHost, '--json'], { env });
        await Promise.race([
          gate.reached,
          recovery.then((r) => {
            throw new Error(`recover ended (${r.code}) before it looked at any domain: ${r.stderr}`);
          }),
        ]);

        // 4. meanwhile a snapshot backup starts and its VM runs on its overlay; the guest writes after that
        live = await startBackup(client, {
          domain: dom.name,
          host: liveHost,
          method: 'snapshot',
          targets: [target],
          options: {},
        });
        started.push(live.handle);
        const liveOverlay = join(state, 'overlays', live.backupId, `${dom.name}.vda.qcow2`);
        await waitFor('the VM to run on its overlay', async () => (await diskSource(dom.name)) === liveOverlay, {
          intervalMs: 20,
        });
        await dom.writeThroughDevice('vda', 0x5b, 600, 8);
        gate.release();

        const res = await recovery;
        expect({ code: res.code, stderr: res.stderr }).toMatchObject({ code: 0 });
        const actions = JSON.parse(res.stdout) as RecoveryAction[];
        // nothing was done to the running backup, though it started after the recovery
        expect(actions.filter((a) => a.backupId === live!.backupId)).toEqual([]);
        expect(actions).toEqual(
          expect.arrayContaining([
            { domain: dead.dom.name, disk: 'vda', overlay: dead.overlay, backupId: dead.backupId, action: 'committed' },
            { domain: dead.dom.name, backupId: dead.backupId, staging: deadStaging, action: 'removed-staging' },
            { domain: 'vmbt-rec-gone', backupId: basename(gone(1)), staging: gone(1), action: 'removed-staging' },
          ]),
        );
        expect(actions.filter((a) => 'staging' in a)).toHaveLength(2);
      } finally {
        gate.release();
        worker.shutdown();
        await serving;
      }
    } finally {
      await connection.close();
      hv.close();
    }

    // the dead backup: VM on its base with every write, overlay and staging gone
    expect(await diskSource(dead.dom.name)).toBe(dead.base);
    expect(await holds(dead.base, 0x7e, 600, 8)).toBe(true);
    expect(await exists(dead.overlay)).toBe(false);
    expect(await exists(deadStaging)).toBe(false);
    // what is not (provably) a dead backup's staging dir is untouched
    expect(await readdir(gone(2))).toEqual(['vda.qcow2']);
    expect((await lstat(gone(3))).isSymbolicLink()).toBe(true);
    expect(await readdir(outside)).toEqual(['keep']);
    expect((await lstat(gone(4))).isFile()).toBe(true);

    // the running backup completes, with the disk as it was at its backup point
    const result = (await live.handle.result()) as { status: string };
    expect(result.status).toBe('completed');
    const image = join(state, 'backups', dom.name, live.backupId, 'vda.qcow2');
    expect(await holds(image, 0x3c, 700, 8)).toBe(true);
    expect(await holds(image, 0x5b, 600, 8)).toBe(false);
    expect(await diskSource(dom.name)).toBe(dom.disks[0]!.path);
    expect(await holds(dom.disks[0]!.path, 0x5b, 600, 8)).toBe(true);
    expect(await exists(join(stagingRoot(target), live.backupId))).toBe(false);
  });

  test('a running backup that this client cannot decode (another codec) does not stop recover', async () => {
    const host = uniqueHost('recm');
    workers.push(await startWorkerProcess(host));
    // as if started by someone with a payload codec this CLI lacks; no worker ever serves its queue
    const workflowId = `vmbackup-backup-${host}-vmbt-recm-foreign`;
    const { runId } = await client.workflowService.startWorkflowExecution({
      namespace: stackEnv().temporal.namespace,
      workflowId,
      workflowType: { name: 'backupDomain' },
      taskQueue: { name: hostTaskQueue(uniqueHost('nobody')) },
      memo: {
        fields: { backupId: { metadata: { encoding: Buffer.from('binary/encrypted') }, data: randomBytes(32) } },
      },
      identity: 'recover.test.ts',
      requestId: randomUUID(),
    });
    started.push(client.workflow.getHandle(workflowId, runId ?? undefined));
    const res = await runCli(['recover', '--host', host, '--domain', 'vmbt-recm-none', '--json']);
    expect({ code: res.code, stderr: res.stderr, stdout: res.stdout }).toEqual({ code: 0, stderr: '', stdout: '[]\n' });
  });
});
