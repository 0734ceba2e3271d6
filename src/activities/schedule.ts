/**
 * What a scheduled run asks of a host: the domains libvirt has there now (`--all`), and retention on a target after
 * a VM's new backup (the chain-aware prune of src/repository/prune.ts). Both run on the host's own queue: a file://
 * target is a directory of that host.
 */
import { Context } from '@temporalio/activity';
import type { Hypervisor } from '../hypervisor/port';
import { pruneBackups } from '../repository/prune';
import { ErrorType } from '../shared/errors';
import { DOMAIN_GLOB_RE, DOMAIN_NAME_RE, globMatcher } from '../shared/names';
import type {
  AppliedRetention,
  ApplyRetentionInput,
  ListDomainsInput,
  ListedDomains,
  RetentionPolicy,
  ScheduleActivities,
} from '../shared/schedule';
import { permanent, hypervisorFailure } from './failures';
import { withTarget } from './storage';
import type { StorageActivityDeps } from './storage';

/**
 * The backup of `domain` that runs now, other than the run `exceptRunId` (the backup a scheduled run just waited
 * for, which visibility may still show running for a moment): its backup id or workflow id; undefined when none.
 */
export type RunningBackupOf = (domain: string, exceptRunId?: string) => Promise<string | undefined>;

export interface ScheduleActivityDeps extends StorageActivityDeps {
  hypervisor: Hypervisor;
  /** without it (tests that schedule nothing) retention refuses to run */
  runningBackupOf?: RunningBackupOf;
}

const RULES = ['keepLast', 'keepDaily', 'keepWeekly', 'keepMonthly'] as const;

/** One sentence for a policy no prune would run with (the workflow checks it too; anyone can start one). */
export function retentionPolicyProblem(policy: RetentionPolicy | undefined): string | undefined {
  if (typeof policy !== 'object' || policy === null) return 'the retention policy is missing';
  for (const rule of RULES) {
    const v = policy[rule];
    if (v !== undefined && !(Number.isInteger(v) && v >= 0 && v <= 100_000)) {
      return `${rule} must be a whole number from 0 to 100000, not ${String(v)}`;
    }
  }
  if (!RULES.some((r) => (policy[r] ?? 0) > 0)) return 'the retention policy keeps nothing: give a keep rule above 0';
  return undefined;
}

export function createScheduleActivities(deps: ScheduleActivityDeps): ScheduleActivities {
  return {
    async listDomains(input: ListDomainsInput): Promise<ListedDomains> {
      const globs = input?.match ?? [];
      if (!Array.isArray(globs) || globs.some((g) => typeof g !== 'string' || !DOMAIN_GLOB_RE.test(g))) {
        throw permanent(`invalid --match patterns: ${JSON.stringify(globs).slice(0, 200)}`, ErrorType.InvalidInput);
      }
      let names: string[];
      try {
        names = await deps.hypervisor.listDomains();
      } catch (err) {
        hypervisorFailure(err);
      }
      const matches = globMatcher(globs);
      const out: ListedDomains = { domains: [], skipped: [] };
      for (const name of names.filter(matches).sort()) {
        if (DOMAIN_NAME_RE.test(name)) out.domains.push(name);
        else
          out.skipped.push({
            domain: name,
            reason: 'its name has characters vmbackup does not accept in a domain name',
          });
      }
      return out;
    },

    async applyRetention(input: ApplyRetentionInput): Promise<AppliedRetention> {
      // Retention removes committed backups: only on a target this worker writes to (--allow-target), and only
      // backups of the one domain named.
      deps.paths.checkTarget(input?.target, 'applyRetention');
      deps.paths.domainName(input.domain, 'applyRetention');
      deps.paths.backupId(input.newBackupId, 'applyRetention');
      const problem = retentionPolicyProblem(input.policy);
      if (problem) throw permanent(`applyRetention: ${problem}`, ErrorType.InvalidInput);
      if (!deps.runningBackupOf) {
        throw permanent(
          'this worker cannot ask Temporal whether a backup runs (built without runningBackupOf): retention removed nothing',
          ErrorType.InvalidInput,
        );
      }
      const { domain, policy, newBackupId } = input;
      // Alive while it works: a task the server handed out but this worker never got (a poll answer lost on an
      // overloaded host) is retried after the heartbeat timeout, not after the 30 min of a long prune.
      const ctx = Context.current();
      const keepAlive = setInterval(() => ctx.heartbeat(), 10_000);
      ctx.heartbeat();
      try {
        return await retain(input, domain, policy, newBackupId);
      } finally {
        clearInterval(keepAlive);
      }
    },
  };

  function retain(
    input: ApplyRetentionInput,
    domain: string,
    policy: ApplyRetentionInput['policy'],
    newBackupId: string,
  ): Promise<AppliedRetention> {
    return withTarget(deps, input.target, input.s3Options, async (target) => {
      // A backup of this domain that runs now may build on a backup this prune would remove (its parent): its
      // increment would then point at a missing link. Retention waits for the next run instead.
      const running = await deps.runningBackupOf!(
        domain,
        typeof input.backupRunId === 'string' ? input.backupRunId : undefined,
      );
      if (running) {
        return {
          target: target.displayUrl,
          removed: [],
          kept: 0,
          deferred: `a backup of ${domain} is running (${running}): retention on this target waits for the next run`,
        };
      }
      const report = await pruneBackups(target, {
        domain,
        keepLast: policy.keepLast,
        keepDaily: policy.keepDaily,
        keepWeekly: policy.keepWeekly,
        keepMonthly: policy.keepMonthly,
        protect: [newBackupId],
        ...(deps.manifestKey ? { manifestKey: deps.manifestKey } : {}),
      });
      return {
        target: report.target,
        removed: report.remove.map((d) => ({ backupId: d.backupId, startedAt: d.startedAt, level: d.level })),
        kept: report.keep.filter((d) => d.domain === domain).length,
      };
    });
  }
}
