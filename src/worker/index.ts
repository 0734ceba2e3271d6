/**
 * Composition root: config -> ports (libvirt, storage drivers) -> activities -> a Worker on
 * this host's task queue. One worker per hypervisor host; the workflows of a host's backups
 * run on the same queue, so a host needs nothing but its worker.
 */
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { Client, Connection, WorkflowExecutionAlreadyStartedError, WorkflowIdConflictPolicy } from '@temporalio/client';
import { decodeSearchAttributes } from '@temporalio/common/lib/converter/payload-search-attributes';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import type { InjectedSinks, LogLevel, LogMetadata, WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { createActivities } from '../activities';
import { createSlotActivities } from '../activities/slot';
import { explainConnectFailure, temporalConnectOptions } from '../client/access';
import { payloadCodecs } from '../client/codec';
import { unreachableSentence } from '../client/connect';
import { createVirshHypervisor } from '../hypervisor/virsh';
import { passwordFrom } from '../repository/chunks/password';
import { hostSlotTaskQueue, hostTaskQueue, SEARCH_ATTRIBUTES } from '../shared/names';
import { openTarget, targetEnvironmentFrom } from '../storage/registry';
import { qemuWritableDir, SYSTEM_QEMU_DIR } from '../activities/qemu-paths';
import type { RecoveryAction } from '../shared/activities';
import type { VmbackupSinks } from '../shared/events';
import type * as MetricsModule from './metrics';
import { temporalBackupStates } from './backup-states';
import { temporalRunningBackupOf, temporalSlotGrants, temporalStoreProgress } from './slots';
import type { RecoverHostInput } from '../workflows/recover';
import { readManifestKey, type Config } from './config';

export interface HostWorkerOptions {
  config: Config;
  address: string;
  /** a prebuilt workflow bundle (tests share one); default: bundle src/dist workflows */
  workflowBundle?: WorkflowBundleWithSourceMap;
  maxConcurrentActivityTaskExecutions?: number;
  /** backups that do their libvirt, copy and upload work at once on this host (default defaultMaxConcurrentBackups()) */
  maxConcurrentBackups?: number;
  /** uploads this worker runs at once to one target (`--max-concurrent-uploads`); default no cap */
  maxConcurrentUploads?: number;
  /** also run scheduled runs from the control queue (`vmbackup worker`; not a command's in-process worker) */
  serveControlQueue?: boolean;
  /** workflow sinks (the metrics of `--metrics`, src/worker/metrics.ts) */
  sinks?: InjectedSinks<VmbackupSinks>;
}

export interface HostWorker {
  /** the worker of the host's queue (`vmbackup-host-<host>`) */
  worker: Worker;
  /** every worker of this host: the host's queue, its slot queue, and the control queue when served */
  workers: Worker[];
  /** runs every worker until shutdown(); one that fails shuts the others down */
  run(): Promise<void>;
  shutdown(): void;
  /** a client on the worker's connection (visibility queries of the metrics) */
  client: Client;
  /** after run() has returned: ends the virsh sessions and the connection to Temporal */
  close(): Promise<void>;
}

/** `--max-concurrent-backups` when not given: one backup per core, at least two. */
export function defaultMaxConcurrentBackups(): number {
  return Math.max(2, availableParallelism());
}

export async function createHostWorker(opts: HostWorkerOptions): Promise<HostWorker> {
  const { config } = opts;
  // the chunk repositories' password: this worker's own, read once here (a file it cannot read stops it before it connects), never sent through Temporal
  const repositoryPassword = passwordFrom({
    ...(config.passwordFile ? { passwordFile: config.passwordFile } : {}),
    env: process.env,
  });
  const connection = await connectNative(config, opts.address);
  const hypervisor = createVirshHypervisor({ uri: config.libvirtUri, sessions: config.virshSessions });
  const targetEnv = targetEnvironmentFrom(process.env);
  const client = new Client({ connection, namespace: config.namespace });
  // signals carry payloads: through the payload codec like the workflow's own
  const codecClient = new Client({
    connection,
    namespace: config.namespace,
    dataConverter: payloadCodecs(config, 'client'),
  });
  const activities = createActivities({
    hypervisor,
    stateDir: config.stateDir,
    qemuStateDir: await qemuWritableDir(config.stateDir, '.', SYSTEM_QEMU_DIR),
    pollIntervalMs: config.pollIntervalMs,
    allowTargets: config.allowTargets,
    ...(config.pullWindowBytes ? { pullWindowBytes: config.pullWindowBytes } : {}),
    ...(opts.maxConcurrentUploads ? { maxConcurrentUploads: opts.maxConcurrentUploads } : {}),
    // S3 credentials, region and endpoint are read once, here at the edge (standard AWS variables).
    openTarget: (url, options) => openTarget(url, { ...options, env: targetEnv }),
    // read at start: a worker with a bad key file refuses to run rather than write unsigned manifests
    ...(config.manifestKeyFile ? { manifestKey: readManifestKey(config.manifestKeyFile) } : {}),
    backupStates: temporalBackupStates(client),
    runningBackupOf: temporalRunningBackupOf(client),
    reportStoreProgress: temporalStoreProgress(codecClient),
    // no webhook event may ever carry these, whatever a library puts into an error sentence
    ...(config.allowNotify ? { allowNotify: config.allowNotify } : {}),
    ...(repositoryPassword !== undefined ? { repositoryPassword } : {}),
    secrets: [
      targetEnv.AWS_SECRET_ACCESS_KEY,
      targetEnv.AWS_SESSION_TOKEN,
      config.temporalAccess.apiKey,
      repositoryPassword,
    ].filter((s): s is string => typeof s === 'string'),
  });
  const dataConverter = payloadCodecs(config, 'worker');
  const code = workflowCode(opts.workflowBundle);
  const worker = await Worker.create({
    connection,
    namespace: config.namespace,
    taskQueue: hostTaskQueue(config.host),
    activities,
    ...code,
    dataConverter,
    maxConcurrentActivityTaskExecutions: opts.maxConcurrentActivityTaskExecutions ?? 50,
    // Activities heartbeat their progress often; let the SDK coalesce them.
    defaultHeartbeatThrottleInterval: '1s',
    sinks: opts.sinks ?? NO_METRICS_SINKS,
  });
  const slots = await createSlotWorker({
    connection,
    namespace: config.namespace,
    host: config.host,
    maxConcurrentBackups: opts.maxConcurrentBackups ?? defaultMaxConcurrentBackups(),
    dataConverter,
    // the signal's token is a payload: it goes through the payload codec like any other
    client: codecClient,
  });
  const workers = [worker, slots];
  if (opts.serveControlQueue) {
    // Scheduled runs only orchestrate (children and activities on the hosts' queues): workflows, no activities.
    workers.push(
      await Worker.create({
        connection,
        namespace: config.namespace,
        taskQueue: config.controlTaskQueue,
        ...code,
        dataConverter,
        // backups run on the hosts' queues, where they are counted; a sink the workflow code names must exist
        sinks: NO_METRICS_SINKS,
      }),
    );
  }
  const shutdown = () => {
    for (const w of workers) if (w.getState() === 'RUNNING') w.shutdown();
  };
  return {
    worker,
    workers,
    shutdown,
    run: async () => {
      const runs = workers.map((w) =>
        w.run().catch((err: unknown) => {
          shutdown();
          throw err;
        }),
      );
      const outcomes = await Promise.allSettled(runs);
      const failed = outcomes.find((o): o is PromiseRejectedResult => o.status === 'rejected');
      if (failed) throw failed.reason;
    },
    client,
    close: async () => {
      hypervisor.close();
      await connection.close();
    },
  };
}

/**
 * The host's backup slots: at most `maxConcurrentBackups` holdBackupSlot activities run at once on
 * `vmbackup-host-<host>-slots`; the other backups' slot requests wait in that queue (src/activities/slot.ts).
 */
export async function createSlotWorker(opts: {
  connection: NativeConnection;
  namespace: string;
  host: string;
  maxConcurrentBackups: number;
  /** signals each backup that got its slot */
  client: Client;
  dataConverter?: ReturnType<typeof payloadCodecs>;
}): Promise<Worker> {
  return Worker.create({
    connection: opts.connection,
    namespace: opts.namespace,
    taskQueue: hostSlotTaskQueue(opts.host),
    activities: createSlotActivities({ grantSlot: temporalSlotGrants(opts.client), heartbeatMs: SLOT_HEARTBEAT_MS }),
    ...(opts.dataConverter ? { dataConverter: opts.dataConverter } : {}),
    maxConcurrentActivityTaskExecutions: opts.maxConcurrentBackups,
    ...slotHeartbeatThrottle(),
  });
}

/**
 * How often a held slot heartbeats. A backup releases its slot by cancelling holdBackupSlot, and Temporal delivers a
 * cancellation only in a heartbeat's answer: the worker's slot stays taken until the next heartbeat reaches the
 * server, so this is how long a freed slot can stay idle while other backups queue for it.
 */
export const SLOT_HEARTBEAT_MS = 1000;

/**
 * Every slot heartbeat goes to the server. Left to the SDK, heartbeats are coalesced to 0.8 x the activity's
 * heartbeat timeout (30 s: one every 24 s), so a released slot stayed taken for 12 s on average after its backup
 * ended (20 queued backups of 16 MiB took 220 s on 2 slots, under 1 s of work each).
 */
export function slotHeartbeatThrottle(): {
  maxHeartbeatThrottleInterval: number;
  defaultHeartbeatThrottleInterval: number;
} {
  return { maxHeartbeatThrottleInterval: SLOT_HEARTBEAT_MS, defaultHeartbeatThrottleInterval: SLOT_HEARTBEAT_MS };
}

/** Without `--metrics` the workflows' metrics calls go nowhere (a sink no worker registers is logged as an error). */
const NO_METRICS_SINKS: InjectedSinks<VmbackupSinks> = {
  metrics: { backupEnded: { fn: () => undefined, callDuringReplay: false } },
};

/** `--metrics` (src/worker/metrics.ts), loaded only by a worker that serves them: prom-client stays out of others. */
export function loadMetrics(): Promise<typeof MetricsModule> {
  return import('./metrics');
}

/** The worker's connection, with the cluster's TLS and API key; a refusal is one sentence (access.ts). */
async function connectNative(config: Config, address: string): Promise<NativeConnection> {
  const access = temporalConnectOptions(config);
  try {
    return await NativeConnection.connect({ address, ...access });
  } catch (err) {
    throw await explainConnectFailure(err, {
      address,
      embedded: !config.temporalAddress,
      config,
      unreachable: (reason) => unreachableSentence(config, address, reason),
    });
  }
}

/** The bundle `npm run build` made (dist/workflow-bundle.js), else bundle the workflows now (ts sources in tests). */
function workflowCode(
  bundle: WorkflowBundleWithSourceMap | undefined,
): { workflowBundle: WorkflowBundleWithSourceMap | { codePath: string } } | { workflowsPath: string } {
  if (bundle) return { workflowBundle: bundle };
  const prebuilt = join(__dirname, '..', 'workflow-bundle.js');
  if (existsSync(prebuilt)) return { workflowBundle: { codePath: prebuilt } };
  return { workflowsPath: require.resolve('../workflows') };
}

/**
 * Ask this host's worker to undo what dead backups left (overlays, staging directories). Called by
 * `vmbackup recover` and when a worker starts. The worker decides about each backup when it acts; a
 * recovery of this host that is already going may have passed a backup that died since, so this waits
 * for it to end and then runs its own (and reports what both did).
 */
export async function recoverHostOverlays(
  address: string,
  config: Config,
  opts: { domain?: string } = {},
): Promise<RecoveryAction[]> {
  const connection = await Connection.connect({ address, ...temporalConnectOptions(config) });
  try {
    const client = new Client({
      connection,
      namespace: config.namespace,
      dataConverter: payloadCodecs(config, 'client'),
    });
    const workflowId = `vmbackup-recover-${config.host}`;
    const args: [RecoverHostInput] = [
      { host: config.host, activeBackupIds: await runningBackupIds(client), domain: opts.domain },
    ];
    const actions: RecoveryAction[] = [];
    for (let round = 1; ; round++) {
      try {
        const handle = await client.workflow.start('recoverHost', {
          taskQueue: hostTaskQueue(config.host),
          workflowId,
          // One recovery per host at a time: two would commit the same overlay at once.
          workflowIdConflictPolicy: WorkflowIdConflictPolicy.FAIL,
          args,
        });
        actions.push(...((await handle.result()) as RecoveryAction[]));
        return actions;
      } catch (err) {
        if (!(err instanceof WorkflowExecutionAlreadyStartedError) || round >= MAX_RECOVERY_ROUNDS) throw err;
        const earlier = await client.workflow
          .getHandle(workflowId)
          .result()
          .catch(() => []); // its failure is not ours: our own run follows
        actions.push(...(earlier as RecoveryAction[]));
      }
    }
  } finally {
    await connection.close();
  }
}

/** Recoveries of this host that may end before ours starts (each one another caller's). */
const MAX_RECOVERY_ROUNDS = 5;

/**
 * Backup ids of every running backup, whatever its host (several hosts may share a libvirt; tests do).
 * Only workers of earlier versions use them (see RecoverInput.activeBackupIds). Read without decoding
 * memos: a workflow someone else started with a codec we lack must not stop recovery.
 */
async function runningBackupIds(client: Client): Promise<string[]> {
  const ids: string[] = [];
  const query = `ExecutionStatus = 'Running' AND WorkflowType = 'backupDomain'`;
  let nextPageToken: Uint8Array | undefined;
  do {
    const page = await client.workflowService.listWorkflowExecutions({
      namespace: client.options.namespace,
      query,
      pageSize: 1000,
      nextPageToken,
    });
    for (const e of page.executions ?? []) {
      const id = decodeSearchAttributes(e.searchAttributes?.indexedFields)[SEARCH_ATTRIBUTES.backupId];
      if (Array.isArray(id) && typeof id[0] === 'string') ids.push(id[0]);
    }
    nextPageToken = page.nextPageToken?.length ? page.nextPageToken : undefined;
  } while (nextPageToken);
  return ids;
}

/**
 * Warnings the backup slots give by design, which a command's user can do nothing about: the slot worker runs
 * activities only, and a released slot's activity may complete after its backup has closed (TRY_CANCEL).
 */
const EXPECTED_WARNINGS = [
  /^No workflows registered, not polling for workflow tasks/,
  /^Activity not found on completion/,
];

class QuietLogger extends DefaultLogger {
  override log(level: LogLevel, message: string, meta?: LogMetadata): void {
    if (level === 'WARN' && EXPECTED_WARNINGS.some((re) => re.test(message))) return;
    super.log(level, message, meta);
  }
}

/**
 * An in-process worker inside a CLI command logs warnings only; `vmbackup worker` keeps the SDK's INFO log. It
 * does not stop on SIGINT/SIGTERM (the runtime's default): the command decides (src/cli/interrupt.ts), and a
 * backup's undo steps need the worker until the workflow has closed. The SDK core's own log lines are forwarded
 * to that logger (stderr): by default core prints them on stdout, where they would follow a command's `--json`
 * (e.g. its warning when a released backup slot's activity completes after its backup has closed).
 */
export function quietWorkerLogs(): void {
  Runtime.install({
    logger: new QuietLogger('WARN'),
    shutdownSignals: [],
    telemetryOptions: { logging: { forward: {}, filter: { core: 'WARN', other: 'ERROR' } } },
  });
}
