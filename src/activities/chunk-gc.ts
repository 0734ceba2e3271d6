/**
 * The gc of a chunk repository, run by the worker of the host that reaches the target. The password is the worker's
 * own (read at its start); the workflow input carries none.
 */
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { ChunkGcError, checkGrace, collectChunkGarbage } from '../repository/chunk-gc';
import { isChunkFormatError, openRepository } from '../repository/chunks';
import { CHUNK_GC_MAX_LISTED, chunkGcWorkflowId } from '../shared/chunk-gc';
import type { ChunkGcActivities, ChunkGcInput, ChunkGcResult } from '../shared/chunk-gc';
import { ErrorType } from '../shared/errors';
import { permanent } from './failures';
import { withTarget } from './storage';
import type { StorageActivityDeps } from './storage';

export interface ChunkGcActivityDeps extends StorageActivityDeps {
  /** the chunk repositories' password, read by the worker at its start */
  repositoryPassword?: string;
}

export function createChunkGcActivities(deps: ChunkGcActivityDeps): ChunkGcActivities {
  return {
    async collectChunkGarbage(input: ChunkGcInput): Promise<ChunkGcResult> {
      // only a target this worker writes to (--allow-target): gc deletes
      deps.paths.checkTarget(input?.target, 'collectChunkGarbage');
      const grace = input.graceSeconds;
      try {
        checkGrace(grace);
      } catch (err) {
        throw permanent(`collectChunkGarbage: ${(err as Error).message}`, ErrorType.InvalidInput);
      }
      const ctx = Context.current();
      const keepAlive = setInterval(() => ctx.heartbeat(), 10_000);
      ctx.heartbeat();
      try {
        return await withTarget(deps, input.target, input.s3Options, async (target) => {
          const repo = await openRepository(target, deps.repositoryPassword);
          // the workflow id is what keeps two gcs of one repository apart: anyone may start a workflow, so one whose
          // id names another repository is refused rather than run beside that repository's own gc
          const expected = chunkGcWorkflowId(repo.config.repositoryId);
          if (ctx.info.workflowExecution?.workflowId !== expected)
            throw permanent(
              `collectChunkGarbage: the gc of the chunk repository on ${target.displayUrl} runs only as workflow ${expected}.`,
              ErrorType.InvalidInput,
            );
          const report = await collectChunkGarbage(repo, { graceSeconds: grace, dryRun: Boolean(input.dryRun) });
          const { removed, keptLocked, ...counts } = report;
          return {
            ...counts,
            removedKeys: removed.slice(0, CHUNK_GC_MAX_LISTED).map((o) => o.key),
            moreRemoved: Math.max(0, removed.length - CHUNK_GC_MAX_LISTED),
            keptLocked: keptLocked.length,
            keptLockedKeys: keptLocked
              .slice(0, CHUNK_GC_MAX_LISTED)
              .map((o) => ({ key: o.key, retainUntil: o.retainUntil })),
          };
        });
      } catch (err) {
        if (err instanceof ChunkGcError) throw ApplicationFailure.nonRetryable(err.message, 'ChunkGcStopped');
        if (isChunkFormatError(err)) throw ApplicationFailure.nonRetryable(err.message, 'ChunkRepository');
        throw err;
      } finally {
        clearInterval(keepAlive);
      }
    },
  };
}
