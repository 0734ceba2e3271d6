/**
 * `vmbackup prune`: restic-style retention over restorable points, chain-aware (a backup a kept one depends on is
 * kept, 'parent of <id>'); dependents are removed before their parents, each manifest before its images.
 */
import type { Command } from 'commander';
import { pruneBackups } from '../../repository';
import { action, CliError, printJson, printTable } from '../output';
import { addTargetOptions, cliManifestKey, withCliTarget, type TargetFlags } from './target-options';

interface PruneFlags extends TargetFlags {
  domain?: string;
  keepLast?: string;
  keepDaily?: string;
  keepWeekly?: string;
  keepMonthly?: string;
  dryRun?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command('prune')
    .description(
      'delete backups a retention policy does not keep, counted in restorable points (never the only backup of a domain, never a backup a kept one depends on, never unfinished ones)',
    )
    .option('--domain <name>', 'only this domain (default: every domain, each on its own)')
    .option('--keep-last <n>', 'keep the newest n backups')
    .option('--keep-daily <n>', 'keep the newest backup of each of the last n days that have backups')
    .option('--keep-weekly <n>', 'keep the newest backup of each of the last n ISO weeks that have backups')
    .option('--keep-monthly <n>', 'keep the newest backup of each of the last n months that have backups')
    .option('--dry-run', 'only show what would be deleted')
    .option('--json', 'print one JSON object');
  addTargetOptions(cmd, { required: true });
  cmd.action(action(async (flags: PruneFlags) => runPrune(flags)));
}

function count(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value)) throw new CliError(`--${flag} must be a whole number of 0 or more, not "${value}".`);
  return Number(value);
}

async function runPrune(flags: PruneFlags): Promise<void> {
  const policy = {
    keepLast: count('keep-last', flags.keepLast),
    keepDaily: count('keep-daily', flags.keepDaily),
    keepWeekly: count('keep-weekly', flags.keepWeekly),
    keepMonthly: count('keep-monthly', flags.keepMonthly),
  };
  await withCliTarget(flags.target, flags, async (target) => {
    const report = await pruneBackups(target, {
      ...policy,
      ...(flags.domain ? { domain: flags.domain } : {}),
      manifestKey: cliManifestKey(),
      dryRun: Boolean(flags.dryRun),
    });
    if (flags.json) {
      printJson(report);
      return;
    }
    const rows = [
      ...report.keep.map((d) => [d.backupId, d.domain, d.startedAt, d.level, `keep (${d.reasons.join(', ')})`]),
      ...report.remove.map((d) => [
        d.backupId,
        d.domain,
        d.startedAt,
        d.level,
        report.dryRun ? 'would remove' : 'removed',
      ]),
    ].sort((a, b) => (a[1] ?? '').localeCompare(b[1] ?? '') || (b[2] ?? '').localeCompare(a[2] ?? ''));
    if (rows.length > 0) printTable(['BACKUP ID', 'DOMAIN', 'STARTED', 'LEVEL', 'ACTION'], rows);
    process.stderr.write(
      `${report.dryRun ? 'Would remove' : 'Removed'} ${report.remove.length} backup(s), kept ${report.keep.length} on ${report.target}.\n`,
    );
  });
}
