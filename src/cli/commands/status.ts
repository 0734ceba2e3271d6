/** `vmbackup status <backupId>`: where a backup is, from its workflow. */
import type { Command } from 'commander';
import { loadConfig } from '../../worker/config';
import { action, formatBytes, printJson } from '../output';
import { report } from './backup';
import { temporalFlagsFrom } from './temporal-options';

export function register(program: Command): void {
  program
    .command('status')
    .description('show where a backup is (phase, bytes, targets) or how it ended')
    .argument('<backupId>')
    .option('--wait', 'follow it to the end; exit 0 only on success')
    .option('--json', 'print one JSON object')
    .action(
      action(async (backupId: string, flags: { wait?: boolean; json?: boolean }) => {
        const config = loadConfig(process.env, temporalFlagsFrom(flags));
        const [{ openExistingSession }, { backupStatus, findBackup }, { watchBackup }] = await Promise.all([
          import('../../client/connect'),
          import('../../client/backups'),
          import('../watch'),
        ]);
        const session = await openExistingSession(config);
        try {
          const handle = await findBackup(session.client, backupId);
          const view = flags.wait
            ? await watchBackup(session.client, handle, backupId, { showProgress: !flags.json })
            : await backupStatus(session.client, handle, backupId);
          if (view.execution !== 'RUNNING') {
            const desc = await handle.describe();
            const sa = desc.searchAttributes;
            report(view, flags.json ?? false, {
              domain: String(sa.VmbackupDomain?.[0] ?? ''),
              host: String(sa.VmbackupHost?.[0] ?? ''),
            });
            return;
          }
          if (view.queue) {
            const { host, ahead } = view.queue;
            if (flags.json) printJson({ backupId, status: 'queued', host, ahead, progress: view.progress });
            else
              process.stdout.write(
                `${backupId}: queued, waiting for one of host ${host}'s backup slots` +
                  `${ahead > 0 ? ` (${ahead} backup(s) of ${host} queued before it)` : ''}\n`,
              );
            return;
          }
          if (flags.json) {
            printJson({ backupId, status: 'running', progress: view.progress, activity: view.activity });
            return;
          }
          const p = view.progress;
          const a = view.activity;
          process.stdout.write(
            `${backupId}: running, ${p?.phase ?? 'starting'}${p?.method ? ` (${p.method})` : ''}` +
              (a?.waitingForUpload
                ? `, ${a.name} queued, waiting for one of the worker's upload places on its target`
                : a
                  ? `, ${a.name} ${formatBytes(a.bytesDone)}/${formatBytes(a.bytesTotal)}${a.attempt > 1 ? ` attempt ${a.attempt}` : ''}`
                  : '') +
              '\n',
          );
        } finally {
          await session.close();
        }
      }),
    );
}
