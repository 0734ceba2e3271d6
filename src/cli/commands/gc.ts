/**
 * `vmbackup gc --target URL [--older-than 1d] [--dry-run] [--json]`: removes what dead backups left on a target
 * (backup prefixes with objects but no manifest, and the unfinished uploads under them). A prefix goes only when it
 * is older than --older-than and Temporal knows no running backup with its id; when Temporal cannot be reached the
 * command says so and relies on the age alone.
 */
import type { Command } from 'commander';
import { collectGarbage, parseAge, type GcReport } from '../../repository';
import { loadConfig } from '../../worker/config';
import { action, CliError, formatBytes, printJson, printTable, printWarning } from '../output';
import { addTargetOptions, withCliTarget, type TargetFlags } from './target-options';
import { temporalFlagsFrom } from './temporal-options';

interface GcFlags extends TargetFlags {
  olderThan: string;
  dryRun?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command('gc')
    .description(
      'remove what dead backups left on a target: objects of backups that never got a manifest (never a committed backup, never a running one)',
    )
    .option('--older-than <age>', 'only prefixes whose newest object is at least this old: 30m, 12h, 1d, 2w, 0s', '1d')
    .option('--dry-run', 'only show what would be removed')
    .option('--json', 'print one JSON object');
  addTargetOptions(cmd, { required: true });
  cmd.action(action(async (flags: GcFlags) => runGc(flags)));
}

async function runGc(flags: GcFlags): Promise<void> {
  const olderThanMs = parseAge(flags.olderThan);
  if (olderThanMs === undefined) {
    throw new CliError(`--older-than must be an age like 30m, 12h, 1d or 2w (or 0s), not "${flags.olderThan}".`);
  }
  const running = await runningCheck(flags);
  try {
    await withCliTarget(flags.target, flags, async (target) => {
      await target.checkLocation(); // a typo in the URL is not an empty target
      const report = await collectGarbage(target, { olderThanMs, dryRun: Boolean(flags.dryRun) }, running.isRunning);
      if (running.warning) printWarning(running.warning);
      print(report, Boolean(flags.json));
    });
  } finally {
    await running.close();
  }
}

interface RunningCheck {
  isRunning: (backupId: string) => Promise<boolean>;
  /** set when Temporal could not be asked: gc went by age alone */
  warning?: string;
  close(): Promise<void>;
}

/** Asks Temporal's visibility; when it cannot be reached (or stops answering), says so once and answers "not running". */
async function runningCheck(flags: object): Promise<RunningCheck> {
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const [{ openExistingSession }, { isBackupRunning }] = await Promise.all([
    import('../../client/connect'),
    import('../../client/backups'),
  ]);
  const ageOnly = (why: string): string =>
    `Temporal cannot be reached (${why.replace(/\.$/, '')}), so gc cannot tell which backups are running: it removes dead backups by --older-than alone.`;
  let session: Awaited<ReturnType<typeof openExistingSession>>;
  try {
    session = await openExistingSession(config);
  } catch (err) {
    const warning = ageOnly((err as Error).message);
    return { isRunning: () => Promise.resolve(false), warning, close: () => Promise.resolve() };
  }
  const check: RunningCheck = {
    isRunning: async (backupId) => {
      if (check.warning) return false;
      try {
        return await isBackupRunning(session.client, backupId);
      } catch (err) {
        check.warning = ageOnly((err as Error).message);
        return false;
      }
    },
    close: () => session.close(),
  };
  return check;
}

function print(report: GcReport, json: boolean): void {
  if (json) {
    printJson(report);
    return;
  }
  const rows = report.entries.map((e) => [
    e.prefix,
    e.newest,
    String(e.objects),
    formatBytes(e.bytes),
    e.action === 'running'
      ? 'kept (a backup with this id runs)'
      : e.action === 'too young'
        ? 'kept (too young)'
        : e.action,
  ]);
  if (rows.length > 0) printTable(['PREFIX', 'NEWEST', 'OBJECTS', 'SIZE', 'ACTION'], rows);
  const gone = report.entries.filter((e) => e.action === 'removed' || e.action === 'would remove');
  const kept = report.entries.length - gone.length;
  const bytes = gone.reduce((n, e) => n + e.bytes, 0);
  process.stderr.write(
    `${report.dryRun ? 'Would remove' : 'Removed'} ${gone.length} dead backup prefix(es) (${formatBytes(bytes)}) on ${report.target}, kept ${kept}.\n`,
  );
}
