/** `vmbackup verify <backupId>`: re-read every image, compare SHA-256 with the manifest, qemu-img check qcow2. */
import type { Command } from 'commander';
import { verifyBackup } from '../../repository';
import { action, CliError, printJson, safeText } from '../output';
import { addTargetOptions, cliManifestKey, withCliTarget, type TargetFlags } from './target-options';

export function register(program: Command): void {
  const cmd = program
    .command('verify')
    .description("re-read a backup's images and check them against its manifest (SHA-256, qemu-img check)")
    .argument('<backupId>', 'backup id (see `vmbackup list`)')
    .option('--json', 'print one JSON object');
  addTargetOptions(cmd);
  cmd.action(action(async (backupId: string, flags: TargetFlags) => runVerify(backupId, flags)));
}

async function runVerify(backupId: string, flags: TargetFlags): Promise<void> {
  const manifestKey = cliManifestKey();
  await withCliTarget(flags.target, flags, async (target) => {
    const report = await verifyBackup(target, backupId, { manifestKey });
    if (flags.json) {
      printJson(report);
      if (!report.ok) process.exitCode = 1;
      return;
    }
    for (const d of report.disks) {
      process.stdout.write(
        `${safeText(`${d.ok ? 'ok  ' : 'BAD '} ${d.name}  ${d.key}  ${d.actualSha256 ?? '-'}${d.imageCheck === 'leaks' ? '  (leaked clusters, harmless)' : ''}`)}\n`,
      );
    }
    const bad = report.disks.filter((d) => !d.ok);
    if (bad.length > 0) {
      throw new CliError(
        `Backup ${backupId} on ${target.displayUrl} failed verification: ${bad.map((d) => d.problem).join('; ')}.`,
      );
    }
    process.stderr.write(
      `Backup ${backupId} on ${target.displayUrl} is intact (${report.disks.length} disk${report.disks.length === 1 ? '' : 's'}).\n`,
    );
  });
}
