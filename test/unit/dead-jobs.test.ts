/**
 * Whose backup job it is (recovery ends only a dead backup's own job): every file the job names must be exactly where
 * one backup of the job's domain puts it, under a resolved staging root; anything else is not vmbackup's. The real
 * jobs (pull, push, open, by hand) are test/integration/recover-jobs.test.ts's.
 */
import { ownerOfJob } from '../../src/activities/dead-jobs';
import { shortSocketDir } from '../../src/activities/pull-paths';
import type { RunningBackupJob } from '../../src/hypervisor/port';

const root = '/var/lib/vmbackup/staging';
const other = '/srv/backups/.staging';
const roots = [root, other];
const short = '/run/vmbackup-nbd';
const id = 'vm1-20261130T150000Z-0a1b';
const staging = `${root}/${id}`;

const pull = (over: Partial<RunningBackupJob> = {}): RunningBackupJob => ({
  mode: 'pull',
  transport: 'unix',
  socket: `${staging}/nbd/backup.sock`,
  disks: [
    { name: 'vda', file: `${staging}/vda.scratch.qcow2` },
    { name: 'vdb', file: `${staging}/vdb.scratch.qcow2` },
  ],
  ...over,
});
const push = (files: string[]): RunningBackupJob => ({
  mode: 'push',
  disks: files.map((file, i) => ({ name: `vd${'ab'[i]}`, file })),
});

test("a pull job with vmbackup's scratch files and socket (in the staging dir, or under the short root) is that backup's", () => {
  expect(ownerOfJob('vm1', pull(), roots, short)).toEqual({ owner: { backupId: id, staging } });
  const socket = `${shortSocketDir(staging, short)}/backup.sock`;
  expect(ownerOfJob('vm1', pull({ socket }), roots, short)).toEqual({ owner: { backupId: id, staging } });
});

test("a push job with vmbackup's target files is that backup's, in any staging root", () => {
  const s = `${other}/${id}`;
  expect(ownerOfJob('vm1', push([`${s}/vda.qcow2`, `${s}/vdb.qcow2`]), roots, short)).toEqual({
    owner: { backupId: id, staging: s },
  });
});

test.each([
  [
    'files outside the staging roots',
    push([`/tmp/x/${id}/vda.qcow2`]),
    `/tmp/x/${id} is outside vmbackup's staging directories`,
  ],
  [
    'a root itself, no backup directory',
    push([`${root}/vda.qcow2`]),
    `${root} is outside vmbackup's staging directories`,
  ],
  [
    'a path that climbs out',
    push([`${staging}/../${id}/vda.qcow2`]),
    `${staging}/../${id}/vda.qcow2 is not a normalised path`,
  ],
  [
    'two staging dirs',
    push([`${staging}/vda.qcow2`, `${other}/${id}/vdb.qcow2`]),
    'its files are in more than one directory',
  ],
  [
    'a backup of another domain',
    push([`${root}/vm2-20261130T150000Z-0a1b/vda.qcow2`]),
    `${root}/vm2-20261130T150000Z-0a1b is not the staging directory of a backup of vm1`,
  ],
  ['not a backup id', push([`${root}/etc/vda.qcow2`]), `${root}/etc is not the staging directory of a backup of vm1`],
  [
    'a file named otherwise',
    push([`${staging}/vda.raw`]),
    `${staging}/vda.raw is not where vmbackup puts disk vda (${staging}/vda.qcow2)`,
  ],
  [
    "another disk's name",
    push([`${staging}/vdb.qcow2`]),
    `${staging}/vdb.qcow2 is not where vmbackup puts disk vda (${staging}/vda.qcow2)`,
  ],
  [
    'a pull job with push names',
    pull({ disks: [{ name: 'vda', file: `${staging}/vda.qcow2` }] }),
    `${staging}/vda.qcow2 is not where vmbackup puts disk vda (${staging}/vda.scratch.qcow2)`,
  ],
  [
    'a socket elsewhere',
    pull({ socket: '/tmp/nbd.sock' }),
    `its NBD server (/tmp/nbd.sock) is not the socket of ${id}`,
  ],
  [
    "another staging dir's short socket",
    pull({ socket: `${shortSocketDir(`${other}/${id}`, short)}/backup.sock` }),
    `its NBD server (${shortSocketDir(`${other}/${id}`, short)}/backup.sock) is not the socket of ${id}`,
  ],
  ['a TCP export', pull({ socket: undefined, transport: 'tcp' }), `its NBD server (tcp) is not the socket of ${id}`],
  ['a disk without a file', pull({ disks: [{ name: 'vda' }] }), 'disk vda has no file libvirt names'],
  ['no disk', pull({ disks: [] }), 'it backs up no disk'],
])("not vmbackup's: %s", (_what, job, why) => {
  expect(ownerOfJob('vm1', job, roots, short)).toEqual({ notOurs: why });
});
