/**
 * Where a pull backup's files are, derived from its resolved staging directory alone, so that recovery finds them
 * again from the staging directory (and tells a pull job of ours from anyone else's): the scratch files
 * `<staging>/<disk>.scratch.qcow2`, the socket `<staging>/nbd/backup.sock`, or, when that path is too long for a Unix
 * socket, `<short root>/<16 hex of sha256(staging)>/backup.sock` (short root /run/vmbackup-nbd).
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';

/** where a socket directory goes when `<staging>/nbd/backup.sock` is too long */
export const SHORT_SOCKET_ROOT = '/run/vmbackup-nbd';
export const SOCKET_NAME = 'backup.sock';
/** sockaddr_un holds 108 bytes with its NUL; libvirt and QEMU refuse longer paths */
const MAX_SOCKET_PATH = 100;

/** The socket directory under the short root for the staging directory `stagingDir` (resolved). */
export function shortSocketDir(stagingDir: string, shortRoot: string = SHORT_SOCKET_ROOT): string {
  return join(shortRoot, createHash('sha256').update(stagingDir).digest('hex').slice(0, 16));
}

/** The directory the pull job of `stagingDir` (resolved) has its socket in. */
export function pullSocketDir(stagingDir: string, shortRoot: string = SHORT_SOCKET_ROOT): string {
  const own = join(stagingDir, 'nbd');
  return join(own, SOCKET_NAME).length > MAX_SOCKET_PATH ? shortSocketDir(stagingDir, shortRoot) : own;
}

/** QEMU's copy-before-write scratch file of one disk of a pull job. */
export function scratchFile(stagingDir: string, disk: string): string {
  return join(stagingDir, `${disk}.scratch.qcow2`);
}
