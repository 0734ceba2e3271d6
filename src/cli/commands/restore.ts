/** `vmbackup restore <backupId> --to PATH`: one disk to a file, or all disks into a directory. */
import type { Command } from 'commander';
import { resolve } from 'node:path';
import { restoreBackup } from '../../repository';
import { action, formatBytes, printJson } from '../output';
import { addTargetOptions, cliManifestKey, withCliTarget, type TargetFlags } from './target-options';

interface RestoreFlags extends TargetFlags {
  disk?: string;
  to: string;
  force?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command('restore')
    .description('write backed-up images to files; each file appears only after its SHA-256 matched')
    .argument('<backupId>', 'backup id (see `vmbackup list`)')
    .option('--disk <name>', 'restore only this disk (e.g. vda) to the file --to')
    .requiredOption('--to <path>', 'file for one disk, directory for all disks')
    .option('--force', 'overwrite existing files')
    .option('--json', 'print one JSON object');
  addTargetOptions(cmd);
  cmd.action(action(async (backupId: string, flags: RestoreFlags) => runRestore(backupId, flags)));
}

async function runRestore(backupId: string, flags: RestoreFlags): Promise<void> {
  const manifestKey = cliManifestKey();
  await withCliTarget(flags.target, flags, async (target) => {
    const restored = await restoreBackup(target, backupId, {
      manifestKey,
      to: resolve(flags.to),
      ...(flags.disk ? { disk: flags.disk } : {}),
      force: Boolean(flags.force),
    });
    if (flags.json) {
      printJson({ backupId, target: target.displayUrl, disks: restored });
      return;
    }
    for (const d of restored)
      process.stdout.write(`${d.name} -> ${d.path} (${formatBytes(d.size)}, sha256 ${d.sha256})\n`);
  });
}
