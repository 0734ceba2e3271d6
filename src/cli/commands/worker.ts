/** `vmbackup worker [--host H]`: serve this host's task queues and the control queue until SIGINT/SIGTERM. */
import { resolve } from 'node:path';
import type { Client } from '@temporalio/client';
import type { Command } from 'commander';
import { HOST_NAME_RE, hostSlotTaskQueue, hostTaskQueue } from '../../shared/names';
import { parseAllowNotify } from '../../shared/webhook';
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
  maxConcurrentUploads?: string;
  allowNotify?: string[];
  metrics?: string;
  passwordFile?: string;
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
    .option(
      '--max-concurrent-uploads <n>',
      'uploads this worker runs at once to any one target; others wait, and `status` says so (default: no cap beyond the backup slots)',
    )
    .option(
      '--allow-notify <prefix>',
      'only POST backup events to webhooks at or below this URL prefix (repeatable; replaces VMBACKUP_ALLOW_NOTIFY)',
      (value: string, previous: string[] = []) => [...previous, value],
    )
    .option(
      '--metrics <address>',
      "serve Prometheus metrics (this worker's backups and the Temporal SDK's) at http://<address>/metrics, e.g. 127.0.0.1:9464",
    )
    .option(
      '--password-file <file>',
      'chunk repositories: their password, on the first line of FILE (else VMBACKUP_PASSWORD_FILE, then VMBACKUP_PASSWORD); read once at start',
    )
    .action(
      action(async (flags: WorkerFlags) => {
        const base = loadConfig(process.env, temporalFlagsFrom(flags));
        const host = flags.host ?? base.host;
        if (!HOST_NAME_RE.test(host)) throw new CliError(`"${host}" is not a valid host name`);
        const maxConcurrentBackups = parseMaxConcurrent(flags.maxConcurrentBackups);
        const maxConcurrentUploads = parseMaxConcurrent(flags.maxConcurrentUploads, '--max-concurrent-uploads');
        const allowTargets = flags.allowTarget
          ? parseAllowTargets(flags.allowTarget, '--allow-target')
          : base.allowTargets;
        let allowNotify = base.allowNotify;
        if (flags.allowNotify) {
          try {
            allowNotify = parseAllowNotify(flags.allowNotify, '--allow-notify');
          } catch (err) {
            throw new CliError((err as Error).message);
          }
        }
        const config = {
          ...base,
          host,
          allowTargets,
          ...(allowNotify ? { allowNotify } : {}),
          ...(flags.passwordFile ? { passwordFile: resolve(flags.passwordFile) } : {}),
        };
        const { createHostWorker, defaultMaxConcurrentBackups, recoverHostOverlays } = await import('../../worker');
        const address = config.temporalAddress ?? config.localTemporalAddress;
        const slots = maxConcurrentBackups ?? defaultMaxConcurrentBackups();
        const metrics = flags.metrics ? await startMetrics(flags.metrics, host) : undefined;
        const hostWorker = await createHostWorker({
          config,
          address,
          maxConcurrentBackups: slots,
          ...(maxConcurrentUploads ? { maxConcurrentUploads } : {}),
          serveControlQueue: true,
          ...(metrics ? { sinks: metrics.sinks } : {}),
        }).catch(async (err: unknown) => {
          await metrics?.close();
          throw err;
        });
        // before the ready line: whoever waits for that line has the warning too (one stream, in order)
        if (!allowTargets) {
          // Anyone who can start a workflow on that Temporal chooses where this root worker sends a VM's disks.
          process.stderr.write(
            "vmbackup worker: warning: every target is allowed: anyone who can reach this Temporal server can have this host's VMs backed up anywhere; restrict with --allow-target or VMBACKUP_ALLOW_TARGETS\n",
          );
        }
        process.stderr.write(
          `vmbackup worker for host ${host} on ${address} (task queue ${hostTaskQueue(host)}; ` +
            `${slots} backup slot(s) on ${hostSlotTaskQueue(host)}` +
            `${maxConcurrentUploads ? `; ${maxConcurrentUploads} upload(s) at once per target` : ''}` +
            `; scheduled runs from ${config.controlTaskQueue})\n`,
        );
        if (metrics) {
          metrics.attach(hostWorker.client);
          process.stderr.write(`metrics on http://${metrics.address}/metrics\n`);
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
          await metrics?.close();
          await hostWorker.close(); // its virsh shells and connection end with it, whatever ended the worker
        }
      }),
    );
}

function parseMaxConcurrent(value: string | undefined, flag = '--max-concurrent-backups'): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value) || Number(value) < 1 || Number(value) > MAX_CONCURRENT_BACKUPS) {
    throw new CliError(`${flag} must be a whole number from 1 to ${MAX_CONCURRENT_BACKUPS}, not "${value}"`);
  }
  return Number(value);
}

/**
 * Before the worker connects: the SDK's core exports its own metrics on a loopback port only this process knows
 * (the runtime is configured once, before its first connection), and /metrics serves them after vmbackup's.
 */
async function startMetrics(bindText: string, host: string) {
  const { loadMetrics } = await import('../../worker');
  const { createWorkerMetrics, freeLoopbackPort, parseBindAddress, serveMetrics } = await loadMetrics();
  let bind;
  try {
    bind = parseBindAddress(bindText);
  } catch (err) {
    throw new CliError((err as Error).message);
  }
  const { Runtime } = await import('@temporalio/worker');
  const sdkPort = await freeLoopbackPort();
  Runtime.install({
    telemetryOptions: {
      metrics: {
        prometheus: { bindAddress: `127.0.0.1:${sdkPort}`, useSecondsForDurations: true },
        metricPrefix: 'temporal_',
      },
    },
  });
  let client: Client | undefined;
  const metrics = createWorkerMetrics({ host, visibility: () => client });
  const server = await serveMetrics(bind, metrics, `http://127.0.0.1:${sdkPort}/metrics`).catch((err: unknown) => {
    throw new CliError((err as Error).message);
  });
  return {
    sinks: metrics.sinks,
    address: server.address,
    close: () => server.close(),
    attach(c: Client): void {
      client = c;
      metrics.loadLastSuccesses(c).catch((err: unknown) => {
        process.stderr.write(
          `metrics: the last successful backups could not be read from Temporal: ${(err as Error).message}\n`,
        );
      });
    },
  };
}
