/**
 * `vmbackup copy <backupId> --from URL --to URL`: the backup and the links of its chain the destination lacks, oldest
 * first; resumable (images already there are skipped), each manifest last.
 */
import type { Command } from 'commander';
import { copyBackup } from '../../repository';
import { action, printJson } from '../output';
import { cliPasswordSource, cliToPasswordSource } from '../password';
import { addS3Options } from './s3-options';
import { cliManifestKey, openCliTarget } from './target-options';

interface CopyFlags {
  from: string;
  to: string;
  json?: boolean;
  passwordFile?: string;
  toPasswordFile?: string;
  [flag: string]: unknown;
}

export function register(program: Command): void {
  const cmd = program
    .command('copy')
    .description(
      'copy a committed backup, and the backups of its chain it depends on that are missing there, to another target (skips images already copied; manifests last)',
    )
    .argument('<backupId>', 'backup id (see `vmbackup list`)')
    .requiredOption('--from <url>', 'target holding the backup')
    .requiredOption('--to <url>', 'target to copy it to')
    .option('--json', 'print one JSON object')
    .option(
      '--password-file <file>',
      "the source's chunk repository password (first line); else VMBACKUP_PASSWORD_FILE or VMBACKUP_PASSWORD",
    )
    .option(
      '--to-password-file <file>',
      "the destination's chunk repository password (first line); else VMBACKUP_TO_PASSWORD_FILE or VMBACKUP_TO_PASSWORD",
    );
  addS3Options(cmd);
  cmd.action(action(async (backupId: string, flags: CopyFlags) => runCopy(backupId, flags)));
}

async function runCopy(backupId: string, flags: CopyFlags): Promise<void> {
  const from = openCliTarget(flags.from, flags);
  try {
    const to = openCliTarget(flags.to, flags);
    try {
      const report = await copyBackup(from, to, backupId, {
        manifestKey: cliManifestKey(),
        password: cliPasswordSource(from.displayUrl, flags.passwordFile),
        toPassword: cliToPasswordSource(to.displayUrl, flags.toPasswordFile),
      });
      if (flags.json) printJson(report);
      else {
        const parents = report.links.filter((l) => l.backupId !== backupId);
        const copiedParents = parents.filter((l) => l.action === 'copied').map((l) => l.backupId);
        const chain =
          parents.length === 0
            ? ''
            : copiedParents.length > 0
              ? ` (with ${copiedParents.length} backup(s) of its chain that were missing there: ${copiedParents.join(', ')})`
              : ` (the ${parents.length} backup(s) of its chain it depends on were there already)`;
        process.stdout.write(
          `Copied backup ${backupId} from ${report.from} to ${report.to}: ${report.copied.length} object(s) written, ${report.skipped.length} already there${chain}.\n`,
        );
      }
    } finally {
      await to.close();
    }
  } finally {
    await from.close();
  }
}
