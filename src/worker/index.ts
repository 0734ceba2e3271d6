/**
 * Composition root: config -> ports (libvirt, storage drivers) -> activities -> a Worker on
 * this host's task queue. One worker per hypervisor host; the workflows of a host's backups
 * run on the same queue, so a host needs nothing but its worker.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Client, Connection, WorkflowIdConflictPolicy } from '@temporalio/client';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import type { WorkflowBundleWithSourceMap } from '@temporalio/worker';
import { createActivities } from '../activities';
import { explainConnectFailure, temporalConnectOptions } from '../client/access';
import { payloadCodecs } from '../client/codec';
import { unreachableSentence } from '../client/connect';
import { createVirshHypervisor } from '../hypervisor/virsh';
import { hostTaskQueue, SEARCH_ATTRIBUTES } from '../shared/names';
import { openTarget, targetEnvironmentFrom } from '../storage/registry';
import { qemuWritableDir, SYSTEM_QEMU_DIR } from '../activities/qemu-paths';
import type { RecoveryAction } from '../shared/activities';
import { readManifestKey, type Config } from './config';

export interface HostWorkerOptions {
  config: Config;
  address: string;
  /** a prebuilt workflow bundle (tests share one); default: bundle src/dist workflows */
  workflowBundle?: WorkflowBundleWithSourceMap;
  maxConcurrentActivityTaskExecutions?: number;
}

export interface HostWorker {
  worker: Worker;
  /** after worker.run() has returned: ends the virsh sessions and the connection to Temporal */
  close(): Promise<void>;
}

export async function createHostWorker(opts: HostWorkerOptions): Promise<HostWorker> {
  const { config } = opts;
  const connection = await connectNative(config, opts.address);
  const hypervisor = createVirshHypervisor({ uri: config.libvirtUri, sessions: config.virshSessions });
  const targetEnv = targetEnvironmentFrom(process.env);
  const activities = createActivities({
    hypervisor,
    stateDir: config.stateDir,
    qemuStateDir: await qemuWritableDir(config.stateDir, '.', SYSTEM_QEMU_DIR),
    pollIntervalMs: config.pollIntervalMs,
    // S3 credentials, region and endpoint are read once, here at the edge (standard AWS variables).
    openTarget: (url, options) => openTarget(url, { ...options, env: targetEnv }),
    // read at start: a worker with a bad key file refuses to run rather than write unsigned manifests
    ...(config.manifestKeyFile ? { manifestKey: readManifestKey(config.manifestKeyFile) } : {}),
  });
  const worker = await Worker.create({
    connection,
    namespace: config.namespace,
    taskQueue: hostTaskQueue(config.host),
    activities,
    ...workflowCode(opts.workflowBundle),
    dataConverter: payloadCodecs(config, 'worker'),
    maxConcurrentActivityTaskExecutions: opts.maxConcurrentActivityTaskExecutions ?? 50,
    // Activities heartbeat their progress often; let the SDK coalesce them.
    defaultHeartbeatThrottleInterval: '1s',
  });
  return {
    worker,
    close: async () => {
      hypervisor.close();
      await connection.close();
    },
  };
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
 * Ask this host's worker to commit leftover overlays of backups that no longer run. Called by
 * `vmbackup recover` and when a worker starts.
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
    const active: string[] = [];
    // Every running backup, whatever its host: backup ids are unique, and several hosts may share a libvirt
    // (tests do), so an overlay of another host's running backup must be left alone too.
    const query = `ExecutionStatus = 'Running' AND WorkflowType = 'backupDomain'`;
    for await (const wf of client.workflow.list({ query })) {
      const id = wf.searchAttributes[SEARCH_ATTRIBUTES.backupId];
      if (Array.isArray(id) && typeof id[0] === 'string') active.push(id[0]);
    }
    return await client.workflow.execute('recoverHost', {
      taskQueue: hostTaskQueue(config.host),
      workflowId: `vmbackup-recover-${config.host}`,
      workflowIdConflictPolicy: WorkflowIdConflictPolicy.USE_EXISTING,
      args: [{ host: config.host, activeBackupIds: active, domain: opts.domain }],
    });
  } finally {
    await connection.close();
  }
}

/**
 * An in-process worker inside a CLI command logs warnings only; `vmbackup worker` keeps the SDK's INFO log. It
 * does not stop on SIGINT/SIGTERM (the runtime's default): the command decides (src/cli/interrupt.ts), and a
 * backup's undo steps need the worker until the workflow has closed.
 */
export function quietWorkerLogs(): void {
  Runtime.install({ logger: new DefaultLogger('WARN'), shutdownSignals: [] });
}
