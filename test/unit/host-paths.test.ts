/**
 * HostPaths: the one place that says which paths and targets an activity may touch. Real files in a
 * temp dir (symlinks, modes, owners); no stack.
 */
import { chmod, chown, mkdir, mkdtemp, realpath, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ApplicationFailure } from '@temporalio/common';
import { HostPaths } from '../../src/activities/host-paths';
import { ErrorType } from '../../src/shared/errors';

let work: string;
let state: string;
let qemuDir: string;
const ID = 'vm1-20261130T101010Z-ab12';

beforeEach(async () => {
  work = await realpath(await mkdtemp(join(tmpdir(), 'vmbackup-host-paths-')));
  state = join(work, 'state');
  qemuDir = join(work, 'qemu');
  await mkdir(join(state, 'staging'), { recursive: true, mode: 0o700 });
});
afterEach(async () => {
  await rm(work, { recursive: true, force: true });
});

function paths(allowTargets?: string[]): HostPaths {
  return new HostPaths({ stateDir: state, systemQemuDir: qemuDir, allowTargets });
}

/** The failure `p` rejects with: non-retryable, one sentence. */
async function refusal(p: Promise<unknown>, type: string = ErrorType.InvalidInput): Promise<string> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ApplicationFailure);
  const f = err as ApplicationFailure;
  expect([f.type, f.nonRetryable]).toEqual([type, true]);
  expect(f.message).not.toMatch(/\n/);
  return f.message;
}

describe('staging directories', () => {
  test('<stateDir>/staging/<backupId> and <systemQemuDir>/staging/<backupId> are staging dirs, existing or not', async () => {
    const p = paths();
    expect(await p.stagingDir(join(state, 'staging', ID), ID, 't')).toBe(join(state, 'staging', ID));
    await mkdir(join(state, 'staging', ID));
    expect(await p.stagingDir(join(state, 'staging', ID), ID, 't')).toBe(join(state, 'staging', ID));
    expect(await p.stagingDir(join(qemuDir, 'staging', ID), ID, 't')).toBe(join(qemuDir, 'staging', ID));
  });

  test.each([
    ['/', 'the root directory'],
    ['/etc', 'a system directory'],
    ['relative/staging/ID', 'a relative path'],
    ['STATE/staging', 'the staging root itself'],
    ['STATE/staging/other-backup', "another backup's directory"],
    ['STATE/staging/ID/sub', 'a directory below it'],
    ['STATE/staging//ID', 'a path that is not normalised'],
    ['STATE/staging/ID/../ID', 'a path with ..'],
    ['STATE/elsewhere/ID', 'a directory that is not a root'],
  ])('%s (%s) is refused', async (path, _why) => {
    const message = await refusal(
      paths().stagingDir(path.replace('STATE', state).replace(/ID/g, ID), ID, 'cleanupStaging'),
    );
    expect(message).toMatch(
      /^cleanupStaging: .* is not the staging directory of backup .* on this host \(.*\); refused$/,
    );
  });

  test('a bad backup id or a non-string path is refused', async () => {
    await refusal(paths().stagingDir(join(state, 'staging', '..'), '..', 't'));
    await refusal(paths().stagingDir(join(state, 'staging', 'a'), 'a/b', 't'));
    await refusal(paths().stagingDir({ toString: () => '/' }, ID, 't'));
    await refusal(paths().stagingDir(join(state, 'staging', ID), 42, 't'));
  });

  test('symlinks never lead out: a backup dir linked to / or elsewhere, a linked root, a dangling link', async () => {
    const canary = join(work, 'canary');
    await mkdir(canary);
    await symlink('/', join(state, 'staging', ID));
    expect(await refusal(paths().stagingDir(join(state, 'staging', ID), ID, 't'))).toMatch(/resolves to \//);
    await rm(join(state, 'staging', ID));
    await symlink(canary, join(state, 'staging', ID));
    expect(await refusal(paths().stagingDir(join(state, 'staging', ID), ID, 't'))).toMatch(/resolves to .*canary/);
    await rm(join(state, 'staging', ID));

    // a file below a linked backup dir
    await symlink(canary, join(state, 'staging', ID));
    await refusal(
      paths().stagingImage(join(state, 'staging', ID, 'vda.qcow2'), ID, { name: 'vda', format: 'qcow2' }, 't'),
    );
    await rm(join(state, 'staging', ID));

    // the root itself moved elsewhere
    await rm(join(state, 'staging'), { recursive: true });
    await symlink(canary, join(state, 'staging'));
    expect(await refusal(paths().stagingDir(join(state, 'staging', ID), ID, 't'))).toMatch(/is a symbolic link/);
    await rm(join(state, 'staging'));
    await mkdir(join(state, 'staging'), { mode: 0o700 });

    // an image path that is a link to nowhere: writing through it would create its target
    await mkdir(join(state, 'staging', ID));
    await symlink(join(canary, 'created-by-us'), join(state, 'staging', ID, 'vda.qcow2'));
    expect(
      await refusal(
        paths().stagingImage(join(state, 'staging', ID, 'vda.qcow2'), ID, { name: 'vda', format: 'qcow2' }, 't'),
      ),
    ).toMatch(/symbolic link to a missing file/);
  });

  test('a root that another user could change is refused', async () => {
    const p = paths();
    await chmod(join(state, 'staging'), 0o777);
    expect(await refusal(p.stagingDir(join(state, 'staging', ID), ID, 't'))).toMatch(/is writable by other users/);
    await chmod(join(state, 'staging'), 0o711);
    await chown(state, 65534, 65534);
    expect(await refusal(p.stagingDir(join(state, 'staging', ID), ID, 't'))).toMatch(/belongs to another user/);
    await chown(state, 0, 0);
    expect(await p.stagingDir(join(state, 'staging', ID), ID, 't')).toBe(join(state, 'staging', ID));
  });
});

describe('staging images', () => {
  test('only <root>/<backupId>/<disk>.<format> of valid names and formats', async () => {
    const p = paths();
    const img = join(state, 'staging', ID, 'vda.qcow2');
    expect(await p.stagingImage(img, ID, { name: 'vda', format: 'qcow2' }, 'shipImage')).toBe(img);
    expect(await refusal(p.stagingImage('/etc/shadow', ID, { name: 'vda', format: 'qcow2' }, 'shipImage'))).toMatch(
      /^shipImage: \/etc\/shadow is not the staging image of disk vda/,
    );
    await refusal(p.stagingImage('/etc/vda.qcow2', ID, { name: 'vda', format: 'qcow2' }, 'shipImage'));
    await refusal(p.stagingImage(img, ID, { name: 'vdb', format: 'qcow2' }, 'shipImage'));
    await refusal(p.stagingImage(img, 'other-backup', { name: 'vda', format: 'qcow2' }, 'shipImage'));
    await refusal(p.stagingImage(join(state, 'staging', ID, 'vda.vmdk'), ID, { name: 'vda', format: 'vmdk' }, 's'));
    await refusal(p.stagingImage(join(state, 'staging', ID, 'x', 'vda.raw'), ID, { name: 'vda', format: 'raw' }, 's'));
    await refusal(p.stagingImage(join(state, 'staging', 'vda.raw'), 'vda.raw', { name: 'vda', format: 'raw' }, 's'));
  });
});

describe('local targets', () => {
  test('<dir>/.staging of an allowed file:// target is a staging root; not when the allow-list leaves it out', async () => {
    const target = join(work, 'backups');
    const dir = join(target, '.staging', ID);
    expect(await paths().stagingDir(dir, ID, 't')).toBe(dir); // no allow-list: every target
    expect(await paths([pathToFileURL(target).href]).stagingDir(dir, ID, 't')).toBe(dir);
    expect(await paths([`file://${work}`]).stagingDir(dir, ID, 't')).toBe(dir);
    await refusal(paths([`file://${work}/other`]).stagingDir(dir, ID, 't'));
    await refusal(paths(['s3://bucket/x']).stagingDir(dir, ID, 't'));
    expect(paths().targetStagingRoot(`${pathToFileURL(target).href}/`)).toBe(join(target, '.staging'));
  });

  test('a .staging that is a symlink (to /) is refused', async () => {
    const target = join(work, 'backups');
    await mkdir(target);
    await symlink('/', join(target, '.staging'));
    expect(await refusal(paths().stagingDir(join(target, '.staging', 'etc'), 'etc', 'cleanupStaging'))).toMatch(
      /is a symbolic link/,
    );
  });
});

describe('overlays', () => {
  test('<qemuStateDir>/overlays/<backupId>/<file> only', async () => {
    const p = new HostPaths({ stateDir: state, qemuStateDir: qemuDir, systemQemuDir: qemuDir });
    const file = join(qemuDir, 'overlays', ID, 'vm1.vda.qcow2');
    expect(await p.overlayFile(file, ID, 'removeOverlays')).toBe(file);
    expect(await p.overlayDir(ID, 'removeOverlays')).toBe(join(qemuDir, 'overlays', ID));
    await refusal(p.overlayFile(join(state, 'overlays', ID, 'vm1.vda.qcow2'), ID, 'removeOverlays'));
    await refusal(p.overlayFile(join(qemuDir, 'overlays', 'other', 'vm1.vda.qcow2'), ID, 'removeOverlays'));
    await refusal(p.overlayFile('/var/lib/libvirt/images/vm1.qcow2', ID, 'removeOverlays'));
  });
});

describe('targets', () => {
  test('without an allow-list every valid target is allowed', () => {
    expect(paths().checkTarget('s3://anything/x', 'shipImage')).toBe('s3://anything/x');
    expect(() => paths().checkTarget('ftp://x', 'shipImage')).toThrow(/not a supported target URL/);
  });

  test('an allow-list admits targets at or below its prefixes, at segment boundaries', async () => {
    const p = paths(['file:///backups', 's3://b-1/p', 'nfs://filer/export/vm']);
    for (const ok of [
      'file:///backups',
      'file:///backups/',
      'file:///backups/x//y',
      's3://b-1/p/',
      's3://b-1/p/q',
      'nfs://FILER/export/vm/a',
    ]) {
      expect(p.checkTarget(ok, 'shipImage')).toBe(ok);
    }
    for (const no of [
      'file:///backups-evil',
      'file:///',
      's3://b-1/px',
      's3://b-1',
      's3://b-2/p',
      'nfs://filer/export',
      'file:///tmp',
    ]) {
      const message = await refusal(
        Promise.resolve().then(() => p.checkTarget(no, 'shipImage')),
        no === 'file:///' ? ErrorType.InvalidTarget : ErrorType.InvalidTarget,
      );
      expect(message).toMatch(/^shipImage: /);
    }
    expect(
      await refusal(
        Promise.resolve().then(() => p.checkTarget('s3://b-1/px', 'shipImage')),
        ErrorType.InvalidTarget,
      ),
    ).toBe(
      'shipImage: this worker does not write to s3://b-1/px: it is outside the targets it allows (vmbackup worker --allow-target, VMBACKUP_ALLOW_TARGETS)',
    );
  });

  test('a request naming one place twice is refused', async () => {
    const message = await refusal(
      Promise.resolve().then(() => paths().checkTargets(['s3://b-1/p', 'file:///x', 's3://b-1/p/'], 'prepareStaging')),
    );
    expect(message).toBe(
      'prepareStaging: targets s3://b-1/p and s3://b-1/p/ are the same place; name each target once',
    );
    await refusal(Promise.resolve().then(() => paths().checkTargets([], 'prepareStaging')));
  });
});
