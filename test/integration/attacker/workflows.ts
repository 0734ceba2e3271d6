/**
 * What anyone who can reach the Temporal cluster can run: a workflow of their own, on a task queue of
 * their own, that schedules any activity by name on a host's task queue with any input.
 */
import { proxyActivities } from '@temporalio/workflow';

type AnyActivities = Record<string, (input: unknown) => Promise<unknown>>;

export async function callHostActivity(taskQueue: string, activity: string, input: unknown): Promise<unknown> {
  const acts = proxyActivities<AnyActivities>({
    taskQueue,
    startToCloseTimeout: '2 minutes',
    retry: { maximumAttempts: 1 },
  });
  const fn = acts[activity];
  if (!fn) throw new Error(`no activity ${activity}`);
  return await fn(input);
}
