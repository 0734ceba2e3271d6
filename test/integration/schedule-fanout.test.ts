/**
 * A scheduled run over 40 VMs (`--all --host H`), on the real stack: every VM is backed up (shut-off domains: the
 * direct copy, through the same host slots), retention runs for each, and the run's own history stays small — a
 * handful of events per VM, far below Temporal's 10k-event / 10 MB warnings — because the run is one workflow per
 * schedule action and each backup's steps are in the backup's own history.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Client } from '@temporalio/client';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { deleteSchedule, scheduleCli, scheduleEnv, uniqueScheduleName, waitForRuns } from '../helpers/schedules';

const VMS = 40;
/**
 * A bound on the run's events per VM: the child's initiated/started/completed (3), its retention activity's
 * scheduled/started/completed (3), and at worst a workflow task (3 events) after each of the child's start, its end
 * and the retention's end (9) — 15. Measured: 424 events for 40 VMs (10.6 each), 172 KB.
 */
const EVENTS_PER_VM = 16;

describe('a scheduled run over 40 VMs (real stack)', () => {
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
    work = await mkdtemp(join(stackEnv().stateDir, 'test-fanout-'));
  });
  afterAll(async () => {
    await worker?.stop();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test(`all ${VMS} VMs are backed up and retained; the run's history stays under ${EVENTS_PER_VM} events per VM`, async () => {
    const host = uniqueHost('fan');
    const tag = `s1fan-${Math.random().toString(16).slice(2, 6)}`;
    const vms: FixtureDomain[] = [];
    for (let i = 0; i < VMS; i += 8) {
      vms.push(
        ...(await Promise.all(
          Array.from({ length: Math.min(8, VMS - i) }, () =>
            newDomain({
              prefix: tag,
              start: false,
              disks: [{ format: 'qcow2', sizeMiB: 8, patterns: [{ byte: 0x11, offsetMiB: 0, lengthMiB: 1 }] }],
            }),
          ),
        )),
      );
    }
    worker = await startWorkerProcess(host, { env, args: ['--max-concurrent-backups', '4'] });
    const target = pathToFileURL(await mkdtemp(join(work, 'fan-'))).href;
    const name = uniqueScheduleName('fan');
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
          '--keep-last',
          '1',
          '--target',
          target,
        ],
        env,
      );
      await scheduleCli(['trigger', name], env);
      const d = await waitForRuns(
        `the run of ${VMS} backups`,
        name,
        env,
        (x) => x.recentRuns.at(-1)?.status === 'completed',
        900_000,
      );
      const runView = d.recentRuns.at(-1)!;
      const result = runView.result!;
      expect(result.vms.map((v) => v.domain).sort()).toEqual(vms.map((v) => v.name).sort());
      expect(result.vms.every((v) => v.status === 'completed')).toBe(true);
      expect(result.retention).toHaveLength(VMS);
      expect(result.retention.every((r) => r.error === undefined && r.kept === 1)).toBe(true);

      const info = (await client.workflow.getHandle(runView.workflowId, runView.runId).describe()).raw
        .workflowExecutionInfo!;
      const events = Number(info.historyLength);
      const bytes = Number(info.historySizeBytes);
      console.log(`a run of ${VMS} VMs: ${events} events, ${bytes} bytes of history`);
      expect(events).toBeLessThan(EVENTS_PER_VM * VMS);
      expect(bytes).toBeLessThan(1 << 20);
    } finally {
      await deleteSchedule(client, name);
    }
  });
});
