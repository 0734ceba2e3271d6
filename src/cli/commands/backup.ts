/** `vmbackup backup <domain>`: start a backup, optionally follow it to the end. */
import { resolve } from 'node:path';
import { Option } from 'commander';
import type { Command } from 'commander';
import type { BackupStatusView } from '../../client/backups';
import {
  DEFAULT_MAX_CHAIN,
  DOMAIN_NAME_RE,
  HOST_NAME_RE,
  hostTaskQueue,
  MAX_HEARTBEAT_SECONDS,
  MIN_HEARTBEAT_SECONDS,
} from '../../shared/names';
import { parseDuration } from '../../shared/duration';
import type {
  BackupChainInfo,
  BackupOptions,
  BackupResult,
  CopyTool,
  RequestedLevel,
  RequestedMethod,
  TargetChunkStats,
} from '../../shared/types';
import { parseWebhookUrl } from '../../shared/webhook';
import { canonicalTargetUrl, defaultTargetUrl, redactUrl, targetWithin } from '../../storage/registry';
import { loadConfig } from '../../worker/config';
import { startInProcessWorker } from '../in-process-worker';
import { signalExitCode, watchInterrupts } from '../interrupt';
import type { InterruptWatch } from '../interrupt';
import { action, CliError, printJson, printWarning } from '../output';
import { addS3Options, s3OptionsFrom } from './s3-options';
import { temporalFlagsFrom } from './temporal-options';

export interface BackupOptionFlags {
  method: RequestedMethod;
  quiesce?: boolean;
  requireQuiesce?: boolean;
  copyTool: CopyTool;
  level: RequestedLevel;
  maxChain?: string;
  fullEvery?: string;
  includeAllDisks?: boolean;
  heartbeatTimeout?: string;
  notify?: string;
  notifySuccess?: boolean;
  [s3: string]: unknown;
}

interface BackupFlags extends BackupOptionFlags {
  host?: string;
  target: string[];
  wait?: boolean;
  json?: boolean;
  passwordFile?: string;
}

export function register(program: Command): void {
  const cmd = program
    .command('backup')
    .description('back up a VM (running: push mode, pull mode or snapshot method; shut off: direct copy)')
    .argument('<domain>', 'libvirt domain name')
    .option('--host <name>', "the VM's host (its worker's task queue); default: this machine")
    .option('--target <url>', 'file:///abs/dir, nfs://host/export/path or s3://bucket/prefix (repeatable)', collect, [])
    .option('--wait', 'follow the backup to the end; exit 0 only on success')
    .option('--json', 'print one JSON object with the result')
    .option(
      '--password-file <file>',
      "chunk repositories: the password, on the file's first line, for this command's own worker (the embedded default); a cluster's worker reads its own (vmbackup worker --password-file)",
    );
  addBackupOptions(cmd);
  cmd.action(action(async (domain: string, flags: BackupFlags) => runBackup(domain, flags)));
}

/** How a backup is taken: `backup` and `schedule create` take the same options. */
export function addBackupOptions(cmd: Command): Command {
  cmd
    .addOption(
      new Option('--method <method>', 'backup procedure').choices(['auto', 'push', 'snapshot', 'pull']).default('auto'),
    )
    .option('--quiesce', 'snapshot method: freeze guest filesystems through the guest agent (falls back when missing)')
    .option('--require-quiesce', 'snapshot method: fail instead of falling back to crash-consistent')
    .addOption(
      new Option(
        '--copy-tool <tool>',
        "snapshot method: how base images are copied (auto: vmbackup's own single-pass copy, which hashes what it writes; rsync, cp: that tool, then both files hashed)",
      )
        .choices(['auto', 'rsync', 'cp'])
        .default('auto'),
    )
    .addOption(
      new Option(
        '--level <level>',
        'auto: an incremental when every target holds a chain that can continue, else full; inc: changes since the last backup; diff: changes since the last full',
      )
        .choices(['auto', 'full', 'inc', 'diff'])
        .default('auto'),
    )
    .option(
      '--max-chain <n>',
      `auto/inc: take a full once the chain has this many increments (default ${DEFAULT_MAX_CHAIN})`,
    )
    .option('--full-every <duration>', "take a full once the chain's full is older than this (e.g. 7d, 12h)")
    .option('--include-all-disks', 'also back up cdrom, read-only and shareable disks')
    .option('--notify <url>', 'POST a JSON event to this http(s) webhook when the backup fails or is partial')
    .option('--notify-success', 'with --notify: also when the backup succeeds')
    .addOption(new Option('--heartbeat-timeout <seconds>', 'retry a silent long step after this long').hideHelp());
  addS3Options(cmd);
  return cmd;
}

/** The options of addBackupOptions, checked: one sentence for a bad value. */
export function backupOptionsFrom(flags: BackupOptionFlags): BackupOptions {
  const heartbeatTimeoutSeconds = parseHeartbeatTimeout(flags.heartbeatTimeout);
  let maxChain: number | undefined;
  if (flags.maxChain !== undefined) {
    if (!/^\d+$/.test(flags.maxChain) || Number(flags.maxChain) < 1 || Number(flags.maxChain) > 1000) {
      throw new CliError(`--max-chain must be a whole number from 1 to 1000, not "${flags.maxChain}"`);
    }
    maxChain = Number(flags.maxChain);
  }
  let fullEverySeconds: number | undefined;
  if (flags.fullEvery !== undefined) {
    fullEverySeconds = parseDuration(flags.fullEvery);
    if (!fullEverySeconds) {
      throw new CliError(`--full-every must be a duration such as 7d, 12h or 90m, not "${flags.fullEvery}"`);
    }
  }
  if (flags.notifySuccess && !flags.notify) throw new CliError('--notify-success needs --notify URL');
  if (flags.notify !== undefined) {
    try {
      parseWebhookUrl(flags.notify);
    } catch (err) {
      throw new CliError((err as Error).message);
    }
  }
  return {
    level: flags.level,
    ...(maxChain !== undefined ? { maxChain } : {}),
    ...(fullEverySeconds !== undefined ? { fullEverySeconds } : {}),
    quiesce: Boolean(flags.quiesce || flags.requireQuiesce),
    requireQuiesce: Boolean(flags.requireQuiesce),
    copyTool: flags.copyTool,
    includeAllDisks: Boolean(flags.includeAllDisks),
    s3: s3OptionsFrom(flags),
    ...(heartbeatTimeoutSeconds !== undefined ? { heartbeatTimeoutSeconds } : {}),
    ...(flags.notify ? { notify: { url: flags.notify, ...(flags.notifySuccess ? { onSuccess: true } : {}) } } : {}),
  };
}

/** `--s3-object-lock` locks s3:// targets only: without one, the backup would be written unlocked. */
export function requireLockTarget(options: BackupOptions, targets: readonly string[]): void {
  if (options.s3?.objectLock && !targets.some((t) => t.startsWith('s3://'))) {
    throw new CliError(
      '--s3-object-lock locks objects on s3:// targets only, and no --target is one: give an s3:// target in a bucket with Object Lock, or drop --s3-object-lock',
    );
  }
}

export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

async function runBackup(domain: string, flags: BackupFlags): Promise<void> {
  if (!DOMAIN_NAME_RE.test(domain)) {
    throw new CliError(`"${domain}" is not a valid domain name: use letters, digits, '.', '_', '+' and '-'`);
  }
  const config = loadConfig(process.env, temporalFlagsFrom(flags));
  const host = flags.host ?? config.host;
  if (!HOST_NAME_RE.test(host)) throw new CliError(`"${host}" is not a valid host name`);
  parseHeartbeatTimeout(flags.heartbeatTimeout);
  const log = (line: string) => {
    if (!flags.json) process.stderr.write(`${line}\n`);
  };
  // said even with --json (on stderr): the user named a target twice
  const targets = uniqueTargets(flags.target.length > 0 ? flags.target : [defaultTargetUrl(config.stateDir)], (line) =>
    process.stderr.write(`${line}\n`),
  );
  const options = backupOptionsFrom(flags);
  requireLockTarget(options, targets);

  // The Temporal client loads only for a command that talks to Temporal (help and --version stay instant).
  const [{ openSession }, { startBackup }, { watchBackup }, { hostWorkerSeen }] = await Promise.all([
    import('../../client/connect'),
    import('../../client/backups'),
    import('../watch'),
    import('../../client/workers'),
  ]);
  const session = await openSession(config, { log });
  let stopWorker: (() => Promise<void>) | undefined;
  let interrupts: InterruptWatch | undefined;
  try {
    const ownWorker = session.embedded && host === config.host;
    if (flags.passwordFile && !ownWorker) {
      throw new CliError(
        `--password-file is read by this command's own worker only (the embedded default); the backup runs on host ${host}'s worker, which reads its own password (vmbackup worker --password-file, VMBACKUP_PASSWORD_FILE or VMBACKUP_PASSWORD in its environment); nothing was started`,
      );
    }
    if (ownWorker) {
      // Embedded default: this process is the host's worker for as long as the backup runs, and it writes to
      // this command's targets only (the local server takes workflows from any local user meanwhile).
      for (const t of targets) {
        if (config.allowTargets && !config.allowTargets.some((p) => targetWithin(t, p))) {
          throw new CliError(`${redactUrl(t)} is outside VMBACKUP_ALLOW_TARGETS; nothing was started`);
        }
      }
      stopWorker = await startInProcessWorker(
        {
          ...config,
          allowTargets: targets,
          ...(flags.passwordFile ? { passwordFile: resolve(flags.passwordFile) } : {}),
        },
        session.address,
      );
    }
    if (!ownWorker && (await hostWorkerSeen(session.client, host)) === false) {
      // queued for a host whose worker is down (it runs once the worker is back), or a host name with a typo
      printWarning(
        `no vmbackup worker for host ${host} is connected to Temporal at ${session.address} (nothing polls task queue ${hostTaskQueue(host)}): the backup waits in that queue until \`vmbackup worker --host ${host}\` runs (\`vmbackup cancel\` removes it)`,
      );
    }
    interrupts = watchInterrupts();
    const { backupId, handle } = await startBackup(session.client, {
      domain,
      host,
      method: flags.method,
      targets,
      options,
    });
    if (!flags.json) process.stdout.write(`${backupId}\n`);
    // Without a cluster nobody else would run the backup, so the embedded default always waits.
    if (!flags.wait && !stopWorker) {
      if (flags.json) printJson({ backupId, domain, host, status: 'running' });
      return;
    }
    const watching = watchBackup(session.client, handle, backupId, { showProgress: !flags.json });
    void watching.catch(() => undefined); // after a detach nobody awaits it; the process exits
    if (!stopWorker) {
      // Another process runs the backup (a cluster's worker): Ctrl-C only stops following it.
      const outcome = await Promise.race([watching, interrupts.received]);
      if (typeof outcome === 'string') {
        if (flags.json) printJson({ backupId, domain, host, status: 'running' });
        process.stderr.write(
          `vmbackup: detached from backup ${backupId}, which goes on on host ${host}: follow it with ` +
            `\`vmbackup status ${backupId} --wait\`, stop it with \`vmbackup cancel ${backupId}\`\n`,
        );
        process.exitCode = signalExitCode(outcome);
        return;
      }
      report(outcome, flags.json ?? false, { domain, host });
      return;
    }
    // This process is the backup's worker: Ctrl-C cancels it, and we wait (as the worker) for its undo steps.
    const signals = interrupts;
    void signals.received.then((signal) => {
      process.stderr.write(
        `vmbackup: ${signal}: cancelling backup ${backupId}; waiting for its undo steps ` +
          `(the VM goes back on its own disks, staging files are removed)\n`,
      );
      signals.onRepeat((_again, ms) =>
        process.stderr.write(
          `vmbackup: still running the undo steps of backup ${backupId} (${(ms / 1000).toFixed(1)} s so far); ` +
            `vmbackup exits once they are done (kill -9 would leave them to \`vmbackup cancel ${backupId}\`)\n`,
        ),
      );
      handle.cancel().catch((err: unknown) => {
        process.stderr.write(`vmbackup: could not cancel backup ${backupId}: ${(err as Error).message}\n`);
      });
    });
    const view = await watching;
    // the worker's last log lines (an activity cancelled with the backup, a released slot) come before the
    // command's own last sentence, which a user or a script reads as the outcome
    const stopping = stopWorker;
    stopWorker = undefined;
    await stopping();
    if (signals.first && view.execution === 'CANCELLED') {
      process.stderr.write(
        `vmbackup: interrupted: backup ${backupId} was cancelled; its undo steps ran ` +
          `(backup job aborted or overlays committed, staging removed)\n`,
      );
      process.exitCode = signalExitCode(signals.first);
      return;
    }
    report(view, flags.json ?? false, { domain, host });
  } finally {
    await stopWorker?.();
    interrupts?.dispose();
    await session.close();
  }
}

/** Heartbeat timeouts the workflow accepts: whole seconds (it checks them again, as anyone may start it). */
function parseHeartbeatTimeout(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = /^\d+$/.test(value.trim()) ? Number(value.trim()) : NaN;
  if (!(n >= MIN_HEARTBEAT_SECONDS && n <= MAX_HEARTBEAT_SECONDS)) {
    throw new CliError(
      `--heartbeat-timeout ${JSON.stringify(value)} is not a number of seconds from ${MIN_HEARTBEAT_SECONDS} to ${MAX_HEARTBEAT_SECONDS}`,
    );
  }
  return n;
}

/**
 * Each target once: two spellings of one place (`s3://b/p` and `s3://b/p/`) would race on the same keys.
 * A bad URL fails here with one sentence (canonicalTargetUrl parses it), before anything starts.
 */
export function uniqueTargets(urls: string[], log: (line: string) => void): string[] {
  const seen = new Map<string, string>();
  const unique: string[] = [];
  for (const url of urls) {
    const key = canonicalTargetUrl(url);
    const first = seen.get(key);
    if (first !== undefined) {
      log(`vmbackup: --target ${redactUrl(url)} is the same target as ${redactUrl(first)}; writing to it once`);
      continue;
    }
    seen.set(key, url);
    unique.push(url);
  }
  return unique;
}

function describeLevel(chain: BackupChainInfo): string {
  if (chain.level === 'full') return 'full';
  return `${chain.level === 'inc' ? 'incremental' : 'differential'} on ${chain.parent ?? '?'}`;
}

/** What a backup cost in one chunk repository, in one line. */
export function chunkLine(c: TargetChunkStats): string {
  const mib = (c.uploadedBytes / (1 << 20)).toFixed(1);
  return `chunk repository: ${mib} MiB uploaded, ${c.newChunks} new chunk(s), ${c.knownChunks} already stored, ${c.zeroChunks} zero`;
}

/** Prints the outcome and sets the exit code: 0 only for a backup stored on every target. */
export function report(view: BackupStatusView, json: boolean, ctx: { domain: string; host: string }): void {
  const r: BackupResult | undefined = view.result;
  if (json) {
    printJson(
      r
        ? {
            backupId: r.backupId,
            domain: r.domain,
            host: r.host,
            method: r.method,
            status: r.status,
            level: r.chain?.level ?? 'full',
            ...(r.chain ? { chain: r.chain } : {}),
            startedAt: r.startedAt,
            finishedAt: r.finishedAt,
            quiesced: r.quiesced,
            disks: r.disks.map((d) => ({
              name: d.name,
              format: d.format,
              virtualSize: d.virtualSize,
              sha256: d.sha256,
              location: d.location,
            })),
            skipped: r.skipped,
            targets: r.targets,
            ...(r.pull ? { pull: r.pull } : {}),
          }
        : {
            backupId: view.backupId,
            domain: ctx.domain,
            host: ctx.host,
            status: view.execution.toLowerCase(),
            error: view.error,
          },
    );
  } else if (r) {
    const level = r.chain ? describeLevel(r.chain) : 'full';
    process.stderr.write(`${r.backupId}: ${r.status} (${r.method}, ${level}) ${r.disks.length} disk(s)\n`);
    if (r.chain?.reason) process.stderr.write(`  ${r.chain.reason}\n`);
    for (const t of r.targets) {
      process.stderr.write(`  ${t.ok ? 'ok    ' : 'FAILED'} ${t.target}${t.error ? `: ${t.error}` : ''}\n`);
      if (t.chunks) process.stderr.write(`         ${chunkLine(t.chunks)}\n`);
    }
    for (const d of r.disks) process.stderr.write(`  ${d.name} ${d.format} sha256:${d.sha256} -> ${d.location}\n`);
    for (const s of r.skipped) process.stderr.write(`  skipped ${s.name}: ${s.reason}\n`);
    if (r.pull) process.stderr.write(`  scratch space used by QEMU at its peak: ${r.pull.scratchPeakBytes} bytes\n`);
  } else {
    process.stderr.write(
      `vmbackup: backup ${view.backupId} ${view.execution.toLowerCase()}: ${view.error ?? 'no result'}\n`,
    );
  }
  if (!r || r.status !== 'completed') process.exitCode = 1;
}
