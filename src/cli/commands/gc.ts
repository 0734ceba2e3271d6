/**
 * `vmbackup gc --target URL [--older-than 1d] [--grace 1d] [--dry-run] [--json]`: removes what dead backups left on a
 * target (backup prefixes with objects but no manifest, and the unfinished uploads under them). A prefix goes only
 * when it is older than --older-than and Temporal knows no running backup with its id; when Temporal cannot be
 * reached the command says so and relies on the age alone.
 *
 * On a chunk repository it then runs the repository's gc (src/repository/chunk-gc.ts) as the `gcChunkRepository`
 * workflow, id `gc-chunks-<repositoryId>`: one at a time per repository, whoever starts it. On the embedded default
 * this command is the worker that runs it (with its own password: --password-file, VMBACKUP_PASSWORD_FILE,
 * VMBACKUP_PASSWORD); with TEMPORAL_ADDRESS the host's worker runs it with its password.
 */
import type { Command } from 'commander';
import { WorkflowExecutionAlreadyStartedError, WorkflowIdConflictPolicy } from '@temporalio/client';
import { ChunkGcError, checkGrace, chunkRepositoryId, collectGarbage, parseAge, type GcReport } from '../../repository';
import { isChunkFormatError, isChunkRepository, openRepository, passwordFrom } from '../../repository/chunks';
import { chunkGcWorkflowId, type ChunkGcInput, type ChunkGcResult } from '../../shared/chunk-gc';
import { HOST_NAME_RE, hostTaskQueue } from '../../shared/names';
import { loadConfig } from '../../worker/config';
import { startInProcessWorker } from '../in-process-worker';
import { action, CliError, formatBytes, printJson, printTable, printWarning } from '../output';
import { s3OptionsFrom } from './s3-options';
import { addTargetOptions, withCliTarget, type TargetFlags } from './target-options';
import { temporalFlagsFrom } from './temporal-options';

interface GcFlags extends TargetFlags {
  host?: string;
  olderThan: string;
  grace: string;
  passwordFile?: string;
  dryRun?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command('gc')
    .description(
      'remove what dead backups left on a target: objects of backups that never got a manifest (never a committed backup, never a running one); on a chunk repository also the chunks and indexes no backup references, older than --grace',
    )
    .option('--older-than <age>', 'only prefixes whose newest object is at least this old: 30m, 12h, 1d, 2w, 0s', '1d')
    .option(
      '--grace <age>',
      'chunk repository: keep unreferenced chunks and indexes younger than this (more than 2h: a running backup may rely on a chunk for 1h without touching it)',
      '1d',
    )
    .option(
      '--password-file <file>',
      "chunk repository: the file whose first line is its password (else VMBACKUP_PASSWORD_FILE, VMBACKUP_PASSWORD); used by this command's own worker",
    )
    .option(
      '--host <name>',
      "chunk repository, with TEMPORAL_ADDRESS: the host whose worker runs the repository's gc (it needs the target and its password); default VMBACKUP_HOST or this machine's name",
    )
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
  const graceMs = parseAge(flags.grace);
  if (graceMs === undefined) {
    throw new CliError(`--grace must be an age like 3h, 1d or 2w, not "${flags.grace}".`);
  }
  try {
    checkGrace(graceMs / 1000);
  } catch (err) {
    if (err instanceof ChunkGcError) throw new CliError(err.message.replace(/^The gc grace period/, '--grace'));
    throw err;
  }
  // --host before anything is removed
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  if (!config.temporalAddress && flags.host !== undefined && flags.host !== config.host) {
    throw new CliError(
      '--host is for a cluster (TEMPORAL_ADDRESS): on the embedded default this command is the worker that runs the gc; nothing was removed.',
    );
  }
  const host = flags.host ?? config.host;
  if (!HOST_NAME_RE.test(host)) throw new CliError(`"${host}" is not a valid host name; nothing was removed.`);
  const running = await runningCheck(flags);
  let report: GcReport | undefined;
  let repositoryId: string | undefined;
  try {
    await withCliTarget(flags.target, flags, async (target) => {
      await target.checkLocation(); // a typo in the URL is not an empty target
      report = await collectGarbage(target, { olderThanMs, dryRun: Boolean(flags.dryRun) }, running.isRunning);
      if (running.warning) printWarning(running.warning);
      if (await isChunkRepository(target)) repositoryId = await chunkRepositoryId(target);
    });
  } finally {
    await running.close();
  }
  const dead = report as GcReport;
  if (!repositoryId) {
    print(dead, Boolean(flags.json));
    return;
  }
  if (!flags.json) print(dead, false);
  const chunks = await runChunkGc(flags, repositoryId, graceMs / 1000);
  if (flags.json) printJson({ ...dead, chunkRepository: chunks });
  else printChunks(chunks);
}

/** Starts the repository's gc workflow (refused while one runs) and waits for its report. */
async function runChunkGc(flags: GcFlags, repositoryId: string, graceSeconds: number): Promise<ChunkGcResult> {
  const base = loadConfig(process.env, temporalFlagsFrom(flags));
  const config = { ...base, ...(flags.passwordFile ? { passwordFile: flags.passwordFile } : {}) };
  const [{ openSession }, { failureMessage }, { hostWorkerSeen }] = await Promise.all([
    import('../../client/connect'),
    import('../../client/backups'),
    import('../../client/workers'),
  ]);
  const host = flags.host ?? config.host;
  const session = await openSession(config, { log: (line) => process.stderr.write(`${line}\n`) });
  let stopWorker: (() => Promise<void>) | undefined;
  const workflowId = chunkGcWorkflowId(repositoryId);
  try {
    if (session.embedded) {
      // embedded default: this process is the worker that runs it, with this command's password. A password that
      // opens nothing is said here, in one sentence, before any workflow starts.
      await withCliTarget(flags.target, flags, async (target) => {
        await openRepository(target, passwordFrom(flags.passwordFile ? { passwordFile: flags.passwordFile } : {}));
      }).catch((err: unknown) => {
        if (isChunkFormatError(err)) throw new CliError(err.message);
        throw err;
      });
      stopWorker = await startInProcessWorker(config, session.address);
    } else if ((await hostWorkerSeen(session.client, host)) === false) {
      // started there, the gc would wait for a worker that may never come, and this command with it
      throw new CliError(
        `No vmbackup worker for host ${host} is connected to Temporal at ${session.address} (nothing polls task queue ${hostTaskQueue(host)}): run gc where a worker runs, or name a host whose worker runs with --host; the chunk repository's gc was not started.`,
      );
    }
    const s3Options = s3OptionsFrom(flags as unknown as Record<string, unknown>);
    const input: ChunkGcInput = {
      host,
      target: flags.target as string,
      graceSeconds,
      dryRun: Boolean(flags.dryRun),
      ...(s3Options && Object.keys(s3Options).length > 0 ? { s3Options } : {}),
    };
    let handle;
    try {
      handle = await session.client.workflow.start('gcChunkRepository', {
        taskQueue: hostTaskQueue(host),
        workflowId,
        // Temporal refuses a second running workflow with this id: one gc per repository at a time
        workflowIdConflictPolicy: WorkflowIdConflictPolicy.FAIL,
        args: [input],
      });
    } catch (err) {
      if (err instanceof WorkflowExecutionAlreadyStartedError)
        throw new CliError(
          `A gc of the chunk repository on ${flags.target as string} is already running (workflow ${workflowId}); run this gc again once it has finished.`,
        );
      throw err;
    }
    try {
      return (await handle.result()) as ChunkGcResult;
    } catch (err) {
      throw new CliError(
        `The chunk gc on ${flags.target as string} failed: ${failureMessage(err).replace(/\.$/, '')}.`,
      );
    }
  } finally {
    await stopWorker?.();
    await session.close();
  }
}

function printChunks(r: ChunkGcResult): void {
  for (const key of r.removedKeys) process.stdout.write(`${r.dryRun ? 'would remove' : 'removed'} ${key}\n`);
  if (r.moreRemoved > 0) process.stdout.write(`... and ${r.moreRemoved} more\n`);
  // a result of a worker from before Object Lock support has no keptLockedKeys
  const locked = r.keptLockedKeys ?? [];
  for (const k of locked) process.stdout.write(`kept-by-lock ${k.key} until ${k.retainUntil}\n`);
  if ((r.keptLocked ?? 0) > locked.length)
    process.stdout.write(`... and ${r.keptLocked - locked.length} more kept by lock\n`);
  process.stderr.write(
    `${r.dryRun ? 'Would remove' : 'Removed'} ${r.removedChunks} chunk(s) and ${r.removedIndexes} index(es) (${formatBytes(r.removedBytes)}) that none of the ${r.backups} backup(s) of the chunk repository on ${r.target} references; kept ${r.keptYoung} unreferenced object(s) younger than the grace period (${formatBytes(r.keptYoungBytes)}).\n`,
  );
  if ((r.keptLocked ?? 0) > 0) {
    const latest = locked
      .map((k) => k.retainUntil)
      .sort()
      .at(-1);
    process.stderr.write(
      `Kept ${r.keptLocked} unreferenced object(s) that S3 Object Lock still retains${latest ? ` (the last until ${latest})` : ''}; a gc after that date removes them.\n`,
    );
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
        : e.action === 'locked'
          ? `kept-by-lock (until ${e.lockedUntil ?? '?'})`
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
