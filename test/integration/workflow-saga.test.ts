/**
 * The backup saga covers every phase and the retry policy is decided in one place (issue #11 items 5, 7, 9, 10 and
 * the retry caps of item 2), on the real stack: Temporal dev server, libvirt/QEMU, radosgw (behind a proxy that can
 * answer with server errors first).
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ApplicationFailure } from '@temporalio/common';
import type { WorkflowHandle } from '@temporalio/client';
import type { Client } from '@temporalio/client';
import { WorkflowFailedError } from '@temporalio/client';
import { DefaultLogger, Runtime } from '@temporalio/worker';
import { createActivities } from '../../src/activities';
import { startBackup } from '../../src/client/backups';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import { hostTaskQueue } from '../../src/shared/names';
import type { BackupRequest } from '../../src/shared/types';
import { openTarget } from '../../src/storage/registry';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { startInProcessHostWorker } from '../helpers/host-worker';
import { startS3FaultProxy } from '../helpers/s3-fault-proxy';
import type { S3FaultProxy } from '../helpers/s3-fault-proxy';
import { s3Env, s3Target } from '../storage/fixtures';

const run = promisify(execFile);

async function jobActive(domain: string): Promise<boolean> {
  const { stdout } = await run('virsh', ['domjobinfo', domain]);
  return /Job type:\s+(Bounded|Unbounded)/.test(stdout);
}

async function failureOf(handle: WorkflowHandle): Promise<string> {
  try {
    await handle.result();
  } catch (err) {
    let cur: unknown = err;
    const parts: string[] = [];
    while (cur instanceof Error) {
      parts.push(`${cur.name}: ${cur.message}`);
      cur = (cur as { cause?: unknown }).cause;
    }
    return parts.join(' <- ');
  }
  throw new Error('the workflow did not fail');
}

describe('backup saga and retry policy (real stack)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let proxy: S3FaultProxy;
  let worker: WorkerProcess | undefined;
  let host: string;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    ({ client, close: closeClient } = await temporalClient());
    proxy = await startS3FaultProxy(stackEnv().s3.endpoint);
  });
  afterAll(async () => {
    await worker?.stop();
    await proxy?.close();
    await closeClient?.();
  });
  beforeEach(async () => {
    host = uniqueHost('saga');
    // the worker reaches radosgw through the proxy
    worker = await startWorkerProcess(host, { env: cliEnv({ AWS_ENDPOINT_URL: proxy.url }) });
  });
  afterEach(async () => {
    await worker?.stop();
    worker = undefined;
  });

  test('a transient 5xx on the manifest PUT is retried by Temporal, and the manifest gets the backup S3 options', async () => {
    const dom = await newDomain({
      prefix: 'saga',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x5a, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const s3 = await s3Target();
    try {
      // More 503s than the SDK's own 3 attempts: only a retry of the activity gets past them.
      proxy.fail({
        match: (m, u) => m === 'PUT' && u.includes(s3.prefix) && /manifest\.json/.test(u),
        times: 4,
        status: 503,
      });
      const { backupId, handle } = await startBackup(client, {
        domain: dom.name,
        host,
        method: 'push',
        targets: [s3.url],
        options: { heartbeatTimeoutSeconds: 10, s3: { storageClass: 'STANDARD' } },
      });
      const result = await handle.result();
      expect(result.status).toBe('completed');
      const manifestPuts = proxy.seen.filter((r) => r.method === 'PUT' && r.url.includes(`${backupId}/manifest.json`));
      expect(manifestPuts.filter((r) => r.injected)).toHaveLength(4);
      expect(manifestPuts.filter((r) => !r.injected && r.status === 200)).toHaveLength(1);
      // item 10: the manifest is written with the same S3 options as the images
      for (const put of manifestPuts) expect(put.headers['x-amz-storage-class']).toBe('STANDARD');
      const imagePuts = proxy.seen.filter((r) => r.method === 'PUT' && r.url.includes(`${backupId}/vda.qcow2`));
      expect(imagePuts.length).toBeGreaterThan(0);
      // item 2: every regular activity the backup scheduled carries a capped retry policy
      const history = await handle.fetchHistory();
      const scheduled = (history.events ?? []).filter((e) => e.activityTaskScheduledEventAttributes);
      expect(scheduled.length).toBeGreaterThan(0);
      for (const e of scheduled) {
        const policy = e.activityTaskScheduledEventAttributes?.retryPolicy;
        expect(policy?.maximumAttempts ?? 0).toBeGreaterThan(0);
        expect(policy?.nonRetryableErrorTypes ?? []).toEqual([]);
      }
    } finally {
      await s3.cleanup();
    }
  });

  test('a cancel while uploading removes the staging images and what was uploaded', async () => {
    const dom = await newDomain({ prefix: 'saga', disks: [{ format: 'qcow2', sizeMiB: 256, randomMiB: 64 }] });
    const s3 = await s3Target();
    try {
      const { backupId, handle } = await startBackup(client, {
        domain: dom.name,
        host,
        method: 'push',
        targets: [s3.url],
        // 64 MiB at 2 MiB/s: the upload is still running when we cancel
        options: { heartbeatTimeoutSeconds: 10, s3: { bandwidthLimit: 2 << 20, partSizeMiB: 5 } },
      });
      await waitFor(
        'the upload to be under way',
        async () => {
          const d = await handle.describe();
          return d.raw.pendingActivities?.some((a) => a.activityType?.name === 'shipImage') &&
            proxy.seen.some((r) => r.url.includes(`${backupId}/vda.qcow2`))
            ? true
            : undefined;
        },
        { timeoutMs: 180_000, intervalMs: 200 },
      );
      await handle.cancel();
      await expect(handle.result()).rejects.toThrow(WorkflowFailedError);
      expect((await handle.describe()).status.name).toBe('CANCELLED');
      // nothing of the backup is left: no staging dir on the host, no object or multipart upload on the target
      for (const dir of stagingDirsOf(backupId)) expect(existsSync(dir)).toBe(false);
      expect(await s3.leftovers()).toEqual([]);
    } finally {
      await s3.cleanup();
    }
  });

  test('an invalid heartbeat timeout sent straight to Temporal fails the workflow at once with one sentence', async () => {
    for (const bad of [Number('abc'), -5, 1.5]) {
      const req: BackupRequest = {
        backupId: `vmbt-saga-x-20260101T000000Z-${Math.random().toString(16).slice(2, 6)}`,
        domain: 'vmbt-saga-x',
        host,
        method: 'push',
        targets: ['file:///tmp/vmbackup-saga-never'],
        options: { heartbeatTimeoutSeconds: bad },
        requestedAt: new Date().toISOString(),
      };
      const handle = await client.workflow.start('backupDomain', {
        taskQueue: hostTaskQueue(host),
        workflowId: `vmbt-saga-invalid-${req.backupId}`,
        args: [req],
      });
      const why = await failureOf(handle);
      expect(why).toMatch(/the heartbeat timeout must be a whole number of seconds from 5 to 3600/);
      const history = await handle.fetchHistory();
      expect(
        (history.events ?? []).some(
          (e) =>
            e.activityTaskScheduledEventAttributes ||
            e.markerRecordedEventAttributes?.markerName === 'core_local_activity',
        ),
      ).toBe(false);
    }
  });
});

/** Where a push backup's staging can be: under the state dir or the QEMU-reachable fallback. */
function stagingDirsOf(backupId: string): string[] {
  return [join(stackEnv().stateDir, 'staging', backupId), join('/var/lib/vmbackup/staging', backupId)];
}

describe('push job undo is registered before the job starts (real stack, in-test worker)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    Runtime.install({ logger: new DefaultLogger('WARN') });
  });
  afterAll(async () => {
    await closeClient?.();
  });

  test('beginPushBackup failing after libvirt started the job: the job is aborted and staging removed', async () => {
    const dom = await newDomain({ prefix: 'saga', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const host = uniqueHost('saga');
    const env = stackEnv();
    const hypervisor = createVirshHypervisor({ uri: env.libvirt.uri });
    const real = createActivities({
      hypervisor,
      stateDir: env.stateDir,
      openTarget: (url, options) => openTarget(url, { ...options, env: s3Env() }),
    });
    let started = false;
    const activities = {
      ...real,
      // The step dies after libvirt accepted the job (a timeout or a crash at the wrong moment).
      beginPushBackup: async (input: Parameters<typeof real.beginPushBackup>[0]) => {
        await real.beginPushBackup(input);
        started = await jobActive(input.domain);
        throw ApplicationFailure.nonRetryable('injected: the step failed after the job started', 'InjectedFault');
      },
    };
    const worker = await startInProcessHostWorker(host, activities);
    try {
      const { backupId, handle } = await startBackup(client, {
        domain: dom.name,
        host,
        method: 'push',
        targets: [`file://${join(env.stateDir, 'test-saga-target')}`],
        options: { heartbeatTimeoutSeconds: 10 },
      });
      expect(await failureOf(handle)).toMatch(/injected: the step failed after the job started/);
      expect(started).toBe(true); // the fault really came after libvirt started the job
      await waitFor('the job to be gone', async () => !(await jobActive(dom.name)), { timeoutMs: 30_000 });
      const { stdout } = await run('virsh', ['domjobinfo', dom.name, '--completed']);
      expect(stdout).toMatch(/Job type:\s+(Cancelled|None)/);
      for (const dir of stagingDirsOf(backupId)) expect(existsSync(dir)).toBe(false);
      expect(await dom.state()).toBe('running');
    } finally {
      await worker.stop();
      hypervisor.close();
    }
  });
});
