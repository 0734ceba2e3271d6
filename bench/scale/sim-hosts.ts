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
  /** retention steps (applyRetention) running for longer than `ms` now, with the step they are in */
  slowRetention(ms: number): Array<{ host: string; domain: string; step: string; runningS: number }>;
}

/**
 * Options of every worker here: a worker whose activity does not end (one that waits on a call without a deadline)
 * must not keep the bench from writing its results; the SDK's default waits for it forever.
 */
export const BENCH_WORKER_SHUTDOWN = { shutdownGraceTime: '5s', shutdownForceTime: '30s' } as const;

export async function createSimHosts(o: SimHostsOptions): Promise<SimHosts> {
  const targetEnv = targetEnvironmentFrom(process.env);
  // each retention step while it runs: which part of it (Temporal's visibility, or the prune on the target)
  const retaining = new Map<string, { host: string; domain: string; step: string; since: number }>();
  const out: SimHosts = {
    fakes: [],
    metrics: [],
    workers: [],
    slowRetention: (ms) =>
      [...retaining.values()]
        .filter((r) => Date.now() - r.since > ms)
        .map((r) => ({ host: r.host, domain: r.domain, step: r.step, runningS: (Date.now() - r.since) / 1000 })),
  };
  let seq = 0;
  const runningBackupOf = temporalRunningBackupOf(o.client);
  for (const [host, domains] of o.domainsOf) {
    const tracked = <A extends { applyRetention: (...a: never[]) => Promise<unknown> }>(acts: A): A => ({
      ...acts,
      applyRetention: (async (input: { domain: string }) => {
        const key = `${host}/${input?.domain}/${++seq}`;
        retaining.set(key, { host, domain: String(input?.domain), step: 'opening the target', since: Date.now() });
        try {
          return await (acts.applyRetention as (i: unknown) => Promise<unknown>)(input);
        } finally {
          retaining.delete(key);
        }
      }) as A['applyRetention'],
    });
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
        activities: tracked(
          createActivities({
            hypervisor: fake,
            stateDir,
            qemuStateDir: stateDir,
            systemQemuDir: join(o.root, 'qemu', host),
            allowTargets: [o.target],
            openTarget: (url, options) => openTarget(url, { ...options, env: targetEnv }),
            // retention after a scheduled backup asks Temporal whether a backup of the domain runs, as the worker does
            runningBackupOf: async (domain, exceptRunId) => {
              const r = [...retaining.values()].find((x) => x.host === host && x.domain === domain);
              if (r) r.step = 'visibility query (is a backup of the domain running?)';
              try {
                return await runningBackupOf(domain, exceptRunId);
              } finally {
                if (r) r.step = 'prune on the target';
              }
            },
          }),
        ),
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
        ...BENCH_WORKER_SHUTDOWN,
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
