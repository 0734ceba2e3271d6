/**
 * The Hypervisor port over virsh (libvirt >= 7.2 for the backup API). Every call that changes something
 * is one virsh child process with an argument array and `-c <uri>`; read-only queries are answered by a
 * long-lived virsh shell when one is free (virsh-session.ts), with the same output. A failure becomes a
 * HypervisorError whose kind comes from virsh's stderr (errors.ts), whichever way the call ran.
 *
 * Disk policy (inspect): file and block disks are backed up; cdrom, floppy, read-only and
 * shareable disks are skipped unless includeAllDisks (empty drives always). A writable disk of any
 * other type (network: rbd/nbd/iscsi..., volume, lun) makes inspect throw `unsupported`: a backup
 * that silently leaves out a data disk is worse than no backup. Such disks that would be skipped
 * anyway (read-only, cdrom) are only reported in `skipped`.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { isAbsolute, join } from 'node:path';
import { DOMAIN_NAME_RE } from '../shared/names';
import type { DiskInfo, DomainInfo, DomainState, SkippedDisk } from '../shared/types';
import { boundedTimeout } from './deadline';
import { HypervisorError, checkpointErrorSubject, classifyHypervisorError, toolErrorText } from './errors';
import { ExecStartError, execTool } from './exec';
import type { ExecResult } from './exec';
import type {
  BackupTargetSpec,
  BlockJobInfo,
  Checkpoint,
  CheckpointBitmapState,
  CheckpointSpec,
  Hypervisor,
  JobInfo,
  JobType,
  OverlaySpec,
  PullBackupOptions,
  PushBackupOptions,
  RunningBackupJob,
  VmState,
} from './port';
import { imageInfo } from './qemu-img';
import { VirshSessions, quoteVirshArg } from './virsh-session';
import {
  CHECKPOINT_NAME_RE,
  checkpointCreateXml,
  checkpointRedefineXml,
  parseCheckpointXml,
  parseCheckpointXmls,
  parseBackupJobXml,
  parseDomainXml,
  pullBackupXml,
  pushBackupXml,
  vmStateOf,
} from './xml';
import type { DomainXml, XmlDisk } from './xml';

export const DEFAULT_URI = 'qemu:///system';
export const DISK_NAME_RE = /^[a-z]+[a-z0-9]*$/;
/** Oldest versions with a usable virDomainBackupBegin (libvirt 7.2 enabled it by default; QEMU 4.2 has blockdev-backup with bitmaps). */
export const MIN_LIBVIRT_FOR_BACKUP = '7.2.0';
export const MIN_QEMU_FOR_BACKUP = '4.2.0';

/** A push backup-begin waits for a running job (up to libvirt's 30 s state-lock timeout): leave room. */
const DEFAULT_TIMEOUT_MS = 120_000;
/** checkpoint-dumpxml of a checkpoint deleted since it was listed */
const CHECKPOINT_DELETED = /no domain checkpoint with matching name/i;

export interface VirshHypervisorOptions {
  /** libvirt connection URI; default qemu:///system */
  uri?: string;
  /** per virsh call; default 120 s */
  timeoutMs?: number;
  /** the virsh executable; default `virsh` on PATH */
  virsh?: string;
  /**
   * answer read-only queries from a few long-lived virsh shells (~1 ms a query instead of ~25 ms for a new
   * process); default true. Turned off with VMBACKUP_VIRSH_SESSION=0 (worker config) for debugging.
   */
  sessions?: boolean;
}

export function createVirshHypervisor(opts: VirshHypervisorOptions = {}): VirshHypervisor {
  return new VirshHypervisor(opts);
}

// ------------------------------------------------------------------------------------------ validation

export function validateDomainName(domain: string): void {
  if (!DOMAIN_NAME_RE.test(domain)) {
    throw new HypervisorError(
      'invalid',
      `${JSON.stringify(domain)} is not a valid domain name: use letters, digits, '.', '_', '+', '-' (at most 64, starting with a letter or digit)`,
      { domain },
    );
  }
}

export function validateDiskName(domain: string, disk: string): void {
  if (!DISK_NAME_RE.test(disk)) {
    throw new HypervisorError(
      'invalid',
      `${JSON.stringify(disk)} is not a valid disk name for domain "${domain}": use a target dev such as vda or sdb`,
      { domain, disk },
    );
  }
}

/**
 * A checkpoint name vmbackup hands to virsh: libvirt's rule (CHECKPOINT_NAME_RE), and no leading '-' so that no
 * name can ever read as an option.
 */
export function validateCheckpointName(domain: string, name: string, what = 'checkpoint'): void {
  if (!CHECKPOINT_NAME_RE.test(name) || name.startsWith('-')) {
    throw new HypervisorError(
      'invalid',
      `${JSON.stringify(name)} is not a valid ${what} name for domain "${domain}": use letters, digits, '_', '-', '.' (starting with a letter, digit or '_')`,
      { domain, checkpoint: name },
    );
  }
}

function validateImagePath(domain: string, disk: string, file: string, what: string): void {
  // eslint-disable-next-line no-control-regex
  if (!isAbsolute(file) || /[\u0000-\u001f]/.test(file)) {
    throw new HypervisorError(
      'invalid',
      `the ${what} file for disk ${disk} of domain "${domain}" must be an absolute path without control characters, not ${JSON.stringify(file)}`,
      { domain, disk },
    );
  }
}

// ------------------------------------------------------------------------------------------ parsers

const JOB_TYPES: readonly JobType[] = ['None', 'Bounded', 'Unbounded', 'Completed', 'Failed', 'Cancelled'];
/** virDomainJobOperation, as virsh names them in its human output. */
const JOB_OPERATIONS = [
  'Unknown',
  'Start',
  'Save',
  'Restore',
  'Incoming migration',
  'Outgoing migration',
  'Snapshot',
  'Snapshot revert',
  'Dump',
  'Backup',
  'Snapshot delete',
];
const UNITS: Record<string, number> = {
  B: 1,
  KiB: 1024,
  MiB: 1024 ** 2,
  GiB: 1024 ** 3,
  TiB: 1024 ** 4,
  PiB: 1024 ** 5,
  EiB: 1024 ** 6,
};

function keyValues(output: string): Map<string, string> {
  const map = new Map<string, string>();
  for (const line of output.split('\n')) {
    const m = /^\s*([^:=]+?)\s*[:=]\s*(.*?)\s*$/.exec(line);
    if (m?.[1] !== undefined && m[2] !== undefined && !map.has(m[1])) map.set(m[1], m[2]);
  }
  return map;
}

/** "64.000 MiB" -> bytes (virsh's human output rounds to 3 decimals). */
export function parseSize(value: string): number | undefined {
  const m = /^([\d.]+)\s*([KMGTPE]iB|B)?$/.exec(value.trim());
  if (!m?.[1]) return undefined;
  return Math.round(Number(m[1]) * (UNITS[m[2] ?? 'B'] ?? 1));
}

function int(value: string | undefined): number | undefined {
  if (value === undefined || !/^\d+$/.test(value)) return undefined;
  return Number(value);
}

/**
 * `virsh domjobinfo [--completed] --rawstats` (exact byte counts, numeric enums) or the human
 * output (sizes rounded to units: virsh's domjobinfo has no --bytes). Both seen on libvirt 9.0.
 */
export function parseJobInfo(output: string): JobInfo {
  const kv = keyValues(output);
  const rawType = kv.get('Job type') ?? 'None';
  const typeIndex = int(rawType);
  const type: JobType =
    typeIndex !== undefined
      ? (JOB_TYPES[typeIndex] ?? 'None')
      : (JOB_TYPES.find((t) => t.toLowerCase() === rawType.toLowerCase()) ?? 'None');
  const info: JobInfo = { type };

  const rawOperation = kv.get('operation') ?? kv.get('Operation');
  if (rawOperation !== undefined) {
    const opIndex = int(rawOperation);
    info.operation = opIndex !== undefined ? (JOB_OPERATIONS[opIndex] ?? `operation ${opIndex}`) : rawOperation;
  }

  const processed = int(kv.get('data_processed')) ?? int(kv.get('disk_processed'));
  const total = int(kv.get('data_total')) ?? int(kv.get('disk_total'));
  const human = (key: string): number | undefined => {
    for (const prefix of ['Data', 'File']) {
      const v = kv.get(`${prefix} ${key}`);
      if (v !== undefined) return parseSize(v);
    }
    return undefined;
  };
  const dataProcessed = processed ?? human('processed');
  const dataTotal = total ?? human('total');
  if (dataProcessed !== undefined) info.dataProcessed = dataProcessed;
  if (dataTotal !== undefined) info.dataTotal = dataTotal;

  const elapsed = int(kv.get('time_elapsed')) ?? int(/^(\d+)/.exec(kv.get('Time elapsed') ?? '')?.[1]);
  if (elapsed !== undefined) info.timeElapsedMs = elapsed;

  const error = kv.get('errmsg') ?? kv.get('Error message');
  if (error) info.errorMessage = error;
  return info;
}

/**
 * `virsh blockjob DOM DISK --raw`: ` type=Active Block Commit`, ` cur=...`, ` end=...`, or an empty
 * line when no job runs. The ready flag is not in this output (it is in the XML's <mirror ready>).
 */
export function parseBlockJobRaw(output: string): Omit<BlockJobInfo, 'ready'> {
  const kv = keyValues(output);
  const type = kv.get('type');
  if (!type) return { type: undefined, cur: 0, end: 0 };
  return { type, cur: int(kv.get('cur')) ?? 0, end: int(kv.get('end')) ?? 0 };
}

/** `virsh version`: libvirt from "Using library", QEMU from "Running hypervisor". */
export function parseVersions(output: string): { libvirt: string; qemu: string } {
  const libvirt = /Using library:\s*libvirt\s+(\S+)/.exec(output)?.[1];
  const qemu = /Running hypervisor:\s*QEMU\s+(\S+)/.exec(output)?.[1];
  if (!libvirt || !qemu) {
    throw new HypervisorError(
      'failed',
      `cannot read the libvirt and QEMU versions from virsh version: ${output.trim()}`,
    );
  }
  return { libvirt, qemu };
}

/** `virsh domblkinfo DOM DEV` (bytes by default; --human would round). */
export function parseDomBlkInfo(output: string): { capacity: number; allocation: number; physical: number } {
  const kv = keyValues(output);
  return {
    capacity: int(kv.get('Capacity')) ?? 0,
    allocation: int(kv.get('Allocation')) ?? 0,
    physical: int(kv.get('Physical')) ?? 0,
  };
}

export function parseDomainState(output: string): DomainState {
  const s = output.trim().split('\n')[0]?.trim() ?? '';
  if (s === 'running' || s === 'paused' || s === 'shut off') return s;
  return 'other';
}

/** "9.0.0" >= "7.2"? Missing parts count as 0; non-numeric suffixes ("7.2.22") are ignored. */
export function versionAtLeast(version: string, minimum: string): boolean {
  const a = version.split('.').map((p) => parseInt(p, 10) || 0);
  const b = minimum.split('.').map((p) => parseInt(p, 10) || 0);
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const x = a[i] ?? 0;
    const y = b[i] ?? 0;
    if (x !== y) return x > y;
  }
  return true;
}

/** virsh --diskspec separates fields with commas; a literal comma in a file name is doubled. */
function diskspecValue(file: string): string {
  return file.replace(/,/g, ',,');
}

// ------------------------------------------------------------------------------------------ the port

interface CallContext {
  /** what we were doing, for the message: "start the push backup of domain "vm1"" */
  action: string;
  domain?: string;
  disk?: string;
  checkpoint?: string;
  timeoutMs?: number;
}

export class VirshHypervisor implements Hypervisor {
  readonly uri: string;
  private readonly timeoutMs: number;
  private readonly virshBin: string;
  private readonly sessions: VirshSessions | undefined;

  constructor(opts: VirshHypervisorOptions = {}) {
    this.uri = opts.uri ?? DEFAULT_URI;
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.virshBin = opts.virsh ?? 'virsh';
    this.sessions = (opts.sessions ?? true) ? new VirshSessions({ virsh: this.virshBin, uri: this.uri }) : undefined;
  }

  /**
   * Runs `virsh -c URI args...` (a query may be answered by a virsh session instead, with the same output);
   * stdout on success, a classified HypervisorError otherwise.
   */
  async virsh(args: readonly string[], ctx: CallContext): Promise<string> {
    // never longer than the activity attempt that asks (deadline.ts): a retry must not race our child
    const timeoutMs = boundedTimeout(ctx.timeoutMs ?? this.timeoutMs) ?? this.timeoutMs;
    const result = (await this.sessions?.run(args, timeoutMs)) ?? (await this.runOnce(args, ctx, timeoutMs));
    if (result.timedOut) {
      throw new HypervisorError(
        'failed',
        `cannot ${ctx.action}: virsh ${args[0] ?? ''} did not answer within ${Math.round(timeoutMs / 1000)} s`,
        { command: result.command, stderr: result.stderr, domain: ctx.domain, disk: ctx.disk },
      );
    }
    if (result.code !== 0) throw this.errorFrom(result.stderr, result.command, ctx);
    return result.stdout;
  }

  /** Ends the idle virsh sessions (a worker at shutdown); later queries start new processes. */
  close(): void {
    this.sessions?.close();
  }

  private async runOnce(args: readonly string[], ctx: CallContext, timeoutMs: number): Promise<ExecResult> {
    try {
      return await execTool(this.virshBin, ['-c', this.uri, ...args], { timeoutMs });
    } catch (err) {
      if (err instanceof ExecStartError) {
        const missing = err.code === 'ENOENT';
        throw new HypervisorError(
          missing ? 'unsupported' : 'failed',
          missing
            ? `cannot ${ctx.action}: virsh is not installed (apt-get install libvirt-clients, or npm run stack:up -- libvirt)`
            : `cannot ${ctx.action}: ${err.message}`,
          { command: err.command, domain: ctx.domain, disk: ctx.disk, cause: err },
        );
      }
      throw err;
    }
  }

  private errorFrom(stderr: string, command: readonly string[], ctx: CallContext): HypervisorError {
    const kind = classifyHypervisorError(stderr);
    const said = toolErrorText(stderr) || `virsh exited with an error and printed nothing`;
    const subject = kind.includes('checkpoint') || kind === 'bitmap-exists' ? checkpointErrorSubject(stderr) : {};
    const details = {
      stderr,
      command,
      domain: ctx.domain,
      disk: subject.disk ?? ctx.disk,
      checkpoint: subject.checkpoint ?? ctx.checkpoint,
    };
    if (kind === 'checkpoint-inconsistent') {
      return new HypervisorError(
        kind,
        `cannot ${ctx.action}: the dirty bitmap of checkpoint ${details.checkpoint ?? '?'} on disk ${details.disk ?? '?'} ` +
          `is missing or inconsistent: QEMU stopped without saving it, or the disk was not in that checkpoint (virsh: ${said})`,
        details,
      );
    }
    if (kind === 'bitmap-exists') {
      return new HypervisorError(
        kind,
        `cannot ${ctx.action}: a disk already holds a dirty bitmap named ${details.checkpoint ?? '?'} that libvirt has no checkpoint for ` +
          `(its metadata was lost); redefine that checkpoint and delete it, or use another name (virsh: ${said})`,
        details,
      );
    }
    if (kind === 'unreachable') {
      return new HypervisorError(
        kind,
        `cannot ${ctx.action}: libvirt is not reachable at ${this.uri} (${said}); is libvirtd running?`,
        details,
      );
    }
    if (kind === 'not-found' && ctx.domain && /failed to get domain|domain not found|no domain with/i.test(stderr)) {
      return new HypervisorError(
        kind,
        `domain "${ctx.domain}" does not exist on ${this.uri} (virsh: ${said})`,
        details,
      );
    }
    if (kind === 'not-found' && ctx.disk) {
      return new HypervisorError(kind, `domain "${ctx.domain}" has no disk ${ctx.disk} (virsh: ${said})`, details);
    }
    return new HypervisorError(kind, `cannot ${ctx.action}: ${said}`, details);
  }

  async versions(): Promise<{ libvirt: string; qemu: string }> {
    return parseVersions(await this.virsh(['version'], { action: 'read the libvirt and QEMU versions' }));
  }

  async listDomains(): Promise<string[]> {
    const out = await this.virsh(['list', '--all', '--name'], { action: 'list the domains' });
    return out
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '');
  }

  async state(domain: string): Promise<DomainState> {
    validateDomainName(domain);
    const out = await this.virsh(['domstate', domain], { action: `read the state of domain "${domain}"`, domain });
    return parseDomainState(out);
  }

  async domainXml(domain: string, opts: { inactive?: boolean } = {}): Promise<string> {
    validateDomainName(domain);
    return this.virsh(['dumpxml', domain, ...(opts.inactive ? ['--inactive'] : [])], {
      action: `read the XML of domain "${domain}"`,
      domain,
    });
  }

  async defineDomain(xml: string): Promise<void> {
    const { name } = parseDomainXml(xml);
    validateDomainName(name);
    const dir = await mkdtemp(join(tmpdir(), 'vmbackup-domain-xml-'));
    try {
      const file = join(dir, 'domain.xml');
      await writeFile(file, xml, { mode: 0o600 });
      await this.virsh(['define', file, '--validate'], { action: `define domain "${name}"`, domain: name });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  async startDomain(domain: string): Promise<void> {
    validateDomainName(domain);
    await this.virsh(['start', domain], { action: `start domain "${domain}"`, domain });
  }

  async undefineDomain(domain: string, opts: { nvram?: boolean; tpm?: boolean } = {}): Promise<boolean> {
    validateDomainName(domain);
    try {
      await this.virsh(
        [
          'undefine',
          domain,
          '--checkpoints-metadata',
          '--snapshots-metadata',
          ...(opts.nvram ? ['--nvram'] : []),
          ...(opts.tpm ? ['--tpm'] : []),
        ],
        { action: `undefine domain "${domain}"`, domain },
      );
      return true;
    } catch (err) {
      if (err instanceof HypervisorError && err.kind === 'not-found') return false;
      throw err;
    }
  }

  async vmState(domain: string): Promise<VmState> {
    const xml = await this.domainXml(domain, { inactive: true });
    return vmStateOf(xml);
  }

  private async parsedXml(domain: string): Promise<DomainXml> {
    return parseDomainXml(await this.domainXml(domain));
  }

  async inspect(domain: string, opts: { includeAllDisks?: boolean } = {}): Promise<DomainInfo> {
    validateDomainName(domain);
    const [xml, state, versions] = await Promise.all([this.parsedXml(domain), this.state(domain), this.versions()]);
    const includeAll = opts.includeAllDisks ?? false;

    const chosen: XmlDisk[] = [];
    const skipped: SkippedDisk[] = [];
    for (const disk of xml.disks) {
      const reason = skipReason(disk, includeAll);
      if (reason) {
        skipped.push({ name: disk.target, reason });
        continue;
      }
      if (disk.type !== 'file' && disk.type !== 'block') {
        throw new HypervisorError(
          'unsupported',
          `disk ${disk.target} of domain "${domain}" is a ${describeSource(disk)}: vmbackup backs up file and block disks only ` +
            `(mark it <readonly/> or <shareable/> to leave it out)`,
          { domain, disk: disk.target },
        );
      }
      chosen.push(disk);
    }

    const disks = await Promise.all(chosen.map((d) => this.diskInfo(domain, d)));
    return {
      domain: xml.name,
      uuid: xml.uuid,
      state,
      disks,
      skipped,
      libvirtVersion: versions.libvirt,
      qemuVersion: versions.qemu,
      backupApi:
        versionAtLeast(versions.libvirt, MIN_LIBVIRT_FOR_BACKUP) && versionAtLeast(versions.qemu, MIN_QEMU_FOR_BACKUP),
      hasGuestAgent: xml.hasGuestAgentChannel,
    };
  }

  async disks(domain: string): Promise<DiskInfo[]> {
    validateDomainName(domain);
    const xml = await this.parsedXml(domain);
    return Promise.all(xml.disks.map((d) => this.diskInfo(domain, d)));
  }

  /**
   * Sizes from QEMU (`domblkinfo`), backing chain from the live XML or, when inactive, qemu-img. Not from
   * `domstats --block`, which would save this second round: on a running domain its allocation is the highest
   * written offset (0 on an untouched disk) and its physical is what domblkinfo calls allocation.
   */
  private async diskInfo(domain: string, disk: XmlDisk): Promise<DiskInfo> {
    const info: DiskInfo = {
      name: disk.target,
      source: disk.source ?? '',
      format: disk.format ?? 'raw',
      device: disk.device,
      readonly: disk.readonly,
      shareable: disk.shareable,
      virtualSize: 0,
      allocation: 0,
      backingChain: [],
      ...(disk.iothread ? { iothread: true } : {}),
    };
    const local = disk.type === 'file' || disk.type === 'block';
    if (!disk.source || !local) return info;

    const sizes = parseDomBlkInfo(
      await this.virsh(['domblkinfo', domain, disk.target], {
        action: `read the size of disk ${disk.target} of domain "${domain}"`,
        domain,
        disk: disk.target,
      }),
    );
    info.virtualSize = sizes.capacity;
    info.allocation = sizes.allocation;
    if (disk.backingChain) {
      info.backingChain = disk.backingChain.map((b) => b.path ?? '').filter((p) => p.length > 0);
    } else if (disk.format === 'qcow2') {
      const image = await imageInfo(disk.source, { format: 'qcow2', backingChain: true, forceShare: true });
      info.backingChain = (image.chain ?? []).map((i) => i.filename);
    }
    return info;
  }

  async beginPushBackup(domain: string, targets: BackupTargetSpec[], opts: PushBackupOptions = {}): Promise<void> {
    validateDomainName(domain);
    if (targets.length === 0) {
      throw new HypervisorError('invalid', `a push backup of domain "${domain}" needs at least one disk`, { domain });
    }
    const seen = new Set<string>();
    for (const t of targets) {
      validateDiskName(domain, t.disk);
      validateImagePath(domain, t.disk, t.file, 'backup target');
      if (seen.has(t.disk)) {
        throw new HypervisorError('invalid', `disk ${t.disk} of domain "${domain}" is listed twice in the backup`, {
          domain,
          disk: t.disk,
        });
      }
      seen.add(t.disk);
    }
    if (opts.incremental !== undefined) validateCheckpointName(domain, opts.incremental, 'parent checkpoint');
    if (opts.checkpoint) validateCheckpointName(domain, opts.checkpoint.name);
    for (const d of [...(opts.checkpoint?.disks ?? []), ...(opts.fullDisks ?? [])]) validateDiskName(domain, d);
    for (const d of opts.fullDisks ?? []) {
      if (!seen.has(d)) {
        throw new HypervisorError(
          'invalid',
          `disk ${d} of domain "${domain}" cannot be copied whole in this backup: it is not one of the disks backed up`,
          { domain, disk: d },
        );
      }
    }

    const all = opts.disks ?? (await this.parsedXml(domain)).disks.map((d) => d.target);
    for (const d of [...seen, ...(opts.checkpoint?.disks ?? [])]) {
      if (!all.includes(d)) {
        throw new HypervisorError('not-found', `domain "${domain}" has no disk ${d} (it has ${all.join(', ')})`, {
          domain,
          disk: d,
        });
      }
    }

    const disks = targets.map((t) => t.disk).join(', ');
    const what =
      opts.incremental === undefined ? 'push backup' : `incremental push backup from checkpoint ${opts.incremental}`;
    await this.backupBegin(
      domain,
      pushBackupXml(targets, all, { incremental: opts.incremental, fullDisks: opts.fullDisks }),
      opts.checkpoint,
      all,
      { action: `start the ${what} of domain "${domain}" (${disks})`, checkpoint: opts.incremental },
    );
  }

  async beginPullBackup(domain: string, opts: PullBackupOptions): Promise<void> {
    validateDomainName(domain);
    if (opts.disks.length === 0) {
      throw new HypervisorError('invalid', `a pull backup of domain "${domain}" needs at least one disk`, { domain });
    }
    // eslint-disable-next-line no-control-regex
    if (!isAbsolute(opts.socket) || /[\u0000-\u001f]/.test(opts.socket) || opts.socket.length > 100) {
      throw new HypervisorError(
        'invalid',
        `the NBD socket of a pull backup of domain "${domain}" must be an absolute path of at most 100 bytes without control characters, not ${JSON.stringify(opts.socket)}`,
        { domain },
      );
    }
    const seen = new Set<string>();
    for (const d of opts.disks) {
      validateDiskName(domain, d.dev);
      validateImagePath(domain, d.dev, d.scratch, 'scratch');
      if (seen.has(d.dev)) {
        throw new HypervisorError('invalid', `disk ${d.dev} of domain "${domain}" is listed twice in the backup`, {
          domain,
          disk: d.dev,
        });
      }
      seen.add(d.dev);
    }
    if (opts.incremental !== undefined) validateCheckpointName(domain, opts.incremental, 'parent checkpoint');
    if (opts.checkpoint) validateCheckpointName(domain, opts.checkpoint.name);
    for (const d of [...(opts.checkpoint?.disks ?? []), ...(opts.fullDisks ?? [])]) validateDiskName(domain, d);
    const all = opts.allDisks ?? (await this.parsedXml(domain)).disks.map((d) => d.target);
    for (const d of [...seen, ...(opts.checkpoint?.disks ?? [])]) {
      if (!all.includes(d)) {
        throw new HypervisorError('not-found', `domain "${domain}" has no disk ${d} (it has ${all.join(', ')})`, {
          domain,
          disk: d,
        });
      }
    }
    const what =
      opts.incremental === undefined ? 'pull backup' : `incremental pull backup from checkpoint ${opts.incremental}`;
    await this.backupBegin(domain, pullBackupXml(opts.socket, opts.disks, all, opts), opts.checkpoint, all, {
      action: `start the ${what} of domain "${domain}" (${[...seen].join(', ')})`,
      checkpoint: opts.incremental,
    });
  }

  /** `backup-begin DOMAIN backup.xml [checkpoint.xml]`, the XML files private and removed afterwards. */
  private async backupBegin(
    domain: string,
    backupXml: string,
    checkpoint: CheckpointSpec | undefined,
    all: string[],
    ctx: { action: string; checkpoint: string | undefined },
  ): Promise<void> {
    const dir = await mkdtemp(join(tmpdir(), 'vmbackup-backup-xml-'));
    try {
      const backupFile = join(dir, 'backup.xml');
      await writeFile(backupFile, backupXml, { mode: 0o600 });
      const args = ['backup-begin', domain, backupFile];
      if (checkpoint) {
        const checkpointFile = join(dir, 'checkpoint.xml');
        await writeFile(checkpointFile, checkpointCreateXml(checkpoint.name, checkpoint.disks, all), { mode: 0o600 });
        args.push(checkpointFile);
      }
      await this.virsh(args, { action: ctx.action, domain, checkpoint: ctx.checkpoint });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  async jobInfo(domain: string): Promise<JobInfo> {
    validateDomainName(domain);
    const out = await this.virsh(['domjobinfo', domain, '--rawstats'], {
      action: `read the running job of domain "${domain}"`,
      domain,
    });
    return parseJobInfo(out);
  }

  async completedJobInfo(domain: string): Promise<JobInfo> {
    validateDomainName(domain);
    // plain --completed forgets the statistics after one read
    const out = await this.virsh(['domjobinfo', domain, '--completed', '--keep-completed', '--rawstats'], {
      action: `read the last completed job of domain "${domain}"`,
      domain,
    });
    return parseJobInfo(out);
  }

  async abortJob(domain: string): Promise<void> {
    validateDomainName(domain);
    try {
      await this.virsh(['domjobabort', domain], { action: `abort the job of domain "${domain}"`, domain });
    } catch (err) {
      // "Requested operation is not valid: no job is active on the domain"
      if (err instanceof HypervisorError && err.kind === 'no-job') return;
      throw err;
    }
  }

  async backupJob(domain: string): Promise<RunningBackupJob | undefined> {
    validateDomainName(domain);
    let out: string;
    try {
      out = await this.virsh(['backup-dumpxml', domain], {
        action: `read the backup job of domain "${domain}"`,
        domain,
      });
    } catch (err) {
      // "Domain backup job id not found: no domain backup job present" (also for a domain that is not running)
      if (err instanceof HypervisorError && (err.kind === 'no-job' || err.kind === 'not-running')) return undefined;
      throw err;
    }
    return parseBackupJobXml(out);
  }

  async createOverlays(domain: string, overlays: OverlaySpec[], opts: { quiesce: boolean }): Promise<void> {
    validateDomainName(domain);
    if (overlays.length === 0) {
      throw new HypervisorError('invalid', `an overlay snapshot of domain "${domain}" needs at least one disk`, {
        domain,
      });
    }
    for (const o of overlays) {
      validateDiskName(domain, o.disk);
      validateImagePath(domain, o.disk, o.file, 'overlay');
    }
    const xml = await this.parsedXml(domain);
    const all = xml.disks.map((d) => d.target);
    const missing = overlays.find((o) => !all.includes(o.disk));
    if (missing) {
      throw new HypervisorError(
        'not-found',
        `domain "${domain}" has no disk ${missing.disk} (it has ${all.join(', ')})`,
        { domain, disk: missing.disk },
      );
    }
    const listed = new Set(overlays.map((o) => o.disk));
    const args = [
      'snapshot-create-as',
      '--domain',
      domain,
      '--name',
      `vmbackup-overlay-${Date.now()}`,
      '--disk-only',
      '--atomic',
      '--no-metadata',
      ...(opts.quiesce ? ['--quiesce'] : []),
    ];
    for (const o of overlays) args.push('--diskspec', `${o.disk},snapshot=external,file=${diskspecValue(o.file)}`);
    // Without an explicit snapshot=no libvirt would snapshot every other disk too.
    for (const d of all) if (!listed.has(d)) args.push('--diskspec', `${d},snapshot=no`);
    await this.virsh(args, {
      action: `create ${opts.quiesce ? 'quiesced ' : ''}overlays for domain "${domain}" (${overlays.map((o) => o.disk).join(', ')})`,
      domain,
    });
  }

  async startActiveCommit(domain: string, disk: string): Promise<void> {
    validateDomainName(domain);
    validateDiskName(domain, disk);
    // --shallow: commit the overlay into its immediate backing file only. Without it libvirt commits
    // into the bottom of the chain: a disk based on a template image would be merged into the template
    // and the domain left running on the template.
    await this.virsh(['blockcommit', domain, disk, '--active', '--shallow'], {
      action: `start committing the overlay of disk ${disk} of domain "${domain}"`,
      domain,
      disk,
    });
  }

  async blockJobInfo(domain: string, disk: string): Promise<BlockJobInfo> {
    validateDomainName(domain);
    validateDiskName(domain, disk);
    // virsh --raw does not print the ready flag; the live XML has it as <mirror ready='yes'>. The XML is read
    // first: a job that turns ready between the two reads must not be reported ready with the progress read
    // before (cur < end), and once ready the progress read after it has cur = end unless the guest writes.
    const mirror = (await this.parsedXml(domain)).disks.find((d) => d.target === disk)?.mirror;
    const out = await this.virsh(['blockjob', domain, disk, '--raw'], {
      action: `read the block job of disk ${disk} of domain "${domain}"`,
      domain,
      disk,
    });
    const job = parseBlockJobRaw(out);
    return { ...job, ready: job.type !== undefined && (mirror?.ready ?? false) };
  }

  async pivot(domain: string, disk: string): Promise<void> {
    validateDomainName(domain);
    validateDiskName(domain, disk);
    // not ready yet: "block copy still active: block job '...' not ready for pivot yet" (kind not-ready)
    await this.virsh(['blockjob', domain, disk, '--pivot'], {
      action: `pivot disk ${disk} of domain "${domain}" back to its base image`,
      domain,
      disk,
    });
  }

  async abortBlockJob(domain: string, disk: string): Promise<void> {
    validateDomainName(domain);
    validateDiskName(domain, disk);
    try {
      await this.virsh(['blockjob', domain, disk, '--abort'], {
        action: `abort the block job of disk ${disk} of domain "${domain}"`,
        domain,
        disk,
      });
    } catch (err) {
      // "invalid argument: disk vda does not have an active block job"
      if (err instanceof HypervisorError && err.kind === 'no-job') return;
      throw err;
    }
  }

  async startBlockPull(domain: string, disk: string, opts: { bandwidthMiB?: number } = {}): Promise<void> {
    validateDomainName(domain);
    validateDiskName(domain, disk);
    const bw = opts.bandwidthMiB;
    if (bw !== undefined && !(Number.isInteger(bw) && bw > 0)) {
      throw new HypervisorError('invalid', `a block pull bandwidth must be a whole number of MiB/s, not ${bw}`, {
        domain,
        disk,
      });
    }
    await this.virsh(['blockpull', domain, disk, ...(bw !== undefined ? ['--bandwidth', String(bw)] : [])], {
      action: `start pulling the backing chain of disk ${disk} of domain "${domain}" into its image`,
      domain,
      disk,
    });
  }

  async removeDomain(domain: string): Promise<void> {
    validateDomainName(domain);
    const gone = (err: unknown): boolean =>
      err instanceof HypervisorError && (err.kind === 'not-found' || /domain is not running/i.test(err.stderr ?? ''));
    await this.virsh(['destroy', domain], { action: `stop domain "${domain}"`, domain }).catch((err: unknown) => {
      if (!gone(err)) throw err;
    });
    await this.virsh(['undefine', domain, '--nvram', '--tpm'], { action: `undefine domain "${domain}"`, domain }).catch(
      (err: unknown) => {
        if (!gone(err)) throw err;
      },
    );
  }

  // ---------------------------------------------------------------------------------------- checkpoints

  async listCheckpoints(domain: string): Promise<Checkpoint[]> {
    validateDomainName(domain);
    const action = `list the checkpoints of domain "${domain}"`;
    // --topological: parents before children, the order in which redefinitions are accepted
    const names = (await this.virsh(['checkpoint-list', domain, '--name', '--topological'], { action, domain }))
      .split('\n')
      .map((n) => n.trim())
      .filter((n) => n.length > 0);
    if (names.length === 0) return [];
    for (const n of names) {
      if (!CHECKPOINT_NAME_RE.test(n)) {
        const said = `libvirt listed ${JSON.stringify(n)}, not a checkpoint name`;
        throw new HypervisorError('failed', `cannot ${action}: ${said}`, { domain });
      }
    }
    // Each checkpoint-dumpxml goes to a virsh session when one is free (~1 ms each); the others run in one virsh
    // process (virsh's own `;`-separated commands, ~1 ms each after the process's ~25 ms start). A checkpoint
    // deleted since the listing ("no domain checkpoint with matching name") is left out, any other error fails
    // the listing; in the one process a failed command does not stop the next ones.
    const xmls: string[] = [];
    const rest: string[] = [];
    for (const n of names) {
      const args = ['checkpoint-dumpxml', '--domain', domain, '--checkpointname', n, '--no-domain'];
      const r = await this.sessions?.run(args, this.timeoutMs);
      if (!r) rest.push(n);
      else if (r.code === 0) xmls.push(r.stdout);
      else if (!CHECKPOINT_DELETED.test(r.stderr)) throw this.errorFrom(r.stderr, r.command, { action, domain });
    }
    if (rest.length > 0) xmls.push(await this.checkpointXmlsOnce(domain, rest, action));
    const byName = new Map(parseCheckpointXmls(xmls.join('\n')).map((c) => [c.name, c]));
    return names.flatMap((n) => byName.get(n) ?? []);
  }

  /** `checkpoint-dumpxml --no-domain` of every name in ONE virsh process; a name deleted meanwhile prints nothing. */
  private async checkpointXmlsOnce(domain: string, names: string[], action: string): Promise<string> {
    const line = names
      .map(
        (n) => `checkpoint-dumpxml --domain ${quoteVirshArg(domain)} --checkpointname ${quoteVirshArg(n)} --no-domain`,
      )
      .join(' ; ');
    const result = await this.runOnce([line], { action, domain }, this.timeoutMs);
    if (result.timedOut) {
      throw new HypervisorError(
        'failed',
        `cannot ${action}: virsh did not answer within ${Math.round(this.timeoutMs / 1000)} s`,
        {
          command: result.command,
          stderr: result.stderr,
          domain,
        },
      );
    }
    // the exit status is the last command's: a checkpoint deleted meanwhile may have set it
    const errors = result.stderr.split('\n').filter((l) => /^error:/i.test(l.trim()));
    const otherErrors = errors.filter((l) => !CHECKPOINT_DELETED.test(l));
    if (otherErrors.length > 0 || (result.code !== 0 && errors.length === 0)) {
      throw this.errorFrom(otherErrors.join('\n') || result.stderr, result.command, { action, domain });
    }
    return result.stdout;
  }

  async checkpointXml(domain: string, name: string): Promise<string> {
    validateDomainName(domain);
    validateCheckpointName(domain, name);
    return this.virsh(['checkpoint-dumpxml', '--domain', domain, '--checkpointname', name, '--no-domain'], {
      action: `read checkpoint ${name} of domain "${domain}"`,
      domain,
      checkpoint: name,
    });
  }

  async checkpointBitmaps(
    domain: string,
    name: string,
    opts: { disks?: string[] } = {},
  ): Promise<CheckpointBitmapState[]> {
    validateDomainName(domain);
    validateCheckpointName(domain, name);
    // --size merges the checkpoint's bitmaps into a temporary one to count them and leaves out the size of every
    // disk whose bitmap fails the check backup-begin makes (qemuBlockBitmapChainIsValid): missing, or
    // inconsistent after QEMU was killed. No job is started and nothing is changed.
    const out = await this.virsh(
      ['checkpoint-dumpxml', '--domain', domain, '--checkpointname', name, '--no-domain', '--size'],
      {
        action: `check the bitmaps of checkpoint ${name} of domain "${domain}"`,
        domain,
        checkpoint: name,
      },
    );
    const checkpoint = parseCheckpointXml(out);
    const present = new Set(opts.disks ?? (await this.parsedXml(domain)).disks.map((d) => d.target));
    return checkpoint.disks.map((d): CheckpointBitmapState => {
      if (d.checkpoint === 'no') return { disk: d.name, state: 'no-bitmap' };
      if (!present.has(d.name)) return { disk: d.name, state: 'no-disk' };
      if (d.size === undefined) return { disk: d.name, state: 'broken' };
      return { disk: d.name, state: 'ok', changedBytes: d.size };
    });
  }

  async deleteCheckpoint(domain: string, name: string, opts: { metadataOnly?: boolean } = {}): Promise<boolean> {
    validateDomainName(domain);
    validateCheckpointName(domain, name);
    const args = ['checkpoint-delete', '--domain', domain, '--checkpointname', name];
    if (opts.metadataOnly) args.push('--metadata');
    const ctx = {
      action: `delete ${opts.metadataOnly ? 'the metadata of ' : ''}checkpoint ${name} of domain "${domain}"`,
      domain,
      checkpoint: name,
    };
    // libvirt removes every disk's bitmap in one QEMU transaction, and refuses all of them when one is missing
    // ("bitmap 'c2' not found in backing chain of 'vda'": QEMU was killed before it stored a bitmap made since
    // it started). Such a disk is redefined as checkpoint='no' and the delete tried again, once per disk at most
    // (a disk already 'no' ends the loop).
    for (;;) {
      try {
        await this.virsh(args, ctx);
        return true;
      } catch (err) {
        if (!(err instanceof HypervisorError)) throw err;
        if (err.kind === 'checkpoint-not-found') return false;
        if (opts.metadataOnly || err.kind !== 'checkpoint-inconsistent' || !err.disk) throw err;
        const checkpoint = parseCheckpointXml(await this.checkpointXml(domain, name));
        const disk = checkpoint.disks.find((d) => d.name === err.disk && d.checkpoint === 'bitmap');
        if (!disk) throw err;
        disk.checkpoint = 'no';
        delete disk.bitmap;
        await this.redefine(domain, checkpoint, false);
      }
    }
  }

  async redefineCheckpoint(
    domain: string,
    xml: string,
    opts: { validate: boolean; dropParent?: boolean },
  ): Promise<Checkpoint> {
    validateDomainName(domain);
    const parsed = parseCheckpointXml(xml);
    // libvirt names each bitmap after its checkpoint ("bitmap for disk 'vda' must match checkpoint name"): a saved
    // XML that points a checkpoint at another bitmap is not one libvirt wrote, and an incremental from it would
    // hold the changes since some other point in time
    const foreign = parsed.disks.find((d) => d.checkpoint === 'bitmap' && d.bitmap !== parsed.name);
    if (foreign) {
      throw new HypervisorError(
        'invalid',
        `cannot redefine checkpoint ${parsed.name} of domain "${domain}": its XML gives disk ${foreign.name} the bitmap ${foreign.bitmap ?? '?'}, not ${parsed.name}`,
        { domain, disk: foreign.name, checkpoint: parsed.name },
      );
    }
    const checkpoint: Checkpoint = {
      name: parsed.name,
      creationTime: parsed.creationTime,
      disks: parsed.disks.map((d) =>
        d.checkpoint === 'no'
          ? { name: d.name, checkpoint: 'no' }
          : { name: d.name, checkpoint: 'bitmap', bitmap: d.bitmap },
      ),
    };
    if (parsed.parent !== undefined && !opts.dropParent) checkpoint.parent = parsed.parent;
    await this.redefine(domain, checkpoint, opts.validate);
    return checkpoint;
  }

  private async redefine(domain: string, checkpoint: Checkpoint, validate: boolean): Promise<void> {
    const dir = await mkdtemp(join(tmpdir(), 'vmbackup-checkpoint-xml-'));
    try {
      const file = join(dir, 'checkpoint.xml');
      await writeFile(file, checkpointRedefineXml(checkpoint), { mode: 0o600 });
      await this.virsh(
        ['checkpoint-create', domain, file, '--redefine', ...(validate ? ['--redefine-validate'] : [])],
        {
          action: `redefine checkpoint ${checkpoint.name} of domain "${domain}"`,
          domain,
          checkpoint: checkpoint.name,
        },
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
}

function skipReason(disk: XmlDisk, includeAll: boolean): string | undefined {
  if (disk.device === 'cdrom' || disk.device === 'floppy') {
    if (!disk.source) return `${disk.device} drive without media`;
    if (!includeAll) return `${disk.device} (use --include-all-disks to back it up)`;
  }
  if (!includeAll && disk.readonly) return 'read-only disk (use --include-all-disks to back it up)';
  if (!includeAll && disk.shareable) return 'shareable disk (use --include-all-disks to back it up)';
  if (disk.type !== 'file' && disk.type !== 'block' && (disk.readonly || disk.device !== 'disk')) {
    return `${describeSource(disk)}: vmbackup backs up file and block disks only`;
  }
  return undefined;
}

function describeSource(disk: XmlDisk): string {
  if (disk.type === 'network') return `network disk (${disk.source ?? disk.protocol ?? 'unknown source'})`;
  if (disk.device === 'lun') return 'SCSI passthrough (lun) disk';
  return `disk of type '${disk.type}'${disk.source ? ` (${disk.source})` : ''}`;
}
