/**
 * `vmbackup restore <backupId> --to PATH [--format qcow2|raw]`: one standalone image per disk (a full, an increment
 * or a differential), one disk to a file or all disks into a directory. Ctrl-C (SIGINT) or SIGTERM stops it and
 * removes every file it had written.
 *
 * `vmbackup restore <backupId> --define NAME [--to DIR] [--start] [--keep-macs] [--dry-run]` and `--replace --yes`:
 * the whole VM (disks, definition, NVRAM, TPM state) as a libvirt domain, from the target alone: no Temporal.
 */
import { Option } from 'commander';
import type { Command } from 'commander';
import { resolve } from 'node:path';
import { createVirshHypervisor } from '../../hypervisor/virsh';
import { RESTORE_FORMATS, restoreBackup, restoreVm, type RestoreFormat, type VmRestoreResult } from '../../repository';
import { loadConfig } from '../../worker/config';
import { action, CliError, formatBytes, printJson, safeText } from '../output';
import { runFinish, runInstant, type InstantFlags } from './restore-instant';
import { addTargetOptions, cliManifestKey, withCliTarget, type TargetFlags } from './target-options';
import { addTemporalOptions } from './temporal-options';
import { cliPasswordSource } from '../password';

interface RestoreFlags extends TargetFlags {
  passwordFile?: string;
  disk?: string;
  to?: string;
  format?: string;
  force?: boolean;
  define?: string;
  replace?: boolean;
  start?: boolean;
  keepMacs?: boolean;
  dryRun?: boolean;
  yes?: boolean;
  bootDir?: string[];
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
      '--password-file <file>',
      "a backup in an encrypted chunk repository: the repository's password (first line)",
    )
    .option(
      '--define <name>',
      'the whole VM: restore the disks (into --to DIR), NVRAM and TPM state and define it as a new domain NAME',
    )
    .option(
      '--replace',
      'the whole VM over its own domain (shut off): its disks, NVRAM, TPM state and definition (needs --yes)',
    )
    .option('--start', 'with --define or --replace: start the domain once it is defined')
    .option('--keep-macs', 'with --define: keep the MAC addresses (default: libvirt gives the new domain new ones)')
    .option('--dry-run', 'with --define or --replace: print the definition and the files it would write, write nothing')
    .option('--yes', 'confirm --replace')
    .option(
      '--boot-dir <dir>',
      'with --define or --replace: a directory from which the definition may keep host files (a direct-boot kernel), besides /usr/share, /usr/lib and /var/lib/libvirt/boot; repeatable',
      (value: string, previous: string[] = []) => [...previous, value],
    )
    .option(
      '--instant <name>',
      'define and start the VM as NAME at once, on overlays (in --to DIR) whose backing files are the backup images (file:// targets)',
    )
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
    action(async (backupId: string | undefined, flags: RestoreFlags & InstantFlags) => {
      if (flags.finish !== undefined) {
        if (backupId || flags.instant !== undefined || flags.define !== undefined || flags.replace) {
          throw new CliError(
            'restore --finish NEWNAME takes no backup id, --instant, --define or --replace: it finishes the VM NEWNAME.',
          );
        }
        return runFinish(flags.finish, flags);
      }
      if (flags.instant !== undefined) {
        if (flags.define !== undefined || flags.replace) {
          throw new CliError(
            '--instant NAME starts the backup at once as a new domain; it does not go with --define or --replace.',
          );
        }
        return runInstant(backupId, flags.instant, flags);
      }
      return flags.define !== undefined || flags.replace ? runVmRestore(backupId, flags) : runRestore(backupId, flags);
    }),
  );
}

const VM_USAGE = 'vmbackup restore <backupId> --define NAME [--to DIR] [--start] (or --replace --yes)';

function checkVmUsage(backupId: string | undefined, flags: RestoreFlags): string {
  if (!backupId) {
    throw new CliError(`restore needs the id of the backup to restore: ${VM_USAGE} (\`vmbackup list\` shows the ids).`);
  }
  if (flags.define !== undefined && flags.replace) {
    throw new CliError('--define NAME makes a new domain and --replace restores over the original one: pick one.');
  }
  for (const [flag, set] of [
    ['--disk', flags.disk !== undefined],
    ['--format', flags.format !== undefined],
    ['--force', Boolean(flags.force)],
  ] as const) {
    if (set) throw new CliError(`${flag} restores disk images only; it does not go with --define or --replace.`);
  }
  if (flags.replace && flags.to !== undefined) {
    throw new CliError("--replace restores over the domain's own files; --to goes with --define only.");
  }
  if (flags.replace && flags.keepMacs)
    throw new CliError('--replace always keeps the MAC addresses; leave out --keep-macs.');
  return backupId;
}

async function runVmRestore(id: string | undefined, flags: RestoreFlags): Promise<void> {
  const backupId = checkVmUsage(id, flags);
  const manifestKey = cliManifestKey();
  const config = loadConfig();
  const hypervisor = createVirshHypervisor({ uri: config.libvirtUri, sessions: false });
  const stop = new AbortController();
  let stoppedBy: NodeJS.Signals | undefined;
  const onSignal = (signal: NodeJS.Signals): void => {
    stoppedBy ??= signal;
    stop.abort(new Error(`${signal} received`));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await withCliTarget(flags.target, flags, async (target) => {
      const result = await restoreVm(target, hypervisor, backupId, {
        password: cliPasswordSource(target.displayUrl, flags.passwordFile),
        mode:
          flags.define !== undefined
            ? { kind: 'define', name: flags.define, ...(flags.to !== undefined ? { to: resolve(flags.to) } : {}) }
            : { kind: 'replace', confirmed: Boolean(flags.yes) },
        start: Boolean(flags.start),
        keepMacs: Boolean(flags.keepMacs),
        dryRun: Boolean(flags.dryRun),
        stateDir: config.stateDir,
        ...(flags.bootDir ? { bootDirs: flags.bootDir.map((d) => resolve(d)) } : {}),
        ...(manifestKey ? { manifestKey } : {}),
        signal: stop.signal,
        onStep: (line) => process.stderr.write(`${safeText(line)}\n`),
      });
      printVmResult(result, Boolean(flags.json));
    });
  } catch (err) {
    // the restore undid its work already; the shell's convention for the exit code
    if (stoppedBy && err instanceof Error) throw new CliError(err.message, exitCodeOf(stoppedBy));
    throw err;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    hypervisor.close();
  }
}

function printVmResult(r: VmRestoreResult, json: boolean): void {
  if (json) {
    printJson(r);
    return;
  }
  const out = (line: string) => process.stdout.write(`${safeText(line)}\n`);
  const note = (line: string) => process.stderr.write(`${safeText(line)}\n`);
  if (r.dryRun) {
    // the definition on stdout (it can be piped to a file), what would be written on stderr
    process.stdout.write(r.xml);
    note(
      `dry run: nothing was written; ${r.mode === 'define' ? `domain ${r.domain} would be defined` : `domain ${r.domain} would be redefined`} with UUID ${r.uuid} from backup ${r.backupId}`,
    );
    for (const d of r.disks) note(`  would write disk ${d.name} -> ${d.path} (${d.format})`);
    if (r.nvram) note(`  would write NVRAM -> ${r.nvram}`);
    for (const f of r.tpm?.files ?? []) note(`  would write TPM state -> ${f}`);
  } else {
    out(
      `${r.mode === 'define' ? 'defined' : 'restored and redefined'} domain ${r.domain} (UUID ${r.uuid}) from backup ${r.backupId} of ${r.from}${r.started ? '; started' : ''}`,
    );
    for (const d of r.disks) out(`  disk ${d.name} -> ${d.path} (${d.format})`);
    if (r.nvram) out(`  NVRAM -> ${r.nvram}`);
    if (r.tpm) out(`  TPM state -> ${r.tpm.dir}`);
  }
  for (const e of r.ejected) note(`  cdrom/floppy media not in the backup, left empty: ${e}`);
  for (const k of r.keptHostFiles) note(`  keeps the host file ${k}`);
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
  for (const [flag, set] of [
    ['--start', flags.start],
    ['--keep-macs', flags.keepMacs],
    ['--dry-run', flags.dryRun],
    ['--yes', flags.yes],
    ['--boot-dir', flags.bootDir !== undefined],
  ] as const) {
    if (set) throw new CliError(`${flag} goes with --define NAME or --replace (a whole-VM restore).`);
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
        password: cliPasswordSource(target.displayUrl, flags.passwordFile),
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
