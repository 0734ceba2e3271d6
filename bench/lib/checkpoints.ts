/**
 * libvirt checkpoints of a bench domain, and the bench's housekeeping of them: virtnbdbackup 1.9.15 refuses to run
 * (full, inc or diff) while the domain has any checkpoint whose name lacks "virtnbdbackup" ("Foreign checkpoint
 * found: [vmbackup.<id>] ... remove existing checkpoints and start a new backup chain"), so the bench deletes
 * vmbackup's own checkpoints before each virtnbdbackup chain. vmbackup leaves checkpoints it did not create alone.
 */
import { must, run } from './measure';

/** Names, parents before children. */
export async function listCheckpoints(domain: string): Promise<string[]> {
  return (await must('virsh', ['checkpoint-list', domain, '--name', '--topological']))
    .split('\n')
    .map((s) => s.trim())
    .filter(Boolean);
}

/** Deletes the domain's checkpoints (those whose name starts with `prefix`, when given), children first. */
export async function deleteCheckpoints(domain: string, prefix = ''): Promise<void> {
  const names = (await listCheckpoints(domain)).filter((n) => n.startsWith(prefix)).reverse();
  for (const n of names) await run('virsh', ['checkpoint-delete', domain, n]);
}
