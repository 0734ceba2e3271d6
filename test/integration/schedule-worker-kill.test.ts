/**
 * A scheduled backup whose host worker is killed (issue #13, test 2), on the real stack: the VM's host worker gets
 * kill -9 while the run's backup job runs in QEMU. While it is dead the schedule goes on (another host's worker
 * serves the control queue): the next run starts, ends and reports the VM skipped (its backup still runs). Once
 * the worker is back the killed backup completes, and the run after that backs the VM up again.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { findBackup } from '../../src/client/backups';
import { SEARCH_ATTRIBUTES } from '../../src/shared/names';
import type { BackupResult } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import { virsh } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { deleteSchedule, scheduleCli, scheduleEnv, uniqueScheduleName, waitForRuns } from '../helpers/schedules';
import type { RunView } from '../helpers/schedules';

/**
 * The schedule's interval, which is also how long a run waits for its backups. Each wait below is a multiple of it,
 * so it is short; it must still be well above one backup of the VM (a 1 GiB push backup takes 2-3 s here), or the
 * run after the killed backup would report the VM still running instead of completed.
 */
const EVERY_S = 10;

async function jobActive(domain: string): Promise<boolean> {
  return /Job type:\s+(Bounded|Unbounded)/.test(await virsh('domjobinfo', domain).catch(() => ''));
}

describe('a scheduled backup whose worker is killed (real stack)', () => {
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
    work = await mkdtemp(join(stackEnv().stateDir, 'test-schedule-kill-'));
  });
  afterAll(async () => {
    for (const w of workers) await w.stop();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('kill -9 of the host worker mid-job: the next run is not blocked, the backup completes once the worker is back, and the run after it backs the VM up', async () => {
    const hostA = uniqueHost('kila');
    const hostB = uniqueHost('kilb');
    const vm = await newDomain({ prefix: 's1kill', disks: [{ format: 'qcow2', sizeMiB: 1024, randomMiB: 1024 }] });
    let workerA = await startWorkerProcess(hostA, { env });
    workers.push(workerA, await startWorkerProcess(hostB, { env })); // B: the control queue while A is dead
    const target = pathToFileURL(await mkdtemp(join(work, 'kill-'))).href;
    const name = uniqueScheduleName('kill');
    const vmStatus = (r: RunView) => r.result?.vms.find((v) => v.domain === vm.name)?.status;
    try {
      await scheduleCli(
        [
          'create',
          name,
          '--domain',
          `${hostA}/${vm.name}`,
          '--every',
          `${EVERY_S}s`,
          '--method',
          'push',
          '--level',
          'full',
          '--target',
          target,
          '--heartbeat-timeout',
          '5',
        ],
        env,
      );

      // 1. the first run's backup job runs in QEMU, its worker waits in awaitBackupJob: kill -9
      const handle = await waitFor(
        "the scheduled backup's job",
        async (): Promise<WorkflowHandle | undefined> => {
          for await (const wf of client.workflow.list({
            query: `WorkflowType = 'backupDomain' AND ExecutionStatus = 'Running' AND ${SEARCH_ATTRIBUTES.host} = '${hostA}'`,
          })) {
            const h = client.workflow.getHandle(wf.workflowId, wf.runId);
            const d = await h.describe();
            const waiting = d.raw.pendingActivities?.some((a) => a.activityType?.name === 'awaitBackupJob');
            if (waiting && (await jobActive(vm.name))) return h;
          }
          return undefined;
        },
        { timeoutMs: (EVERY_S + 180) * 1000, intervalMs: 200 },
      );
      const killedAt = Date.now();
      await workerA.kill9();
      const backupId = String((await handle.describe()).searchAttributes[SEARCH_ATTRIBUTES.backupId]?.[0]);

      // 2. while host A has no worker, a later run starts, ends (host B's worker runs it) and reports the VM skipped
      const whileDead = await waitForRuns(
        'a run while the worker is dead',
        name,
        env,
        (d) => d.recentRuns.some((r) => Date.parse(r.takenAt) > killedAt && r.status === 'completed'),
        (2 * EVERY_S + 120) * 1000,
      );
      const runWhileDead = whileDead.recentRuns.find((r) => Date.parse(r.takenAt) > killedAt)!;
      expect(vmStatus(runWhileDead)).toBe('skipped');
      expect((await handle.describe()).status.name).toBe('RUNNING');

      // 3. the worker is back: the killed backup completes, stored on the target
      workerA = await startWorkerProcess(hostA, { env });
      workers.push(workerA);
      const result = (await (await findBackup(client, backupId)).result()) as BackupResult;
      expect(result.status).toBe('completed');
      const manifest = JSON.parse(
        await readFile(join(fileURLToPath(target), vm.name, backupId, 'manifest.json'), 'utf8'),
      ) as { host: string };
      expect(manifest.host).toBe(hostA);
      const closedAt = (await handle.describe()).closeTime!.getTime();

      // 4. the schedule is not blocked: a run taken after that backs the VM up again
      const after = await waitForRuns(
        'a run after the backup completed',
        name,
        env,
        (d) =>
          d.recentRuns.some(
            (r) => Date.parse(r.takenAt) > closedAt && r.status === 'completed' && vmStatus(r) === 'completed',
          ),
        (2 * EVERY_S + 180) * 1000,
      );
      const next = after.recentRuns.find((r) => Date.parse(r.takenAt) > closedAt && vmStatus(r) === 'completed')!;
      expect(next.result!.vms[0]!.backupId).not.toBe(backupId);
    } finally {
      await deleteSchedule(client, name);
    }
  });
});
