/**
 * The checkpoint layer of the hypervisor port against the real libvirt 9.0 + QEMU 7.2 (TCG): full backup with a
 * checkpoint, guest-visible writes, an incremental that holds exactly the changed clusters and restores (after
 * `qemu-img rebase -u` onto the full) to the disk as it was; list/delete/redefine round trips after lost
 * metadata; kill -9 of QEMU; a disk hot-added or grown between backups. docs/checkpoints.md has the facts.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HypervisorError } from '../../src/hypervisor/errors';
import { imageInfo } from '../../src/hypervisor/qemu-img';
import type { BackupTargetSpec, JobInfo, PushBackupOptions } from '../../src/hypervisor/port';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { identical, pausedCopy, run, virsh } from '../helpers/images';
import { requireLibvirt, stackEnv } from '../helpers/stack';

const MiB = 1 << 20;
const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri });
afterAll(() => hv.close());

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function rejection(p: Promise<unknown>): Promise<HypervisorError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof HypervisorError)) throw new Error(`expected a HypervisorError, got ${String(err)}`);
  return err;
}

/** Starts a push backup of `disks` into DIR/<prefix>.<disk>.qcow2 and waits until libvirt reports it completed. */
async function backup(
  dom: FixtureDomain,
  prefix: string,
  disks: string[],
  opts: PushBackupOptions = {},
): Promise<Record<string, string>> {
  const targets: BackupTargetSpec[] = disks.map((disk) => ({ disk, file: join(dom.dir, `${prefix}.${disk}.qcow2`) }));
  await hv.beginPushBackup(dom.name, targets, opts);
  const done = await until<JobInfo>(`the backup ${prefix} of ${dom.name}`, async () => {
    if ((await hv.jobInfo(dom.name)).type !== 'None') return undefined;
    const job = await hv.completedJobInfo(dom.name);
    return job.type === 'None' ? undefined : job;
  });
  expect(done).toMatchObject({ type: 'Completed', operation: 'Backup' });
  return Object.fromEntries(targets.map((t) => [t.disk, t.file]));
}

/** The clusters an image holds itself (`qemu-img map`, depth 0 with data), as [offset, length] in bytes. */
async function ownData(file: string): Promise<Array<[number, number]>> {
  const { stdout } = await run('qemu-img', ['map', '--output=json', '-U', file]);
  const extents = JSON.parse(stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
  const own: Array<[number, number]> = [];
  for (const e of extents.filter((x) => x.depth === 0 && x.data)) {
    const last = own.at(-1);
    if (last && last[0] + last[1] === e.start) last[1] += e.length;
    else own.push([e.start, e.length]);
  }
  return own;
}

/** What a restore does with a push increment: point it at its parent instead of the live disk. */
async function rebase(increment: string, parent: string): Promise<void> {
  await run('qemu-img', ['rebase', '-u', '-F', 'qcow2', '-b', parent, increment]);
}

async function killQemu(dom: FixtureDomain): Promise<void> {
  const pid = Number((await readFile(`/run/libvirt/qemu/${dom.name}.pid`, 'utf8')).trim());
  if (!(pid > 1)) throw new Error(`no QEMU pid for ${dom.name}`);
  process.kill(pid, 'SIGKILL');
  await until(`QEMU of ${dom.name} to be gone`, async () => ((await dom.state()) === 'shut off' ? true : undefined));
}

describe('checkpoints on real libvirt', () => {
  const newDomain = useFixtureDomains();

  beforeAll(async () => {
    await requireLibvirt();
  });

  test('full + checkpoint, writes, incremental: only the changed clusters, and it restores onto the full', async () => {
    const dom = await newDomain({
      prefix: 'ckp',
      disks: [
        { format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0xab, offsetMiB: 0, lengthMiB: 8 }] },
        { format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x5a, offsetMiB: 2, lengthMiB: 4 }] },
      ],
    });
    const disks = ['vda', 'vdb'];
    const full = await backup(dom, 'full', disks, { disks, checkpoint: { name: 'ckp-0', disks } });
    expect(await hv.listCheckpoints(dom.name)).toEqual([
      {
        name: 'ckp-0',
        creationTime: expect.any(Number),
        disks: [
          { name: 'vda', checkpoint: 'bitmap', bitmap: 'ckp-0' },
          { name: 'vdb', checkpoint: 'bitmap', bitmap: 'ckp-0' },
        ],
      },
    ]);
    // a full push backup is standalone
    expect((await imageInfo(full['vda']!, { format: 'qcow2' })).backingFile).toBeUndefined();

    await dom.writeThroughDevice('vda', 0xc1, 10, 2);
    await dom.writeThroughDevice('vda', 0xc2, 40, 1);
    await dom.writeThroughDevice('vdb', 0xc3, 20, 1);
    expect(await hv.checkpointBitmaps(dom.name, 'ckp-0')).toEqual([
      { disk: 'vda', state: 'ok', changedBytes: 3 * MiB },
      { disk: 'vdb', state: 'ok', changedBytes: 1 * MiB },
    ]);
    const refVda = await pausedCopy(dom, 'vda', join(dom.dir, 'ref1.vda.raw'));
    const refVdb = await pausedCopy(dom, 'vdb', join(dom.dir, 'ref1.vdb.raw'));

    const inc = await backup(dom, 'inc1', disks, { disks, incremental: 'ckp-0', checkpoint: { name: 'ckp-1', disks } });
    // libvirt gives a push increment the LIVE disk as backing file
    expect((await imageInfo(inc['vda']!, { format: 'qcow2' })).backingFile).toBe(dom.disks[0]!.path);
    expect(await ownData(inc['vda']!)).toEqual([
      [10 * MiB, 2 * MiB],
      [40 * MiB, 1 * MiB],
    ]);
    expect(await ownData(inc['vdb']!)).toEqual([[20 * MiB, 1 * MiB]]);

    await rebase(inc['vda']!, full['vda']!);
    await rebase(inc['vdb']!, full['vdb']!);
    expect((await imageInfo(inc['vda']!, { format: 'qcow2' })).backingFile).toBe(full['vda']);
    expect(await identical(inc['vda']!, refVda)).toBe(true);
    expect(await identical(inc['vdb']!, refVdb)).toBe(true);
    // and not merely because the full already held it
    expect(await identical(full['vda']!, refVda)).toBe(false);

    const list = await hv.listCheckpoints(dom.name);
    expect(list.map((c) => [c.name, c.parent])).toEqual([
      ['ckp-0', undefined],
      ['ckp-1', 'ckp-0'],
    ]);
    expect(list[1]!.creationTime).toBeGreaterThanOrEqual(list[0]!.creationTime);
  });

  test('metadata lost: list, delete and redefine round trips, and the chain continues', async () => {
    const dom = await newDomain({ prefix: 'ckp', disks: [{ format: 'qcow2', sizeMiB: 64 }] });
    const disks = ['vda'];
    const full = await backup(dom, 'full', disks, { disks, checkpoint: { name: 'ckp-0', disks } });
    await dom.writeThroughDevice('vda', 0xd1, 8, 1);
    const inc1 = await backup(dom, 'inc1', disks, {
      disks,
      incremental: 'ckp-0',
      checkpoint: { name: 'ckp-1', disks },
    });
    const before = await hv.listCheckpoints(dom.name);
    const saved = [await hv.checkpointXml(dom.name, 'ckp-0'), await hv.checkpointXml(dom.name, 'ckp-1')];
    expect(saved[1]).not.toMatch(/<domain[ >]/);

    // libvirt forgets them; the bitmaps stay in QEMU (and in the qcow2)
    expect(await hv.deleteCheckpoint(dom.name, 'ckp-1', { metadataOnly: true })).toBe(true);
    expect(await hv.deleteCheckpoint(dom.name, 'ckp-0', { metadataOnly: true })).toBe(true);
    expect(await hv.listCheckpoints(dom.name)).toEqual([]);
    expect(await hv.deleteCheckpoint(dom.name, 'ckp-0')).toBe(false);

    // the same name again: QEMU still has that bitmap
    const again = await rejection(
      hv.beginPushBackup(dom.name, [{ disk: 'vda', file: join(dom.dir, 'again.qcow2') }], {
        disks,
        checkpoint: { name: 'ckp-1', disks },
      }),
    );
    expect(again).toMatchObject({ kind: 'bitmap-exists', permanent: true, checkpoint: 'ckp-1' });
    expect(again.message).toMatch(/Bitmap already exists: ckp-1/);
    expect((await hv.jobInfo(dom.name)).type).toBe('None');
    expect(await hv.listCheckpoints(dom.name)).toEqual([]);

    // a child before its parent is refused: parents first
    const orphan = await rejection(hv.redefineCheckpoint(dom.name, saved[1]!, { validate: true }));
    expect(orphan).toMatchObject({ kind: 'checkpoint-not-found', checkpoint: 'ckp-0' });
    expect(orphan.message).toMatch(/parent ckp-0 for moment ckp-1 not found/);

    for (const xml of saved) await hv.redefineCheckpoint(dom.name, xml, { validate: true });
    expect(await hv.listCheckpoints(dom.name)).toEqual(before);

    // the chain continues from the redefined checkpoint, exactly
    await dom.writeThroughDevice('vda', 0xd2, 30, 1);
    const ref = await pausedCopy(dom, 'vda', join(dom.dir, 'ref2.raw'));
    const inc2 = await backup(dom, 'inc2', disks, {
      disks,
      incremental: 'ckp-1',
      checkpoint: { name: 'ckp-2', disks },
    });
    expect(await ownData(inc2['vda']!)).toEqual([[30 * MiB, 1 * MiB]]);
    // and from the older one too: each checkpoint has its own bitmap
    expect(await hv.checkpointBitmaps(dom.name, 'ckp-0', { disks })).toEqual([
      { disk: 'vda', state: 'ok', changedBytes: 2 * MiB },
    ]);

    // deleting the old root removes its bitmap only; its child becomes a root
    expect(await hv.deleteCheckpoint(dom.name, 'ckp-0')).toBe(true);
    expect((await hv.listCheckpoints(dom.name)).map((c) => [c.name, c.parent])).toEqual([
      ['ckp-1', undefined],
      ['ckp-2', 'ckp-1'],
    ]);
    expect(await hv.checkpointBitmaps(dom.name, 'ckp-1', { disks })).toEqual([
      { disk: 'vda', state: 'ok', changedBytes: 1 * MiB },
    ]);
    // its saved XML cannot come back: the bitmap is gone
    const gone = await rejection(hv.redefineCheckpoint(dom.name, saved[0]!, { validate: true }));
    expect(gone).toMatchObject({ kind: 'checkpoint-inconsistent', checkpoint: 'ckp-0', disk: 'vda' });

    // a checkpoint whose parent is gone comes back as a root with dropParent
    const ckp2 = await hv.checkpointXml(dom.name, 'ckp-2');
    await hv.deleteCheckpoint(dom.name, 'ckp-2', { metadataOnly: true });
    await hv.deleteCheckpoint(dom.name, 'ckp-1', { metadataOnly: true });
    expect(await rejection(hv.redefineCheckpoint(dom.name, ckp2, { validate: true }))).toMatchObject({
      kind: 'checkpoint-not-found',
    });
    expect(await hv.redefineCheckpoint(dom.name, ckp2, { validate: true, dropParent: true })).not.toHaveProperty(
      'parent',
    );
    // the chain full <- inc1 <- inc2 restores the disk as it was at inc2
    await rebase(inc1['vda']!, full['vda']!);
    await rebase(inc2['vda']!, inc1['vda']!);
    expect(await identical(inc2['vda']!, ref)).toBe(true);
  });

  test('domain undefined and defined again (new UUID): the saved XML redefines, the next incremental is exact', async () => {
    const dom = await newDomain({ prefix: 'ckp', disks: [{ format: 'qcow2', sizeMiB: 64 }] });
    const disks = ['vda'];
    const full = await backup(dom, 'full', disks, { disks, checkpoint: { name: 'ckp-0', disks } });
    const saved = await hv.checkpointXml(dom.name, 'ckp-0');
    const uuid = (await hv.inspect(dom.name)).uuid;

    await dom.destroy();
    // "cannot delete inactive domain with 1 checkpoints" without --checkpoints-metadata
    await expect(virsh('undefine', dom.name)).rejects.toThrow(/cannot delete inactive domain with 1 checkpoints/);
    await virsh('undefine', dom.name, '--checkpoints-metadata');
    await virsh('define', join(dom.dir, 'domain.xml'));
    await dom.start();
    expect((await hv.inspect(dom.name)).uuid).not.toBe(uuid);
    expect(await hv.listCheckpoints(dom.name)).toEqual([]);

    await hv.redefineCheckpoint(dom.name, saved, { validate: true });
    await dom.writeThroughDevice('vda', 0xf1, 24, 1);
    const ref = await pausedCopy(dom, 'vda', join(dom.dir, 'ref.raw'));
    const inc = await backup(dom, 'inc1', disks, { disks, incremental: 'ckp-0', checkpoint: { name: 'ckp-1', disks } });
    expect(await ownData(inc['vda']!)).toEqual([[24 * MiB, 1 * MiB]]);
    await rebase(inc['vda']!, full['vda']!);
    expect(await identical(inc['vda']!, ref)).toBe(true);
  });

  test('kill -9 of QEMU: the bitmaps are broken, seen before any job; delete cleans up; a full starts anew', async () => {
    const dom = await newDomain({ prefix: 'ckp', disks: [{ format: 'qcow2', sizeMiB: 64 }] });
    const disks = ['vda'];
    await backup(dom, 'full', disks, { disks, checkpoint: { name: 'ckp-a', disks } });

    // virsh destroy is SIGTERM: QEMU stores its bitmaps and the chain continues
    await dom.destroy();
    await dom.start();
    await dom.writeThroughDevice('vda', 0xe1, 12, 1);
    const afterDestroy = await backup(dom, 'inc1', disks, {
      disks,
      incremental: 'ckp-a',
      checkpoint: { name: 'ckp-b', disks },
    });
    expect(await ownData(afterDestroy['vda']!)).toEqual([[12 * MiB, 1 * MiB]]);
    const savedA = await hv.checkpointXml(dom.name, 'ckp-a');

    await killQemu(dom);
    await dom.start();
    // ckp-a's bitmap is in the qcow2 but marked in use (inconsistent); ckp-b's was never stored
    expect(await hv.checkpointBitmaps(dom.name, 'ckp-a', { disks })).toEqual([{ disk: 'vda', state: 'broken' }]);
    expect(await hv.checkpointBitmaps(dom.name, 'ckp-b', { disks })).toEqual([{ disk: 'vda', state: 'broken' }]);
    const validate = await rejection(hv.redefineCheckpoint(dom.name, savedA, { validate: true }));
    expect(validate).toMatchObject({ kind: 'checkpoint-inconsistent', checkpoint: 'ckp-a', disk: 'vda' });

    const inc = await rejection(
      hv.beginPushBackup(dom.name, [{ disk: 'vda', file: join(dom.dir, 'inc2.vda.qcow2') }], {
        disks,
        incremental: 'ckp-b',
        checkpoint: { name: 'ckp-c', disks },
      }),
    );
    expect(inc).toMatchObject({ kind: 'checkpoint-inconsistent', permanent: true, checkpoint: 'ckp-b', disk: 'vda' });
    expect(inc.message).toMatch(/missing or broken bitmap 'ckp-b' for disk 'vda'/);
    // refused before the job: no job, no new checkpoint
    expect((await hv.jobInfo(dom.name)).type).toBe('None');
    expect((await hv.listCheckpoints(dom.name)).map((c) => c.name)).toEqual(['ckp-a', 'ckp-b']);

    // ckp-b's bitmap does not exist ("bitmap 'ckp-b' not found in backing chain of 'vda'"): deleted all the same
    expect(await hv.deleteCheckpoint(dom.name, 'ckp-b')).toBe(true);
    expect(await hv.deleteCheckpoint(dom.name, 'ckp-a')).toBe(true);
    expect(await hv.listCheckpoints(dom.name)).toEqual([]);

    const full = await backup(dom, 'full2', disks, { disks, checkpoint: { name: 'ckp-c', disks } });
    await dom.writeThroughDevice('vda', 0xe2, 50, 2);
    const ref = await pausedCopy(dom, 'vda', join(dom.dir, 'ref.raw'));
    const inc3 = await backup(dom, 'inc3', disks, {
      disks,
      incremental: 'ckp-c',
      checkpoint: { name: 'ckp-d', disks },
    });
    expect(await ownData(inc3['vda']!)).toEqual([[50 * MiB, 2 * MiB]]);
    await rebase(inc3['vda']!, full['vda']!);
    expect(await identical(inc3['vda']!, ref)).toBe(true);
  });

  test('a disk hot-added between backups: copied whole (backupmode=full) inside the incremental', async () => {
    const dom = await newDomain({
      prefix: 'ckp',
      acpi: true,
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x11, offsetMiB: 0, lengthMiB: 4 }] }],
    });
    const full = await backup(dom, 'full', ['vda'], { disks: ['vda'], checkpoint: { name: 'ckp-0', disks: ['vda'] } });
    await dom.attachDisk({ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x77, offsetMiB: 0, lengthMiB: 3 }] });
    const disks = ['vda', 'vdb'];
    await dom.writeThroughDevice('vda', 0x21, 16, 1);
    await dom.writeThroughDevice('vdb', 0x22, 8, 1);

    // as an increment, vdb has no bitmap for ckp-0: the same text as a broken bitmap
    const notInChain = await rejection(
      hv.beginPushBackup(
        dom.name,
        disks.map((d) => ({ disk: d, file: join(dom.dir, `bad.${d}.qcow2`) })),
        { disks, incremental: 'ckp-0', checkpoint: { name: 'ckp-1', disks } },
      ),
    );
    expect(notInChain).toMatchObject({ kind: 'checkpoint-inconsistent', checkpoint: 'ckp-0', disk: 'vdb' });
    expect(await hv.checkpointBitmaps(dom.name, 'ckp-0', { disks })).toEqual([
      { disk: 'vda', state: 'ok', changedBytes: 1 * MiB },
    ]);

    const refVda = await pausedCopy(dom, 'vda', join(dom.dir, 'ref.vda.raw'));
    const refVdb = await pausedCopy(dom, 'vdb', join(dom.dir, 'ref.vdb.raw'));
    const inc = await backup(dom, 'inc1', disks, {
      disks,
      incremental: 'ckp-0',
      fullDisks: ['vdb'],
      checkpoint: { name: 'ckp-1', disks },
    });
    // the whole disk, standalone; the other disk an increment on the live disk as usual
    expect((await imageInfo(inc['vdb']!, { format: 'qcow2' })).backingFile).toBeUndefined();
    expect(await identical(inc['vdb']!, refVdb)).toBe(true);
    expect((await imageInfo(inc['vda']!, { format: 'qcow2' })).backingFile).toBe(dom.disks[0]!.path);
    expect(await ownData(inc['vda']!)).toEqual([[16 * MiB, 1 * MiB]]);
    await rebase(inc['vda']!, full['vda']!);
    expect(await identical(inc['vda']!, refVda)).toBe(true);
    expect((await hv.listCheckpoints(dom.name))[1]?.disks).toEqual([
      { name: 'vda', checkpoint: 'bitmap', bitmap: 'ckp-1' },
      { name: 'vdb', checkpoint: 'bitmap', bitmap: 'ckp-1' },
    ]);
  });

  test('a disk grown between backups (blockresize): the bitmap survives and the increment has the new size', async () => {
    const dom = await newDomain({ prefix: 'ckp', disks: [{ format: 'qcow2', sizeMiB: 64 }] });
    const disks = ['vda'];
    const full = await backup(dom, 'full', disks, { disks, checkpoint: { name: 'ckp-0', disks } });
    await virsh('blockresize', dom.name, 'vda', '96M');
    await dom.writeThroughDevice('vda', 0x31, 20, 1);
    // past the old end: the fixture only knows the old size, so through HMP directly
    const out = await virsh(
      'qemu-monitor-command',
      dom.name,
      '--hmp',
      `qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x32 ${80 * MiB} ${MiB}"`,
    );
    expect(out.trim()).toBe('');
    expect(await hv.checkpointBitmaps(dom.name, 'ckp-0', { disks })).toEqual([
      { disk: 'vda', state: 'ok', changedBytes: 2 * MiB },
    ]);
    const ref = await pausedCopy(dom, 'vda', join(dom.dir, 'ref.raw'));
    const inc = await backup(dom, 'inc1', disks, { disks, incremental: 'ckp-0', checkpoint: { name: 'ckp-1', disks } });
    expect((await imageInfo(inc['vda']!, { format: 'qcow2' })).virtualSize).toBe(96 * MiB);
    expect(await ownData(inc['vda']!)).toEqual([
      [20 * MiB, 1 * MiB],
      [80 * MiB, 1 * MiB],
    ]);
    // a 64 MiB full under a 96 MiB increment: what lies past the full's end reads as zeros, as on the disk
    await rebase(inc['vda']!, full['vda']!);
    expect(await identical(inc['vda']!, ref)).toBe(true);
  });

  test('a checkpoint on a raw disk is refused by libvirt as checkpoint-unsupported, naming the disk', async () => {
    const dom = await newDomain({
      prefix: 'ckp',
      disks: [
        { format: 'qcow2', sizeMiB: 16 },
        { format: 'raw', sizeMiB: 16 },
      ],
    });
    const err = await rejection(
      hv.beginPushBackup(dom.name, [{ disk: 'vda', file: join(dom.dir, 'full.qcow2') }], {
        disks: ['vda', 'vdb'],
        checkpoint: { name: 'ckp-0', disks: ['vda', 'vdb'] },
      }),
    );
    expect(err).toMatchObject({ kind: 'checkpoint-unsupported', permanent: true, disk: 'vdb' });
    expect(err.message).toMatch(/checkpoint for disk vdb unsupported for storage type raw/);
    expect(await hv.listCheckpoints(dom.name)).toEqual([]);
    // the raw disk left out of the checkpoint: fine
    await backup(dom, 'full', ['vda', 'vdb'], {
      disks: ['vda', 'vdb'],
      checkpoint: { name: 'ckp-0', disks: ['vda'] },
    });
    expect((await hv.listCheckpoints(dom.name))[0]?.disks).toEqual([
      { name: 'vda', checkpoint: 'bitmap', bitmap: 'ckp-0' },
      { name: 'vdb', checkpoint: 'no' },
    ]);
  });
});
