/** `vmbackup recover [--host H]`: undo what backups that no longer run left: overlays, backup jobs, staging directories. */
import type { Command } from 'commander';
import type { RecoveryAction } from '../../shared/activities';
import { HOST_NAME_RE } from '../../shared/names';
import { loadConfig } from '../../worker/config';
import { temporalFlagsFrom } from './temporal-options';
import { action, CliError, printJson } from '../output';

export function register(program: Command): void {
  program
    .command('recover')
    .description(
      'commit and pivot overlays, end backup jobs, and remove staging directories, left by dead backups; report what was done',
    )
    .option('--host <name>', 'host to recover (its worker does the work); default: this machine')
    .option('--domain <name>', 'only this domain')
    .option('--json', 'print one JSON array')
    .action(
      action(async (flags: { host?: string; domain?: string; json?: boolean }) => {
        const { createHostWorker, quietWorkerLogs, recoverHostOverlays } = await import('../../worker');
        const base = loadConfig(process.env, temporalFlagsFrom(flags));
        const host = flags.host ?? base.host;
        if (!HOST_NAME_RE.test(host)) throw new CliError(`"${host}" is not a valid host name`);
        const config = { ...base, host };
        const { openSession } = await import('../../client/connect');
        const session = await openSession(config);
        const address = config.temporalAddress ?? config.localTemporalAddress;
        let stop: (() => Promise<void>) | undefined;
        try {
          if (session.embedded && host === base.host) {
            quietWorkerLogs();
            // recovery ships nothing: this command's worker writes to no target
            const hostWorker = await createHostWorker({ config: { ...config, allowTargets: [] }, address });
            const { close } = hostWorker;
            const running = hostWorker.run();
            stop = async () => {
              hostWorker.shutdown();
              await running.catch(() => undefined);
              await close();
            };
          }
          const actions = await recoverHostOverlays(address, config, { domain: flags.domain });
          if (flags.json) printJson(actions);
          else if (actions.length === 0) process.stdout.write(`nothing to recover on ${host}\n`);
          else for (const a of actions) process.stdout.write(`${recoveryLine(a)}\n`);
          if (actions.some((a) => a.action === 'failed')) process.exitCode = 1;
        } finally {
          await stop?.();
          await session.close();
        }
      }),
    );
}

/**
 * One line per action: `vm1 vda: committed /path`, `<backupId>: removed-staging /path`, or
 * `vm1: job-ended (pull job of <backupId>: ...)`.
 */
export function recoveryLine(a: RecoveryAction): string {
  const detail = a.detail ? ` (${a.detail})` : '';
  if ('job' in a) {
    const of = a.backupId ? ` of ${a.backupId}` : '';
    const also = [
      ...(a.checkpoint ? [`checkpoint ${a.checkpoint} deleted`] : []),
      ...(a.socketDir ? [`${a.socketDir} removed`] : []),
    ];
    return `${a.domain}: ${a.action} ${a.job.mode} job${of} (${a.job.files.join(', ')})${also.length ? `; ${also.join(', ')}` : ''}${detail}`;
  }
  if ('staging' in a)
    return `${a.backupId}: ${a.action} ${a.staging}${a.socketDir ? ` and ${a.socketDir}` : ''}${detail}`;
  return `${a.domain} ${a.disk}: ${a.action} ${a.overlay}${detail}`;
}
