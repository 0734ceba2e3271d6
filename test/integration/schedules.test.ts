/**
 * Scheduled backups on the real stack (issue #13, tests 1 and the group's run-time resolution): Temporal Schedules
 * start `scheduledBackups` runs on the test's own control queue; each VM's backup runs as a child on its own host's
 * worker process (two `vmbackup worker --host` processes on this machine, one libvirt); retention after each run;
 * pause, trigger and backfill through the CLI. Every schedule is deleted at the end of its test.
 */
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Client } from '@temporalio/client';
import { findBackup } from '../../src/client/backups';
import type { ScheduledVmResult } from '../../src/shared/schedule';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import {
  activityWorkers,
  deleteSchedule,
  describe as describeSchedule,
  scheduleCli,
  scheduleEnv,
  uniqueScheduleName,
  waitForRuns,
} from '../helpers/schedules';
import type { RunView } from '../helpers/schedules';

const EVERY_S = 15;

/** Manifests on a file:// target: domain -> backup ids (sorted), with each manifest's host. */
async function onTarget(target: string, domain: string): Promise<Array<{ backupId: string; host: string }>> {
  const dir = join(fileURLToPath(target), domain);
  const ids = await readdir(dir).catch(() => [] as string[]);
  const out: Array<{ backupId: string; host: string }> = [];
  for (const id of ids.sort()) {
    const text = await readFile(join(dir, id, 'manifest.json'), 'utf8').catch(() => undefined);
    if (text) out.push({ backupId: id, host: (JSON.parse(text) as { host: string }).host });
  }
  return out;
}

function vmOf(run: RunView, domain: string): ScheduledVmResult | undefined {
  return run.result?.vms.find((v) => v.domain === domain);
}

function completedFor(runs: RunView[], domain: string): RunView[] {
  return runs.filter((r) => r.status === 'completed' && vmOf(r, domain)?.status === 'completed');
}

describe('scheduled backups (real stack)', () => {
  const newDomain = useFixtureDomains();
  const env = scheduleEnv();
  let client: Client;
  let closeClient: () => Promise<void>;
  let work: string;
  const workers: WorkerProcess[] = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-schedules-'));
  });
  afterEach(async () => {
    for (const w of workers.splice(0)) await w.stop();
  });
  afterAll(async () => {
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  async function smallVm(prefix: string): Promise<FixtureDomain> {
    return newDomain({
      prefix,
      disks: [{ format: 'qcow2', sizeMiB: 16, patterns: [{ byte: 0x5a, offsetMiB: 1, lengthMiB: 2 }] }],
    });
  }

  test('two VMs on two hosts are backed up repeatedly, each on its own host; retention keeps the policy; pause stops runs, trigger runs one now, backfill runs the missed ones overlapping', async () => {
    const hostA = uniqueHost('scha');
    const hostB = uniqueHost('schb');
    const [vmA, vmB] = await Promise.all([smallVm('s1sched'), smallVm('s1sched')]);
    const [workerA, workerB] = await Promise.all([
      startWorkerProcess(hostA, { env }),
      startWorkerProcess(hostB, { env }),
    ]);
    workers.push(workerA, workerB);
    const target = pathToFileURL(await mkdtemp(join(work, 'two-hosts-'))).href;
    const name = uniqueScheduleName('two');
    const hostOf: Record<string, { host: string; worker: WorkerProcess }> = {
      [vmA.name]: { host: hostA, worker: workerA },
      [vmB.name]: { host: hostB, worker: workerB },
    };
    try {
      await scheduleCli(
        [
          'create',
          name,
          '--domain',
          `${hostA}/${vmA.name}`,
          '--domain',
          `${hostB}/${vmB.name}`,
          '--every',
          `${EVERY_S}s`,
          '--target',
          target,
          '--level',
          'full',
          '--keep-last',
          '2',
          '--heartbeat-timeout',
          '10',
        ],
        env,
      );

      // 1. repeatedly: three runs that backed up both VMs
      await waitForRuns(
        'three runs that backed up both VMs',
        name,
        env,
        (d) => completedFor(d.recentRuns, vmA.name).length >= 3 && completedFor(d.recentRuns, vmB.name).length >= 3,
        12 * EVERY_S * 1000 + 120_000,
      );

      // 2. pause: the run going on ends, then no new run starts for more than two intervals
      await scheduleCli(['pause', name, '--note', 'maintenance window'], env);
      const paused = await waitForRuns('the runs to end after the pause', name, env, (d) =>
        d.recentRuns.every((r) => r.status !== 'running'),
      );
      expect(paused.paused).toBe(true);
      expect(paused.note).toBe('maintenance window');
      const ranBefore = paused.actionsTaken;
      await new Promise((r) => setTimeout(r, (2 * EVERY_S + 5) * 1000));
      const stillPaused = await describeSchedule(name, env);
      expect(stillPaused.actionsTaken).toBe(ranBefore);
      expect(stillPaused.recentRuns.map((r) => r.workflowId)).toEqual(paused.recentRuns.map((r) => r.workflowId));

      // every VM's backups ran on its own host's worker, and its manifests name that host
      const runs = stillPaused.recentRuns;
      for (const vm of [vmA, vmB]) {
        const own = hostOf[vm.name]!;
        for (const run of completedFor(runs, vm.name)) {
          const result = vmOf(run, vm.name)!;
          expect(result.host).toBe(own.host);
          const handle = await findBackup(client, result.backupId!);
          const ids = await activityWorkers(client, handle.workflowId, (await handle.describe()).runId);
          expect([...ids]).toEqual([`${own.worker.child.pid}@${hostname()}`]);
        }
        // retention kept exactly the policy: the two newest backups of the VM, the others were removed and the
        // runs' results (their histories) say so
        const made = completedFor(runs, vm.name)
          .map((r) => vmOf(r, vm.name)!.backupId!)
          .sort();
        const stored = await onTarget(target, vm.name);
        expect(stored.map((s) => s.backupId)).toEqual(made.slice(-2));
        for (const s of stored) expect(s.host).toBe(own.host);
        const removed = runs.flatMap((r) =>
          (r.result?.retention ?? [])
            .filter((x) => x.domain === vm.name)
            .flatMap((x) => x.removed.map((b) => b.backupId)),
        );
        for (const id of made.slice(0, -2)) expect(removed).toContain(id);
        for (const id of made.slice(-2)) expect(removed).not.toContain(id);
      }

      // 3. trigger: a run now, although paused
      await scheduleCli(['trigger', name], env);
      const triggered = await waitForRuns(
        'the triggered run',
        name,
        env,
        (d) => d.actionsTaken === ranBefore + 1 && d.recentRuns.at(-1)?.status === 'completed',
      );
      const last = triggered.recentRuns.at(-1)!;
      expect(vmOf(last, vmA.name)?.status).toBe('completed');
      expect(vmOf(last, vmB.name)?.status).toBe('completed');
      expect((await onTarget(target, vmA.name)).map((s) => s.backupId)).toContain(vmOf(last, vmA.name)!.backupId);
      expect(await onTarget(target, vmA.name)).toHaveLength(2);

      // 4. backfill: the three runs due in a past window start now, all at once (overlap allowed: with the
      // schedule's own policy, skip, only one would); each VM is backed up by one of them, the others report
      // it skipped (one backup per VM and host at a time)
      const base = Math.floor(Date.now() / (EVERY_S * 1000)) * EVERY_S * 1000;
      const from = new Date(base - 4 * EVERY_S * 1000 + 5000);
      const to = new Date(base - 5000);
      const due = [3, 2, 1].map((k) => new Date(base - k * EVERY_S * 1000).toISOString());
      await scheduleCli(['backfill', name, '--from', from.toISOString(), '--to', to.toISOString()], env);
      const filled = await waitForRuns(
        'the backfilled runs',
        name,
        env,
        (d) => d.actionsTaken === ranBefore + 4 && d.recentRuns.slice(-3).every((r) => r.status === 'completed'),
      );
      const backfilled = filled.recentRuns.slice(-3);
      expect(backfilled.map((r) => r.scheduledAt).sort()).toEqual(due);
      const takenAt = backfilled.map((r) => Date.parse(r.takenAt));
      expect(Math.max(...takenAt) - Math.min(...takenAt)).toBeLessThan(EVERY_S * 1000);
      for (const vm of [vmA, vmB]) {
        const statuses = backfilled.map((r) => vmOf(r, vm.name)?.status);
        expect(statuses.filter((s) => s === 'completed').length).toBeGreaterThanOrEqual(1);
        for (const s of statuses) expect(['completed', 'skipped']).toContain(s);
      }
      expect(backfilled.flatMap((r) => r.result?.vms ?? []).some((v) => v.status === 'skipped')).toBe(true);
    } finally {
      await deleteSchedule(client, name);
    }
    const list = await scheduleCli(['list', '--json'], env);
    expect((JSON.parse(list.stdout) as Array<{ name: string }>).map((s) => s.name)).not.toContain(name);
  });

  test('--all --host H takes the domains libvirt has when the run starts: a VM added later is in the next run', async () => {
    const host = uniqueHost('scall');
    const tag = `s1all-${Math.random().toString(16).slice(2, 6)}`;
    const first = await smallVm(tag);
    workers.push(await startWorkerProcess(host, { env }));
    const target = pathToFileURL(await mkdtemp(join(work, 'all-'))).href;
    const name = uniqueScheduleName('all');
    try {
      await scheduleCli(
        [
          'create',
          name,
          '--all',
          '--host',
          host,
          '--match',
          `vmbt-${tag}-*`,
          '--every',
          '1h',
          '--paused',
          '--target',
          target,
        ],
        env,
      );
      await scheduleCli(['trigger', name], env);
      const one = await waitForRuns('the first run', name, env, (d) => d.recentRuns.at(-1)?.status === 'completed');
      expect(one.recentRuns.at(-1)!.result!.vms.map((v) => [v.host, v.domain, v.status])).toEqual([
        [host, first.name, 'completed'],
      ]);

      const second = await smallVm(tag);
      await scheduleCli(['trigger', name], env);
      const two = await waitForRuns(
        'the second run',
        name,
        env,
        (d) => d.actionsTaken === 2 && d.recentRuns.at(-1)?.status === 'completed',
      );
      expect(
        two.recentRuns
          .at(-1)!
          .result!.vms.map((v) => [v.host, v.domain, v.status])
          .sort(),
      ).toEqual(
        [
          [host, first.name, 'completed'],
          [host, second.name, 'completed'],
        ].sort(),
      );
      expect(await onTarget(target, second.name)).toHaveLength(1);
      expect(await onTarget(target, first.name)).toHaveLength(2);
    } finally {
      await deleteSchedule(client, name);
    }
  });
});
