/**
 * A host's backup slots on the real stack (issue #13, test 3): `vmbackup worker --max-concurrent-backups 2` and six
 * VMs due at once (one scheduled run). libvirt is sampled (`virsh domjobinfo` of the six domains every ~100 ms):
 * never more than two backup jobs at a time; all six complete; `vmbackup status` of a waiting one says queued. The
 * backups' histories say the same: no more than two held a slot at any moment.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import type { Client } from '@temporalio/client';
import { findBackup } from '../../src/client/backups';
import { SEARCH_ATTRIBUTES } from '../../src/shared/names';
import { useFixtureDomains } from '../fixtures/domains';
import { virsh } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { runCli, startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { deleteSchedule, scheduleCli, scheduleEnv, uniqueScheduleName, waitForRuns } from '../helpers/schedules';

const run = promisify(execFile);
const VMS = 6;
const SLOTS = 2;

async function jobActive(domain: string): Promise<boolean> {
  const out = await virsh('domjobinfo', domain).catch(() => '');
  return /Job type:\s+(Bounded|Unbounded)/.test(out);
}

const ms = (t: { seconds?: unknown; nanos?: number | null } | null | undefined): number =>
  t ? Number(t.seconds ?? 0) * 1000 + (t.nanos ?? 0) / 1e6 : NaN;

describe('per-host backup slots (real stack)', () => {
  const newDomain = useFixtureDomains();
  const env = scheduleEnv();
  let client: Client;
  let closeClient: () => Promise<void>;
  let work: string;
  let worker: WorkerProcess | undefined;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-slots-'));
  });
  afterAll(async () => {
    await worker?.stop();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test(`--max-concurrent-backups ${SLOTS} with ${VMS} VMs due at once: never more than ${SLOTS} libvirt jobs, all complete, a waiting one is queued`, async () => {
    const host = uniqueHost('slot');
    // 512 MiB of random data each: a push job that reads it from a cold cache runs for a while under TCG
    const vms = await Promise.all(
      Array.from({ length: VMS }, () =>
        newDomain({ prefix: 's1slot', disks: [{ format: 'qcow2', sizeMiB: 512, randomMiB: 512 }] }),
      ),
    );
    worker = await startWorkerProcess(host, { env, args: ['--max-concurrent-backups', String(SLOTS)] });
    expect(worker.output()).toContain(`${SLOTS} backup slot(s)`);
    const target = pathToFileURL(await mkdtemp(join(work, 'six-'))).href;
    const name = uniqueScheduleName('slots');
    try {
      await scheduleCli(
        [
          'create',
          name,
          '--host',
          host,
          ...vms.flatMap((v) => ['--domain', v.name]),
          '--every',
          '1h',
          '--paused',
          '--method',
          'push',
          '--target',
          target,
          '--heartbeat-timeout',
          '10',
        ],
        env,
      );
      await run('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches']).catch(() => undefined);

      // libvirt, sampled every ~100 ms while the run goes on
      let sampling = true;
      let maxActive = 0;
      let samplesWithJobs = 0;
      const sampler = (async () => {
        while (sampling) {
          const active = (await Promise.all(vms.map((v) => jobActive(v.name)))).filter(Boolean).length;
          maxActive = Math.max(maxActive, active);
          if (active > 0) samplesWithJobs++;
          await new Promise((r) => setTimeout(r, 100));
        }
      })();

      // a backup waiting for a slot: `vmbackup status` says so
      let queuedSaid: string | undefined;
      const watcher = (async () => {
        while (sampling && !queuedSaid) {
          const waiting = client.workflow.list({
            query:
              `WorkflowType = 'backupDomain' AND ExecutionStatus = 'Running' AND ` +
              `${SEARCH_ATTRIBUTES.host} = '${host}' AND ${SEARCH_ATTRIBUTES.state} = 'queued'`,
          });
          for await (const wf of waiting) {
            const id = wf.searchAttributes[SEARCH_ATTRIBUTES.backupId]?.[0];
            if (typeof id !== 'string') continue;
            const r = await runCli(['status', id], { env });
            if (r.code === 0 && /queued/.test(r.stdout)) {
              queuedSaid = r.stdout.trim();
              break;
            }
          }
          await new Promise((r) => setTimeout(r, 200));
        }
      })();

      await scheduleCli(['trigger', name], env);
      const done = await waitForRuns(
        'the run of six backups',
        name,
        env,
        (d) => d.recentRuns.at(-1)?.status === 'completed',
      );
      sampling = false;
      await Promise.all([sampler, watcher]);

      const vmsDone = done.recentRuns.at(-1)!.result!.vms;
      expect(vmsDone.map((v) => v.status)).toEqual(Array(VMS).fill('completed'));
      console.log(`slots: at most ${maxActive} libvirt job(s) at once in ${samplesWithJobs} samples with jobs`);
      expect(samplesWithJobs).toBeGreaterThan(0); // the sampler saw the jobs
      expect(maxActive).toBeLessThanOrEqual(SLOTS);
      expect(queuedSaid).toMatch(new RegExp(`queued, waiting for one of host ${host}'s backup slots`));

      // The histories agree: each backup held its slot from the slotGranted signal to its end, and no more than
      // SLOTS of those spans overlap.
      const spans: Array<[number, number]> = [];
      for (const vm of vmsDone) {
        const handle = await findBackup(client, vm.backupId!);
        const events = (await handle.fetchHistory()).events ?? [];
        const granted = events.find((e) => e.workflowExecutionSignaledEventAttributes?.signalName === 'slotGranted');
        const closed = events.at(-1);
        expect(granted).toBeDefined();
        spans.push([ms(granted!.eventTime), ms(closed!.eventTime)]);
      }
      const overlapAt = (t: number) => spans.filter(([a, b]) => a <= t && t < b).length;
      expect(Math.max(...spans.map(([a]) => overlapAt(a)))).toBeLessThanOrEqual(SLOTS);
    } finally {
      await deleteSchedule(client, name);
    }
  });
});
