/**
 * Whoever else can write a local target can replace an image with a symbolic link to a file only root may read.
 * The worker and the CLI run as root: restore and copy must refuse the link, never read through it. The outside
 * file here holds exactly the image's bytes, so the manifest's SHA-256 matches: the case of an attacker who knows
 * the content of the file they point at (or wants to learn whether they guessed it), where the hash check alone
 * would let the read through.
 */
import { copyFile, mkdtemp, readdir, rm, symlink, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { copyBackup } from '../../src/repository/copy';
import { restoreBackup } from '../../src/repository/restore';
import { openTarget } from '../../src/storage/registry';
import { backUp, makeImage } from '../storage/backups';
import { localTarget } from '../storage/fixtures';

const DOMAIN = 'links';
const ID = 'links-20261130T080000Z-aa11';

describe('a local target whose image is a link to a file outside it', () => {
  let work: string;
  let source: Awaited<ReturnType<typeof localTarget>>;
  let dest: Awaited<ReturnType<typeof localTarget>>;

  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'vmbackup-links-'));
    source = await localTarget();
    dest = await localTarget();
    const image = await makeImage(work, 'vda', 'qcow2', 0x41);
    await backUp(source.url, DOMAIN, ID, '2026-11-30T08:00:00.000Z', [image]);
    // the stored image becomes a link to a root-only file with the same bytes
    const outside = join(work, 'root-only.qcow2');
    const stored = join(source.dir, DOMAIN, ID, 'vda.qcow2');
    await copyFile(stored, outside);
    await unlink(stored);
    await symlink(outside, stored);
  });

  afterAll(async () => {
    await source?.cleanup();
    await dest?.cleanup();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test.each(['qcow2', 'raw'] as const)('restore --format %s refuses it and writes nothing', async (format) => {
    const to = await mkdtemp(join(work, 'restore-'));
    const target = openTarget(source.url, { env: {} });
    try {
      await expect(restoreBackup(target, ID, { to, format })).rejects.toThrow(
        /is a symbolic link|is missing|does not exist/,
      );
      expect(await readdir(to)).toEqual([]);
    } finally {
      await target.close();
    }
  });

  test('copy refuses it and the other target gets nothing', async () => {
    const from = openTarget(source.url, { env: {} });
    const to = openTarget(dest.url, { env: {} });
    try {
      await expect(copyBackup(from, to, ID)).rejects.toThrow(/is missing|is a symbolic link/);
      expect(await dest.leftovers()).toEqual([]);
    } finally {
      await from.close();
      await to.close();
    }
  });
});
