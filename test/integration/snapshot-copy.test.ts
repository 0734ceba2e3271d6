/**
 * The copy tool on real files (rsync 3.x, cp): a killed rsync leaves its bytes in place and the
 * next copy continues from them; the result is byte-identical and still sparse.
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  closeSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { copyImage } from '../../src/activities/snapshot-copy';

const MiB = 1 << 20;

/** kill -9 our own child process running `comm` (found through /proc by parent pid). */
function killChildNamed(comm: string): number {
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
    } catch {
      continue;
    }
    // pid (comm) state ppid ...
    const m = /^(\d+) \((.*)\) \S+ (\d+)/.exec(stat);
    if (m && m[2] === comm && Number(m[3]) === process.pid) {
      process.kill(Number(m[1]), 'SIGKILL');
      return Number(m[1]);
    }
  }
  throw new Error(`no child process named ${comm}`);
}

function sha(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

describe('snapshot copy tool', () => {
  let dir: string;
  let source: string;
  const size = 256 * MiB;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'snap-copy-'));
    source = join(dir, 'base.raw');
    // 192 MiB of random data, then a 64 MiB hole: the copy must keep the hole.
    writeFileSync(source, '');
    const fd = openSync(source, 'r+');
    for (let i = 0; i < 192; i++) writeSync(fd, randomBytes(MiB), 0, MiB, i * MiB);
    closeSync(fd);
    execFileSync('truncate', ['-s', String(size), source]);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('resumes a killed rsync from its partial file instead of starting over', async () => {
    const dest = join(dir, 'resumed.raw');
    const ac = new AbortController();
    // kill -9 rsync (as a worker crash would) once a quarter of the data is in the destination
    let killed = false;
    const watch = setInterval(() => {
      const written = statSync(dest, { throwIfNoEntry: false })?.size ?? 0;
      if (!killed && written >= 48 * MiB) {
        killed = true;
        killChildNamed('rsync');
      }
    }, 5);
    try {
      await expect(
        copyImage({ source, dest, tool: 'rsync', rsyncPath: 'rsync', signal: ac.signal, onProgress: () => {} }),
      ).rejects.toThrow(/rsync failed \(SIGKILL\)/);
    } finally {
      clearInterval(watch);
    }
    expect(killed).toBe(true);
    const partial = statSync(dest).size;
    expect(partial).toBeGreaterThan(0);
    expect(partial).toBeLessThan(size);

    const outcome = await copyImage({
      source,
      dest,
      tool: 'rsync',
      rsyncPath: 'rsync',
      signal: ac.signal,
      onProgress: () => {},
    });
    console.log(`rsync resume: partial ${partial} B kept, ${outcome.bytesCopied} B re-copied of ${size} B`);
    expect(outcome.resumedFrom).toBe(partial);
    expect(outcome.bytesCopied).toBe(size - partial);
    expect(sha(dest)).toBe(sha(source));
    // the 64 MiB hole is still a hole (the resumed tail went through fallocate --dig-holes)
    expect(statSync(dest).blocks * 512).toBeLessThanOrEqual(193 * MiB);
  });

  it('copies with cp --sparse=always, starting over', async () => {
    const dest = join(dir, 'cp.raw');
    writeFileSync(dest, 'stale partial copy');
    const outcome = await copyImage({
      source,
      dest,
      tool: 'cp',
      rsyncPath: 'rsync',
      signal: new AbortController().signal,
      onProgress: () => {},
    });
    expect(outcome).toEqual({ resumedFrom: 0, bytesCopied: size });
    expect(sha(dest)).toBe(sha(source));
    expect(statSync(dest).blocks * 512).toBeLessThanOrEqual(193 * MiB);
  });

  it('stops the copy when the activity is cancelled', async () => {
    const dest = join(dir, 'cancelled.raw');
    const ac = new AbortController();
    const copy = copyImage({
      source,
      dest,
      tool: 'rsync',
      rsyncPath: 'rsync',
      signal: ac.signal,
      onProgress: (n) => n > 0 && ac.abort(new Error('cancelled by test')),
    });
    await expect(copy).rejects.toThrow('cancelled by test');
  });
});
