/**
 * Staging directories of dead backups. A backup stages its images in `<root>/<backupId>/` and removes the
 * directory when it ends; a worker killed for good, or a workflow terminated, leaves it behind, full-size.
 * Recovery removes the staging directory of each backup whose workflow is closed, asked right before the
 * removal, and only directly under this host's staging roots: nothing a running backup owns, and nothing
 * outside those roots, whatever a directory entry points to. A root that is a link, or that another user
 * could change, is not scanned at all: `<stateDir>/staging -> /` would otherwise offer /etc for removal.
 *
 * A dead backup may also have left its libvirt job running in that directory (dead-jobs.ts): the job is ended
 * first. Removing the directory under a running job would delete files QEMU still writes (the space is not freed
 * until the job ends), and a pull job never ends on its own.
 */
import { lstat, readdir, realpath, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Context } from '@temporalio/activity';
import type { Hypervisor } from '../hypervisor/port';
import type { JobRecovery, RecoverInput, StagingRecovery } from '../shared/activities';
import { domainOfBackupId } from '../shared/names';
import { isAbandoned } from './backup-states';
import type { BackupStates } from './backup-states';
import { deadJobs, jobFiles as jobFilesOf } from './dead-jobs';
import { unsafeDirectory } from './host-paths';
import { SHORT_SOCKET_ROOT } from './pull-paths';
import { isValidBackupId } from './snapshot-paths';

export interface DeadStagingDeps {
  /** directories whose entries are staging directories named by backup id */
  stagingRoots: string[];
  backupStates: BackupStates;
  /** the backup jobs on this host's domains: a dead backup's job is ended before its staging goes */
  hypervisor: Hypervisor;
  /** where pull sockets go when `<staging>/nbd/backup.sock` is too long (default /run/vmbackup-nbd) */
  shortSocketRoot?: string;
}

export function createDeadStagingActivities(deps: DeadStagingDeps) {
  const jobs = deadJobs({ hypervisor: deps.hypervisor, shortSocketRoot: deps.shortSocketRoot ?? SHORT_SOCKET_ROOT });

  async function removeDeadStaging(input: RecoverInput): Promise<Array<StagingRecovery | JobRecovery>> {
    const ctx = Context.current();
    const actions: Array<StagingRecovery | JobRecovery> = [];
    const roots: Array<{ root: string; real: string }> = [];
    for (const root of new Set(deps.stagingRoots)) {
      const unsafe = await unsafeRoot(root);
      if (unsafe) {
        if (unsafe !== 'missing') ctx.log.warn('staging root not scanned', { root, why: unsafe });
        continue;
      }
      // jobs name files by resolved paths (activities hand libvirt the resolved staging dir)
      roots.push({ root, real: await realpath(root) });
    }
    const realRoots = roots.map((r) => r.real);

    // 1. backup jobs: a dead backup's job ends before its staging dir goes; a live backup's, or anyone else's, stays
    const domains = input.domain ? [input.domain] : await deps.hypervisor.listDomains();
    const found = await jobs.find(domains, realRoots);
    /** resolved staging dirs a job still runs in: kept */
    const busy = new Set<string>();
    for (const j of found.jobs) {
      if (!j.owner) {
        const what = { mode: j.job.mode, files: jobFilesOf(j.job) };
        const detail = `a ${j.job.mode} backup job vmbackup did not start (${j.notOurs ?? 'unknown'}): left alone`;
        actions.push({ domain: j.domain, job: what, action: 'job-not-ours', detail });
        continue;
      }
      const owner = j.owner;
      ctx.heartbeat({ phase: 'jobs', actions: actions.length });
      if (!(await isAbandoned(deps.backupStates, owner.backupId, owner.staging))) {
        busy.add(owner.staging);
        continue;
      }
      const ended = await jobs.end({ ...j, owner }, realRoots);
      if (ended) actions.push(ended);
      if (ended?.action === 'failed') busy.add(owner.staging);
    }

    // 2. staging directories of dead backups
    for (const { root, real } of roots) {
      for (const e of await readdir(root, { withFileTypes: true })) {
        // only real directories named as vmbackup names backups (a link or a file is not staging of ours)
        const domain = domainOfBackupId(e.name);
        if (!e.isDirectory() || !isValidBackupId(e.name) || domain === undefined) continue;
        const backupId = e.name;
        if (input.domain && domain !== input.domain) continue;
        const staging = join(root, backupId);
        if (busy.has(join(real, backupId))) continue; // a live backup's job, or one that did not end (reported)
        ctx.heartbeat({ phase: 'staging', actions: actions.length });
        if (!(await isAbandoned(deps.backupStates, backupId, staging))) continue;
        const unreadable = found.unreadable.get(domain);
        if (unreadable !== undefined) {
          const detail = `kept: the backup job of ${domain} could not be read, it may still write here (${unreadable})`;
          actions.push({ domain, backupId, staging, action: 'failed', detail });
          continue;
        }
        try {
          await rm(staging, { recursive: true, force: true });
          const socketDir = await jobs.removeSocketDir(join(real, backupId));
          actions.push({ domain, backupId, staging, action: 'removed-staging', ...(socketDir ? { socketDir } : {}) });
        } catch (err) {
          const detail = err instanceof Error ? err.message : String(err);
          actions.push({ domain, backupId, staging, action: 'failed', detail });
        }
      }
    }
    return actions;
  }

  return { removeDeadStaging };
}

/** Why recovery must not scan `root`: it is missing, not a real directory, or another user could change it. */
async function unsafeRoot(root: string): Promise<string | undefined> {
  const st = await lstat(root).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT' || err.code === 'ENOTDIR') return undefined;
    throw err;
  });
  if (!st) return 'missing';
  if (!st.isDirectory()) return 'not a directory (a link?)';
  // the one ownership and writability check every activity uses (it also checks the directories above)
  return unsafeDirectory(root);
}
