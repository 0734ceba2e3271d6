/**
 * What --instant opens for a QEMU that does not run as root, and when it is put back: the user libvirt will run QEMU
 * as (a static DAC label, else qemu.conf), and releaseInstantAccess keeping a directory open while another unfinished
 * instant record names it.
 */
import { chmod, mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { canTraverse, qemuUserOf, staticDacLabel } from '../../src/hypervisor/qemu-user';
import { releaseInstantAccess, writeInstantRecord, type InstantRecord } from '../../src/repository/instant';

let work: string;

beforeEach(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmbackup-instant-access-'));
});
afterEach(async () => {
  await rm(work, { recursive: true, force: true });
});

describe('the user QEMU runs as', () => {
  test('a static DAC label of root means root (no opening), any other label is that user', async () => {
    const conf = join(work, 'qemu.conf');
    await writeFile(conf, '#user = "libvirt-qemu"\n');
    const rootXml = `<domain><seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>`;
    expect(await qemuUserOf(rootXml, conf)).toBeUndefined();
    const other = `<domain><seclabel type='static' model='dac'><label>+107:+107</label></seclabel></domain>`;
    expect(staticDacLabel(other)).toEqual({ user: '+107', group: '+107' });
    expect(await qemuUserOf(other, conf)).toEqual({ user: '+107', group: '+107' });
  });

  test('without a label: qemu.conf user and group, libvirt-qemu when unset', async () => {
    const conf = join(work, 'qemu.conf');
    await writeFile(conf, '#user = "root"\n');
    expect(await qemuUserOf('<domain/>', conf)).toEqual({ user: 'libvirt-qemu', group: 'libvirt-qemu' });
    await writeFile(conf, 'user = "root"\ngroup = "root"\n');
    expect(await qemuUserOf('<domain/>', conf)).toBeUndefined();
    await writeFile(conf, 'user = "qemu"\ngroup = "kvm"\n');
    expect(await qemuUserOf('<domain/>', conf)).toEqual({ user: 'qemu', group: 'kvm' });
  });
});

describe('canTraverse (setpriv as that user: needs root, as the worker)', () => {
  const nobody = { user: '+65534', group: '+65534' };

  test('0700 is closed to another user, 0711 lets it pass', async () => {
    await chmod(work, 0o711);
    const dir = join(work, 'd');
    await mkdir(dir, { mode: 0o700 });
    expect(await canTraverse(nobody, dir)).toBe(false);
    await chmod(dir, 0o711);
    expect(await canTraverse(nobody, dir)).toBe(true);
  });

  test('a user that does not exist is an error, not "cannot pass"', async () => {
    await expect(canTraverse({ user: 'vmbt-no-such-user', group: 'vmbt-no-such-user' }, '/')).rejects.toThrow(
      /^cannot check whether QEMU's user vmbt-no-such-user:vmbt-no-such-user .* can reach \/: /,
    );
  });
});

describe('releaseInstantAccess', () => {
  function record(domain: string, dir: string, finishedAt?: string): InstantRecord {
    return {
      version: 1,
      domain,
      uuid: '00000000-0000-4000-8000-000000000000',
      backupId: 'b',
      sourceDomain: 'src',
      target: 'file:///t',
      createdAt: new Date(0).toISOString(),
      disks: [],
      openedDirs: [{ path: dir, mode: 0o700 }],
      ...(finishedAt ? { finishedAt } : {}),
    };
  }
  const modeOf = async (p: string) => (await stat(p)).mode & 0o7777;

  test('a directory two instant domains opened stays open until the second is done, then is 0700 again', async () => {
    const stateDir = join(work, 'state');
    const dir = join(work, 'target');
    await mkdir(dir, { mode: 0o711 });
    const a = record('vm-a', dir);
    const b = record('vm-b', dir);
    await writeInstantRecord(stateDir, a);
    await writeInstantRecord(stateDir, b);

    await writeInstantRecord(stateDir, { ...a, finishedAt: new Date().toISOString() });
    await releaseInstantAccess(stateDir, a);
    expect(await modeOf(dir)).toBe(0o711); // vm-b still reads from it

    await writeInstantRecord(stateDir, { ...b, finishedAt: new Date().toISOString() });
    await releaseInstantAccess(stateDir, b);
    expect(await modeOf(dir)).toBe(0o700);
    await releaseInstantAccess(stateDir, b); // a retry of the last step: the same
    expect(await modeOf(dir)).toBe(0o700);
  });

  test('a directory that is gone (the backup was removed) is skipped', async () => {
    const stateDir = join(work, 'state');
    await expect(releaseInstantAccess(stateDir, record('vm-a', join(work, 'gone')))).resolves.toBeUndefined();
  });
});
