/** `vmbackup worker [--host H]`: serve this host's task queue until SIGINT/SIGTERM. */
import type { Command } from 'commander';
import { HOST_NAME_RE, hostTaskQueue } from '../../shared/names';
import { loadConfig, parseAllowTargets } from '../../worker/config';
import { temporalFlagsFrom } from './temporal-options';
import { action, CliError } from '../output';
import { recoveryLine } from './recover';

export function register(program: Command): void {
  program
    .command('worker')
    .description("run this host's worker: executes backups of the VMs on this host")
    .option('--host <name>', 'host name (task queue vmbackup-host-<name>); default: this machine')
    .option('--no-recover', 'do not undo what dead backups left (overlays, staging directories) at start')
    .option(
      '--allow-target <prefix>',
      'only write to targets at or below this URL prefix (repeatable; replaces VMBACKUP_ALLOW_TARGETS)',
      (value: string, previous: string[] = []) => [...previous, value],
    )
    .action(
      action(async (flags: { host?: string; recover: boolean; allowTarget?: string[] }) => {
        const base = loadConfig(process.env, temporalFlagsFrom(flags));
        const host = flags.host ?? base.host;
        if (!HOST_NAME_RE.test(host)) throw new CliError(`"${host}" is not a valid host name`);
        const allowTargets = flags.allowTarget
          ? parseAllowTargets(flags.allowTarget, '--allow-target')
          : base.allowTargets;
        const config = { ...base, host, allowTargets };
        const { createHostWorker, recoverHostOverlays } = await import('../../worker');
        const address = config.temporalAddress ?? config.localTemporalAddress;
        const { worker, close } = await createHostWorker({ config, address });
        process.stderr.write(`vmbackup worker for host ${host} on ${address} (task queue ${hostTaskQueue(host)})\n`);
        if (!allowTargets) {
          // Anyone who can start a workflow on that Temporal chooses where this root worker sends a VM's disks.
          process.stderr.write(
            "vmbackup worker: warning: every target is allowed: anyone who can reach this Temporal server can have this host's VMs backed up anywhere; restrict with --allow-target or VMBACKUP_ALLOW_TARGETS\n",
          );
        }
        const running = worker.run();
        if (flags.recover) {
          recoverHostOverlays(address, config).then(
            (actions) => {
              for (const a of actions) process.stderr.write(`recover: ${recoveryLine(a)}\n`);
            },
            (err: unknown) => process.stderr.write(`recover at start failed: ${(err as Error).message}\n`),
          );
        }
        try {
          await running;
        } finally {
          await close(); // its virsh shells and connection end with it, whatever ended the worker
        }
      }),
    );
}
