/**
 * `vmbackup restore <backupId> --to PATH [--format qcow2|raw]`: one standalone image per disk (a full, an increment
 * or a differential), one disk to a file or all disks into a directory. Ctrl-C (SIGINT) or SIGTERM stops it and
 * removes every file it had written.
 */
import { Option } from 'commander';
import type { Command } from 'commander';
import { resolve } from 'node:path';
import { RESTORE_FORMATS, restoreBackup, type RestoreFormat } from '../../repository';
import { action, CliError, formatBytes, printJson } from '../output';
import { runFinish, runInstant, type InstantFlags } from './restore-instant';
import { addTargetOptions, cliManifestKey, withCliTarget, type TargetFlags } from './target-options';
import { addTemporalOptions } from './temporal-options';

interface RestoreFlags extends TargetFlags {
  disk?: string;
  to?: string;
  format?: string;
  force?: boolean;
}

const USAGE = 'vmbackup restore <backupId> --to PATH';

export function register(program: Command): void {
  const cmd = program
    .command('restore')
    .description(
      'write one standalone image per disk of a backup (full, incremental or differential); files appear only once every disk is done',
    )
    // both checked in the action, so a missing id or --to gets one sentence naming what is missing
    .argument('[backupId]', 'backup id (see `vmbackup list`)')
    .option('--to <path>', 'file for one disk (--disk), directory for all disks')
    .option('--disk <name>', 'restore only this disk (e.g. vda) to the file --to')
    .option('--format <format>', `format of the restored images: ${RESTORE_FORMATS.join(' or ')} (default: as stored)`)
    .option('--force', 'overwrite existing files')
    .option(
      '--instant <name>',
      'define and start the VM as NAME at once, on overlays (in --to DIR) whose backing files are the backup images (file:// targets)',
    )
    .option(
      '--boot-dir <dir>',
      'a directory the restored definition may keep host files from (direct-boot kernel, firmware) besides the system ones (repeatable)',
      (v: string, prev: string[]) => [...prev, v],
      [] as string[],
    )
    .option('--keep-macs', 'keep the MAC address of every interface (default: new ones)')
    .option(
      '--finish <name>',
      'copy the data of an --instant VM into its overlays while it runs; it then needs no backup',
    )
    .option('--host <name>', "--finish: the VM's host (its worker's task queue); default: this machine")
    .option('--bandwidth <MiB/s>', '--finish: at most this many MiB/s per disk')
    .addOption(new Option('--heartbeat-timeout <seconds>', '--finish: retry a silent pull after this long').hideHelp())
    .option('--json', 'print one JSON object');
  addTargetOptions(cmd);
  addTemporalOptions(cmd);
  cmd.action(
    action(
      async (
        backupId: string | undefined,
        flags: RestoreFlags & InstantFlags & { instant?: string; finish?: string },
      ) => {
        if (flags.finish !== undefined) {
          if (backupId || flags.instant !== undefined) {
            throw new CliError(
              'restore --finish NEWNAME takes no backup id and no --instant: it finishes the VM NEWNAME.',
            );
          }
          return runFinish(flags.finish, flags);
        }
        if (flags.instant !== undefined) return runInstant(backupId, flags.instant, flags);
        return runRestore(backupId, flags);
      },
    ),
  );
}

function checkUsage(
  backupId: string | undefined,
  flags: RestoreFlags,
): { backupId: string; to: string; format?: RestoreFormat } {
  if (!backupId && !flags.to) {
    throw new CliError(
      `restore needs the id of the backup to restore and where to write it: ${USAGE} (\`vmbackup list\` shows the ids).`,
    );
  }
  if (!backupId)
    throw new CliError(`restore needs the id of the backup to restore: ${USAGE} (\`vmbackup list\` shows the ids).`);
  if (!flags.to)
    throw new CliError(`restore needs --to PATH: a directory for all disks, or a file with --disk: ${USAGE}.`);
  if (flags.format !== undefined && !(RESTORE_FORMATS as readonly string[]).includes(flags.format)) {
    throw new CliError(`--format must be ${RESTORE_FORMATS.join(' or ')}, not "${flags.format}".`);
  }
  return { backupId, to: flags.to, ...(flags.format ? { format: flags.format as RestoreFormat } : {}) };
}

async function runRestore(id: string | undefined, flags: RestoreFlags): Promise<void> {
  const { backupId, to, format } = checkUsage(id, flags);
  const manifestKey = cliManifestKey();
  const stop = new AbortController();
  let stoppedBy: NodeJS.Signals | undefined;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stoppedBy) {
      // a second Ctrl-C: leave now (the first one's cleanup may not have finished)
      process.stderr.write(
        `vmbackup: the restore of backup ${backupId} was interrupted twice; hidden partial files may be left next to ${to}.\n`,
      );
      process.exit(exitCodeOf(signal));
    }
    stoppedBy = signal;
    stop.abort(new Error(`${signal} received`));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await withCliTarget(flags.target, flags, async (target) => {
      const restored = await restoreBackup(target, backupId, {
        manifestKey,
        to: resolve(to),
        ...(flags.disk ? { disk: flags.disk } : {}),
        ...(format ? { format } : {}),
        force: Boolean(flags.force),
        signal: stop.signal,
      });
      if (flags.json) {
        printJson({ backupId, target: target.displayUrl, disks: restored });
        return;
      }
      for (const d of restored) {
        const from = d.links.length > 1 ? `, from ${d.links.length} backups of its chain` : '';
        const sum = d.sha256 ? `, sha256 ${d.sha256}` : '';
        process.stdout.write(`${d.name} -> ${d.path} (${d.format}, ${formatBytes(d.size)}${sum}${from})\n`);
      }
    });
  } catch (err) {
    if (stoppedBy) {
      throw new CliError(
        `The restore of backup ${backupId} was interrupted (${stoppedBy}); the files it had written were removed.`,
        exitCodeOf(stoppedBy),
      );
    }
    throw err;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** The shell's convention: 128 + the signal's number. */
function exitCodeOf(signal: NodeJS.Signals): number {
  return signal === 'SIGINT' ? 130 : 143;
}
