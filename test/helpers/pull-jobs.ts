/**
 * What the pull-mode tests check around a backup job: the job libvirt shows on a domain, the domain's checkpoints,
 * and the places a backup's staging directory (its scratch files, the NBD socket) can be.
 */
import { lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { virsh } from './images';
import { stackEnv } from './stack';

/** `virsh domjobinfo`'s job type of the domain: None, Unbounded, ... (the whole output when it has none). */
export async function jobType(dom: { name: string }): Promise<string> {
  const out = await virsh('domjobinfo', dom.name);
  return /Job type:\s+(\S+)/.exec(out)?.[1] ?? out;
}

/** The names of the domain's checkpoints (`virsh checkpoint-list --name`). */
export async function checkpoints(dom: { name: string }): Promise<string[]> {
  return (await virsh('checkpoint-list', dom.name, '--name'))
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
}

/** The places a backup's staging directory can be (under the state dir, or QEMU-reachable fallback). */
export function stagingDirs(backupId: string): string[] {
  return [join(stackEnv().stateDir, 'staging', backupId), join('/var/lib/vmbackup/staging', backupId)];
}

/** Whether `path` is there (lstat: a link counts, whatever it points to). */
export async function present(path: string): Promise<boolean> {
  return lstat(path).then(
    () => true,
    () => false,
  );
}

/** The first of `paths` that is there, or undefined. */
export async function anyPresent(paths: string[]): Promise<string | undefined> {
  for (const p of paths) if (await present(p)) return p;
  return undefined;
}
