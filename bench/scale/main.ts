/**
 * `npm run bench:scale` (bench/scale/run.sh): how vmbackup's orchestration scales, in two groups, each against a
 * Temporal dev server of its own (bench/scale/temporal-server.ts):
 *
 * - vms: real VMs on this machine. As many tiny BIOS-only TCG domains as fit (default 40: 32 MiB RAM, a 16 MiB
 *   qcow2 disk with 4 MiB of data), split over two host workers (`vmbackup worker --host A` and `--host B`, the
 *   built CLI as separate processes), all backups started at once (push, full, to a local file:// target): backups
 *   per minute, the workers' RSS, the time from each start request to the backup's start and first activity.
 * - sim: past this machine. 2,000 VMs on 50 host task queues; each host's worker runs vmbackup's own activities and
 *   workflows (createActivities, the built workflow bundle) over a fake hypervisor port whose push jobs sleep like a
 *   real job (--job-seconds, +-50 %) and leave a tiny real qcow2 image, shipping to a file:// target on tmpfs. All
 *   workers live in this process. Workflow start rate, end-to-end latency and its overhead over the job itself,
 *   history size per backup (events, bytes, state transitions: the database writes a cluster pays for).
 *
 * - schedule: the schedules' fan-out. The same simulated hosts (--sim-hosts, --sim-vms), each backed up by a Temporal
 *   Schedule of its own (`vmbackup schedule create host-H --all --host H --keep-last 1`, through
 *   src/client/schedules.ts), all due at the same calendar instant, a worker on the control queue as `vmbackup
 *   worker` serves it: the time from the schedule's action to each VM's backup start, the parent runs' start and
 *   history size (events and bytes per VM against Temporal's warnings), every backup completed and retained.
 *
 * In vms and sim backups are started directly (client.workflow.start, as `vmbackup backup` does). In sim every
 * backup is started before the hosts' workers poll (all VMs due at once); in schedule every worker polls from the
 * start. Each simulated host takes --host-slots activities and backups (its backup slots) at a time.
 *
 *   node $BUILD/bench/scale/main.js [--only vms,sim,schedule] [--vms N] [--sim-vms N] [--sim-hosts N] [--job-seconds S]
 *     [--start-concurrency N] [--host-slots N] [--deadline-min M] [--smoke] [--out DIR]
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, freemem, totalmem } from 'node:os';
import { join } from 'node:path';
import { Client, Connection } from '@temporalio/client';
import type { WorkflowHandle } from '@temporalio/client';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import type { InjectedSinks, LogLevel, LogMetadata } from '@temporalio/worker';
import { startBackup } from '../../src/client/backups';
import { createSchedule, defaultCatchupSeconds, scheduleHandle } from '../../src/client/schedules';
import type { VmbackupSinks } from '../../src/shared/events';
import { DEFAULT_CONTROL_TASK_QUEUE } from '../../src/shared/names';
import type { ScheduledBackupsResult } from '../../src/shared/schedule';
import { MAX_VMS_PER_RUN } from '../../src/workflows/scheduled';
import type { WorkerMetrics } from '../../src/worker/metrics';
import { cleanupStaleFixtures, createFixtureDomain } from '../../test/fixtures/domains';
import type { FixtureDomain } from '../../test/fixtures/domains';
import { activityTimeline } from '../../test/helpers/history';
import { requireLibvirt, stackEnv } from '../../test/helpers/stack';
import { must } from '../lib/measure';
import { REPO, startWorker } from '../lib/vmbackup';
import type { WorkerProcess } from '../lib/vmbackup';
import { BENCH_WORKER_SHUTDOWN, createSimHosts } from './sim-hosts';
import { processUsage, startDevServer } from './temporal-server';
import type { DevServer } from './temporal-server';

const MiB = 1 << 20;

interface Args {
  only?: Set<string>;
  vms: number;
  vmMemoryMiB: number;
  simVms: number;
  simHosts: number;
  jobSeconds: number;
  startConcurrency: number;
  /** sim, schedule: activity slots of each simulated host's worker (its local activities too) and its backup slots */
  hostSlots: number;
  /** stop waiting for the backups after this many minutes; the figures are those of the closed ones */
  deadlineMin: number;
  smoke: boolean;
  out: string;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    vms: 40,
    vmMemoryMiB: 32,
    simVms: 2000,
    simHosts: 50,
    jobSeconds: 20,
    startConcurrency: 64,
    hostSlots: 4,
    deadlineMin: 30,
    smoke: false,
    out: join(REPO, 'bench', 'results', 'scale'),
  };
  const num = (v: string | undefined, name: string) => {
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`${name} needs a positive number, not ${v}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--only') a.only = new Set((argv[++i] ?? '').split(','));
    else if (k === '--vms') a.vms = num(argv[++i], k);
    else if (k === '--vm-memory') a.vmMemoryMiB = num(argv[++i], k);
    else if (k === '--sim-vms') a.simVms = num(argv[++i], k);
    else if (k === '--sim-hosts') a.simHosts = num(argv[++i], k);
    else if (k === '--job-seconds') a.jobSeconds = num(argv[++i], k);
    else if (k === '--start-concurrency') a.startConcurrency = num(argv[++i], k);
    else if (k === '--host-slots') a.hostSlots = num(argv[++i], k);
    else if (k === '--deadline-min') a.deadlineMin = num(argv[++i], k);
    else if (k === '--out') a.out = argv[++i] ?? a.out;
    else if (k === '--smoke') a.smoke = true;
    else throw new Error(`unknown argument ${k}`);
  }
  if (a.smoke) Object.assign(a, { vms: 4, simVms: 100, simHosts: 5, jobSeconds: 2 });
  return a;
}

function log(line: string): void {
  process.stderr.write(`[scale ${new Date().toISOString().slice(11, 19)}] ${line}\n`);
}

/** Nearest-rank percentile (q in 0..1) of xs. */
export function percentile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

const summary = (xs: number[]) => ({
  median: percentile(xs, 0.5),
  p99: percentile(xs, 0.99),
  max: Math.max(...xs),
});

/** Runs fn over items with at most `limit` at a time. */
async function pool<T, R>(items: T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      for (let i = next++; i < items.length; i = next++) out[i] = await fn(items[i]!, i);
    }),
  );
  return out;
}

/** Peak RSS of some processes, sampled every 250 ms (VmHWM would include a start-up peak). */
function rssSampler(pids: () => number[]): { stop(): Promise<Record<number, number>> } {
  const peak: Record<number, number> = {};
  let busy = Promise.resolve();
  const timer = setInterval(() => {
    busy = busy.then(async () => {
      for (const pid of pids()) {
        const u = await processUsage(pid).catch(() => undefined);
        if (u) peak[pid] = Math.max(peak[pid] ?? 0, u.rssMiB);
      }
    });
  }, 250);
  return {
    stop: async () => {
      clearInterval(timer);
      await busy;
      return peak;
    },
  };
}

/** The 1, 5 and 15 minute load averages: other users' work on this shared machine shows here. */
async function loadAverage(): Promise<string> {
  return (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');
}

// ------------------------------------------------------------------------------------ what each backup took

interface BackupFigures {
  domain: string;
  host: string;
  status: string;
  /** request -> the workflow's WorkflowExecutionStarted event (the server created it) */
  toExecutionStartedMs: number;
  /** request -> the workflow's first task started on the host's worker (the backup's start) */
  toStartMs: number;
  /** request -> its first activity (inspectDomain) started */
  toFirstActivityMs: number;
  /** request -> workflow closed */
  endToEndMs: number;
  historyEvents: number;
  historyBytes: number;
  stateTransitions: number;
  /** why a backup that did not complete failed (the innermost cause's message) */
  failure?: string;
  workflowTaskTimeouts: number;
  retries: number;
  /** run time per activity type (start -> close, summed over its runs), and the workflow's time outside them */
  activityMs: Record<string, number>;
}

const tsMs = (t: { seconds?: unknown; nanos?: number | null } | null | undefined) =>
  t ? Number(t.seconds ?? 0) * 1000 + (t.nanos ?? 0) / 1e6 : NaN;

async function figuresOf(started: {
  domain: string;
  host: string;
  requestedAt: number;
  handle: WorkflowHandle;
}): Promise<BackupFigures> {
  const d = await started.handle.describe();
  const info = d.raw.workflowExecutionInfo;
  const history = await started.handle.fetchHistory();
  const events = history.events ?? [];
  const t0 = tsMs(events[0]?.eventTime as never);
  const firstTask = events.find((e) => e.workflowTaskStartedEventAttributes);
  const timeline = activityTimeline(events);
  // The backup's host slot (holdBackupSlot) is held for the whole backup and released without waiting for the
  // activity to acknowledge: its history has no start or close of it. Its wait is scheduled -> the slotGranted signal.
  const slot = timeline.activities.find((a) => a.name === 'holdBackupSlot');
  const steps = timeline.activities.filter((a) => a.name !== 'holdBackupSlot');
  const first = steps[0];
  const activityMs: Record<string, number> = {};
  for (const a of steps) activityMs[a.name] = (activityMs[a.name] ?? 0) + (a.closedAt - a.startedAt);
  activityMs['(outside activities)'] = timeline.workflowMs - coveredBy(steps);
  if (slot) {
    const granted = events.find((e) => e.workflowExecutionSignaledEventAttributes?.signalName === 'slotGranted');
    activityMs['(waiting for a backup slot)'] = tsMs(granted?.eventTime as never) - t0 - slot.scheduledAt;
  }
  // the waits in the task queues: activity tasks scheduled -> started, workflow tasks scheduled -> started
  const at = new Map<string, number>();
  let activityQueueMs = 0;
  let workflowTaskQueueMs = 0;
  let workflowTaskRunMs = 0;
  for (const e of events) {
    const t = tsMs(e.eventTime as never);
    if (e.activityTaskScheduledEventAttributes) at.set(`a${String(e.eventId)}`, t);
    if (e.activityTaskStartedEventAttributes) {
      activityQueueMs += t - (at.get(`a${String(e.activityTaskStartedEventAttributes.scheduledEventId)}`) ?? t);
    }
    if (e.workflowTaskScheduledEventAttributes) at.set(`w${String(e.eventId)}`, t);
    if (e.workflowTaskStartedEventAttributes) {
      const sched = at.get(`w${String(e.workflowTaskStartedEventAttributes.scheduledEventId)}`) ?? t;
      workflowTaskQueueMs += t - sched;
      at.set(`s${String(e.eventId)}`, t);
    }
    if (e.workflowTaskCompletedEventAttributes) {
      workflowTaskRunMs += t - (at.get(`s${String(e.workflowTaskCompletedEventAttributes.startedEventId)}`) ?? t);
    }
  }
  activityMs['(activity tasks queued)'] = activityQueueMs;
  activityMs['(workflow tasks queued)'] = workflowTaskQueueMs;
  activityMs['(workflow tasks running, local activities included)'] = workflowTaskRunMs;
  // what went wrong on the way, even in a backup that completed: workflow tasks that timed out (the worker did not
  // answer within 10 s) and activity attempts beyond the first
  const workflowTaskTimeouts = events.filter((e) => e.workflowTaskTimedOutEventAttributes).length;
  const retries = timeline.activities.reduce((n, a) => n + Math.max(0, a.attempts - 1), 0);
  const failure =
    d.status.name === 'COMPLETED' || d.status.name === 'RUNNING'
      ? undefined
      : await started.handle.result().then(
          () => 'completed after all',
          (err: unknown) => failureSentence(err),
        );
  return {
    domain: started.domain,
    host: started.host,
    status: d.status.name,
    ...(failure ? { failure } : {}),
    workflowTaskTimeouts,
    retries,
    toExecutionStartedMs: t0 - started.requestedAt,
    toStartMs: tsMs(firstTask?.eventTime as never) - started.requestedAt,
    toFirstActivityMs: first ? t0 + first.startedAt - started.requestedAt : NaN,
    endToEndMs: (d.closeTime?.getTime() ?? NaN) - started.requestedAt,
    historyEvents: Number(info?.historyLength ?? 0),
    historyBytes: Number(info?.historySizeBytes ?? 0),
    stateTransitions: Number(info?.stateTransitionCount ?? 0),
    activityMs,
  };
}

/** The innermost cause of a workflow failure, e.g. the activity's own sentence. */
function failureSentence(err: unknown): string {
  let e = err as { message?: string; cause?: unknown } | undefined;
  let message = String(e?.message ?? err);
  while (e?.cause) {
    e = e.cause as { message?: string; cause?: unknown };
    if (e?.message) message = e.message;
  }
  return message;
}

/** The time covered by at least one activity run (targets ship in parallel). */
function coveredBy(spans: Array<{ startedAt: number; closedAt: number }>): number {
  const iv = spans.map((a) => [a.startedAt, a.closedAt] as const).sort((x, y) => x[0] - y[0]);
  let covered = 0;
  let s = -Infinity;
  let e = -Infinity;
  for (const [a, b] of iv) {
    if (a > e) {
      if (e > s) covered += e - s;
      s = a;
      e = b;
    } else e = Math.max(e, b);
  }
  if (e > s) covered += e - s;
  return covered;
}

/** Starts one backup per (domain, host), `limit` requests in flight; returns when every start was accepted. */
async function startAll(
  client: Client,
  vms: Array<{ domain: string; host: string }>,
  target: string,
  limit: number,
): Promise<{
  started: Array<{ domain: string; host: string; requestedAt: number; handle: WorkflowHandle }>;
  ms: number;
}> {
  const t0 = Date.now();
  const started = await pool(vms, limit, async (vm) => {
    const requestedAt = Date.now();
    const { handle } = await startBackup(client, {
      domain: vm.domain,
      host: vm.host,
      method: 'push',
      targets: [target],
      options: { level: 'full' },
    });
    return { ...vm, requestedAt, handle: handle as unknown as WorkflowHandle };
  });
  return { started, ms: Date.now() - t0 };
}

/** Waits until no backup runs or the deadline (ms since the epoch) passes; the count of those still running. */
async function waitAllClosed(client: Client, total: number, what: string, deadline = Infinity): Promise<number> {
  let last = -1;
  for (;;) {
    const running = (await client.workflow.count(`WorkflowType = 'backupDomain' AND ExecutionStatus = 'Running'`))
      .count;
    if (running !== last) log(`${what}: ${total - running} of ${total} closed`);
    last = running;
    if (running === 0) return 0;
    if (Date.now() > deadline) {
      log(`${what}: deadline passed with ${running} backups still running; figures of the closed ones`);
      return running;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function backupsSummary(all: BackupFigures[], makespanMs: number) {
  const failed = all.filter((b) => b.status !== 'COMPLETED');
  const reasons = new Map<string, number>();
  for (const b of failed) {
    const why = `${b.status}: ${b.failure ?? '?'}`.replace(
      /simvm-\d+|vmbt-scale-[0-9a-f]+|\S+-\d{8}T\d{6}Z-[0-9a-f]{4}/g,
      '<vm>',
    );
    reasons.set(why, (reasons.get(why) ?? 0) + 1);
  }
  return {
    backups: all.length,
    failed: failed.length,
    ...(failed.length ? { failures: Object.fromEntries(reasons) } : {}),
    backupsWithWorkflowTaskTimeouts: all.filter((b) => b.workflowTaskTimeouts > 0).length,
    backupsWithActivityRetries: all.filter((b) => b.retries > 0).length,
    makespanS: makespanMs / 1000,
    backupsPerMinute: (all.length * 60_000) / makespanMs,
    requestToStartMs: summary(all.map((b) => b.toStartMs)),
    requestToFirstActivityMs: summary(all.map((b) => b.toFirstActivityMs)),
    endToEndMs: summary(all.map((b) => b.endToEndMs)),
    historyEvents: summary(all.map((b) => b.historyEvents)),
    historyBytes: summary(all.map((b) => b.historyBytes)),
    stateTransitions: summary(all.map((b) => b.stateTransitions)),
    // where a backup's time goes: median per activity type over the backups
    medianMsPerActivity: Object.fromEntries(
      [...new Set(all.flatMap((b) => Object.keys(b.activityMs)))].map((name) => [
        name,
        Math.round(
          percentile(
            all.map((b) => b.activityMs[name] ?? 0),
            0.5,
          ),
        ),
      ]),
    ),
  };
}

// ------------------------------------------------------------------------------------ group vms: real VMs

async function memAvailableMiB(): Promise<number> {
  const m = /^MemAvailable:\s+(\d+)/m.exec(await readFile('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) / 1024 : freemem() / MiB;
}

async function runVms(args: Args, work: string): Promise<Record<string, unknown>> {
  await requireLibvirt();
  await cleanupStaleFixtures('scale');
  // as many as fit: each domain costs its RAM plus ~60 MiB of QEMU (TCG) itself; 2 GiB stay free for everyone else
  const fit = Math.floor(((await memAvailableMiB()) - 2048) / (args.vmMemoryMiB + 60));
  const n = Math.max(2, Math.min(args.vms, fit));
  if (n < args.vms) log(`vms: ${args.vms} asked, ${n} fit in the memory available now`);
  const server = await startDevServer(REPO, join(work, 'vms-temporal.db'), log);
  const hosts = [`scale-a-${randomBytes(2).toString('hex')}`, `scale-b-${randomBytes(2).toString('hex')}`];
  const targetDir = join(work, 'vms-target');
  await mkdir(targetDir, { recursive: true });
  const target = `file://${targetDir}`;
  const domains: FixtureDomain[] = [];
  const workers: WorkerProcess[] = [];
  const connection = await Connection.connect({ address: server.address });
  const client = new Client({ connection, namespace: 'default' });
  try {
    const t = Date.now();
    await pool(
      Array.from({ length: n }, (_, i) => i),
      4,
      async () => {
        domains.push(
          await createFixtureDomain({
            prefix: 'scale',
            memoryMiB: args.vmMemoryMiB,
            disks: [{ format: 'qcow2', sizeMiB: 16, patterns: [{ byte: 0xa5, offsetMiB: 0, lengthMiB: 4 }] }],
          }),
        );
      },
    );
    log(`vms: ${n} domains defined and started in ${((Date.now() - t) / 1000).toFixed(1)} s`);
    const env = { TEMPORAL_ADDRESS: server.address, VMBACKUP_ALLOW_TARGETS: target };
    for (const h of hosts) workers.push(await startWorker(h, { env }));
    await new Promise((r) => setTimeout(r, 3000)); // settle after start-up
    const idle = await Promise.all(workers.map((w) => w.meter.read()));
    for (const w of workers) await w.meter.reset();
    const serverBefore = await server.usage();
    const sampler = rssSampler(() => [...workers.map((w) => w.child.pid as number), server.pid]);
    const load = await loadAverage();

    const vms = domains.map((d, i) => ({ domain: d.name, host: hosts[i % 2]! }));
    const t0 = Date.now();
    const { started, ms: startMs } = await startAll(client, vms, target, n);
    log(`vms: ${n} backups started in ${startMs} ms`);
    await Promise.allSettled(started.map((s) => s.handle.result()));
    const peaks = await sampler.stop();
    const used = await Promise.all(workers.map((w) => w.meter.read()));
    const serverAfter = await server.usage();
    const figures = await pool(started, 8, (s) => figuresOf(s));
    const lastClose = Math.max(...figures.map((f, i) => started[i]!.requestedAt + f.endToEndMs));
    const result = {
      domains: n,
      domainMemoryMiB: args.vmMemoryMiB,
      hosts: 2,
      loadAverageAtStart: load,
      loadAverageAtEnd: await loadAverage(),
      startRequestsMs: startMs,
      ...backupsSummary(figures, lastClose - t0),
      workers: workers.map((w, i) => ({
        host: w.host,
        idleRssMiB: idle[i]!.rssMiB,
        peakRssMiB: peaks[w.child.pid as number] ?? NaN,
        cpuS: used[i]!.cpuMs / 1000,
      })),
      temporalServer: {
        peakRssMiB: peaks[server.pid] ?? NaN,
        cpuS: (serverAfter.cpuMs - serverBefore.cpuMs) / 1000,
        cpuMsPerBackup: (serverAfter.cpuMs - serverBefore.cpuMs) / n,
        writtenKiBPerBackup: (serverAfter.writeBytes - serverBefore.writeBytes) / 1024 / n,
      },
    };
    // recorded with their reasons (the figures of the others still count), and the run exits 1
    if (result.failed > 0) {
      log(`vms: ${result.failed} backups did not complete: ${JSON.stringify(result.failures)}`);
      process.exitCode = 1;
    }
    return result;
  } finally {
    for (const w of workers) await w.stop();
    await pool(domains, 4, (d) => d.cleanup());
    await connection.close();
    await server.stop();
    await rm(targetDir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------------------------ group sim: 2,000 VMs

/** vmbackup_backup_success_total over every host's registry (each counts the backups its worker ran). */
async function successTotal(metrics: WorkerMetrics[]): Promise<number> {
  let n = 0;
  for (const m of metrics) {
    const c = m.registry.getSingleMetric('vmbackup_backup_success_total') as
      { get(): Promise<{ values: Array<{ value: number }> }> } | undefined;
    for (const v of (await c?.get())?.values ?? []) n += v.value;
  }
  return n;
}

/** A small deterministic PRNG (mulberry32): the same job lengths on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

async function runSim(args: Args, work: string): Promise<Record<string, unknown>> {
  const bundle = join(REPO, 'dist', 'workflow-bundle.js');
  if (!existsSync(bundle)) throw new Error(`${bundle} is missing: run npm run build`);
  const shm = await mkdtemp('/dev/shm/vmbackup-scale-'); // tmpfs: the target and the images
  const targetDir = join(shm, 'target');
  await mkdir(targetDir, { recursive: true });
  const target = `file://${targetDir}`;
  const template = join(shm, 'template.qcow2');
  await must('qemu-img', ['create', '-q', '-f', 'qcow2', template, '64M']);
  const random = prng(13);
  const jobMs = new Map<string, number>();
  const run = randomBytes(2).toString('hex');
  const hosts = Array.from({ length: args.simHosts }, (_, i) => `sim-${run}-h${String(i).padStart(3, '0')}`);
  const vms = Array.from({ length: args.simVms }, (_, i) => ({
    domain: `simvm-${String(i).padStart(5, '0')}`,
    host: hosts[i % hosts.length]!,
  }));
  for (const vm of vms) jobMs.set(vm.domain, Math.round(args.jobSeconds * 1000 * (0.5 + random())));

  const server: DevServer = await startDevServer(REPO, join(work, 'sim-temporal.db'), log);
  const native = await NativeConnection.connect({ address: server.address });
  const connection = await Connection.connect({ address: server.address });
  const client = new Client({ connection, namespace: 'default' });
  let workers: Worker[] = [];
  const runs: Array<Promise<void>> = [];
  const rssBefore = process.memoryUsage().rss / MiB;
  try {
    const t = Date.now();
    const domainsOf = new Map(hosts.map((h) => [h, vms.filter((v) => v.host === h).map((v) => v.domain)]));
    const sim = await createSimHosts({
      native,
      client,
      bundle,
      domainsOf,
      templateImage: template,
      root: shm,
      target,
      jobMs: (domain) => jobMs.get(domain) ?? args.jobSeconds * 1000,
      hostSlots: args.hostSlots,
    });
    const { fakes, metrics } = sim;
    workers = sim.workers;
    const rssWorkers = process.memoryUsage().rss / MiB;
    log(
      `sim: ${hosts.length} host workers in this process (${Math.round(rssWorkers - rssBefore)} MiB) in ${((Date.now() - t) / 1000).toFixed(1)} s`,
    );

    const serverBefore = await server.usage();
    const cpuBefore = await processUsage(process.pid);
    const sampler = rssSampler(() => [process.pid, server.pid]);
    const load = await loadAverage();
    // every VM due at once (a nightly run): all backups are started before any host's worker polls, so the start
    // rate is the server's alone; then the hosts drain their task queues
    const t0 = Date.now();
    const { started, ms: startMs } = await startAll(client, vms, target, args.startConcurrency);
    log(
      `sim: ${vms.length} backups started in ${(startMs / 1000).toFixed(1)} s (${Math.round((vms.length * 1000) / startMs)}/s)`,
    );
    const workersAt = Date.now();
    for (const w of workers) runs.push(w.run());
    const stillRunning = await waitAllClosed(client, vms.length, 'sim', t0 + args.deadlineMin * 60_000);
    const peaks = await sampler.stop();
    const cpuAfter = await processUsage(process.pid);
    const serverAfter = await server.usage();
    const all = await pool(started, 16, async (s) => ({ s, f: await figuresOf(s) }));
    const closed = all.filter((x) => x.f.status !== 'RUNNING');
    const figures = closed.map((x) => x.f);
    const lastClose = Math.max(...closed.map((x) => x.s.requestedAt + x.f.endToEndMs));
    const overhead = figures.map((f) => f.endToEndMs - (jobMs.get(f.domain) ?? 0));
    const result = {
      vms: vms.length,
      hosts: hosts.length,
      hostSlots: args.hostSlots,
      jobSeconds: { mean: args.jobSeconds, min: args.jobSeconds * 0.5, max: args.jobSeconds * 1.5 },
      startConcurrency: args.startConcurrency,
      loadAverageAtStart: load,
      loadAverageAtEnd: await loadAverage(),
      startRequestsS: startMs / 1000,
      workflowStartsPerSecond: (vms.length * 1000) / startMs,
      // the hosts' workers poll from the end of the start requests on: that wait is in requestToStartMs
      workersPollingFromS: (workersAt - t0) / 1000,
      ...(stillRunning ? { stillRunningAtDeadline: stillRunning, deadlineMin: args.deadlineMin } : {}),
      ...backupsSummary(figures, lastClose - t0),
      overheadOverJobMs: summary(overhead),
      jobsBegun: fakes.reduce((n, f) => n + f.jobsBegun(), 0),
      // what the workers' /metrics would say: vmbackup_backup_success_total summed over hosts and domains
      metricsSuccessTotal: await successTotal(metrics),
      benchProcess: {
        workersRssMiB: rssWorkers - rssBefore,
        peakRssMiB: peaks[process.pid] ?? NaN,
        cpuS: (cpuAfter.cpuMs - cpuBefore.cpuMs) / 1000,
        cpuMsPerBackup: (cpuAfter.cpuMs - cpuBefore.cpuMs) / figures.length,
      },
      temporalServer: {
        peakRssMiB: peaks[server.pid] ?? NaN,
        cpuS: (serverAfter.cpuMs - serverBefore.cpuMs) / 1000,
        cpuMsPerBackup: (serverAfter.cpuMs - serverBefore.cpuMs) / vms.length,
        // SQLite on disk, as the local stack's: database and WAL writes per backup
        writtenKiBPerBackup: (serverAfter.writeBytes - serverBefore.writeBytes) / 1024 / vms.length,
      },
    };
    // recorded with their reasons (the figures of the others still count), and the run exits 1
    if (result.failed > 0) {
      log(`sim: ${result.failed} backups did not complete: ${JSON.stringify(result.failures)}`);
      process.exitCode = 1;
    }
    if (stillRunning) process.exitCode = 1;
    return result;
  } finally {
    for (const w of workers) {
      try {
        w.shutdown();
      } catch {
        // never ran (the run failed before the workers were started)
      }
    }
    await Promise.allSettled(runs);
    await native.close();
    await connection.close();
    await server.stop();
    await rm(shm, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------------------------ group schedule: fan-out

/** Temporal's per-workflow history warnings (its limits, 51,200 events and 50 MB, fail the workflow). */
const HISTORY_WARN_EVENTS = 10_240;
const HISTORY_WARN_BYTES = 10 * MiB;

/** The workflows' metrics sink: every worker of the bundle must register it (the control queue's counts nothing). */
const NO_METRICS_SINKS: InjectedSinks<VmbackupSinks> = {
  metrics: { backupEnded: { fn: () => undefined, callDuringReplay: false } },
};

/** `HH:MM:SS` (UTC) of a time: a schedule's `--at`. */
const hhmmss = (t: Date) => t.toISOString().slice(11, 19);

/**
 * The sim group's hosts (--sim-hosts, --sim-vms spread over them), each backed up by a Temporal Schedule of its
 * own, created with vmbackup's client code as `vmbackup schedule create host-H --all --host H --every 1d --at
 * HH:MM:SS --keep-last 1 --target URL` does. All schedules are due at the same calendar instant (a nightly run at a
 * fixed time), a worker serves the control queue as `vmbackup worker` does, and every worker polls from the start.
 * Measured per VM: the schedule's action time (the instant) -> its backup's WorkflowExecutionStarted and first
 * workflow task; per schedule: the action taken, the parent's start, and the parent's history.
 */
async function runSchedule(args: Args, work: string): Promise<Record<string, unknown>> {
  const bundle = join(REPO, 'dist', 'workflow-bundle.js');
  if (!existsSync(bundle)) throw new Error(`${bundle} is missing: run npm run build`);
  const shm = await mkdtemp('/dev/shm/vmbackup-sched-'); // tmpfs: the target and the images
  const targetDir = join(shm, 'target');
  await mkdir(targetDir, { recursive: true });
  const target = `file://${targetDir}`;
  const template = join(shm, 'template.qcow2');
  await must('qemu-img', ['create', '-q', '-f', 'qcow2', template, '64M']);
  const random = prng(13);
  const jobMs = new Map<string, number>();
  const run = randomBytes(2).toString('hex');
  const hosts = Array.from({ length: args.simHosts }, (_, i) => `sched-${run}-h${String(i).padStart(3, '0')}`);
  const domainsOf = new Map<string, string[]>(hosts.map((h) => [h, []]));
  for (let i = 0; i < args.simVms; i++) {
    const domain = `simvm-${String(i).padStart(5, '0')}`;
    domainsOf.get(hosts[i % hosts.length]!)!.push(domain);
    jobMs.set(domain, Math.round(args.jobSeconds * 1000 * (0.5 + random())));
  }
  const perHost = Math.max(...[...domainsOf.values()].map((d) => d.length));
  if (perHost > MAX_VMS_PER_RUN) {
    throw new Error(`${perHost} VMs per host: a schedule's run backs up at most ${MAX_VMS_PER_RUN}`);
  }
  const retention = { keepLast: 1 };

  const server: DevServer = await startDevServer(REPO, join(work, 'schedule-temporal.db'), log);
  const native = await NativeConnection.connect({ address: server.address });
  const connection = await Connection.connect({ address: server.address });
  const client = new Client({ connection, namespace: 'default' });
  let workers: Worker[] = [];
  const runs: Array<Promise<void>> = [];
  const names: string[] = [];
  const rssBefore = process.memoryUsage().rss / MiB;
  try {
    const t = Date.now();
    const sim = await createSimHosts({
      native,
      client,
      bundle,
      domainsOf,
      templateImage: template,
      root: shm,
      target,
      jobMs: (domain) => jobMs.get(domain) ?? args.jobSeconds * 1000,
      hostSlots: args.hostSlots,
    });
    // the control queue, as every `vmbackup worker` serves it (src/worker/index.ts): the schedules' runs
    const control = await Worker.create({
      connection: native,
      namespace: 'default',
      taskQueue: DEFAULT_CONTROL_TASK_QUEUE,
      workflowBundle: { codePath: bundle },
      sinks: NO_METRICS_SINKS,
      ...BENCH_WORKER_SHUTDOWN,
    });
    workers = [...sim.workers, control];
    const rssWorkers = process.memoryUsage().rss / MiB;
    log(
      `schedule: ${hosts.length} host workers and a control-queue worker in this process (${Math.round(rssWorkers - rssBefore)} MiB) in ${((Date.now() - t) / 1000).toFixed(1)} s`,
    );
    for (const w of workers) runs.push(w.run());

    // every schedule due at one calendar instant, far enough ahead that all are created before it
    const instant = new Date(Math.ceil((Date.now() + 20_000 + 200 * hosts.length) / 1000) * 1000);
    const timing = { everySeconds: 86_400, at: hhmmss(instant) };
    const tc = Date.now();
    await pool(hosts, 8, async (host) => {
      const name = `host-${host}`;
      await createSchedule(client, {
        name,
        controlTaskQueue: DEFAULT_CONTROL_TASK_QUEUE,
        run: {
          schedule: name,
          group: { domains: [], allOn: [host] },
          method: 'push',
          targets: [target],
          options: { level: 'full' },
          retention,
          waitSeconds: timing.everySeconds,
        },
        timing,
        overlap: 'skip',
        catchupSeconds: defaultCatchupSeconds(timing.everySeconds),
      });
      names.push(name);
    });
    const createMs = Date.now() - tc;
    if (Date.now() > instant.getTime() - 1000) {
      throw new Error(
        `creating ${hosts.length} schedules took ${createMs} ms, past their instant ${instant.toISOString()}`,
      );
    }
    log(`schedule: ${hosts.length} schedules created in ${createMs} ms, all due at ${instant.toISOString()}`);

    const serverBefore = await server.usage();
    const cpuBefore = await processUsage(process.pid);
    const sampler = rssSampler(() => [process.pid, server.pid]);
    const load = await loadAverage();
    await new Promise((r) => setTimeout(r, instant.getTime() - Date.now()));
    const deadline = instant.getTime() + args.deadlineMin * 60_000;
    // until every schedule's run has closed (its backups and retention done) or the deadline
    let lastLine = '';
    let slowLoggedAt = 0;
    let parentsOpen = hosts.length;
    for (;;) {
      const q = (w: string) => client.workflow.count(w).then((c) => c.count);
      const [parentsClosed, backupsClosed, backupsRunning] = await Promise.all([
        q(`WorkflowType = 'scheduledBackups' AND ExecutionStatus != 'Running'`),
        q(`WorkflowType = 'backupDomain' AND ExecutionStatus != 'Running'`),
        q(`WorkflowType = 'backupDomain' AND ExecutionStatus = 'Running'`),
      ]);
      parentsOpen = hosts.length - parentsClosed;
      const line = `schedule: runs ${parentsClosed} of ${hosts.length} closed; backups ${backupsClosed} closed, ${backupsRunning} running (of ${args.simVms})`;
      if (line !== lastLine) log(line);
      lastLine = line;
      const slow = sim.slowRetention(60_000);
      if (slow.length && Date.now() - slowLoggedAt > 30_000) {
        slowLoggedAt = Date.now();
        log(`schedule: ${slow.length} retention steps running for over 60 s: ${JSON.stringify(slow.slice(0, 5))}`);
      }
      if (parentsOpen === 0) break;
      if (Date.now() > deadline) {
        log(`schedule: deadline passed with ${parentsOpen} runs open; figures of what closed`);
        break;
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
    const peaks = await sampler.stop();
    const cpuAfter = await processUsage(process.pid);
    const serverAfter = await server.usage();

    // per schedule: its action, the parent run it started, and the backups that run started
    const parents = await pool(names, 8, async (name) => {
      const desc = await scheduleHandle(client, name).describe();
      const action = desc.info.recentActions[0];
      if (!action) return { name, missed: true as const };
      const wf = action.action.workflow;
      const handle = client.workflow.getHandle(wf.workflowId, wf.firstExecutionRunId);
      const d = await handle.describe();
      const events = (await handle.fetchHistory()).events ?? [];
      const children = events
        .map((e) => e.childWorkflowExecutionStartedEventAttributes?.workflowExecution)
        .filter((x): x is { workflowId: string; runId: string } => !!x?.workflowId && !!x.runId);
      const firstTask = events.find((e) => e.workflowTaskStartedEventAttributes);
      const result = d.status.name === 'COMPLETED' ? ((await handle.result()) as ScheduledBackupsResult) : undefined;
      return {
        name,
        missed: false as const,
        scheduledAt: action.scheduledAt.getTime(),
        takenAt: action.takenAt.getTime(),
        startedAt: tsMs(events[0]?.eventTime as never),
        firstTaskAt: tsMs(firstTask?.eventTime as never),
        closedAt: d.closeTime?.getTime() ?? NaN,
        status: d.status.name,
        events: Number(d.raw.workflowExecutionInfo?.historyLength ?? 0),
        bytes: Number(d.raw.workflowExecutionInfo?.historySizeBytes ?? 0),
        children,
        result,
      };
    });
    const ran = parents.filter((p): p is Exclude<(typeof parents)[number], { missed: true }> => !p.missed);
    const host = (workflowId: string) => hosts.find((h) => workflowId.startsWith(`vmbackup-backup-${h}-`)) ?? '?';
    const kids = ran.flatMap((p) =>
      p.children.map((c) => ({
        domain: c.workflowId.slice(`vmbackup-backup-${host(c.workflowId)}-`.length),
        host: host(c.workflowId),
        // the schedule's action time: the calendar instant it was due at
        requestedAt: p.scheduledAt,
        parentStartedAt: p.startedAt,
        handle: client.workflow.getHandle(c.workflowId, c.runId) as unknown as WorkflowHandle,
      })),
    );
    const all = await pool(kids, 16, async (k) => ({ k, f: await figuresOf(k) }));
    const closed = all.filter((x) => x.f.status !== 'RUNNING');
    const figures = closed.map((x) => x.f);
    const lastClose = Math.max(...closed.map((x) => x.k.requestedAt + x.f.endToEndMs));
    const vmResults = ran.flatMap((p) => p.result?.vms ?? []);
    const statuses: Record<string, number> = {};
    for (const v of vmResults) statuses[v.status] = (statuses[v.status] ?? 0) + 1;
    const retained = ran.flatMap((p) => p.result?.retention ?? []);
    const perVm = ran.map((p) => ({
      events: p.events / Math.max(1, p.children.length),
      bytes: p.bytes / Math.max(1, p.children.length),
    }));
    const result = {
      vms: args.simVms,
      hosts: hosts.length,
      vmsPerHost: perHost,
      schedules: hosts.length,
      hostSlots: args.hostSlots,
      jobSeconds: { mean: args.jobSeconds, min: args.jobSeconds * 0.5, max: args.jobSeconds * 1.5 },
      due: `every schedule at the same calendar instant: --every 1d --at ${timing.at} (UTC), ${instant.toISOString()}`,
      retention: `--keep-last ${retention.keepLast}`,
      loadAverageAtStart: load,
      loadAverageAtEnd: await loadAverage(),
      schedulesCreatedS: createMs / 1000,
      schedulesThatRan: ran.length,
      ...(parentsOpen ? { runsOpenAtDeadline: parentsOpen, deadlineMin: args.deadlineMin } : {}),
      // per schedule: due -> the action taken (the scheduler's own delay), -> the parent run's start and first task
      actionTakenMs: summary(ran.map((p) => p.takenAt - p.scheduledAt)),
      parentStartMs: summary(ran.map((p) => p.startedAt - p.scheduledAt)),
      parentFirstTaskMs: summary(ran.map((p) => p.firstTaskAt - p.scheduledAt)),
      // per VM: the schedule's action time -> its backup's WorkflowExecutionStarted (the fan-out) and first task
      backupsStartedByRuns: kids.length,
      fanOutToBackupStartedMs: summary(all.map((x) => x.f.toExecutionStartedMs)),
      fanOutToBackupFirstTaskMs: summary(all.map((x) => x.f.toStartMs)),
      // the same, from the parent's start: the fan-out inside the run (listDomains, then 40 startChild)
      parentStartToBackupStartedMs: summary(
        all.map((x) => x.f.toExecutionStartedMs - (x.k.parentStartedAt - x.k.requestedAt)),
      ),
      runEndMs: summary(ran.map((p) => p.closedAt - p.scheduledAt)),
      runStatuses: Object.fromEntries(ran.map((p) => p.status).map((s, _, a) => [s, a.filter((x) => x === s).length])),
      vmStatuses: statuses,
      retentionSteps: retained.length,
      retentionFailed: retained.filter((r) => r.error !== undefined).length,
      retentionDeferred: retained.filter((r) => r.deferred !== undefined).length,
      // retention steps still running when the wait ended (each holds its run open), and where each one is
      ...(sim.slowRetention(60_000).length ? { retentionStepsRunningOver60s: sim.slowRetention(60_000) } : {}),
      unlistedHosts: ran.reduce((n, p) => n + (p.result?.unlistedHosts.length ?? 0), 0),
      parentHistoryEvents: summary(ran.map((p) => p.events)),
      parentHistoryBytes: summary(ran.map((p) => p.bytes)),
      parentHistoryEventsPerVm: summary(perVm.map((x) => x.events)),
      parentHistoryBytesPerVm: summary(perVm.map((x) => x.bytes)),
      parentHistoryOfWarning: {
        eventsPct: (100 * Math.max(...ran.map((p) => p.events))) / HISTORY_WARN_EVENTS,
        bytesPct: (100 * Math.max(...ran.map((p) => p.bytes))) / HISTORY_WARN_BYTES,
      },
      ...backupsSummary(figures, lastClose - instant.getTime()),
      jobsBegun: sim.fakes.reduce((n, f) => n + f.jobsBegun(), 0),
      metricsSuccessTotal: await successTotal(sim.metrics),
      benchProcess: {
        workersRssMiB: rssWorkers - rssBefore,
        peakRssMiB: peaks[process.pid] ?? NaN,
        cpuS: (cpuAfter.cpuMs - cpuBefore.cpuMs) / 1000,
        cpuMsPerBackup: (cpuAfter.cpuMs - cpuBefore.cpuMs) / Math.max(1, figures.length),
      },
      temporalServer: {
        peakRssMiB: peaks[server.pid] ?? NaN,
        cpuS: (serverAfter.cpuMs - serverBefore.cpuMs) / 1000,
        cpuMsPerBackup: (serverAfter.cpuMs - serverBefore.cpuMs) / args.simVms,
        writtenKiBPerBackup: (serverAfter.writeBytes - serverBefore.writeBytes) / 1024 / args.simVms,
      },
    };
    // the run exits 1 unless every VM of every schedule was backed up and retained
    const completed = statuses.completed ?? 0;
    if (
      ran.length < hosts.length ||
      parentsOpen ||
      completed < args.simVms ||
      result.failed > 0 ||
      result.retentionFailed > 0
    ) {
      log(
        `schedule: not every VM was backed up and retained: ${JSON.stringify({ ran: ran.length, statuses, failures: result.failures, retentionFailed: result.retentionFailed })}`,
      );
      process.exitCode = 1;
    }
    return result;
  } finally {
    // schedules live in the cluster, not in this process: remove them (the server is this run's own, but a
    // schedule left behind would start runs whenever it came back)
    await Promise.allSettled(names.map((n) => scheduleHandle(client, n).delete()));
    for (const w of workers) {
      try {
        w.shutdown();
      } catch {
        // never ran
      }
    }
    await Promise.allSettled(runs);
    await native.close();
    await connection.close();
    await server.stop();
    await rm(shm, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------------------------ report

function fmt(n: unknown, digits = 0): string {
  return typeof n === 'number' && Number.isFinite(n) ? n.toFixed(digits) : String(n);
}

function report(results: Record<string, Record<string, unknown>>, meta: Record<string, unknown>): string {
  const lines = [`# vmbackup scale bench (${meta.startedAt})`, '', `machine: ${meta.machine}`, ''];
  const ms = (s: unknown) => {
    const v = s as { median: number; p99: number; max: number };
    return `${fmt(v.median)} / ${fmt(v.p99)} / ${fmt(v.max)}`;
  };
  for (const [group, r] of Object.entries(results)) {
    lines.push(`## ${group}`, '', '| figure | value |', '|---|---|');
    for (const [k, v] of Object.entries(r)) {
      if (v && typeof v === 'object' && 'median' in v) lines.push(`| ${k} (median / p99 / max) | ${ms(v)} |`);
      else if (Array.isArray(v)) for (const x of v) lines.push(`| ${k} | ${JSON.stringify(x)} |`);
      else if (v && typeof v === 'object') lines.push(`| ${k} | ${JSON.stringify(v)} |`);
      else lines.push(`| ${k} | ${typeof v === 'number' ? fmt(v, Number.isInteger(v) ? 0 : 1) : String(v)} |`);
    }
    lines.push('');
  }
  return lines.join('\n');
}

class BenchLogger extends DefaultLogger {
  override log(level: LogLevel, message: string, meta?: LogMetadata): void {
    if (level === 'WARN' && EXPECTED_WARNINGS.some((re) => re.test(message))) return;
    super.log(level, message, meta);
  }
}
const EXPECTED_WARNINGS = [
  /TMPRL1104/,
  /^No workflows registered, not polling for workflow tasks/,
  /^Activity not found on completion/,
];

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  // Warnings and errors, the SDK core's too (forwarded here instead of stdout: a lost activity completion shows), but
  // not those an overloaded machine or the backup slots give by design: every workflow task over 5 s (TMPRL1104; the
  // figures show it), a released slot's activity completing after its backup closed (src/worker/index.ts)
  Runtime.install({
    logger: new BenchLogger('WARN'),
    telemetryOptions: { logging: { forward: {}, filter: { core: 'WARN', other: 'WARN' } } },
  });
  const want = (g: string) => !args.only || args.only.has(g);
  const work = join(stackEnv().stateDir, `bench-scale-${randomBytes(3).toString('hex')}`);
  await mkdir(work, { recursive: true });
  const meta = {
    startedAt: new Date().toISOString(),
    machine: `${cpus().length} cores (${cpus()[0]?.model ?? '?'}), ${Math.round(totalmem() / 2 ** 30)} GiB RAM, shared with other users`,
    args: { ...args, only: args.only ? [...args.only] : undefined },
  };
  const results: Record<string, Record<string, unknown>> = {};
  try {
    // a group that fails is recorded with its error; the others still run and the files are still written
    const group = async (name: string, fn: () => Promise<Record<string, unknown>>) => {
      try {
        results[name] = await fn();
      } catch (err) {
        log(`${name}: ${(err as Error).stack ?? String(err)}`);
        results[name] = { error: (err as Error).message };
        process.exitCode = 1;
      }
    };
    if (want('vms')) await group('vms', () => runVms(args, work));
    if (want('sim')) await group('sim', () => runSim(args, work));
    if (want('schedule')) await group('schedule', () => runSchedule(args, work));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  await mkdir(args.out, { recursive: true });
  await writeFile(join(args.out, 'latest.json'), JSON.stringify({ ...meta, results }, null, 2) + '\n');
  await writeFile(join(args.out, 'latest.md'), report(results, meta));
  log(`${join(args.out, 'latest.json')}, latest.md`);
  process.stdout.write(report(results, meta));
}

main().then(
  () => process.exit(process.exitCode ?? 0),
  (err: unknown) => {
    process.stderr.write(`bench:scale: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  },
);
