/**
 * Ctrl-C and SIGTERM in the embedded default (no TEMPORAL_ADDRESS: the CLI is the host's only worker), and
 * `vmbackup cancel` of a backup whose CLI was killed. The signal goes to the CLI's whole process group, as a
 * terminal sends it. Whatever the moment, the VM ends on its own disks, no job, overlay or staging file is left,
 * and the workflow is closed as cancelled.
 */
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Client } from '@temporalio/client';
import { qemuWritableDir, SYSTEM_QEMU_DIR } from '../../src/activities/qemu-paths';
import { findBackup } from '../../src/client/backups';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { domblklist, exists, virsh } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import {
  embeddedEnv,
  runCli,
  spawnCli,
  startWorkerProcess,
  temporalClient,
  uniqueHost,
  waitFor,
} from '../helpers/vmbackup';
import type { CliProcess } from '../helpers/vmbackup';

const MiB = 1 << 20;
/** The bound for Ctrl-C: the undo steps run and the command exits well under this. */
const INTERRUPT_DEADLINE_MS = 10_000;

async function size(path: string): Promise<number> {
  return stat(path).then(
    (s) => s.size,
    () => -1,
  );
}

async function jobType(domain: string): Promise<string> {
  return /Job type:\s+(\S+)/.exec(await virsh('domjobinfo', domain))?.[1] ?? '';
}

describe('Ctrl-C, SIGTERM and cancel of a running backup', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let work: string;
  let qemuStateDir: string;
  /** what a failed test must not leave behind on the shared server: a running workflow, a CLI */
  const started: Array<{ cli?: CliProcess; backupId?: string }> = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-interrupt-'));
    qemuStateDir = await qemuWritableDir(stackEnv().stateDir, '.');
  });
  afterEach(async () => {
    for (const s of started.splice(0)) {
      s.cli?.signal('SIGKILL');
      if (!s.backupId) continue;
      const handle = await findBackup(client, s.backupId).catch(() => undefined);
      if (handle && (await handle.describe()).status.name === 'RUNNING') {
        // a failed test left it to nobody: end it, and drop the overlay the fixture's removal leaves behind
        await handle.terminate('test cleanup');
        await rm(join(qemuStateDir, 'overlays', s.backupId), { recursive: true, force: true });
        await rm(join(SYSTEM_QEMU_DIR, 'staging', s.backupId), { recursive: true, force: true });
      }
    }
  });
  afterAll(async () => {
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** Every place a staging dir of this backup can be: the local target's .staging, or the QEMU-reachable one. */
  async function stagingLeft(targetDir: string, backupId: string): Promise<string[]> {
    const candidates = [
      join(targetDir, '.staging', backupId),
      join(SYSTEM_QEMU_DIR, 'staging', backupId),
      join(stackEnv().stateDir, 'staging', backupId),
    ];
    const left: string[] = [];
    for (const c of candidates) if (await exists(c)) left.push(c);
    return left;
  }

  async function newTarget(name: string): Promise<{ url: string; dir: string }> {
    const dir = await mkdtemp(join(work, `${name}-`));
    return { url: pathToFileURL(dir).href, dir };
  }

  async function startEmbeddedBackup(
    dom: FixtureDomain,
    method: 'snapshot' | 'push',
    host: string,
  ): Promise<{ cli: CliProcess; backupId: string; target: { url: string; dir: string } }> {
    const target = await newTarget(method);
    const entry: { cli?: CliProcess; backupId?: string } = {};
    started.push(entry);
    const cli = spawnCli(['backup', dom.name, '--method', method, '--target', target.url], { env: embeddedEnv(host) });
    entry.cli = cli;
    const backupId = (await cli.line(/^(vmbt-\S+)$/m))[1]!;
    entry.backupId = backupId;
    return { cli, backupId, target };
  }

  async function interrupt(cli: CliProcess, signal: NodeJS.Signals) {
    const t0 = Date.now();
    cli.signal(signal);
    const exit = await cli.exited(INTERRUPT_DEADLINE_MS);
    return { ...exit, ms: Date.now() - t0 };
  }

  async function workflowStatus(backupId: string): Promise<string> {
    return (await (await findBackup(client, backupId)).describe()).status.name;
  }

  test('snapshot method, Ctrl-C while copying: the backup is cancelled, the VM back on its disk, nothing left', async () => {
    const dom = await newDomain({
      prefix: 'intr',
      guest: true,
      disks: [{ format: 'raw', sizeMiB: 1536, randomMiB: 1536 }],
    });
    const vda = dom.disks[0]!.path;
    const writes = await dom.waitForGuestWrites(1);
    const { cli, backupId, target } = await startEmbeddedBackup(dom, 'snapshot', uniqueHost('intr'));
    const copy = join(target.dir, '.staging', backupId, 'vda.raw');
    await waitFor('the copy of vda to run', async () => (await size(copy)) > 16 * MiB, { intervalMs: 20 });
    expect((await domblklist(dom.name)).vda).not.toBe(vda); // on its overlay now

    const exit = await interrupt(cli, 'SIGINT');

    expect(exit.ms).toBeLessThan(INTERRUPT_DEADLINE_MS);
    expect(exit.code).not.toBe(0);
    const lines = cli.stderr().trim().split('\n');
    expect(lines[lines.length - 1]).toMatch(
      new RegExp(`^vmbackup: interrupted: backup ${backupId} was cancelled; its undo steps ran`),
    );
    expect(await workflowStatus(backupId)).toBe('CANCELLED');
    expect(await domblklist(dom.name)).toEqual({ vda });
    expect(await exists(join(qemuStateDir, 'overlays', backupId))).toBe(false);
    expect(await stagingLeft(target.dir, backupId)).toEqual([]);
    expect(await dom.state()).toBe('running');
    // the guest still writes, to its own disk
    await dom.waitForGuestWrites(writes + 3);
    expect(await domblklist(dom.name)).toEqual({ vda });
  });

  test('push method, SIGTERM during the job: the job is aborted, staging removed, the workflow cancelled', async () => {
    const dom = await newDomain({ prefix: 'intr', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1536 }] });
    const before = await domblklist(dom.name);
    const { cli, backupId, target } = await startEmbeddedBackup(dom, 'push', uniqueHost('intr'));
    await waitFor('the backup job to run', async () => /Bounded|Unbounded/.test(await jobType(dom.name)), {
      intervalMs: 20,
    });

    const exit = await interrupt(cli, 'SIGTERM');

    expect(exit.ms).toBeLessThan(INTERRUPT_DEADLINE_MS);
    expect(exit.code).not.toBe(0);
    expect(cli.stderr().trim().split('\n').pop()).toMatch(
      new RegExp(`^vmbackup: interrupted: backup ${backupId} was cancelled; its undo steps ran`),
    );
    expect(await jobType(dom.name)).toBe('None');
    expect(await virsh('domjobinfo', dom.name, '--completed', '--keep-completed')).toMatch(/Job type:\s+Cancelled/);
    expect(await workflowStatus(backupId)).toBe('CANCELLED');
    expect(await stagingLeft(target.dir, backupId)).toEqual([]);
    expect(await dom.state()).toBe('running');
    expect(await domblklist(dom.name)).toEqual(before);
  });

  test('a second Ctrl-C says the undo steps still run; the command still waits for them', async () => {
    const dom = await newDomain({ prefix: 'intr', disks: [{ format: 'raw', sizeMiB: 1536, randomMiB: 1536 }] });
    const vda = dom.disks[0]!.path;
    const { cli, backupId, target } = await startEmbeddedBackup(dom, 'snapshot', uniqueHost('intr'));
    const copy = join(target.dir, '.staging', backupId, 'vda.raw');
    await waitFor('the copy of vda to run', async () => (await size(copy)) > 16 * MiB, { intervalMs: 20 });
    cli.signal('SIGINT');
    await waitFor('the first Ctrl-C to be taken', async () => /cancelling backup/.test(cli.stderr()), {
      timeoutMs: 5_000,
      intervalMs: 10,
    });
    cli.signal('SIGINT');
    const exit = await cli.exited(INTERRUPT_DEADLINE_MS);

    expect(cli.stderr()).toMatch(/still running the undo steps of backup \S+ \(\d+(\.\d)? s so far\)/);
    expect(exit.code).not.toBe(0);
    expect(await workflowStatus(backupId)).toBe('CANCELLED');
    expect(await domblklist(dom.name)).toEqual({ vda });
    expect(await stagingLeft(target.dir, backupId)).toEqual([]);
  });

  test('with a cluster (TEMPORAL_ADDRESS), Ctrl-C only detaches: the backup goes on and completes', async () => {
    const dom = await newDomain({ prefix: 'intr', disks: [{ format: 'qcow2', sizeMiB: 1024, randomMiB: 512 }] });
    const host = uniqueHost('intr');
    const worker = await startWorkerProcess(host);
    try {
      const target = await newTarget('detach');
      const entry: { cli?: CliProcess; backupId?: string } = {};
      started.push(entry);
      const cli = spawnCli(['backup', dom.name, '--host', host, '--target', target.url, '--wait']);
      entry.cli = cli;
      const backupId = (await cli.line(/^(vmbt-\S+)$/m))[1]!;
      entry.backupId = backupId;
      const exit = await interrupt(cli, 'SIGINT');

      expect(exit.code).toBe(130);
      expect(cli.stderr().trim().split('\n').pop()).toBe(
        `vmbackup: detached from backup ${backupId}, which goes on on host ${host}: follow it with ` +
          `\`vmbackup status ${backupId} --wait\`, stop it with \`vmbackup cancel ${backupId}\``,
      );
      const done = await runCli(['status', backupId, '--wait', '--json']);
      expect(done.code).toBe(0);
      expect(JSON.parse(done.stdout)).toMatchObject({ backupId, status: 'completed' });
    } finally {
      await worker.stop();
    }
  });

  test('kill -9 of the embedded CLI mid-copy, then `vmbackup cancel`: the VM is back on its disk, the workflow closed', async () => {
    const dom = await newDomain({ prefix: 'intr', disks: [{ format: 'raw', sizeMiB: 1536, randomMiB: 1536 }] });
    const vda = dom.disks[0]!.path;
    const host = uniqueHost('intr');
    const { cli, backupId, target } = await startEmbeddedBackup(dom, 'snapshot', host);
    const copy = join(target.dir, '.staging', backupId, 'vda.raw');
    await waitFor('the copy of vda to run', async () => (await size(copy)) > 16 * MiB, { intervalMs: 20 });
    cli.signal('SIGKILL');
    await cli.exited();
    expect((await domblklist(dom.name)).vda).not.toBe(vda); // left on its overlay: nobody undoes it yet
    expect(await workflowStatus(backupId)).toBe('RUNNING');

    const res = await runCli(['cancel', backupId], { env: embeddedEnv(host), timeoutMs: 300_000 });

    expect(res.stderr.trim()).toBe(`${backupId}: cancelled`);
    expect(res.code).toBe(0);
    expect(await workflowStatus(backupId)).toBe('CANCELLED');
    expect(await domblklist(dom.name)).toEqual({ vda });
    expect(await exists(join(qemuStateDir, 'overlays', backupId))).toBe(false);
    expect(await stagingLeft(target.dir, backupId)).toEqual([]);
    // nothing of the backup on the target (cleanupStaging leaves an empty `.staging` behind: not this test's matter)
    expect((await readdir(target.dir, { recursive: true })).filter((n) => n !== '.staging')).toEqual([]);
  });
});
