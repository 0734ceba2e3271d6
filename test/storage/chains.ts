/**
 * Real backup chains for repository tests, built the way the workflow stores them: a full qcow2, increments that
 * hold only the changed clusters (one zeroes a region its parent had data in) and name their parent relatively in
 * their header (`../<parentId>/vda.qcow2`, backing format qcow2), a differential of the full, and a disk new to the
 * chain in an increment. Manifests are built with the schema (version 2, chain, per-disk backing with the parent's
 * SHA-256). Beside each point a raw reference of the disk at that point: what a restore of that point must equal.
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { buildManifest, encodeManifest, type Manifest } from '../../src/repository/manifest';
import type { StorageTarget } from '../../src/storage/contract';
import { manifestKey } from '../../src/storage/keys';
import { sha256Of } from './backups';

const run = promisify(execFile);
export const MiB = 1 << 20;
export const DISK_MIB = 64;
const VDB_MIB = 16;

export type PointName = 'full' | 'inc1' | 'inc2' | 'diff';
export const POINTS: readonly PointName[] = ['full', 'inc1', 'inc2', 'diff'];

export interface BuiltChain {
  /** the target layout on local disk: `<layout>/<domain>/<backupId>/<disk>.qcow2` */
  layout: string;
  domain: string;
  ids: Record<PointName, string>;
  manifests: Record<PointName, Manifest>;
  /** raw images of each disk at each point */
  refs: Record<PointName, Record<string, string>>;
}

async function qemuIo(format: string, path: string, commands: string[]): Promise<void> {
  await run('qemu-io', ['-f', format, ...commands.flatMap((c) => ['-c', c]), path]);
}

/** The same writes on the backup image and on the raw reference of the disk. */
async function write(image: string, ref: string, commands: string[]): Promise<void> {
  await qemuIo('qcow2', image, commands);
  await qemuIo('raw', ref, commands);
}

async function snapshotRef(ref: string, dest: string): Promise<string> {
  await copyFile(ref, dest);
  return dest;
}

export async function buildChain(work: string, domain = 'web'): Promise<BuiltChain> {
  const layout = join(work, 'layout');
  const refDir = join(work, 'refs');
  await mkdir(refDir, { recursive: true });
  const ids: Record<PointName, string> = {
    full: `${domain}-20261120T010000Z-f001`,
    inc1: `${domain}-20261121T010000Z-a002`,
    inc2: `${domain}-20261122T010000Z-a003`,
    diff: `${domain}-20261123T010000Z-d004`,
  };
  const image = (p: PointName, disk = 'vda'): string => join(layout, domain, ids[p], `${disk}.qcow2`);
  for (const p of POINTS) await mkdir(join(layout, domain, ids[p]), { recursive: true });

  const live = join(work, 'live-vda.raw');
  const liveVdb = join(work, 'live-vdb.raw');
  await run('qemu-img', ['create', '-q', '-f', 'raw', live, `${DISK_MIB}M`]);
  await run('qemu-img', ['create', '-q', '-f', 'raw', liveVdb, `${VDB_MIB}M`]);
  const refs = {} as Record<PointName, Record<string, string>>;

  // full: data at 0..8M and 20M..21M
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', image('full'), `${DISK_MIB}M`]);
  const fullWrites = ['write -P 0x11 0 8M', 'write -P 0x12 20M 1M'];
  await write(image('full'), live, fullWrites);
  refs.full = { vda: await snapshotRef(live, join(refDir, 'full-vda.raw')) };

  // inc1: one changed MiB, and a region zeroed that the full had data in (must read as zeros, not as the parent)
  const backed = async (p: PointName, parent: PointName): Promise<void> => {
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-F',
      'qcow2',
      '-b',
      `../${ids[parent]}/vda.qcow2`,
      image(p),
      `${DISK_MIB}M`,
    ]);
  };
  await backed('inc1', 'full');
  const inc1Writes = ['write -P 0x21 4M 1M', 'write -z 20M 512k'];
  await write(image('inc1'), live, inc1Writes);
  refs.inc1 = { vda: await snapshotRef(live, join(refDir, 'inc1-vda.raw')) };

  // inc2: more changes on vda, and vdb, a disk new to the chain (a whole image, no backing)
  await backed('inc2', 'inc1');
  const inc2Writes = ['write -P 0x31 30M 2M', 'write -P 0x32 0 64k'];
  await write(image('inc2'), live, inc2Writes);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', image('inc2', 'vdb'), `${VDB_MIB}M`]);
  await write(image('inc2', 'vdb'), liveVdb, ['write -P 0x5b 1M 2M']);
  refs.inc2 = {
    vda: await snapshotRef(live, join(refDir, 'inc2-vda.raw')),
    vdb: await snapshotRef(liveVdb, join(refDir, 'inc2-vdb.raw')),
  };

  // diff: every change since the full (inc1's, inc2's and one more), on the full directly
  await backed('diff', 'full');
  await qemuIo('qcow2', image('diff'), [...inc1Writes, ...inc2Writes]);
  await write(image('diff'), live, ['write -P 0x41 40M 1M']);
  refs.diff = { vda: await snapshotRef(live, join(refDir, 'diff-vda.raw')) };

  const manifests = {} as Record<PointName, Manifest>;
  const disk = async (p: PointName, name: string, parent?: PointName) => {
    const path = image(p, name);
    const below = parent ? manifests[parent].disks.find((d) => d.name === name) : undefined;
    return {
      name,
      format: 'qcow2',
      virtualSize: (name === 'vdb' ? VDB_MIB : DISK_MIB) * MiB,
      size: (await stat(path)).size,
      sha256: await sha256Of(path),
      key: `${domain}/${ids[p]}/${name}.qcow2`,
      ...(below && parent ? { backing: { backupId: ids[parent], key: below.key, sha256: below.sha256 } } : {}),
    };
  };
  const point = async (p: PointName, level: 'full' | 'inc' | 'diff', parent?: PointName, disks = ['vda']) => {
    const day = ids[p].slice(domain.length + 1, domain.length + 9);
    const at = `${day.slice(0, 4)}-${day.slice(4, 6)}-${day.slice(6, 8)}T01:00:00.000Z`;
    manifests[p] = buildManifest({
      backupId: ids[p],
      domain,
      host: 'hv1',
      method: 'push',
      startedAt: at,
      finishedAt: at,
      quiesced: false,
      libvirtVersion: '9.0.0',
      qemuVersion: '7.2.0',
      chain: parent ? { level, parent: ids[parent], base: ids.full } : { level: 'full', base: ids.full },
      disks: await Promise.all(disks.map((d) => disk(p, d, parent))),
    });
  };
  await point('full', 'full');
  await point('inc1', 'inc', 'full');
  await point('inc2', 'inc', 'inc1', ['vda', 'vdb']);
  await point('diff', 'diff', 'full');
  return { layout, domain, ids, manifests, refs };
}

/** Stores the points (default all, oldest first) on a target through its driver: images, then each manifest. */
export async function putChain(
  target: StorageTarget,
  chain: BuiltChain,
  points: readonly PointName[] = POINTS,
): Promise<void> {
  for (const p of points) await putPoint(target, chain.layout, chain.manifests[p]);
}

/** One backup: its images from `layout`, then its manifest (as the workflow commits a backup). */
export async function putPoint(target: StorageTarget, layout: string, m: Manifest): Promise<void> {
  for (const d of m.disks) await target.putImage(d.key, join(layout, d.key), { metadata: { sha256: d.sha256 } });
  await target.putManifest(manifestKey(m.domain, m.backupId), encodeManifest(m));
}
