/**
 * Committed histories of real backups (push, push with a worker killed mid-job, snapshot,
 * offline) replay against the current workflow code without non-determinism; a deliberately
 * changed workflow fails the same replay.
 */
import { execFile } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const dir = join(__dirname, 'histories');
const files = readdirSync(dir).filter((f) => f.endsWith('.json'));

interface Replayed {
  workflowId: string;
  error: { name: string; message: string } | null;
}

async function replay(workflowsPath: string): Promise<Replayed[]> {
  const { stdout } = await run(process.execPath, [join(__dirname, 'replay-histories.js'), workflowsPath, dir], {
    maxBuffer: 16 << 20,
  });
  return JSON.parse(stdout.trim().split('\n').pop() ?? '[]') as Replayed[];
}

describe('workflow history replay', () => {
  test('there are committed histories to replay (push, snapshot, offline)', () => {
    expect(files.length).toBeGreaterThanOrEqual(3);
  });

  test('every committed history replays against the current workflows', async () => {
    const results = await replay(join(__dirname, '..', '..', 'src', 'workflows', 'index.ts'));
    expect(results).toHaveLength(files.length);
    for (const r of results) expect(r).toEqual({ workflowId: r.workflowId, error: null });
  });

  test('a deliberately changed workflow fails the replay with a non-determinism error', async () => {
    const results = await replay(join(__dirname, 'changed-workflows.ts'));
    expect(results).toHaveLength(files.length);
    for (const r of results) expect(r.error?.name).toBe('DeterminismViolationError');
  });
});
