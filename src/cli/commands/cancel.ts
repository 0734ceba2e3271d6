/** `vmbackup cancel <backupId>`: stop a running backup; its undo steps put everything back. */
import type { Command } from 'commander';
import { SEARCH_ATTRIBUTES } from '../../shared/names';
import { loadConfig } from '../../worker/config';
import { startInProcessWorker } from '../in-process-worker';
import { action, CliError, printJson } from '../output';
import { temporalFlagsFrom } from './temporal-options';

export function register(program: Command): void {
  program
    .command('cancel')
    .description('cancel a running backup: the job is aborted or the overlays committed, staging removed')
    .argument('<backupId>')
    .option('--wait', 'return once the backup has stopped and cleaned up (always, without TEMPORAL_ADDRESS)')
    .option('--json', 'print one JSON object')
    .action(
      action(async (backupId: string, flags: { wait?: boolean; json?: boolean }) => {
        const config = loadConfig(process.env, temporalFlagsFrom(flags));
        const [{ openExistingSession }, { backupTargets, findBackup }] = await Promise.all([
          import('../../client/connect'),
          import('../../client/backups'),
        ]);
        const session = await openExistingSession(config);
        let stopWorker: (() => Promise<void>) | undefined;
        try {
          const handle = await findBackup(session.client, backupId);
          const before = await handle.describe();
          if (before.status.name !== 'RUNNING') {
            throw new CliError(
              `backup ${backupId} is not running (${before.status.name.toLowerCase()}): nothing to cancel`,
            );
          }
          const host = before.searchAttributes[SEARCH_ATTRIBUTES.host]?.[0];
          if (session.embedded && host === config.host) {
            // Embedded default: the backup's worker was the CLI that started it, and it may be gone (killed, or
            // the machine rebooted). Run this host's worker here until the undo steps have run.
            // It writes to that backup's targets only (to remove what it uploaded): the local server takes
            // workflows from any local user meanwhile.
            const allowTargets = (await backupTargets(session.client, handle)) ?? [];
            stopWorker = await startInProcessWorker({ ...config, allowTargets }, session.address);
          }
          await handle.cancel();
          let status = 'cancelling';
          if (flags.wait || stopWorker) {
            await handle.result().catch(() => undefined);
            status = (await handle.describe()).status.name.toLowerCase();
          }
          if (flags.json) printJson({ backupId, status });
          else process.stderr.write(`${backupId}: ${status}\n`);
        } finally {
          await stopWorker?.();
          await session.close();
        }
      }),
    );
}
