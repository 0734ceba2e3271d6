/**
 * realpathLoose, under the host's path checks (HostPaths.inside): a symlink to nowhere is refused, a missing path
 * resolves through its nearest existing ancestor, and a directory that other backups create and remove meanwhile
 * (a target's shared `.staging`) is never mistaken for a symlink to nowhere. A scheduled run of 40 VMs into one
 * target once failed a backup with "`.staging` is a symbolic link to a missing file": its realpath saw the directory
 * gone (another backup's cleanup), and its lstat saw it back (a third backup's prepareStaging).
 */
import { mkdir, mkdtemp, rm, rmdir, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { realpathLoose } from '../../src/activities/host-paths';

let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-realpath-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('a symlink to nowhere is refused; a missing path resolves through its existing ancestor', async () => {
  await symlink(join(dir, 'nowhere'), join(dir, 'link'));
  await expect(realpathLoose(join(dir, 'link', 'x'))).rejects.toThrow(/is a symbolic link to a missing file$/);
  await mkdir(join(dir, 'real'));
  await symlink(join(dir, 'real'), join(dir, 'good'));
  expect(await realpathLoose(join(dir, 'good', 'a', 'b'))).toBe(join(dir, 'real', 'a', 'b'));
  expect(await realpathLoose(join(dir, 'missing', 'a'))).toBe(join(dir, 'missing', 'a'));
});

test('a directory created and removed by others meanwhile is resolved, never called a symlink', async () => {
  const shared = join(dir, '.staging');
  let stop = false;
  // others: one backup's prepareStaging makes it, another's cleanupStaging removes it once empty, over and over
  const churn = (async () => {
    while (!stop) {
      await mkdir(shared).catch(() => undefined);
      await rmdir(shared).catch(() => undefined);
    }
  })();
  const errors: string[] = [];
  try {
    for (let i = 0; i < 3000; i++) {
      const out = await realpathLoose(join(shared, 'b1')).catch((err: Error) => {
        errors.push(err.message);
        return undefined;
      });
      if (out !== undefined) expect(out).toBe(join(dir, '.staging', 'b1'));
    }
  } finally {
    stop = true;
    await churn;
  }
  expect(errors.filter((m) => /symbolic link/.test(m))).toEqual([]);
});
