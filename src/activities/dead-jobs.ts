/**
 * Backup jobs of dead backups. A backup whose worker died for good and whose workflow was terminated leaves its libvirt
 * job running: a pull job never ends on its own (QEMU keeps the NBD export open and the scratch files grow with the
 * guest's writes), a push job keeps writing into the staging directory. Recovery ends such a job before it removes
 * the backup's staging directory.
 *
 * Whose job it is, is read from the job itself (`backup-dumpxml`): a job is a backup's of ours only when every file it
 * names is exactly where that backup puts it, in `<staging root>/<backupId>/` (the resolved root, compared as text:
 * no link is followed), for a backup id of the domain the job runs on; a pull job's socket must also be that backup's.
 * Any other job is not vmbackup's: left alone, and reported. Recovery deletes only paths it derives itself from the
 * staging directory, never a path a job names.
 */
import { lstat, rm } from 'node:fs/promises';
import { basename, dirname, join, normalize } from 'node:path';
import { Context } from '@temporalio/activity';
import { HypervisorError } from '../hypervisor/errors';
import type { Hypervisor, RunningBackupJob } from '../hypervisor/port';
import type { JobRecovery } from '../shared/activities';
import { checkpointName, domainOfBackupId } from '../shared/names';
import { unsafeDirectory } from './host-paths';
import { scratchFile, shortSocketDir, SOCKET_NAME } from './pull-paths';
import { isValidBackupId } from './snapshot-paths';

/** How long an aborted job may take to go (libvirt ends it asynchronously). */
const JOB_END_WAIT_MS = 30_000;

/** A backup job found on a domain, with the backup of ours it belongs to, or why it is not ours. */
export interface FoundJob {
  domain: string;
  job: RunningBackupJob;
  owner?: JobOwner;
  /** why the job is not one of ours */
  notOurs?: string;
}

export interface JobOwner {
  backupId: string;
  /** `<resolved staging root>/<backupId>` */
  staging: string;
}

/** Every file a job names (target or scratch files, a pull job's socket), for the report. */
export function jobFiles(job: RunningBackupJob): string[] {
  return [...job.disks.map((d) => d.file ?? `(disk ${d.name}: no file)`), ...(job.socket ? [job.socket] : [])];
}

/**
 * The backup of ours `job` on `domain` belongs to, or why it belongs to none. `roots`: the resolved staging roots
 * recovery may act in. Text only: the caller checks that the staging directory is not a link.
 */
export function ownerOfJob(
  domain: string,
  job: RunningBackupJob,
  roots: readonly string[],
  shortSocketRoot: string,
): { owner: JobOwner } | { notOurs: string } {
  if (job.disks.length === 0) return { notOurs: 'it backs up no disk' };
  const files: string[] = [];
  for (const d of job.disks) {
    if (d.file === undefined) return { notOurs: `disk ${d.name} has no file libvirt names` };
    if (normalize(d.file) !== d.file) return { notOurs: `${d.file} is not a normalised path` };
    files.push(d.file);
  }
  const staging = dirname(files[0]!);
  if (files.some((f) => dirname(f) !== staging)) return { notOurs: 'its files are in more than one directory' };
  const backupId = basename(staging);
  if (!roots.includes(dirname(staging))) return { notOurs: `${staging} is outside vmbackup's staging directories` };
  if (!isValidBackupId(backupId) || domainOfBackupId(backupId) !== domain) {
    return { notOurs: `${staging} is not the staging directory of a backup of ${domain}` };
  }
  for (const d of job.disks) {
    const want = job.mode === 'push' ? join(staging, `${d.name}.qcow2`) : scratchFile(staging, d.name);
    if (d.file !== want) return { notOurs: `${String(d.file)} is not where vmbackup puts disk ${d.name} (${want})` };
  }
  if (job.mode === 'pull') {
    const sockets = [join(staging, 'nbd', SOCKET_NAME), join(shortSocketDir(staging, shortSocketRoot), SOCKET_NAME)];
    if (job.socket === undefined || !sockets.includes(job.socket)) {
      return { notOurs: `its NBD server (${job.socket ?? job.transport ?? 'none'}) is not the socket of ${backupId}` };
    }
  }
  return { owner: { backupId, staging } };
}

/** Whether `owner`'s staging directory is missing or a real directory (a link there moves the files elsewhere). */
export async function stagingNotALink(owner: JobOwner): Promise<boolean> {
  const st = await lstat(owner.staging).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  });
  return st === undefined || st.isDirectory();
}

export interface DeadJobsDeps {
  hypervisor: Hypervisor;
  /** where pull sockets go when `<staging>/nbd/backup.sock` is too long (default /run/vmbackup-nbd) */
  shortSocketRoot: string;
}

export function deadJobs(deps: DeadJobsDeps) {
  const hv = deps.hypervisor;

  /**
   * The backup job of each domain, attributed. A domain that vanished meanwhile is left out; one whose job cannot be
   * read is in `unreadable` (its job may run in a dead backup's staging directory: that directory is then kept).
   */
  async function find(
    domains: string[],
    roots: readonly string[],
  ): Promise<{ jobs: FoundJob[]; unreadable: Map<string, string> }> {
    const jobs: FoundJob[] = [];
    const unreadable = new Map<string, string>();
    for (const domain of domains) {
      Context.current().heartbeat({ phase: 'jobs' });
      let job: RunningBackupJob | undefined;
      try {
        job = await hv.backupJob(domain);
      } catch (err) {
        if (err instanceof HypervisorError && err.kind === 'not-found') continue;
        if (err instanceof HypervisorError && err.kind === 'unreachable') throw err; // retried
        unreadable.set(domain, err instanceof Error ? err.message : String(err));
        continue;
      }
      if (!job) continue;
      const found = ownerOfJob(domain, job, roots, deps.shortSocketRoot);
      if ('owner' in found && !(await stagingNotALink(found.owner))) {
        jobs.push({ domain, job, notOurs: `${found.owner.staging} is a link, not a staging directory of ours` });
      } else jobs.push({ domain, job, ...found });
    }
    return { jobs, unreadable };
  }

  /** Whether the job running on `domain` now is still `owner`'s. */
  async function stillOurs(domain: string, owner: JobOwner, roots: readonly string[]): Promise<boolean> {
    const job = await hv.backupJob(domain).catch((err: unknown) => {
      if (err instanceof HypervisorError && err.kind === 'not-found') return undefined;
      throw err;
    });
    if (!job) return false;
    const found = ownerOfJob(domain, job, roots, deps.shortSocketRoot);
    return 'owner' in found && found.owner.backupId === owner.backupId && found.owner.staging === owner.staging;
  }

  /**
   * Ends the job of a dead backup: `domjobabort` (how a pull job ends; a push job stops writing), waits for it to go,
   * deletes the checkpoint the backup was creating and a pull job's socket directory under the short root. The
   * checkpoint never counted: a backup commits (writes its manifests) only after its job is over, so a backup whose
   * job still ran was committed nowhere. Returns undefined when the job ended by itself meanwhile.
   */
  async function end(
    found: FoundJob & { owner: JobOwner },
    roots: readonly string[],
  ): Promise<JobRecovery | undefined> {
    const { domain, job, owner } = found;
    const report = { domain, backupId: owner.backupId, job: { mode: job.mode, files: jobFiles(job) } };
    try {
      // libvirt's domjobabort names no job: read it again right before, so a job another backup began since is never
      // the one ended
      if (!(await stillOurs(domain, owner, roots))) return undefined;
      await hv.abortJob(domain);
      const deadline = Date.now() + JOB_END_WAIT_MS;
      while (await stillOurs(domain, owner, roots)) {
        Context.current().heartbeat({ phase: 'jobs' });
        if (Date.now() > deadline) {
          const detail = `the job was still running ${JOB_END_WAIT_MS / 1000} s after domjobabort: its staging directory is kept; run \`vmbackup recover\` again`;
          return { ...report, action: 'failed', detail };
        }
        await new Promise((r) => setTimeout(r, 200));
      }
      const checkpoint = checkpointName(owner.backupId);
      const deleted = await hv.deleteCheckpoint(domain, checkpoint).catch((err: unknown) => {
        if (err instanceof HypervisorError && err.kind === 'not-found') return false; // the domain is gone
        throw err;
      });
      const socketDir = job.mode === 'pull' ? await removeSocketDir(owner.staging) : undefined;
      return {
        ...report,
        action: 'job-ended',
        ...(deleted ? { checkpoint } : {}),
        ...(socketDir ? { socketDir } : {}),
      };
    } catch (err) {
      if (err instanceof HypervisorError && err.kind === 'unreachable') throw err;
      return { ...report, action: 'failed', detail: err instanceof Error ? err.message : String(err) };
    }
  }

  /**
   * Removes the socket directory a pull job of the staging directory `staging` (resolved) had under the short root;
   * returns it when it was there. Only a real directory, in a short root that is a real directory nobody else can
   * change.
   */
  async function removeSocketDir(staging: string): Promise<string | undefined> {
    const root = await lstat(deps.shortSocketRoot).catch(() => undefined);
    if (!root?.isDirectory() || (await unsafeDirectory(deps.shortSocketRoot))) return undefined;
    const dir = shortSocketDir(staging, deps.shortSocketRoot);
    const st = await lstat(dir).catch(() => undefined);
    if (!st?.isDirectory()) return undefined;
    await rm(dir, { recursive: true, force: true });
    return dir;
  }

  return { find, end, removeSocketDir };
}
