/**
 * Staging directories of dead backups. A backup stages its images in `<root>/<backupId>/` and removes the
 * directory when it ends; a worker killed for good, or a workflow terminated, leaves it behind, full-size.
 * Recovery removes the staging directory of each backup whose workflow is closed, asked right before the
 * removal, and only directly under this host's staging roots: nothing a running backup owns, and nothing
 * outside those roots, whatever a directory entry points to. A root that is a link, or that another user
 * could change, is not scanned at all: `<stateDir>/staging -> /` would otherwise offer /etc for removal.
 */
import { lstat, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Context } from '@temporalio/activity';
import type { RecoverInput, StagingRecovery } from '../shared/activities';
import { domainOfBackupId } from '../shared/names';
import { isAbandoned } from './backup-states';
import type { BackupStates } from './backup-states';
import { unsafeDirectory } from './host-paths';
import { isValidBackupId } from './snapshot-paths';

export interface DeadStagingDeps {
  /** directories whose entries are staging directories named by backup id */
  stagingRoots: string[];
  backupStates: BackupStates;
}

export function createDeadStagingActivities(deps: DeadStagingDeps) {
  async function removeDeadStaging(input: RecoverInput): Promise<StagingRecovery[]> {
    const ctx = Context.current();
    const actions: StagingRecovery[] = [];
    for (const root of new Set(deps.stagingRoots)) {
      const unsafe = await unsafeRoot(root);
      if (unsafe) {
        if (unsafe !== 'missing') ctx.log.warn('staging root not scanned', { root, why: unsafe });
        continue;
      }
      for (const e of await readdir(root, { withFileTypes: true })) {
        // only real directories named as vmbackup names backups (a link or a file is not staging of ours)
        const domain = domainOfBackupId(e.name);
        if (!e.isDirectory() || !isValidBackupId(e.name) || domain === undefined) continue;
        const backupId = e.name;
        if (input.domain && domain !== input.domain) continue;
        const staging = join(root, backupId);
        ctx.heartbeat({ phase: 'staging', actions: actions.length });
        if (!(await isAbandoned(deps.backupStates, backupId, staging))) continue;
        try {
          await rm(staging, { recursive: true, force: true });
          actions.push({ domain, backupId, staging, action: 'removed-staging' });
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
