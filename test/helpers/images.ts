/**
 * What a user checks after a backup, as test helpers: is the image byte-identical to a
 * reference, does a disk hold a pattern, which files does the domain run on.
 */
import { execFile } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { promisify } from 'node:util';
import { stackEnv } from './stack';

export const run = promisify(execFile);

export async function virsh(...args: string[]): Promise<string> {
  return (await run('virsh', ['-c', stackEnv().libvirt.uri, ...args])).stdout;
}

/** dev -> source file of every disk of a domain, from `virsh domblklist`. */
export async function domblklist(domain: string): Promise<Record<string, string>> {
  const rows = (await virsh('domblklist', domain)).split('\n').slice(2);
  return Object.fromEntries(
    rows.map((l) => l.trim().split(/\s+/)).filter((r): r is [string, string] => r.length === 2 && r[0] !== ''),
  );
}

/** The image as it is now, as raw: the reference a backup of this moment must equal. */
export async function reference(path: string, dest: string): Promise<string> {
  await run('qemu-img', ['convert', '-U', '-O', 'raw', path, dest]);
  return dest;
}

/** `qemu-img compare`: same guest-visible content, whatever the formats. */
export async function identical(a: string, b: string): Promise<boolean> {
  try {
    await run('qemu-img', ['compare', '-U', a, b]);
    return true;
  } catch (err) {
    if ((err as { code?: number }).code === 1) return false;
    throw err;
  }
}

/**
 * Every byte of `len` MiB at `off` MiB is `byte`. qemu-io needs -r with -U ("force-share=on can
 * only be used with read-only images") and exits non-zero when the pattern does not match.
 */
export async function holds(path: string, byte: number, offMiB: number, lenMiB: number): Promise<boolean> {
  const args = ['-r', '-U', '-c', `read -P 0x${byte.toString(16)} ${offMiB}M ${lenMiB}M`, path];
  try {
    const { stdout } = await run('qemu-io', args);
    return !/Pattern verification failed/.test(stdout);
  } catch (err) {
    if (/Pattern verification failed/.test(String((err as { stdout?: string }).stdout))) return false;
    throw err;
  }
}

export async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * A raw copy of a domain's disk as the guest sees it now, taken while the domain is paused: pausing makes QEMU drain
 * and flush (a running qcow2 read with -U may miss clusters QEMU has not written back yet).
 */
export async function pausedCopy(
  dom: { name: string; disks: ReadonlyArray<{ dev: string; path: string; format: string }> },
  dev: string,
  dest: string,
): Promise<string> {
  const disk = dom.disks.find((d) => d.dev === dev);
  if (!disk) throw new Error(`${dom.name} has no disk ${dev}`);
  await virsh('suspend', dom.name);
  try {
    await run('qemu-img', ['convert', '-U', '-f', disk.format, '-O', 'raw', disk.path, dest]);
  } finally {
    await virsh('resume', dom.name);
  }
  return dest;
}
