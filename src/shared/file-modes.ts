/**
 * Modes of everything vmbackup creates: backups hold whole disks, so files are 0600 and directories
 * 0700, whatever the process umask (a umask of 000 made target directories 0777). The one exception are
 * directories QEMU itself must pass through under the system daemon (push staging, overlays, see
 * activities/qemu-paths.ts): 0711, searchable but not listable. Node code only; not for workflows.
 */
import { chmod, chown, lstat, mkdir, stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';

export const PRIVATE_FILE_MODE = 0o600;
export const PRIVATE_DIR_MODE = 0o700;
/** a directory the QEMU user must traverse to reach a file in it */
export const QEMU_DIR_MODE = 0o711;

/**
 * `mkdir -p` in which every directory this call creates gets exactly `mode` (mkdir's own mode is masked by
 * the umask, so it is set again with chmod). Directories that exist already keep their mode: they are
 * not ours to change. A directory created meanwhile by someone else (EEXIST) is left alone too.
 */
export async function makeDirs(dir: string, mode: number): Promise<void> {
  const missing: string[] = [];
  for (let cur = resolve(dir); ; cur = dirname(cur)) {
    try {
      const st = await stat(cur);
      if (!st.isDirectory()) {
        throw Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${cur}'`), { code: 'ENOTDIR', path: cur });
      }
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      missing.push(cur);
      if (cur === dirname(cur)) break;
    }
  }
  for (const d of missing.reverse()) {
    try {
      await mkdir(d, { mode });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') continue;
      throw err;
    }
    await chmod(d, mode);
  }
}

/**
 * Makes a file another program wrote ours and private: mode 0600 and, when we run as root, our owner (libvirt
 * gives a push backup's image to the QEMU user, which every VM's QEMU process runs as). Not for symlinks:
 * callers pass paths they checked (activities/host-paths.ts).
 */
export async function makeFilePrivate(path: string): Promise<void> {
  const st = await lstat(path);
  if (!st.isFile()) throw Object.assign(new Error(`${path} is not a regular file`), { code: 'EINVAL' });
  const uid = typeof process.geteuid === 'function' ? process.geteuid() : undefined;
  const gid = typeof process.getegid === 'function' ? process.getegid() : undefined;
  if (uid === 0 && gid !== undefined && (st.uid !== uid || st.gid !== gid)) await chown(path, uid, gid);
  await chmod(path, PRIVATE_FILE_MODE);
}
