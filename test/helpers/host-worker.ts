/**
 * A host's worker run inside the test process, on the prebuilt workflow bundle, with the activities the test gives
 * (real ones, some wrapped to inject a fault or count calls), plus the host's slot worker every backup waits on first.
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Client } from '@temporalio/client';
import { NativeConnection, Worker } from '@temporalio/worker';
import { hostTaskQueue } from '../../src/shared/names';
import { createSlotWorker } from '../../src/worker';
import { stackEnv } from './stack';

const BUNDLE = join(resolve(__dirname, '..', '..'), 'dist', 'workflow-bundle.js');

export interface InProcessHostWorker {
  /** shuts both workers down and closes their connection */
  stop(): Promise<void>;
}

export async function startInProcessHostWorker(host: string, activities: object): Promise<InProcessHostWorker> {
  if (!existsSync(BUNDLE))
    throw new Error('dist/workflow-bundle.js is missing: run `npm run build` (npm test does it)');
  const env = stackEnv();
  const connection = await NativeConnection.connect({ address: env.temporal.address });
  const worker = await Worker.create({
    connection,
    namespace: env.temporal.namespace,
    taskQueue: hostTaskQueue(host),
    activities,
    workflowBundle: { codePath: BUNDLE },
  });
  const slots = await createSlotWorker({
    connection,
    namespace: env.temporal.namespace,
    host,
    maxConcurrentBackups: 2,
    client: new Client({ connection, namespace: env.temporal.namespace }),
  });
  const running = Promise.all([worker.run(), slots.run()]);
  return {
    async stop() {
      worker.shutdown();
      slots.shutdown();
      await running;
      await connection.close();
    },
  };
}
