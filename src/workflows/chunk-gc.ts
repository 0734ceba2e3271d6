/**
 * gcChunkRepository: gc of one chunk repository (src/repository/chunk-gc.ts) on the host whose worker reaches its
 * target, under the workflow id `gc-chunks-<repositoryId>` (one at a time per repository). The password never passes
 * through here: the worker has its own.
 */
import { proxyActivities } from '@temporalio/workflow';
import type { ChunkGcActivities, ChunkGcInput, ChunkGcResult } from '../shared/chunk-gc';
import { hostTaskQueue } from '../shared/names';

export async function gcChunkRepository(input: ChunkGcInput): Promise<ChunkGcResult> {
  const { collectChunkGarbage } = proxyActivities<ChunkGcActivities>({
    taskQueue: hostTaskQueue(input.host),
    // a listing of millions of chunks and their deletes; the activity heartbeats while it works
    startToCloseTimeout: '24h',
    heartbeatTimeout: '2m',
    retry: { maximumAttempts: 5, initialInterval: '5s', nonRetryableErrorTypes: ['InvalidInput', 'InvalidTarget'] },
  });
  return collectChunkGarbage(input);
}
