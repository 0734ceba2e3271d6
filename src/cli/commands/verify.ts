/**
 * `vmbackup verify <backupId>`: re-read every image of the backup and of every link of its chain it depends on,
 * compare size and SHA-256 with the manifests, and `qemu-img check` each image (its format given, no backing opened).
 */
import type { Command } from 'commander';
import { verifyBackup } from '../../repository';
import { action, CliError, printJson, safeText } from '../output';
import { addTargetOptions, cliManifestKey, withCliTarget, type TargetFlags } from './target-options';
import { cliPasswordSource } from '../password';

export function register(program: Command): void {
  const cmd = program
    .command('verify')
    .description(
      "re-read a backup's images and those of the chain it depends on, and check them against their manifests (SHA-256, qemu-img check)",
    )
    .argument('<backupId>', 'backup id (see `vmbackup list`)')
    .option(
      '--read-data',
      'a backup in a chunk repository: read and authenticate every chunk (default: check each exists)',
    )
    .option(
      '--password-file <file>',
      "a backup in an encrypted chunk repository: the repository's password (first line)",
    )
    .option('--json', 'print one JSON object');
  addTargetOptions(cmd);
  cmd.action(action(async (backupId: string, flags: VerifyFlags) => runVerify(backupId, flags)));
}

interface VerifyFlags extends TargetFlags {
  readData?: boolean;
  passwordFile?: string;
}

async function runVerify(backupId: string, flags: VerifyFlags): Promise<void> {
  const manifestKey = cliManifestKey();
  await withCliTarget(flags.target, flags, async (target) => {
    const report = await verifyBackup(target, backupId, {
      manifestKey,
      readData: Boolean(flags.readData),
      password: cliPasswordSource(target.displayUrl, flags.passwordFile),
    });
    if (flags.json) {
      printJson(report);
      if (!report.ok) process.exitCode = 1;
      return;
    }
    const chained = report.links.length > 1;
    for (const link of report.links) {
      if (chained || link.problem) {
        process.stdout.write(
          `${safeText(`${link.ok ? 'ok  ' : 'BAD '} ${link.backupId}  ${link.level ?? 'missing'}`)}\n`,
        );
      }
      for (const d of link.disks) {
        process.stdout.write(
          `${safeText(`${chained ? '  ' : ''}${d.ok ? 'ok  ' : 'BAD '} ${d.name}  ${d.key}  ${d.actualSha256 ?? '-'}${d.imageCheck === 'leaks' ? '  (leaked clusters, harmless)' : ''}`)}\n`,
        );
      }
      for (const f of link.vmFiles) {
        process.stdout.write(
          `${safeText(`${chained ? '  ' : ''}${f.ok ? 'ok  ' : 'BAD '} ${f.name}  ${f.key}  ${f.actualSha256 ?? '-'}`)}\n`,
        );
      }
    }
    const problems = report.links.flatMap((l) =>
      l.problem ? [l.problem] : [...l.disks, ...l.vmFiles].flatMap((d) => (d.ok ? [] : [d.problem])),
    );
    if (problems.length > 0) {
      throw new CliError(`Backup ${backupId} on ${target.displayUrl} failed verification: ${problems.join('; ')}.`);
    }
    const disks = report.disks.length;
    const links = chained ? ` and the ${report.links.length - 1} backup(s) of its chain it depends on` : '';
    const vm = report.vmFiles.length > 0 ? `, ${report.vmFiles.map((f) => f.name).join(', ')}` : '';
    const checked = report.disks[0]?.chunks?.checked;
    const how =
      checked === 'read'
        ? '; every chunk read and authenticated'
        : checked === 'exists'
          ? '; every chunk is present, none was read: --read-data reads and authenticates them'
          : '';
    process.stderr.write(
      `Backup ${backupId} on ${target.displayUrl} is intact (${disks} disk${disks === 1 ? '' : 's'}${vm}${links}${how}).\n`,
    );
  });
}
