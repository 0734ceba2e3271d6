/**
 * VirshHypervisor against the real libvirt + QEMU (TCG): inspect, typed errors, the overlay ->
 * active commit -> pivot round trip, guest-visible writes, and the tiny writing guest.
 */
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { HypervisorError } from '../../src/hypervisor/errors';
import { execTool } from '../../src/hypervisor/exec';
import { compareImages, convertImage, imageInfo } from '../../src/hypervisor/qemu-img';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { BlockJobInfo } from '../../src/hypervisor/port';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, stackEnv } from '../helpers/stack';

const MiB = 1 << 20;

/** `qemu-io -r -U -c 'read -P BYTE OFF LEN'`: does the image hold that pattern there? */
async function holdsPattern(file: string, format: string, byte: number, offsetMiB: number, lengthMiB: number) {
  const r = await execTool('qemu-io', [
    '-r',
    '-U',
    '-f',
    format,
    '-c',
    `read -P 0x${byte.toString(16)} ${offsetMiB * MiB} ${lengthMiB * MiB}`,
    file,
  ]);
  if (/Pattern verification failed/.test(r.stdout + r.stderr)) return false;
  if (r.code !== 0) throw new Error(`qemu-io read on ${file} failed: ${r.stdout}${r.stderr}`);
  return true;
}

async function rejection(p: Promise<unknown>): Promise<HypervisorError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof HypervisorError) return err;
    throw err;
  }
  throw new Error('expected a HypervisorError, got success');
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('VirshHypervisor on real libvirt', () => {
  const newDomain = useFixtureDomains();
  const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri });
  let dom: FixtureDomain;
  afterAll(() => hv.close()); // its virsh shells would outlive this file inside jest's process

  beforeAll(async () => {
    await requireLibvirt();
    dom = await newDomain({
      prefix: 'hv',
      disks: [
        { format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0xab, offsetMiB: 0, lengthMiB: 8 }] },
        { format: 'raw', sizeMiB: 32, patterns: [{ byte: 0x5a, offsetMiB: 4, lengthMiB: 4 }] },
      ],
      cdrom: true,
    });
  });

  test('inspect reports the qcow2 and raw disks, skips the cdrom, and reads versions', async () => {
    const info = await hv.inspect(dom.name);
    const [vda, vdb] = dom.disks;
    expect(info).toMatchObject({ domain: dom.name, state: 'running', backupApi: true, hasGuestAgent: false });
    expect(info.uuid).toMatch(/^[0-9a-f-]{36}$/);
    expect(info.disks).toEqual([
      expect.objectContaining({
        name: 'vda',
        source: vda!.path,
        format: 'qcow2',
        device: 'disk',
        virtualSize: 64 * MiB,
      }),
      expect.objectContaining({ name: 'vdb', source: vdb!.path, format: 'raw', device: 'disk', virtualSize: 32 * MiB }),
    ]);
    expect(info.disks.every((d) => d.backingChain.length === 0 && d.allocation > 0)).toBe(true);
    expect(info.skipped).toEqual([{ name: 'sda', reason: expect.stringMatching(/cdrom/) }]);
    expect(info.libvirtVersion).toMatch(/^\d+\.\d+/);
    expect(info.qemuVersion).toMatch(/^\d+\.\d+/);

    const all = await hv.inspect(dom.name, { includeAllDisks: true });
    expect(all.disks.map((d) => d.name)).toEqual(['vda', 'vdb', 'sda']);
    expect(all.disks[2]).toMatchObject({ device: 'cdrom', readonly: true, virtualSize: 1 * MiB });
    expect(all.skipped).toEqual([]);
  });

  test('inspect of a shut-off domain reads sizes without a QEMU process', async () => {
    const off = await newDomain({ prefix: 'hvoff', disks: [{ format: 'qcow2', sizeMiB: 48 }], start: false });
    const info = await hv.inspect(off.name);
    expect(info).toMatchObject({ state: 'shut off', skipped: [] });
    expect(info.disks).toEqual([
      expect.objectContaining({ name: 'vda', source: off.disks[0]!.path, virtualSize: 48 * MiB, backingChain: [] }),
    ]);
    const err = await rejection(hv.beginPushBackup(off.name, [{ disk: 'vda', file: join(off.dir, 'b.qcow2') }]));
    expect(err).toMatchObject({ kind: 'not-running', permanent: true });
    expect(err.message).toMatch(/cannot perform disk backup for inactive domain/);
  });

  test('an unknown domain is a permanent not-found error naming it', async () => {
    const err = await rejection(hv.inspect('vmbt-no-such-domain'));
    expect(err).toMatchObject({ kind: 'not-found', permanent: true, domain: 'vmbt-no-such-domain' });
    expect(err.message).toMatch(/domain "vmbt-no-such-domain" does not exist/);
    expect(err.stderr).toMatch(/failed to get domain 'vmbt-no-such-domain'/);
  });

  test('an invalid domain or disk name is rejected before virsh runs', async () => {
    // a virsh that does not exist: reaching it would fail with 'unsupported' (ENOENT), not 'invalid'
    const noVirsh = createVirshHypervisor({ virsh: '/nonexistent/virsh' });
    const bad = await rejection(noVirsh.state('vm;rm -rf /'));
    expect(bad).toMatchObject({ kind: 'invalid', permanent: true });
    expect(bad.message).toBe(
      `"vm;rm -rf /" is not a valid domain name: use letters, digits, '.', '_', '+', '-' (at most 64, starting with a letter or digit)`,
    );
    expect(await rejection(noVirsh.blockJobInfo('vm1', '../vda'))).toMatchObject({ kind: 'invalid' });
    expect(await rejection(noVirsh.beginPushBackup('vm1', [{ disk: 'vda', file: 'rel.qcow2' }]))).toMatchObject({
      kind: 'invalid',
    });
    expect(await rejection(noVirsh.state('vm1'))).toMatchObject({ kind: 'unsupported' });
  });

  test('idle domain: no job, no block job, aborts are no-ops', async () => {
    expect(await hv.jobInfo(dom.name)).toEqual({ type: 'None' });
    expect(await hv.blockJobInfo(dom.name, 'vda')).toEqual({ type: undefined, cur: 0, end: 0, ready: false });
    await hv.abortJob(dom.name);
    await hv.abortBlockJob(dom.name, 'vda');
    const err = await rejection(hv.pivot(dom.name, 'vda'));
    expect(err).toMatchObject({ kind: 'no-job' });
    expect(err.message).toMatch(/disk vda .*does not have an active block job/);
  });

  test('writeThroughDevice changes the live disk as the guest would', async () => {
    const vdb = dom.disks[1]!;
    expect(await holdsPattern(vdb.path, 'raw', 0x5a, 4, 4)).toBe(true);
    await dom.writeThroughDevice('vdb', 0xc3, 5, 2);
    expect(await holdsPattern(vdb.path, 'raw', 0xc3, 5, 2)).toBe(true);
    expect(await holdsPattern(vdb.path, 'raw', 0x5a, 4, 1)).toBe(true);
    expect(await holdsPattern(vdb.path, 'raw', 0x5a, 7, 1)).toBe(true);
    await expect(dom.writeThroughDevice('vdb', 0xc3, 31, 2)).rejects.toThrow(/does not fit vdb/);
  });

  test('a push backup target that exists is a permanent exists error', async () => {
    const vdb = dom.disks[1]!;
    const err = await rejection(hv.beginPushBackup(dom.name, [{ disk: 'vdb', file: vdb.path }]));
    expect(err).toMatchObject({ kind: 'exists', permanent: true });
    expect(err.message).toContain(`store '${vdb.path}' for backup of 'vdb' exists`);
    expect((await hv.jobInfo(dom.name)).type).toBe('None');
  });

  test('a push backup given the disks inspect read backs up only the listed disk, not the others or the cdrom', async () => {
    const before = await readdir(dom.dir);
    const target = join(dom.dir, 'push-vda.qcow2');
    const info = await hv.inspect(dom.name);
    // only vda, though inspect found vdb too: the XML then says nothing about vdb nor about the skipped cdrom
    await hv.beginPushBackup(dom.name, [{ disk: 'vda', file: target }], { disks: ['vda'] });
    const done = await until('the push job to end', async () => {
      if ((await hv.jobInfo(dom.name)).type !== 'None') return undefined;
      const job = await hv.completedJobInfo(dom.name);
      return job.type === 'None' ? undefined : job;
    });
    expect(done.type).toBe('Completed');
    expect(await compareImages(dom.disks[0]!.path, target)).toBe(true);
    // libvirt would have written `<source>.<timestamp>` next to any other disk taking part in the job
    expect((await readdir(dom.dir)).sort()).toEqual([...before, 'push-vda.qcow2'].sort());
    expect(info.skipped.map((s) => s.name)).toEqual(['sda']);
    await rm(target);
  });

  test('overlay -> write -> active commit -> pivot leaves the domain on its base with the writes', async () => {
    const [vda, vdb] = dom.disks;
    const overlay = join(dom.dir, 'vda-overlay.qcow2');
    const baseCopy = join(dom.dir, 'vda-base-copy.qcow2');

    await hv.createOverlays(dom.name, [{ disk: 'vda', file: overlay }], { quiesce: false });
    const during = await hv.disks(dom.name);
    expect(during.map((d) => [d.name, d.source])).toEqual([
      ['vda', overlay],
      ['vdb', vdb!.path],
      ['sda', join(dom.dir, 'cdrom.iso')],
    ]);
    expect(during[0]!.backingChain).toEqual([vda!.path]);
    expect((await imageInfo(overlay, { format: 'qcow2' })).backingFile).toBe(vda!.path);

    // The base is frozen while the overlay takes the writes: copy it, then write.
    await convertImage({ path: vda!.path, format: 'qcow2', backing: null }, baseCopy, { forceShare: true });
    await dom.writeThroughDevice('vda', 0xee, 16, 4);
    expect(await compareImages(vda!.path, baseCopy)).toBe(true);
    expect(await holdsPattern(vda!.path, 'qcow2', 0xee, 16, 4)).toBe(false);

    await hv.startActiveCommit(dom.name, 'vda');
    try {
      const ready = await until<BlockJobInfo>('the commit to be ready', async () => {
        const job = await hv.blockJobInfo(dom.name, 'vda');
        return job.ready ? job : undefined;
      });
      expect(ready).toMatchObject({ type: 'Active Block Commit', ready: true });
      expect(ready.cur).toBe(ready.end);
      await hv.pivot(dom.name, 'vda');
    } catch (err) {
      // a commit left running would make the next tests on this domain fail as "busy", hiding this failure
      await hv.abortBlockJob(dom.name, 'vda').catch(() => undefined);
      throw err;
    }

    const after = await hv.disks(dom.name);
    expect(after.map((d) => [d.name, d.source])).toEqual(
      during.map((d, i) => [d.name, i === 0 ? vda!.path : d.source]),
    );
    expect(after[0]!.backingChain).toEqual([]);
    expect(await hv.blockJobInfo(dom.name, 'vda')).toMatchObject({ type: undefined });
    expect(await holdsPattern(vda!.path, 'qcow2', 0xee, 16, 4)).toBe(true);
    expect(await holdsPattern(vda!.path, 'qcow2', 0xab, 0, 8)).toBe(true);
    expect(await dom.state()).toBe('running');
  });

  test('quiesce without a guest agent channel, and with a channel but no agent, is a quiesce error', async () => {
    const overlay = join(dom.dir, 'quiesce.qcow2');
    const noChannel = await rejection(hv.createOverlays(dom.name, [{ disk: 'vda', file: overlay }], { quiesce: true }));
    expect(noChannel).toMatchObject({ kind: 'quiesce', permanent: true });
    expect(noChannel.message).toMatch(/QEMU guest agent is not configured/);

    const withChannel = await newDomain({
      prefix: 'hvqga',
      disks: [{ format: 'qcow2', sizeMiB: 32 }],
      guestAgentChannel: true,
    });
    expect((await hv.inspect(withChannel.name)).hasGuestAgent).toBe(true);
    const noAgent = await rejection(
      hv.createOverlays(withChannel.name, [{ disk: 'vda', file: join(withChannel.dir, 'q.qcow2') }], { quiesce: true }),
    );
    expect(noAgent).toMatchObject({ kind: 'quiesce', permanent: true });
    expect(noAgent.message).toMatch(/Guest agent is not responding/);
    // the failed snapshot left the domain on its disk
    expect((await hv.disks(withChannel.name))[0]!.source).toBe(withChannel.disks[0]!.path);
  });

  test('the tiny guest boots and writes to vda', async () => {
    const guest = await newDomain({ prefix: 'hvguest', disks: [{ format: 'qcow2', sizeMiB: 64 }], guest: true });
    const last = await guest.waitForGuestWrites(3);
    expect(last).toBeGreaterThanOrEqual(3);
    expect(await guest.serialLog()).toMatch(/^GUEST-UP/m);
    // chunk i lands at MiB 8 + i % 48
    expect((await imageInfo(guest.disks[0]!.path, { format: guest.disks[0]!.format })).actualSize).toBeGreaterThan(
      2 * MiB,
    );
  });
});
