/**
 * Whether a host's worker is there to run what a command starts on its task queue. Temporal remembers the pollers of
 * a task queue for a few minutes after their last poll; a queue nobody polled in that time has no worker behind it,
 * and a workflow started there only waits.
 */
import type { Client } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import { hostTaskQueue } from '../shared/names';

/**
 * True when a worker for HOST polled its task queue lately, false when none did; undefined when Temporal would not
 * say (an API key without that permission, an old server): the caller then goes on as before.
 */
export async function hostWorkerSeen(client: Client, host: string): Promise<boolean | undefined> {
  try {
    const r = await client.workflowService.describeTaskQueue({
      namespace: client.options.namespace,
      taskQueue: { name: hostTaskQueue(host), kind: temporal.api.enums.v1.TaskQueueKind.TASK_QUEUE_KIND_NORMAL },
      taskQueueType: temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    });
    return (r.pollers?.length ?? 0) > 0;
  } catch {
    return undefined;
  }
}
