/** The vmbackup command line: thin commands over client/ and storage/. */
import { Command } from 'commander';
import { register as backup } from './commands/backup';
import { register as cancel } from './commands/cancel';
import { register as copy } from './commands/copy';
import { register as gc } from './commands/gc';
import { register as installService } from './commands/install-service';
import { register as list } from './commands/list';
import { register as prune } from './commands/prune';
import { register as recover } from './commands/recover';
import { register as repo } from './commands/repo';
import { register as report } from './commands/report';
import { register as restore } from './commands/restore';
import { register as schedule } from './commands/schedule';
import { register as status } from './commands/status';
import { register as verify } from './commands/verify';
import { register as worker } from './commands/worker';
import { addTemporalOptions } from './commands/temporal-options';

const CONNECTS_TO_TEMPORAL = new Set(['backup', 'status', 'cancel', 'recover', 'worker', 'gc', 'report']);

export function buildProgram(): Command {
  const program = new Command('vmbackup')
    .description('crash-proof backups of running libvirt/QEMU VMs, orchestrated by Temporal')
    .version('0.1.0')
    .showHelpAfterError();
  for (const reg of [
    backup,
    status,
    cancel,
    list,
    verify,
    restore,
    copy,
    prune,
    gc,
    repo,
    recover,
    report,
    worker,
    installService,
    schedule,
  ]) {
    reg(program);
  }
  // --tls-*, --api-key, --payload-key-file: on every command that connects to Temporal
  for (const cmd of program.commands) if (CONNECTS_TO_TEMPORAL.has(cmd.name())) addTemporalOptions(cmd);
  return program;
}

export async function main(argv: string[]): Promise<void> {
  // A second line of defence: files and directories are created with explicit modes (shared/file-modes.ts),
  // and anything else this process or its children create stays private too.
  process.umask(0o077);
  try {
    await buildProgram().parseAsync(argv);
  } catch (err) {
    process.stderr.write(`vmbackup: ${(err as Error).message}\n`);
    process.exitCode = 1;
  }
}
