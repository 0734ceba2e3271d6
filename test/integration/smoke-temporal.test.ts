/** The real Temporal dev server from scripts/stack.sh: a worker runs a workflow and its activity end to end. */
import { randomUUID } from 'node:crypto';
import { Client, Connection } from '@temporalio/client';
import { SearchAttributeType, defineSearchAttributeKey } from '@temporalio/common';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import { requireTemporal, stackEnv } from '../helpers/stack';
import { createSmokeActivities } from './smoke/activities';
import { echoWorkflow } from './smoke/workflows';

const VmbackupDomain = defineSearchAttributeKey('VmbackupDomain', SearchAttributeType.KEYWORD);

describe('Temporal smoke (real server)', () => {
  const { address, namespace } = stackEnv().temporal;
  const taskQueue = `smoke-${randomUUID()}`;
  let nativeConnection: NativeConnection | undefined;
  let connection: Connection | undefined;
  let worker: Worker | undefined;
  let workerRun: Promise<void> | undefined;

  beforeAll(async () => {
    await requireTemporal();
    Runtime.install({ logger: new DefaultLogger('WARN') }); // the worker's state changes are noise here
    nativeConnection = await NativeConnection.connect({ address });
    worker = await Worker.create({
      connection: nativeConnection,
      namespace,
      taskQueue,
      workflowsPath: require.resolve('./smoke/workflows'),
      activities: createSmokeActivities(),
    });
    workerRun = worker.run();
    connection = await Connection.connect({ address });
  });

  afterAll(async () => {
    if (worker && worker.getState() === 'RUNNING') worker.shutdown();
    await workerRun;
    await connection?.close();
    await nativeConnection?.close();
  });

  it('runs an echo workflow through a worker and an activity, with a custom search attribute', async () => {
    if (!connection) throw new Error('no client connection');
    const client = new Client({ connection, namespace });
    const workflowId = `smoke-echo-${randomUUID()}`;
    const handle = await client.workflow.start(echoWorkflow, {
      taskQueue,
      workflowId,
      args: ['hello from the smoke test'],
      workflowExecutionTimeout: '1 minute',
      typedSearchAttributes: [{ key: VmbackupDomain, value: 'vmbt-smoke' }],
    });

    await expect(handle.result()).resolves.toBe('echo: hello from the smoke test');
    const description = await handle.describe();
    expect(description.status.name).toBe('COMPLETED');
    expect(description.typedSearchAttributes.get(VmbackupDomain)).toBe('vmbt-smoke');
  });
});
