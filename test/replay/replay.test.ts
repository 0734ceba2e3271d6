/**
 * Committed histories of real backups replay against the current workflow code without
 * non-determinism; a deliberately changed workflow fails the same replay.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Worker } from '@temporalio/worker';
import { DeterminismViolationError } from '@temporalio/workflow';
import type { ReplayResult } from '@temporalio/worker';

const dir = join(__dirname, 'histories');
const files = readdirSync(dir).filter((f) => f.endsWith('.json'));

function histories() {
  return files.map((f) => ({
    workflowId: f.replace(/\.json$/, ''),
    history: JSON.parse(readFileSync(join(dir, f), 'utf8')),
  }));
}

async function replay(workflowsPath: string): Promise<ReplayResult[]> {
  const results: ReplayResult[] = [];
  for await (const r of Worker.runReplayHistories({ workflowsPath, replayName: 'vmbackup-replay' }, histories())) {
    results.push(r);
  }
  return results;
}

describe('workflow history replay', () => {
  test('there are committed histories to replay (push, snapshot, offline)', () => {
    expect(files.length).toBeGreaterThanOrEqual(3);
  });

  test('every committed history replays against the current workflows', async () => {
    const results = await replay(require.resolve('../../src/workflows'));
    expect(results).toHaveLength(files.length);
    for (const r of results)
      expect({ id: r.workflowId, error: r.error?.message }).toEqual({ id: r.workflowId, error: undefined });
  });

  test('a deliberately changed workflow fails the replay with a non-determinism error', async () => {
    const results = await replay(require.resolve('./changed-workflows'));
    expect(results).toHaveLength(files.length);
    for (const r of results) expect(r.error).toBeInstanceOf(DeterminismViolationError);
  });
});
