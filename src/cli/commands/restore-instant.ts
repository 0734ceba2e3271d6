/**
 * `vmbackup restore <id> --instant NEWNAME [--to DIR] [--keep-macs]`: define and start the VM at once on overlays of
 * the backup's images (src/repository/instant.ts); `vmbackup restore --finish NEWNAME [--host H] [--bandwidth MiB/s]`:
 * the finishInstantRestore workflow pulls the data into the overlays while the VM runs (src/activities/instant.ts).
 */
import { join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { WorkflowIdConflictPolicy } from '@temporalio/client';
import { qemuWritableDir } from '../../activities/qemu-paths';
import { rewriteDomainXml } from '../../hypervisor/domain-xml';
import { createVirshHypervisor } from '../../hypervisor/virsh';
import { instantRestore } from '../../repository/instant';
import type { FinishInstantResult } from '../../shared/activities';
import {
  DOMAIN_NAME_RE,
  HOST_NAME_RE,
  MAX_HEARTBEAT_SECONDS,
  MIN_HEARTBEAT_SECONDS,
  finishInstantWorkflowId,
  hostTaskQueue,
} from '../../shared/names';
import { loadConfig } from '../../worker/config';
import type { FinishInstantWorkflowInput } from '../../workflows/finish-instant';
import { startInProcessWorker } from '../in-process-worker';
import { CliError, printJson } from '../output';
import { temporalFlagsFrom } from './temporal-options';
import { cliManifestKey, withCliTarget, type TargetFlags } from './target-options';

export interface InstantFlags extends TargetFlags {
  instant?: string;
  finish?: string;
  to?: string;
  keepMacs?: boolean;
  bootDir?: string[];
  host?: string;
  bandwidth?: string;
  heartbeatTimeout?: string;
}

function checkName(name: string, flag: string): void {
  if (!DOMAIN_NAME_RE.test(name)) {
    throw new CliError(`${flag} "${name}" is not a valid domain name: use letters, digits, '.', '_', '+' and '-'.`);
  }
}

export async function runInstant(backupId: string | undefined, name: string, flags: InstantFlags): Promise<void> {
  if (!backupId) {
    throw new CliError(
      'restore --instant needs the id of the backup to start: vmbackup restore <backupId> --instant NEWNAME (`vmbackup list` shows the ids).',
    );
  }
  checkName(name, '--instant');
  const config = loadConfig();
  const hypervisor = createVirshHypervisor({ uri: config.libvirtUri, sessions: false });
  try {
    await withCliTarget(flags.target, flags, async (target) => {
      const dir = flags.to
        ? resolve(flags.to)
        : await qemuWritableDir(join(config.stateDir, 'instant', name), join('instant', name));
      const started = await instantRestore(target, backupId, {
        name,
        dir,
        keepMacs: Boolean(flags.keepMacs),
        stateDir: config.stateDir,
        hypervisor,
        bootDirs: (flags.bootDir ?? []).map((d) => resolve(d)),
        rewriteXml: rewriteDomainXml,
        manifestKey: cliManifestKey(),
      });
      // from the command's start (the process's time origin) to the domain running
      const startSeconds = Math.round(performance.now()) / 1000;
      if (flags.json) {
        printJson({ ...started, target: target.displayUrl, startSeconds });
        return;
      }
      process.stdout.write(
        `${name} is running on overlays of backup ${backupId} (running ${startSeconds.toFixed(2)} s after the command started)\n`,
      );
      for (const d of started.disks) process.stdout.write(`  ${d.name} -> ${d.overlay} (reads from ${d.backing})\n`);
      process.stderr.write(
        `Its disks read from the backup until \`vmbackup restore --finish ${name}\` has copied them; keep the backup until then.\n`,
      );
    });
  } finally {
    hypervisor.close();
  }
}

export async function runFinish(name: string, flags: InstantFlags): Promise<void> {
  checkName(name, '--finish');
  let bandwidthMiB: number | undefined;
  if (flags.bandwidth !== undefined) {
    bandwidthMiB = /^\d+$/.test(flags.bandwidth) ? Number(flags.bandwidth) : NaN;
    if (!(bandwidthMiB >= 1 && bandwidthMiB <= 1 << 20)) {
      throw new CliError(`--bandwidth must be a whole number of MiB/s from 1 to 1048576, not "${flags.bandwidth}".`);
    }
  }
  let heartbeatTimeoutSeconds: number | undefined;
  if (flags.heartbeatTimeout !== undefined) {
    heartbeatTimeoutSeconds = /^\d+$/.test(flags.heartbeatTimeout) ? Number(flags.heartbeatTimeout) : NaN;
    if (!(heartbeatTimeoutSeconds >= MIN_HEARTBEAT_SECONDS && heartbeatTimeoutSeconds <= MAX_HEARTBEAT_SECONDS)) {
      throw new CliError(
        `--heartbeat-timeout must be a number of seconds from ${MIN_HEARTBEAT_SECONDS} to ${MAX_HEARTBEAT_SECONDS}, not "${flags.heartbeatTimeout}".`,
      );
    }
  }
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const host = flags.host ?? config.host;
  if (!HOST_NAME_RE.test(host)) throw new CliError(`"${host}" is not a valid host name`);
  const [{ openSession }, { failureMessage }] = await Promise.all([
    import('../../client/connect'),
    import('../../client/backups'),
  ]);
  const session = await openSession(config, { log: (line) => process.stderr.write(`${line}\n`) });
  let stopWorker: (() => Promise<void>) | undefined;
  try {
    if (session.embedded && host === config.host) {
      // Embedded default: this process is the host's worker while the pull runs; it ships nothing.
      stopWorker = await startInProcessWorker({ ...config, allowTargets: [] }, session.address);
    }
    const args: [FinishInstantWorkflowInput] = [
      {
        host,
        domain: name,
        ...(bandwidthMiB !== undefined ? { bandwidthMiB } : {}),
        ...(heartbeatTimeoutSeconds !== undefined ? { heartbeatTimeoutSeconds } : {}),
      },
    ];
    const handle = await session.client.workflow.start('finishInstantRestore', {
      taskQueue: hostTaskQueue(host),
      workflowId: finishInstantWorkflowId(host, name),
      // a finish that already runs (its command was killed) is followed, never doubled
      workflowIdConflictPolicy: WorkflowIdConflictPolicy.USE_EXISTING,
      args,
    });
    if (!flags.json) process.stderr.write(`finishing ${name}: pulling its disks from the backup while it runs\n`);
    let result: FinishInstantResult;
    try {
      result = (await handle.result()) as FinishInstantResult;
    } catch (err) {
      throw new CliError(`Cannot finish ${name}: ${failureMessage(err).replace(/\.$/, '')}.`);
    }
    if (flags.json) {
      printJson(result);
      return;
    }
    process.stdout.write(
      result.alreadyStandalone
        ? `${name} is already standalone: no disk reads from a backup\n`
        : `${name} runs on standalone disks; it no longer needs the backup\n`,
    );
    for (const d of result.disks) process.stdout.write(`  ${d.name} -> ${d.path}\n`);
  } finally {
    await stopWorker?.();
    await session.close();
  }
}
