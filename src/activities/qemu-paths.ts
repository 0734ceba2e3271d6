/**
 * Files QEMU itself must open (push-backup targets, snapshot overlays) need a path the QEMU
 * user (libvirt-qemu under the system daemon) can traverse. Without it libvirt fails with
 * "Could not open '...': Permission denied" from blockdev-add. A directory under a private
 * home (/root is 0700) is not reachable, so such files go to a world-searchable place instead.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { makeDirs, QEMU_DIR_MODE } from '../shared/file-modes';

/** Where QEMU-written files go when the preferred place is not reachable (root only). */
export const SYSTEM_QEMU_DIR = '/var/lib/vmbackup';

/** True when `dir` and every existing directory above it is searchable by others (o+x). */
export async function reachableByQemu(dir: string): Promise<boolean> {
  for (let cur = dir; ; cur = join(cur, '..')) {
    try {
      const s = await stat(cur);
      if ((s.mode & 0o001) === 0) return false;
    } catch {
      /* not created yet: makeDirs makes it 0711 */
    }
    if (cur === join(cur, '..')) return true;
  }
}

/**
 * `preferred` when QEMU can reach it (or when we are not root: then QEMU runs as us, e.g. a
 * session daemon), else the same sub-path under SYSTEM_QEMU_DIR. Each directory it creates is 0711:
 * QEMU can pass through, nobody can list what is in it.
 */
export async function qemuWritableDir(preferred: string, sub: string, systemRoot = SYSTEM_QEMU_DIR): Promise<string> {
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  const dir = !isRoot || (await reachableByQemu(preferred)) ? preferred : join(systemRoot, sub);
  await makeDirs(dir, QEMU_DIR_MODE);
  return dir;
}
