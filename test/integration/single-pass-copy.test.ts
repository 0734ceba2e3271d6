/**
 * vmbackup's own single-pass copy (`--copy-tool auto`) on real files: the copy is byte-identical
 * (`cmp`), keeps holes like `cp --sparse=always`, reports the SHA-256 `sha256sum` computes, resumes after
 * its process is killed with SIGKILL (keeping a correct partial file, repairing a corrupted one), stops
 * when cancelled and fails with one sentence when the staging file system is full or denies the write.
 */
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { ApplicationFailure } from '@temporalio/common';
import { singlePassCopy } from '../../src/activities/single-pass-copy';
import type { SinglePassCopyOutcome } from '../../src/activities/single-pass-copy';
import { copyImage } from '../../src/activities/snapshot-copy';
import { fileHoles } from '../../src/hypervisor/qemu-img';
import { ErrorType } from '../../src/shared/errors';
import { jsonLines } from '../helpers/jsonl';

const run = promisify(execFile);
const MiB = 1 << 20;
const ROOT = resolve(__dirname, '..', '..');
const SIZE = 512 * MiB;
/** MiB of the source that hold data; the rest is a hole (or, 352-384, zeros written out) */
const DATA: Array<[number, number]> = [
  [0, 160],
  [224, 352],
  [384, 448],
];
/** one non-zero byte in the middle of the first hole: one 4 KiB block of data there */
const LONE_BYTE = 200 * MiB + 12345;

let work: string;
let source: string;
let sourceSha: string;
/** bytes `cp --sparse=always` allocates for a copy of the source */
let cpAllocated: number;

async function sha256sum(path: string): Promise<string> {
  return (await run('sha256sum', [path])).stdout.split(' ')[0]!;
}

async function same(a: string, b: string): Promise<boolean> {
  try {
    await run('cmp', [a, b]);
    return true;
  } catch (err) {
    if ((err as { code?: number }).code === 1) return false;
    throw err;
  }
}

async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

function copy(dest: string, more: Partial<Parameters<typeof singlePassCopy>[0]> = {}): Promise<SinglePassCopyOutcome> {
  return singlePassCopy({ source, dest, signal: new AbortController().signal, onProgress: () => undefined, ...more });
}

/** What a user checks: the same bytes, the same holes as cp leaves, the hash sha256sum computes. */
async function expectGoodCopy(dest: string, outcome: SinglePassCopyOutcome): Promise<void> {
  expect(await same(dest, source)).toBe(true);
  expect(outcome.sha256).toBe(sourceSha);
  expect(outcome.size).toBe(SIZE);
  expect((await stat(dest)).size).toBe(SIZE);
  // st_blocks also counts ext4's extent-tree blocks, which depend on how the writes landed
  expect(await allocated(dest)).toBeLessThanOrEqual(cpAllocated + MiB);
}

/**
 * Copies in a child process and kill -9s it once a checkpoint reached `stopAt` bytes (it then stands
 * still, with the writes that were in flight finished). Returns the last checkpoint and the partial size.
 */
async function killedCopy(dest: string, stopAt: number): Promise<{ checkpoint: number; partial: number }> {
  const events = `${dest}.events`;
  const child = spawn(
    process.execPath,
    [
      '-r',
      join(ROOT, 'test/storage/ts-register.js'),
      join(ROOT, 'test/helpers/copy-child.ts'),
      source,
      dest,
      events,
      String(32 * MiB),
      String(stopAt),
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<string | null>((r) => child.on('exit', (_code, signal) => r(signal)));
  let checkpoint = 0;
  for (let i = 0; i < 1200 && checkpoint < stopAt; i++) {
    const ev = await jsonLines(events);
    if (ev.some((e) => 'done' in e)) throw new Error('the copy finished before it could be killed');
    checkpoint = Math.max(0, ...ev.map((e) => Number(e.checkpoint ?? 0)));
    if (child.exitCode !== null) throw new Error(`the copy child exited (${child.exitCode}): ${stderr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  if (checkpoint < stopAt) throw new Error(`the copy child reached no checkpoint of ${stopAt} B: ${stderr}`);
  await new Promise((r) => setTimeout(r, 200)); // the reads and writes it had in flight end
  child.kill('SIGKILL');
  expect(await exited).toBe('SIGKILL');
  return { checkpoint, partial: (await stat(dest)).size };
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'snapcp-'));
  source = join(work, 'base.raw');
  const fh = await open(source, 'w');
  for (const [from, to] of DATA) for (let m = from; m < to; m++) await fh.write(randomBytes(MiB), 0, MiB, m * MiB);
  await fh.write(Buffer.alloc(32 * MiB), 0, 32 * MiB, 352 * MiB); // zeros written out: the copy makes a hole
  await fh.write(Buffer.from([0x42]), 0, 1, LONE_BYTE);
  await fh.truncate(SIZE); // ends in a hole
  await fh.close();
  sourceSha = await sha256sum(source);
  const byCp = join(work, 'by-cp.raw');
  await run('cp', ['--sparse=always', source, byCp]);
  cpAllocated = await allocated(byCp);
  await rm(byCp);
});
afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

test('a fresh copy: same bytes, holes where the base has zeros, SHA-256 as sha256sum computes it', async () => {
  const dest = join(work, 'fresh.raw');
  const progress: Array<[number, string]> = [];
  const outcome = await copy(dest, { onProgress: (n, phase) => progress.push([n, phase]) });
  await expectGoodCopy(dest, outcome);
  expect(outcome).toMatchObject({ resumedFrom: 0, bytesCopied: SIZE });
  // 352 MiB of data plus the lone 4 KiB block: the 32 MiB of written zeros became a hole as well
  expect(await allocated(dest)).toBeLessThanOrEqual(352 * MiB + 64 * 1024);
  expect(progress.at(-1)).toEqual([SIZE, 'copy']);
  expect(progress.every(([, phase]) => phase === 'copy')).toBe(true);
});

/** Bytes this process has read through read(2) and friends so far (page cache hits included). */
async function bytesRead(): Promise<number> {
  return Number(/^rchar: (\d+)$/m.exec(await readFile('/proc/self/io', 'utf8'))?.[1]);
}

test('given the holes qemu-img map finds, the copy hashes them without reading them and gets the same result', async () => {
  const holes = await fileHoles(source);
  // 160-224 MiB (split by the lone data block at 200 MiB) and 448-512 MiB; the zeros written at 352 MiB are data
  expect(holes).toEqual([
    [160 * MiB, LONE_BYTE - (LONE_BYTE % 4096)],
    [LONE_BYTE - (LONE_BYTE % 4096) + 4096, 224 * MiB],
    [448 * MiB, SIZE],
  ]);
  const dest = join(work, 'with-holes.raw');
  const before = await bytesRead();
  const outcome = await copy(dest, { holes });
  const read = (await bytesRead()) - before;
  await expectGoodCopy(dest, outcome);
  expect(read).toBeGreaterThanOrEqual(384 * MiB);
  expect(read).toBeLessThan(384 * MiB + 4 * MiB);
});

test('kill -9 mid-copy: the next attempt keeps the partial copy (at least up to the last checkpoint)', async () => {
  const dest = join(work, 'killed.raw');
  const { checkpoint, partial } = await killedCopy(dest, 128 * MiB);
  expect(partial).toBeGreaterThanOrEqual(checkpoint);
  expect(partial).toBeLessThan(SIZE);

  const phases = new Set<string>();
  const outcome = await copy(dest, { onProgress: (_n, phase) => phases.add(phase) });
  process.stderr.write(
    `single-pass copy killed at ${partial} B (checkpoint ${checkpoint} B): resumed from ${outcome.resumedFrom} B\n`,
  );
  expect(outcome.resumedFrom).toBeGreaterThanOrEqual(checkpoint);
  expect(outcome.resumedFrom).toBeLessThanOrEqual(partial);
  expect(outcome.bytesCopied).toBe(SIZE - outcome.resumedFrom);
  expect(phases).toEqual(new Set(['verify', 'copy']));
  await expectGoodCopy(dest, outcome);
});

test('kill -9 mid-copy, then the partial copy is damaged: the damage is found and copied over', async () => {
  const dest = join(work, 'damaged.raw');
  const { partial } = await killedCopy(dest, 256 * MiB);
  expect(partial).toBeGreaterThan(224 * MiB);
  // A stray byte where the base has a hole (160-224 MiB): the copy must end with a hole there again.
  const damage = 170 * MiB + 4100;
  const fh = await open(dest, 'r+');
  await fh.write(Buffer.from([0xff]), 0, 1, damage);
  await fh.close();

  // resumed as copyImage does it, skipping the holes: the damaged hole must be cut off, not left as it is
  const outcome = await copy(dest, { holes: await fileHoles(source) });
  expect(outcome.resumedFrom).toBe(damage - (damage % 4096)); // the block before the damage is kept
  await expectGoodCopy(dest, outcome);
});

test('a destination that is not a prefix of the base (longer, or wrong from byte 0) is copied anew', async () => {
  const longer = join(work, 'longer.raw');
  await run('truncate', ['-s', String(SIZE + MiB), longer]);
  await expectGoodCopy(longer, await copy(longer).then((o) => (expect(o.resumedFrom).toBe(0), o)));

  const foreign = join(work, 'foreign.raw');
  await writeFile(foreign, randomBytes(8 * MiB));
  const outcome = await copy(foreign);
  expect(outcome.resumedFrom).toBe(0);
  await expectGoodCopy(foreign, outcome);

  // a complete copy is verified, not rewritten
  const again = await copy(foreign);
  expect(again).toMatchObject({ resumedFrom: SIZE, bytesCopied: 0, sha256: sourceSha });
});

test('cancellation stops the copy: the promise rejects with the reason, nothing is left open or writing', async () => {
  const dest = join(work, 'cancelled.raw');
  const fdsBefore = (await readdir('/proc/self/fd')).length;
  const ac = new AbortController();
  await expect(
    copy(dest, {
      signal: ac.signal,
      chunkSize: MiB,
      onProgress: (n) => n > 16 * MiB && ac.abort(new Error('cancelled by test')),
    }),
  ).rejects.toThrow('cancelled by test');
  const size = (await stat(dest)).size;
  expect(size).toBeLessThan(SIZE);
  await new Promise((r) => setTimeout(r, 300));
  expect((await stat(dest)).size).toBe(size);
  expect((await readdir('/proc/self/fd')).length).toBe(fdsBefore);
  // an attempt cancelled earlier leaves nothing that keeps the next one from running
  await expectGoodCopy(dest, await copy(dest));
});

describe('file-system errors, as copyBaseImages reports them', () => {
  let mnt: string;

  beforeAll(async () => {
    mnt = join(work, 'small');
    await mkdir(mnt);
    try {
      await run('mount', ['-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', mnt]);
    } catch (err) {
      throw new Error(`cannot mount a 32 MiB tmpfs for the no-space test (run the tests as root): ${String(err)}`);
    }
  });
  afterAll(async () => {
    await run('umount', [mnt]).catch(() => undefined);
  });

  const auto = (dest: string) =>
    copyImage({
      source,
      dest,
      tool: 'auto',
      rsyncPath: 'rsync',
      signal: new AbortController().signal,
      onProgress: () => undefined,
    });

  test('a full staging file system: one sentence, permanent (no retry)', async () => {
    const dest = join(mnt, 'vda.raw');
    const err = await auto(dest).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApplicationFailure);
    expect((err as ApplicationFailure).message).toBe(
      `vmbackup ran out of space writing ${dest}: free space in the staging directory`,
    );
    expect((err as ApplicationFailure).type).toBe(ErrorType.NoSpace);
    expect((err as ApplicationFailure).nonRetryable).toBe(true);
  });

  test('a destination the copy may not write: one sentence, permanent', async () => {
    const dest = join(work, 'immutable.raw');
    await writeFile(dest, '');
    await run('chattr', ['+i', dest]);
    try {
      const err = await auto(dest).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ApplicationFailure);
      expect((err as ApplicationFailure).message).toBe(
        `vmbackup was denied access copying to ${dest}: EPERM: operation not permitted, open '${dest}'`,
      );
      expect((err as ApplicationFailure).type).toBe(ErrorType.PermissionDenied);
      expect((err as ApplicationFailure).nonRetryable).toBe(true);
    } finally {
      await run('chattr', ['-i', dest]);
    }
  });
});
