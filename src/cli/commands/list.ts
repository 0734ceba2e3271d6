/** `vmbackup list`: the committed backups on a target, read from their manifests, with their place in a chain. */
import type { Command } from 'commander';
import { listBackups, type Manifest } from '../../repository';
import { action, formatBytes, printJson, printTable, printWarning, safeText } from '../output';
import { addTargetOptions, cliManifestKey, withCliTarget, type TargetFlags } from './target-options';

interface ListFlags extends TargetFlags {
  domain?: string;
}

export function register(program: Command): void {
  const cmd = program
    .command('list')
    .description('list the committed backups on a target (backups whose manifest was written)')
    .option('--domain <name>', 'only backups of this domain')
    .option('--json', 'print one JSON object');
  addTargetOptions(cmd);
  cmd.action(action(async (flags: ListFlags) => runList(flags)));
}

async function runList(flags: ListFlags): Promise<void> {
  const manifestKey = cliManifestKey();
  await withCliTarget(flags.target, flags, async (target) => {
    const invalid: Array<{ key: string; error: string }> = [];
    const backups = await listBackups(target, {
      ...(flags.domain ? { domain: flags.domain } : {}),
      onInvalid: (key, error) => invalid.push({ key, error: error.message }),
      // a target named on the command line must exist (a typo is not an empty target); the default one starts empty
      mustExist: flags.target !== undefined,
      manifestKey,
    });
    if (flags.json) {
      printJson({
        target: target.displayUrl,
        backups: backups.map((b) => ({
          ...b.manifest,
          chain: chainOf(b.manifest),
          format: formatOf(b.manifest),
          vmFiles: vmFilesOf(b.manifest),
          size: b.size,
          ...(manifestKey ? { signed: b.signed } : {}),
        })),
        invalid,
      });
      return;
    }
    for (const bad of invalid) printWarning(`skipping ${bad.key}: ${bad.error}`);
    const unsigned = backups.filter((b) => manifestKey && !b.signed);
    if (unsigned.length > 0) {
      printWarning(
        `${unsigned.length} manifest(s) on ${target.displayUrl} are not signed with your key (SIGNED "NO"): they were written by someone else or changed; verify and restore refuse them.`,
      );
    }
    if (backups.length === 0) {
      process.stderr.write(
        `No backups${flags.domain ? ` of ${safeText(flags.domain)}` : ''} on ${safeText(target.displayUrl)}.\n`,
      );
      return;
    }
    // only on a target with locked backups: scripts reading the other columns by position are not moved
    const locked = backups.some((b) => b.manifest.objectLock);
    const rows = backups.map((b) => [
      b.manifest.backupId,
      b.manifest.domain,
      b.manifest.startedAt,
      b.manifest.chain.level,
      b.manifest.chain.parent ?? '-',
      b.manifest.method + (b.manifest.quiesced ? ' (quiesced)' : ''),
      b.manifest.disks.map((d) => d.name).join(','),
      formatOf(b.manifest),
      vmFilesOf(b.manifest) ?? '-',
      formatBytes(b.size),
      ...(locked ? [b.manifest.objectLock?.retainUntil ?? '-'] : []),
      ...(manifestKey ? [b.signed ? 'yes' : 'NO'] : []),
    ]);
    printTable(
      [
        'BACKUP ID',
        'DOMAIN',
        'STARTED',
        'LEVEL',
        'PARENT',
        'METHOD',
        'DISKS',
        'FORMAT',
        'VM',
        'SIZE',
        ...(locked ? ['LOCKED UNTIL'] : []),
        ...(manifestKey ? ['SIGNED'] : []),
      ],
      rows,
    );
  });
}

/**
 * How a backup is stored: `chunks` in a chunk repository (its SIZE is then the bytes that backup uploaded: the chunks
 * the repository did not hold yet), else its images' formats (`qcow2`, `raw`, `qcow2+raw`).
 */
function formatOf(m: Manifest): string {
  return [...new Set(m.disks.map((d) => d.format))].join('+');
}

/** Which whole-VM files a backup holds, e.g. `xml+nvram+tpm`; null for a backup of disks only (made before them). */
function vmFilesOf(m: Manifest): string | null {
  if (!m.vm) return null;
  return ['xml', ...(m.vm.nvram ? ['nvram'] : []), ...(m.vm.tpm ? ['tpm'] : [])].join('+');
}

/** Where a backup sits in its chain, as scripts read it (`--json`): the checkpoint XML stays in the manifest. */
function chainOf(m: Manifest): { level: string; parent: string | null; base: string; checkpoint: string | null } {
  const { level, parent, base, checkpoint } = m.chain;
  return { level, parent: parent ?? null, base, checkpoint: checkpoint ?? null };
}
