/** Echo workflow for the Temporal smoke test: one activity call, result returned to the client. */
import { proxyActivities } from '@temporalio/workflow';
import type { SmokeActivities } from './activities';

const { echo } = proxyActivities<SmokeActivities>({ startToCloseTimeout: '30 seconds' });

export async function echoWorkflow(text: string): Promise<string> {
  return await echo(text);
}
