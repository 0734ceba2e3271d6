/** The streaming SHA-256 of a file every step uses. */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sha256File } from '../../src/shared/sha256-file';

describe('sha256File', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-sha-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test.each([0, 1, 4 << 20, (9 << 20) + 123])('equals crypto over the whole file (%i bytes)', async (size) => {
    const data = randomBytes(size);
    const file = join(dir, `f${size}`);
    await writeFile(file, data);
    const progress: number[] = [];
    const digest = await sha256File(file, { onProgress: (n) => progress.push(n) });
    expect(digest).toBe(createHash('sha256').update(data).digest('hex'));
    if (size > 0) expect(progress.at(-1)).toBe(size);
    expect([...progress].sort((a, b) => a - b)).toEqual(progress);
  });

  test('reads a small file 1 MiB and a big one 4 MiB at a time, and hashes the whole of either', async () => {
    const small = join(dir, 'small');
    await writeFile(small, randomBytes((9 << 20) + 123));
    const smallProgress: number[] = [];
    await sha256File(small, { onProgress: (n) => smallProgress.push(n) });
    expect(smallProgress.slice(0, 2)).toEqual([1 << 20, 2 << 20]);

    // 300 MiB, sparse, with data at the start, in the middle and at the end
    const big = join(dir, 'big-sparse');
    const size = (300 << 20) + 123;
    const fh = await open(big, 'w');
    await fh.truncate(size);
    for (const at of [0, 150 << 20, size - (1 << 20)]) await fh.write(randomBytes(1 << 20), 0, 1 << 20, at);
    await fh.close();
    const bigProgress: number[] = [];
    const digest = await sha256File(big, { onProgress: (n) => bigProgress.push(n) });
    const expected = createHash('sha256');
    for await (const chunk of createReadStream(big)) expected.update(chunk as Buffer);
    expect(digest).toBe(expected.digest('hex'));
    expect(bigProgress.slice(0, 2)).toEqual([4 << 20, 8 << 20]);
    expect(bigProgress.at(-1)).toBe(size);
    await rm(big);
  });

  test('stops when aborted', async () => {
    const file = join(dir, 'big');
    await writeFile(file, Buffer.alloc(12 << 20));
    const ac = new AbortController();
    const run = sha256File(file, { signal: ac.signal, onProgress: () => ac.abort(new Error('stop')) });
    await expect(run).rejects.toThrow('stop');
  });

  test('a missing file rejects with ENOENT', async () => {
    await expect(sha256File(join(dir, 'missing'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
