/**
 * The simulated hosts of the scale simulation (groups sim and schedule): for each host, what `vmbackup worker --host
 * H` runs there, over a fake hypervisor port (bench/scale/fake-hypervisor.ts) instead of libvirt: the worker of the
 * host's queue (vmbackup's own activities and the built workflow bundle) and the worker of its backup slots
 * (`--max-concurrent-backups`, src/worker/slots.ts). All hosts live in this one process.
 */
import { join } from 'node:path';
import type { Client } from '@temporalio/client';
import type { NativeConnection } from '@temporalio/worker';
import { Worker } from '@temporalio/worker';
import { createActivities } from '../../src/activities';
import { hostTaskQueue } from '../../src/shared/names';
import { createSlotWorker } from '../../src/worker';
import { createWorkerMetrics } from '../../src/worker/metrics';
import type { WorkerMetrics } from '../../src/worker/metrics';
import { temporalRunningBackupOf } from '../../src/worker/slots';
import { openTarget, targetEnvironmentFrom } from '../../src/storage/registry';
import { createFakeHypervisor } from './fake-hypervisor';
import type { FakeHypervisor } from './fake-hypervisor';

const MiB = 1 << 20;

export interface SimHostsOptions {
  native: NativeConnection;
  /** signals a backup its slot (the slot worker) and asks whether a backup runs (retention) */
  client: Client;
  bundle: string;
  /** domains per host */
  domainsOf: Map<string, string[]>;
  templateImage: string;
  /** where the hosts' state directories go (tmpfs) */
  root: string;
  target: string;
  jobMs: (domain: string) => number;
  /** activity slots, local activity slots and backup slots of each simulated host */
  hostSlots: number;
}

export interface SimHosts {
  fakes: FakeHypervisor[];
  metrics: WorkerMetrics[];
  /** every host's queue worker and slot worker */
  workers: Worker[];
}

export async function createSimHosts(o: SimHostsOptions): Promise<SimHosts> {
  const targetEnv = targetEnvironmentFrom(process.env);
  const out: SimHosts = { fakes: [], metrics: [], workers: [] };
  for (const [host, domains] of o.domainsOf) {
    const fake = createFakeHypervisor({
      domains,
      templateImage: o.templateImage,
      virtualSize: 64 * MiB,
      jobMs: o.jobMs,
    });
    out.fakes.push(fake);
    const stateDir = join(o.root, 'state', host);
    // each host's worker counts its backups as `vmbackup worker --metrics` does (the workflows' metrics sink)
    const m = createWorkerMetrics({ host });
    out.metrics.push(m);
    out.workers.push(
      await Worker.create({
        connection: o.native,
        namespace: 'default',
        taskQueue: hostTaskQueue(host),
        activities: createActivities({
          hypervisor: fake,
          stateDir,
          qemuStateDir: stateDir,
          systemQemuDir: join(o.root, 'qemu', host),
          allowTargets: [o.target],
          openTarget: (url, options) => openTarget(url, { ...options, env: targetEnv }),
          // retention after a scheduled backup asks Temporal whether a backup of the domain runs, as the worker does
          runningBackupOf: temporalRunningBackupOf(o.client),
        }),
        workflowBundle: { codePath: o.bundle },
        // A real host has its own cores; here 50 hosts share this process and two cores. Unbounded (`vmbackup
        // worker` allows 50 activities), 2,000 backups at once put thousands of activations and qemu-img runs in
        // flight in one event loop, workflow tasks miss their 10 s timeout and every retry replays the history
        // again: a collapse of the simulation, not of the cluster. So each simulated host takes a few at a time.
        maxConcurrentActivityTaskExecutions: o.hostSlots,
        maxConcurrentLocalActivityExecutions: o.hostSlots,
        maxConcurrentWorkflowTaskExecutions: 2,
        defaultHeartbeatThrottleInterval: '1s',
        sinks: m.sinks,
      }),
    );
    // the host's backup slots (`--max-concurrent-backups`): every backup waits for one first
    out.workers.push(
      await createSlotWorker({
        connection: o.native,
        namespace: 'default',
        host,
        maxConcurrentBackups: o.hostSlots,
        client: o.client,
      }),
    );
  }
  return out;
}
