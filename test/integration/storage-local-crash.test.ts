/**
 * The local driver's copy path (a target on another filesystem, or `vmbackup copy`) survives the worker
 * being killed with SIGKILL mid-copy: the retry resumes from the last heartbeat's checkpoint, copies only
 * the rest, and the stored image is byte-identical to the source.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { PutCheckpoint } from '../../src/storage/contract';
import { LocalTarget } from '../../src/storage/local/driver';
import { filesUnder } from '../storage/fixtures';
import { jsonLines } from '../helpers/jsonl';

const MiB = 1 << 20;
const ROOT = resolve(__dirname, '..', '..');
const WINDOW = 8 * MiB;

let work: string;

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmbackup-localcrash-'));
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

test('kill -9 mid-copy: the retry resumes from the checkpoint, copies only the rest, and the image is byte-identical', async () => {
  const bytes = randomBytes(6 * WINDOW + 12345);
  const image = join(work, 'vda.raw');
  await writeFile(image, bytes);
  const sha = createHash('sha256').update(bytes).digest('hex');
  const dir = join(work, 'target');
  const url = `file://${dir}`;
  const key = 'web/web-20261128T010000Z-dead/vda.raw';
  const cpFile = join(work, 'checkpoints.jsonl');
  // 8 MiB/s: about six seconds, plenty of time to kill it after two checkpoints
  const child = spawn(
    process.execPath,
    [
      '-r',
      join(ROOT, 'test/storage/ts-register.js'),
      join(ROOT, 'test/storage/upload-child.ts'),
      url,
      key,
      image,
      cpFile,
      JSON.stringify({ checkpointBytes: WINDOW, bandwidthLimit: 8 * MiB }),
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((r) => child.on('exit', (code, signal) => r(signal ? null : code)));
  let last: Record<string, unknown> | undefined;
  for (let i = 0; i < 600; i++) {
    const cps = await jsonLines(cpFile);
    if (cps.some((c) => 'done' in c)) throw new Error('the child finished before it could be killed');
    last = cps.at(-1);
    if (last && (last.offset as number) >= 2 * WINDOW) break;
    await sleep(50);
  }
  if (!last || (last.offset as number) < 2 * WINDOW) throw new Error(`the child made no progress: ${stderr}`);
  child.kill('SIGKILL');
  expect(await exited).toBeNull();
  const checkpoint = (await jsonLines(cpFile)).at(-1) as PutCheckpoint & { temp: string; offset: number };
  expect(checkpoint.offset % WINDOW).toBe(0);
  expect(checkpoint.offset).toBeLessThan(bytes.length);
  // what the dead copy left: its temp file, holding at least the durable prefix, and no visible object
  const temp = join(dir, 'web/web-20261128T010000Z-dead', checkpoint.temp);
  expect((await stat(temp)).size).toBeGreaterThanOrEqual(checkpoint.offset);
  expect(await readdir(join(dir, 'web/web-20261128T010000Z-dead'))).toEqual([checkpoint.temp]);

  // the retry, as Temporal would run it on another worker, with the last heartbeat's checkpoint
  const target = new LocalTarget(dir, url, { checkpointBytes: WINDOW });
  const r = await target.putImage(key, image, { resume: checkpoint, metadata: { sha256: sha } });
  process.stderr.write(
    `local kill -9 test: killed after ${checkpoint.offset / MiB} MiB were durable, the retry copied ${(r.bytesSent / MiB).toFixed(1)} MiB\n`,
  );
  expect(r.bytesSent).toBe(bytes.length - checkpoint.offset);
  expect(r.sha256).toBe(sha);
  expect((await readFile(join(dir, key))).equals(bytes)).toBe(true);
  expect((await target.stat(key))?.metadata?.sha256).toBe(sha);
  expect(await filesUnder(dir)).toEqual([key, 'web/web-20261128T010000Z-dead/.vda.raw.meta.json'].sort());
});
