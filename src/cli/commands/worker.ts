/** `vmbackup worker [--host H]`: serve this host's task queues and the control queue until SIGINT/SIGTERM. */
import type { Command } from 'commander';
import { HOST_NAME_RE, hostSlotTaskQueue, hostTaskQueue } from '../../shared/names';
import { loadConfig, parseAllowTargets } from '../../worker/config';
import { temporalFlagsFrom } from './temporal-options';
import { action, CliError } from '../output';
import { recoveryLine } from './recover';

/** What `--max-concurrent-backups` accepts. */
export const MAX_CONCURRENT_BACKUPS = 1000;

interface WorkerFlags {
  host?: string;
  recover: boolean;
  allowTarget?: string[];
  maxConcurrentBackups?: string;
}

export function register(program: Command): void {
  program
    .command('worker')
    .description("run this host's worker: executes backups of the VMs on this host, and scheduled runs")
    .option('--host <name>', 'host name (task queue vmbackup-host-<name>); default: this machine')
    .option('--no-recover', 'do not undo what dead backups left (overlays, staging directories) at start')
    .option(
      '--allow-target <prefix>',
      'only write to targets at or below this URL prefix (repeatable; replaces VMBACKUP_ALLOW_TARGETS)',
      (value: string, previous: string[] = []) => [...previous, value],
    )
    .option(
      '--max-concurrent-backups <n>',
      'backups doing their libvirt, copy and upload work at once on this host; others wait, `queued` (default: the number of cores, at least 2)',
    )
    .action(
      action(async (flags: WorkerFlags) => {
        const base = loadConfig(process.env, temporalFlagsFrom(flags));
        const host = flags.host ?? base.host;
        if (!HOST_NAME_RE.test(host)) throw new CliError(`"${host}" is not a valid host name`);
        const maxConcurrentBackups = parseMaxConcurrent(flags.maxConcurrentBackups);
        const allowTargets = flags.allowTarget
          ? parseAllowTargets(flags.allowTarget, '--allow-target')
          : base.allowTargets;
        const config = { ...base, host, allowTargets };
        const { createHostWorker, defaultMaxConcurrentBackups, recoverHostOverlays } = await import('../../worker');
        const address = config.temporalAddress ?? config.localTemporalAddress;
        const slots = maxConcurrentBackups ?? defaultMaxConcurrentBackups();
        const hostWorker = await createHostWorker({
          config,
          address,
          maxConcurrentBackups: slots,
          serveControlQueue: true,
        });
        process.stderr.write(
          `vmbackup worker for host ${host} on ${address} (task queue ${hostTaskQueue(host)}; ` +
            `${slots} backup slot(s) on ${hostSlotTaskQueue(host)}; scheduled runs from ${config.controlTaskQueue})\n`,
        );
        if (!allowTargets) {
          // Anyone who can start a workflow on that Temporal chooses where this root worker sends a VM's disks.
          process.stderr.write(
            "vmbackup worker: warning: every target is allowed: anyone who can reach this Temporal server can have this host's VMs backed up anywhere; restrict with --allow-target or VMBACKUP_ALLOW_TARGETS\n",
          );
        }
        const running = hostWorker.run();
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
          await hostWorker.close(); // its virsh shells and connection end with it, whatever ended the worker
        }
      }),
    );
}

function parseMaxConcurrent(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value) || Number(value) < 1 || Number(value) > MAX_CONCURRENT_BACKUPS) {
    throw new CliError(
      `--max-concurrent-backups must be a whole number from 1 to ${MAX_CONCURRENT_BACKUPS}, not "${value}"`,
    );
  }
  return Number(value);
}
