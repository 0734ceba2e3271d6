/**
 * Files QEMU itself must open (push-backup targets, snapshot overlays) need a path the QEMU
 * user (libvirt-qemu under the system daemon) can traverse. Without it libvirt fails with
 * "Could not open '...': Permission denied" from blockdev-add. A directory under a private
 * home (/root is 0700) is not reachable, so such files go to a world-searchable place instead.
 */
import { mkdir, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';

/** Where QEMU-written files go when the preferred place is not reachable (root only). */
export const SYSTEM_QEMU_DIR = '/var/lib/vmbackup';

/** True when every existing ancestor of `dir` is searchable by others (o+x). */
export async function reachableByQemu(dir: string): Promise<boolean> {
  for (let cur = dirname(dir); ; cur = dirname(cur)) {
    try {
      const s = await stat(cur);
      if ((s.mode & 0o001) === 0) return false;
    } catch {
      /* not created yet: mkdir makes it 0755 */
    }
    if (cur === dirname(cur)) return true;
  }
}

/**
 * `preferred` when QEMU can reach it (or when we are not root: then QEMU runs as us, e.g. a
 * session daemon), else the same sub-path under SYSTEM_QEMU_DIR. Creates the directory 0755.
 */
export async function qemuWritableDir(preferred: string, sub: string, systemRoot = SYSTEM_QEMU_DIR): Promise<string> {
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  const dir = !isRoot || (await reachableByQemu(preferred)) ? preferred : join(systemRoot, sub);
  await mkdir(dir, { recursive: true, mode: 0o755 });
  return dir;
}
