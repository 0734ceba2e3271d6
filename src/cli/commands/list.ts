/** `vmbackup list`: the committed backups on a target, read from their manifests, with their place in a chain. */
import type { Command } from 'commander';
import { listBackups, type Manifest } from '../../repository';
import { action, formatBytes, printJson } from '../output';
import { addTargetOptions, withCliTarget, type TargetFlags } from './target-options';

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
  await withCliTarget(flags.target, flags, async (target) => {
    const invalid: Array<{ key: string; error: string }> = [];
    const backups = await listBackups(target, {
      ...(flags.domain ? { domain: flags.domain } : {}),
      onInvalid: (key, error) => invalid.push({ key, error: error.message }),
    });
    if (flags.json) {
      printJson({
        target: target.displayUrl,
        backups: backups.map((b) => ({ ...b.manifest, chain: chainOf(b.manifest), size: b.size })),
        invalid,
      });
      return;
    }
    for (const bad of invalid) process.stderr.write(`vmbackup: skipping ${bad.key}: ${bad.error}\n`);
    if (backups.length === 0) {
      process.stderr.write(`No backups${flags.domain ? ` of ${flags.domain}` : ''} on ${target.displayUrl}.\n`);
      return;
    }
    const rows = backups.map((b) => [
      b.manifest.backupId,
      b.manifest.domain,
      b.manifest.startedAt,
      b.manifest.chain.level,
      b.manifest.chain.parent ?? '-',
      b.manifest.method + (b.manifest.quiesced ? ' (quiesced)' : ''),
      b.manifest.disks.map((d) => d.name).join(','),
      formatBytes(b.size),
    ]);
    printTable(['BACKUP ID', 'DOMAIN', 'STARTED', 'LEVEL', 'PARENT', 'METHOD', 'DISKS', 'SIZE'], rows);
  });
}

/** Where a backup sits in its chain, as scripts read it (`--json`): the checkpoint XML stays in the manifest. */
function chainOf(m: Manifest): { level: string; parent: string | null; base: string; checkpoint: string | null } {
  const { level, parent, base, checkpoint } = m.chain;
  return { level, parent: parent ?? null, base, checkpoint: checkpoint ?? null };
}

export function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => c.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd();
  process.stdout.write(`${[line(header), ...rows.map(line)].join('\n')}\n`);
}
