/**
 * A retention step whose task never reaches the worker (a poll answer lost on an overloaded host: the server
 * counts the activity as started, nobody runs it). The scale simulation saw it on 3 of 50 runs. applyRetention
 * heartbeats while it works and has a 1 min heartbeat timeout, so the lost attempt is retried after a minute
 * and the run completes; with only its 30 min start-to-close timeout the run would hang that long (longer than
 * this test's deadline). Real stack: Temporal, libvirt, a local target.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Context } from '@temporalio/activity';
import { Client } from '@temporalio/client';
import { NativeConnection, Worker } from '@temporalio/worker';
import { createActivities } from '../../src/activities';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import { hostTaskQueue } from '../../src/shared/names';
import type { ScheduledBackupsInput, ScheduledBackupsResult } from '../../src/shared/schedule';
import { openTarget } from '../../src/storage/registry';
import { createSlotWorker } from '../../src/worker';
import { temporalRunningBackupOf } from '../../src/worker/slots';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { uniqueHost } from '../helpers/vmbackup';

const REPO_ROOT = join(__dirname, '..', '..');

describe('a lost retention task', () => {
  const newDomain = useFixtureDomains();

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
  });

  test('is retried after its heartbeat timeout: the scheduled run completes and retention runs', async () => {
    const bundle = join(REPO_ROOT, 'dist', 'workflow-bundle.js');
    if (!existsSync(bundle))
      throw new Error('dist/workflow-bundle.js is missing: run `npm run build` (npm test does it)');
    const env = stackEnv();
    const dom = await newDomain({
      prefix: 'lost',
      start: false,
      disks: [{ format: 'qcow2', sizeMiB: 8, patterns: [{ byte: 0x21, offsetMiB: 0, lengthMiB: 1 }] }],
    });
    const host = uniqueHost('lost');
    const controlQueue = `vmbt-control-lost-${randomBytes(3).toString('hex')}`;
    const work = await mkdtemp(join(env.stateDir, 'test-lost-task-'));
    const target = pathToFileURL(join(work, 'target')).href;
    const connection = await NativeConnection.connect({ address: env.temporal.address });
    const client = new Client({ connection, namespace: env.temporal.namespace });
    const hypervisor = createVirshHypervisor({ uri: env.libvirt.uri });
    const real = createActivities({
      hypervisor,
      stateDir: env.stateDir,
      openTarget: (url, options) => openTarget(url, { ...options, env: {} }),
      runningBackupOf: temporalRunningBackupOf(client),
    });
    const attempts: number[] = [];
    const activities = {
      ...real,
      // attempt 1 is the lost task: it never runs (no heartbeat, no result) until the worker shuts down
      applyRetention: async (input: Parameters<typeof real.applyRetention>[0]) => {
        const ctx = Context.current();
        attempts.push(ctx.info.attempt);
        if (ctx.info.attempt === 1) {
          await new Promise((_, reject) =>
            ctx.cancellationSignal.addEventListener('abort', () => reject(ctx.cancellationSignal.reason)),
          );
        }
        return real.applyRetention(input);
      },
    };
    const workers = [
      await Worker.create({
        connection,
        namespace: env.temporal.namespace,
        taskQueue: hostTaskQueue(host),
        activities,
        workflowBundle: { codePath: bundle },
        shutdownGraceTime: '1s',
      }),
      await createSlotWorker({ connection, namespace: env.temporal.namespace, host, maxConcurrentBackups: 2, client }),
      await Worker.create({
        connection,
        namespace: env.temporal.namespace,
        taskQueue: controlQueue,
        workflowBundle: { codePath: bundle },
      }),
    ];
    const running = Promise.all(workers.map((w) => w.run()));
    try {
      const input: ScheduledBackupsInput = {
        schedule: `lost-${host}`,
        group: { domains: [{ host, domain: dom.name }], allOn: [] },
        method: 'auto',
        targets: [target],
        options: {},
        retention: { keepLast: 1 },
        waitSeconds: 600,
      };
      const started = Date.now();
      const handle = await client.workflow.start('scheduledBackups', {
        taskQueue: controlQueue,
        workflowId: `vmbt-lost-task-${host}`,
        args: [input],
      });
      // a deadline the behaviour needs (a hung retention holds the run for its 30 min start-to-close)
      let timer: NodeJS.Timeout | undefined;
      const result = (await Promise.race([
        handle.result(),
        new Promise((_, reject) => {
          timer = setTimeout(
            () =>
              reject(
                new Error(
                  'the scheduled run did not complete within 4 min: the lost retention attempt was never retried',
                ),
              ),
            240_000,
          );
        }),
      ]).finally(() => clearTimeout(timer))) as ScheduledBackupsResult;
      expect(result.vms.map((v) => [v.domain, v.status])).toEqual([[dom.name, 'completed']]);
      expect(result.retention).toHaveLength(1);
      expect(result.retention[0]).toMatchObject({ domain: dom.name, kept: 1, removed: [] });
      expect(result.retention[0]!.error).toBeUndefined();
      // the lost attempt, then the one the heartbeat timeout started
      expect(attempts).toEqual([1, 2]);
      process.stderr.write(
        `lost retention task: the run completed after ${Math.round((Date.now() - started) / 1000)} s\n`,
      );
    } finally {
      // a run that hung (the failure above) must not stay open on the shared server
      await client.workflow
        .getHandle(`vmbt-lost-task-${host}`)
        .terminate('test over')
        .catch(() => undefined);
      for (const w of workers) if (w.getState() === 'RUNNING') w.shutdown();
      await running;
      hypervisor.close();
      await connection.close();
      await rm(work, { recursive: true, force: true });
    }
  });
});
