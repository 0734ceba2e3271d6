/**
 * VirshHypervisor's own logic (disk policy, argument lists, error messages) over a fake virsh that
 * replays outputs captured from libvirt 9.0.0 (test/fixtures/virsh/) and logs its arguments.
 */
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HypervisorError } from '../../src/hypervisor/errors';
import { VirshHypervisor } from '../../src/hypervisor/virsh';

const FIXTURES = join(__dirname, '..', 'fixtures', 'virsh');

let dir: string;
let fake: string;

/**
 * A virsh that answers from captured files. XML is taken from the fixture named in $FAKE_DIR/xml (a file:
 * tools get no environment of ours but PATH, HOME and the like); `domstate nosuch-domain` fails as virsh
 * does; backup-begin keeps a copy of its XML; every call is logged.
 */
const script = (fakeDir: string): string => `#!/bin/bash
F=${FIXTURES}
FAKE_DIR=${fakeDir}
FAKE_XML=$(cat "$FAKE_DIR/xml")
echo "$*" >>"$FAKE_DIR/calls.log"
shift 2 # -c URI
case "$1" in
  version) cat "$F/version.txt" ;;
  dumpxml) cat "$F/$FAKE_XML" ;;
  domstate) if [[ $2 == nosuch-domain ]]; then cat "$F/stderr.no-domain.txt" >&2; exit 1; fi; cat "$F/domstate.running.txt" ;;
  domblkinfo) cat "$F/domblkinfo.vda.txt" ;;
  domjobinfo) cat "$F/domjobinfo.running.rawstats.txt" ;;
  domjobabort) cat "$F/stderr.no-job.txt" >&2; exit 1 ;;
  backup-begin) cp "$3" "$FAKE_DIR/backup.xml"; echo 'Backup started' ;;
  snapshot-create-as) echo 'Domain snapshot created' ;;
  blockjob) if [[ " $* " == *" --raw "* ]]; then cat "$F/blockjob.running.raw.txt"; else cat "$F/stderr.not-ready.txt" >&2; exit 1; fi ;;
  *) echo "error: fake virsh: unexpected $1" >&2; exit 1 ;;
esac
`;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-fake-virsh-'));
  fake = join(dir, 'virsh');
  await writeFile(fake, script(dir));
  await chmod(fake, 0o755);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});
beforeEach(async () => {
  await rm(join(dir, 'calls.log'), { force: true });
  await useXml('dumpxml.live.xml');
});

/** The domain XML the fake virsh answers with from now on. */
const useXml = (fixture: string): Promise<void> => writeFile(join(dir, 'xml'), fixture);

const calls = async (): Promise<string[]> =>
  (await readFile(join(dir, 'calls.log'), 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);

// The fake answers one command per process: no virsh sessions (test/integration/hypervisor-session.test.ts).
function hv(): VirshHypervisor {
  return new VirshHypervisor({ uri: 'qemu:///fake', virsh: fake, sessions: false });
}

describe('inspect: disk policy', () => {
  test('the qcow2 disk is backed up; the shareable disk and the cdrom are skipped with reasons', async () => {
    const info = await hv().inspect('vm1');
    expect(info).toMatchObject({
      domain: 'vm1',
      state: 'running',
      libvirtVersion: '9.0.0',
      qemuVersion: '7.2.22',
      backupApi: true,
      hasGuestAgent: true,
    });
    expect(info.disks).toEqual([
      {
        name: 'vda',
        source: '/VM/vda.qcow2',
        format: 'qcow2',
        device: 'disk',
        readonly: false,
        shareable: false,
        virtualSize: 1 << 30,
        allocation: 1074077696,
        backingChain: ['/VM/template.qcow2'],
      },
    ]);
    expect(info.skipped).toEqual([
      { name: 'vdb', reason: 'shareable disk (use --include-all-disks to back it up)' },
      { name: 'sda', reason: 'cdrom (use --include-all-disks to back it up)' },
    ]);
    expect(await calls()).toContain('-c qemu:///fake domblkinfo vm1 vda');
  });

  test('includeAllDisks takes the shareable disk and the cdrom too', async () => {
    const info = await hv().inspect('vm1', { includeAllDisks: true });
    expect(info.disks.map((d) => d.name)).toEqual(['vda', 'vdb', 'sda']);
    expect(info.skipped).toEqual([]);
  });

  test('a writable network disk is refused rather than silently left out', async () => {
    await useXml('dumpxml.inactive.xml');
    const err = await hv()
      .inspect('vm1')
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HypervisorError);
    expect(err).toMatchObject({ kind: 'unsupported', permanent: true, domain: 'vm1', disk: 'vdc' });
    expect((err as Error).message).toBe(
      'disk vdc of domain "vm1" is a network disk (nbd:export): vmbackup backs up file and block disks only ' +
        '(mark it <readonly/> or <shareable/> to leave it out)',
    );
  });

  test('disks() lists every disk, including the skipped ones', async () => {
    const disks = await hv().disks('vm1');
    expect(disks.map((d) => [d.name, d.source, d.device])).toEqual([
      ['vda', '/VM/vda.qcow2', 'disk'],
      ['vdb', '/VM/vdb.raw', 'disk'],
      ['sda', '/VM/cdrom.iso', 'cdrom'],
    ]);
  });
});

describe('commands and messages', () => {
  test('beginPushBackup hands libvirt exactly the listed disks', async () => {
    await hv().beginPushBackup('vm1', [{ disk: 'vda', file: '/backups/vm1/vda.qcow2' }]);
    const xml = await readFile(join(dir, 'backup.xml'), 'utf8');
    expect(xml).toContain(`<disk name='vda' backup='yes' type='file'><target file='/backups/vm1/vda.qcow2'/>`);
    expect(xml).toContain(`<disk name='vdb' backup='no'/>`);
    expect(xml).toContain(`<disk name='sda' backup='no'/>`);
    expect((await calls()).at(-1)).toMatch(/^-c qemu:\/\/\/fake backup-begin vm1 \/.*\/backup.xml$/);
  });

  test('beginPushBackup of a disk the domain does not have', async () => {
    await expect(hv().beginPushBackup('vm1', [{ disk: 'vdz', file: '/b/vdz.qcow2' }])).rejects.toMatchObject({
      kind: 'not-found',
      message: 'domain "vm1" has no disk vdz (it has vda, vdb, sda)',
    });
  });

  test('beginPushBackup with the disks the caller read: no second dumpxml, the same check and sentence', async () => {
    await hv().beginPushBackup('vm1', [{ disk: 'vda', file: '/backups/vm1/vda.qcow2' }], { disks: ['vda'] });
    expect(await calls()).toEqual([expect.stringMatching(/^-c qemu:\/\/\/fake backup-begin vm1 \/.*\/backup.xml$/)]);
    const xml = await readFile(join(dir, 'backup.xml'), 'utf8');
    expect(xml).toContain(`<disk name='vda' backup='yes' type='file'><target file='/backups/vm1/vda.qcow2'/>`);
    await expect(
      hv().beginPushBackup('vm1', [{ disk: 'vdz', file: '/b/vdz.qcow2' }], { disks: ['vda', 'vdb', 'sda'] }),
    ).rejects.toMatchObject({ kind: 'not-found', message: 'domain "vm1" has no disk vdz (it has vda, vdb, sda)' });
  });

  test('createOverlays: one external diskspec, snapshot=no for every other disk, commas doubled', async () => {
    await hv().createOverlays('vm1', [{ disk: 'vda', file: '/ov/a,b.qcow2' }], { quiesce: true });
    const line = (await calls()).at(-1)!;
    expect(line).toMatch(
      /^-c qemu:\/\/\/fake snapshot-create-as --domain vm1 --name vmbackup-overlay-\d+ --disk-only --atomic --no-metadata --quiesce /,
    );
    expect(line).toContain(
      '--diskspec vda,snapshot=external,file=/ov/a,,b.qcow2 --diskspec vdb,snapshot=no --diskspec sda,snapshot=no',
    );
  });

  test('blockJobInfo reads the ready flag from the XML mirror', async () => {
    await useXml('dumpxml.commit-running.xml');
    expect(await hv().blockJobInfo('vm1', 'vda')).toEqual({
      type: 'Active Block Commit',
      cur: 606076928,
      end: 1 << 30,
      ready: false,
    });
    await useXml('dumpxml.commit-ready.xml');
    expect((await hv().blockJobInfo('vm1', 'vda')).ready).toBe(true);
  });

  test("startActiveCommit commits shallow (into the overlay's own backing file)", async () => {
    await hv()
      .startActiveCommit('vm1', 'vda')
      .catch(() => undefined);
    expect((await calls()).at(-1)).toBe('-c qemu:///fake blockcommit vm1 vda --active --shallow');
  });

  test('pivot too early: not-ready, transient, naming the disk and saying what libvirt said', async () => {
    const err = await hv()
      .pivot('vm1', 'vda')
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ kind: 'not-ready', permanent: false, domain: 'vm1', disk: 'vda' });
    expect((err as Error).message).toBe(
      `cannot pivot disk vda of domain "vm1" back to its base image: block copy still active: block job 'commit-vda-libvirt-8-format' not ready for pivot yet`,
    );
    expect((err as HypervisorError).stderr).toContain('error: block copy still active');
  });

  test('jobInfo uses --rawstats; abortJob with no job is a no-op', async () => {
    expect(await hv().jobInfo('vm1')).toMatchObject({ type: 'Unbounded', dataProcessed: 473956352 });
    await hv().abortJob('vm1');
    expect(await calls()).toEqual(['-c qemu:///fake domjobinfo vm1 --rawstats', '-c qemu:///fake domjobabort vm1']);
  });

  test('an unknown domain', async () => {
    await expect(hv().state('nosuch-domain')).rejects.toMatchObject({
      kind: 'not-found',
      message: `domain "nosuch-domain" does not exist on qemu:///fake (virsh: failed to get domain 'nosuch-domain')`,
    });
  });
});
