/**
 * Staging directories of dead backups: recovery scans the roots prepareStaging uses, removes the directory
 * of a backup whose workflow is closed (or unknown to Temporal and quiet for long), and nothing else.
 * The backupStates port answers as Temporal would; test/integration/recover.test.ts asks the real one.
 */
import { chmod, lstat, lutimes, mkdir, mkdtemp, readdir, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { MockActivityEnvironment } from '@temporalio/testing';
import type { BackupState } from '../../src/activities/backup-states';
import { UNKNOWN_BACKUP_GRACE_MS } from '../../src/activities/backup-states';
import { createDeadStagingActivities } from '../../src/activities/dead-staging';
import { HostPaths } from '../../src/activities/host-paths';
import { createPushActivities } from '../../src/activities/push';
import type { Hypervisor } from '../../src/hypervisor/port';
import { defaultTargetUrl } from '../../src/storage/registry';

let work: string;
beforeEach(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmbt-dead-staging-'));
});
afterEach(async () => {
  await rm(work, { recursive: true, force: true });
});

const id = (domain: string, n: number) => `${domain}-20261130T000000Z-000${n}`;

/** A host without domains (so without backup jobs): the jobs part is test/integration/recover-jobs.test.ts's. */
const noDomains = {
  listDomains: () => Promise.resolve([]),
  backupJob: () => Promise.resolve(undefined),
} as unknown as Hypervisor;

test('every staging directory prepareStaging makes lies directly under a root recovery scans', async () => {
  // a private parent: as root, QEMU-written staging then falls back to the system directory
  const parent = join(work, 'private');
  await mkdir(parent, { mode: 0o700 });
  await chmod(parent, 0o700);
  const stateDir = join(parent, 'state');
  const systemQemuDir = join(work, 'system');
  // prepareStaging never asks libvirt
  const push = createPushActivities({ hypervisor: {} as Hypervisor, stateDir, systemQemuDir });
  const roots = new HostPaths({ stateDir, systemQemuDir }).recoveryStagingRoots(join(stateDir, 'backups'));
  const defaultTarget = defaultTargetUrl(stateDir);
  const cases = [
    { targets: ['s3://bucket/prefix'], writtenByQemu: false },
    { targets: ['s3://bucket/prefix'], writtenByQemu: true },
    { targets: [defaultTarget], writtenByQemu: false },
    { targets: [defaultTarget], writtenByQemu: true },
  ];
  let n = 0;
  for (const c of cases) {
    const backupId = id('vm1', ++n);
    const { dir } = await push.prepareStaging({ backupId, domain: 'vm1', ...c });
    const under = roots.includes(dirname(dir)) && basename(dir) === backupId ? 'a root' : dir;
    expect({ ...c, under }).toEqual({ ...c, under: 'a root' });
  }
});

test('removes the staging dirs of closed and long-unknown backups, keeps running, recent and foreign entries', async () => {
  const root = join(work, 'staging');
  const other = join(work, 'target', '.staging');
  await mkdir(root, { recursive: true });
  await mkdir(other, { recursive: true });
  const states = new Map<string, BackupState>();
  const dir = async (base: string, backupId: string, state: BackupState, ageMs = 0) => {
    const path = join(base, backupId);
    await mkdir(path);
    await writeFile(join(path, 'vda.qcow2'), 'partial image');
    const at = new Date(Date.now() - ageMs);
    await utimes(join(path, 'vda.qcow2'), at, at);
    await utimes(path, at, at);
    states.set(backupId, state);
    return path;
  };
  const long = UNKNOWN_BACKUP_GRACE_MS + 60_000;
  const closed = await dir(root, id('vm1', 1), 'closed');
  const closedElsewhere = await dir(other, id('vm2', 1), 'closed');
  const running = await dir(root, id('vm1', 2), 'running', long);
  const unknownOld = await dir(root, id('vm1', 3), 'unknown', long);
  const unknownNew = await dir(root, id('vm1', 4), 'unknown');
  // quiet directory, but a file in it changed just now: not quiet
  const unknownBusy = await dir(root, id('vm1', 5), 'unknown', long);
  await writeFile(join(unknownBusy, 'vda.qcow2'), 'still being written');
  // names like a backup's, but a link (to a directory outside) and a file: never followed, never removed
  const outside = join(work, 'outside');
  await mkdir(outside);
  await writeFile(join(outside, 'keep'), 'x');
  const link = join(root, id('vm1', 6));
  await symlink(outside, link);
  const file = join(root, id('vm1', 7));
  await writeFile(file, 'x');
  const old = new Date(Date.now() - long);
  await lutimes(link, old, old);
  await utimes(file, old, old);
  states.set(id('vm1', 6), 'closed');
  states.set(id('vm1', 7), 'closed');
  // not a backup id at all, or not one vmbackup makes (`/etc` must never be offered by a root gone wrong)
  const odd = join(root, 'not a backup');
  await mkdir(odd);
  const etc = await dir(root, 'etc', 'closed', long);
  // roots that are a link (`staging -> /`), or that another user could change: not scanned
  const linkedRoot = join(work, 'linked-staging');
  await symlink(other, linkedRoot);
  const openRoot = join(work, 'open', 'staging');
  await mkdir(openRoot, { recursive: true });
  await chmod(openRoot, 0o777);
  const inOpen = await dir(openRoot, id('vm3', 1), 'closed');

  const asked: string[] = [];
  const { removeDeadStaging } = createDeadStagingActivities({
    stagingRoots: [root, other, join(work, 'missing'), root, linkedRoot, openRoot],
    backupStates: async (backupId) => {
      asked.push(backupId);
      return states.get(backupId) ?? 'unknown';
    },
    hypervisor: noDomains,
  });
  const env = new MockActivityEnvironment();

  // --domain: only backups of that domain (through a linked root it is not offered a second time)
  expect(await env.run(removeDeadStaging, { domain: 'vm2' })).toEqual([
    { domain: 'vm2', backupId: id('vm2', 1), staging: closedElsewhere, action: 'removed-staging' },
  ]);
  expect(asked).toEqual([id('vm2', 1)]);
  await mkdir(closedElsewhere);

  const actions = await env.run(removeDeadStaging, { activeBackupIds: [id('vm1', 1)] });
  // the (stale) list of an earlier version does not decide; Temporal does
  expect(actions).toEqual(
    expect.arrayContaining([
      { domain: 'vm1', backupId: id('vm1', 1), staging: closed, action: 'removed-staging' },
      { domain: 'vm1', backupId: id('vm1', 3), staging: unknownOld, action: 'removed-staging' },
    ]),
  );
  expect(actions).toHaveLength(3);
  expect(actions).toContainEqual({
    domain: 'vm2',
    backupId: id('vm2', 1),
    staging: closedElsewhere,
    action: 'removed-staging',
  });
  for (const kept of [running, unknownNew, unknownBusy, etc, inOpen]) expect(await readdir(kept)).not.toEqual([]);
  expect((await lstat(odd)).isDirectory()).toBe(true);
  expect((await lstat(link)).isSymbolicLink()).toBe(true);
  expect(await readdir(outside)).toEqual(['keep']);
  expect((await lstat(file)).isFile()).toBe(true);
});
