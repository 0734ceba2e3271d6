/**
 * Domain XML in, typed objects out (fast-xml-parser), and the backup XML we hand to libvirt.
 * Only what vmbackup needs is read: disks (source, format, backing chain, block-job mirror),
 * and the guest agent channel.
 */
import { XMLParser } from 'fast-xml-parser';
import type { BackupTargetSpec, Checkpoint, CheckpointDisk, RunningBackupJob, VmState } from './port';
import { SWTPM_STATE_ROOT } from './port';
import { HypervisorError } from './errors';

export type DiskDevice = 'disk' | 'cdrom' | 'floppy' | 'lun';

export interface XmlImageRef {
  /** file, block, network, ... */
  type?: string;
  /** file path or block device path; for network sources `protocol:name` */
  path?: string;
  format?: string;
}

export interface XmlDisk {
  /** target dev, e.g. vda */
  target: string;
  bus?: string;
  /** <disk type=...>: file, block, network, volume, dir, nvme, vhostuser */
  type: string;
  device: DiskDevice;
  /** driver type: qcow2, raw, ... */
  format?: string;
  /** file or block device path; `protocol:name` for network disks; `pool/volume` for volumes; absent for an empty cdrom */
  source?: string;
  /** network disks: rbd, nbd, iscsi, gluster, ... */
  protocol?: string;
  readonly: boolean;
  shareable: boolean;
  /** QEMU device alias (live XML only), e.g. virtio-disk0 */
  alias?: string;
  /**
   * Images below `source`, top first, as the live XML tells them. Undefined when the XML does not
   * say (the inactive XML has no <backingStore>); empty for a standalone image.
   */
  backingChain?: XmlImageRef[];
  /** a block job that copies or commits this disk (blockcommit --active, blockcopy) */
  mirror?: { job?: string; ready: boolean; path?: string; format?: string };
  /**
   * its I/O runs in an IOThread: `<driver iothread=N>` or an `<iothreads>` mapping on the disk, or (SCSI) a
   * virtio-scsi controller with an IOThread
   */
  iothread: boolean;
}

export interface XmlChannel {
  type?: string;
  targetType?: string;
  targetName?: string;
}

export interface DomainXml {
  name: string;
  uuid: string;
  /** <domain type=...>: qemu, kvm */
  type: string;
  /** the running domain's id (live XML only) */
  id?: number;
  disks: XmlDisk[];
  channels: XmlChannel[];
  /** a virtio channel named org.qemu.guest_agent.0 (says nothing about an agent listening on it) */
  hasGuestAgentChannel: boolean;
  /** the UEFI variable store's path (<os><nvram>), when the domain has one that names a file */
  nvram?: string;
}

export const GUEST_AGENT_CHANNEL = 'org.qemu.guest_agent.0';

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@',
  parseAttributeValue: false,
  parseTagValue: false,
  trimValues: true,
});

type XmlNode = Record<string, unknown>;

function node(value: unknown): XmlNode | undefined {
  if (value === undefined || value === null) return undefined;
  // <readonly/> parses as '', an element with text only as a string
  if (typeof value !== 'object') return {};
  if (Array.isArray(value)) return node(value[0]);
  return value as XmlNode;
}

function nodes(value: unknown): XmlNode[] {
  if (value === undefined || value === null) return [];
  const list: unknown[] = Array.isArray(value) ? value : [value];
  return list.map((v) => (typeof v === 'object' && v !== null ? (v as XmlNode) : {}));
}

function attr(n: XmlNode | undefined, name: string): string | undefined {
  const v = n?.[`@${name}`];
  return typeof v === 'string' ? v : undefined;
}

function text(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  const n = node(value);
  const t = n?.['#text'];
  return typeof t === 'string' ? t : undefined;
}

function sourceOf(type: string | undefined, source: XmlNode | undefined): string | undefined {
  if (!source) return undefined;
  switch (type) {
    case 'block':
      return attr(source, 'dev');
    case 'dir':
      return attr(source, 'dir');
    case 'network': {
      const protocol = attr(source, 'protocol');
      const name = attr(source, 'name');
      return protocol && name ? `${protocol}:${name}` : (name ?? protocol);
    }
    case 'volume': {
      const pool = attr(source, 'pool');
      const volume = attr(source, 'volume');
      return pool && volume ? `${pool}/${volume}` : undefined;
    }
    default:
      return attr(source, 'file') ?? attr(source, 'dev');
  }
}

function backingChainOf(disk: XmlNode): XmlImageRef[] | undefined {
  if (!('backingStore' in disk)) return undefined;
  const chain: XmlImageRef[] = [];
  let store = node(disk['backingStore']);
  // <backingStore/> (no type) terminates the chain
  while (store && attr(store, 'type') !== undefined) {
    const type = attr(store, 'type');
    chain.push({ type, path: sourceOf(type, node(store['source'])), format: attr(node(store['format']), 'type') });
    store = node(store['backingStore']);
  }
  return chain;
}

function mirrorOf(disk: XmlNode): XmlDisk['mirror'] {
  const mirror = node(disk['mirror']);
  if (!mirror) return undefined;
  const type = attr(mirror, 'type') ?? 'file';
  return {
    job: attr(mirror, 'job'),
    // ready='yes' once the job reached its synchronised phase; 'pivot'/'abort' while concluding
    ready: attr(mirror, 'ready') === 'yes',
    // libvirt < 1.2.6 put the file in an attribute
    path: sourceOf(type, node(mirror['source'])) ?? attr(mirror, 'file'),
    format: attr(node(mirror['format']), 'type') ?? attr(mirror, 'format'),
  };
}

function deviceOf(value: string | undefined): DiskDevice {
  return value === 'cdrom' || value === 'floppy' || value === 'lun' ? value : 'disk';
}

/** Parses `virsh dumpxml` output. Throws HypervisorError (failed) when it is not a domain. */
export function parseDomainXml(xml: string): DomainXml {
  let doc: XmlNode;
  try {
    doc = parser.parse(xml) as XmlNode;
  } catch (err) {
    throw new HypervisorError('failed', `libvirt returned domain XML that cannot be parsed: ${String(err)}`, {
      cause: err,
    });
  }
  const domain = node(doc['domain']);
  const name = text(domain?.['name']);
  if (!domain || !name) {
    throw new HypervisorError('failed', 'libvirt returned XML without a <domain><name>: not a domain description');
  }
  const devices = node(domain['devices']) ?? {};
  // any SCSI controller in an IOThread puts its disks there (which one a disk sits on is not worth resolving here:
  // the answer is only ever used to be careful)
  const scsiIothread = nodes(devices['controller']).some(
    (c) => attr(c, 'type') === 'scsi' && attr(node(c['driver']), 'iothread') !== undefined,
  );

  const disks: XmlDisk[] = nodes(devices['disk']).map((d) => {
    const type = attr(d, 'type') ?? 'file';
    const source = node(d['source']);
    const driver = node(d['driver']);
    const bus = attr(node(d['target']), 'bus');
    return {
      target: attr(node(d['target']), 'dev') ?? '',
      bus,
      type,
      device: deviceOf(attr(d, 'device')),
      format: attr(node(d['driver']), 'type'),
      source: sourceOf(type, source),
      protocol: type === 'network' ? attr(source, 'protocol') : undefined,
      readonly: 'readonly' in d,
      shareable: 'shareable' in d,
      alias: attr(node(d['alias']), 'name'),
      backingChain: backingChainOf(d),
      mirror: mirrorOf(d),
      iothread:
        attr(driver, 'iothread') !== undefined ||
        (driver !== undefined && 'iothreads' in driver) ||
        (bus === 'scsi' && scsiIothread),
    };
  });

  const channels: XmlChannel[] = nodes(devices['channel']).map((c) => ({
    type: attr(c, 'type'),
    targetType: attr(node(c['target']), 'type'),
    targetName: attr(node(c['target']), 'name'),
  }));

  const id = attr(domain, 'id');
  const nvram = text(node(node(domain['os'])?.['nvram']))?.trim();
  return {
    name,
    uuid: text(domain['uuid']) ?? '',
    type: attr(domain, 'type') ?? '',
    id: id === undefined ? undefined : Number(id),
    disks,
    channels,
    hasGuestAgentChannel: channels.some((c) => c.targetName === GUEST_AGENT_CHANNEL),
    ...(nvram ? { nvram } : {}),
  };
}

export function escapeXmlAttr(value: string): string {
  return value
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&apos;');
}

// ------------------------------------------------------------------------------------------ checkpoints

/**
 * libvirt's checkpoint name (domaincheckpoint.rng: "no leading '.' and no embedded '/' or newline"), which
 * QEMU also uses as the dirty bitmap's name (at most 1023 bytes).
 */
export const CHECKPOINT_NAME_RE = /^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,1022}$/;
/** a disk target name, as the domain XML has it (vda, sdb) */
const DISK_TARGET_RE = /^[a-z]+[a-z0-9]*$/;

/**
 * Incremental push backup options. libvirt 9.0 takes a global `<incremental>` and a per-disk
 * `backupmode='full'` (domainbackup.rng): that disk is copied whole, into an image WITHOUT backing file,
 * while the other disks' increments have the LIVE disk as backing file (libvirt's qemu_backup.c: "push mode:
 * full backups: no backing store; incremental: original disk"): whoever keeps an increment must rebase it
 * (`qemu-img rebase -u -F qcow2 -b <parent>`) before anything opens it, or it reads the running disk.
 */
export interface PushBackupXmlOptions {
  /** the parent checkpoint: the listed disks hold only what changed since it */
  incremental?: string;
  /** disks copied whole inside an incremental backup (a disk new to the chain) */
  fullDisks?: readonly string[];
}

/**
 * A push-mode <domainbackup> that backs up exactly `targets`: every other disk of the domain is
 * listed with backup='no', because libvirt backs up an unlisted disk with a generated file name.
 */
export function pushBackupXml(
  targets: readonly BackupTargetSpec[],
  allDisks: readonly string[],
  opts: PushBackupXmlOptions = {},
): string {
  const listed = new Set(targets.map((t) => t.disk));
  const full = new Set(opts.incremental === undefined ? [] : (opts.fullDisks ?? []));
  const lines = targets.map(
    (t) =>
      `    <disk name='${escapeXmlAttr(t.disk)}' backup='yes'${full.has(t.disk) ? ` backupmode='full'` : ''} type='file'>` +
      `<target file='${escapeXmlAttr(t.file)}'/><driver type='qcow2'/></disk>`,
  );
  for (const disk of allDisks) {
    if (!listed.has(disk)) lines.push(`    <disk name='${escapeXmlAttr(disk)}' backup='no'/>`);
  }
  const incremental =
    opts.incremental === undefined ? '' : `  <incremental>${escapeXmlAttr(opts.incremental)}</incremental>\n`;
  return `<domainbackup mode='push'>\n${incremental}  <disks>\n${lines.join('\n')}\n  </disks>\n</domainbackup>\n`;
}

/** A disk of a pull backup: QEMU's copy-before-write scratch file for the guest's writes while the job runs. */
export interface PullDiskSpec {
  /** disk target, e.g. vda: also the NBD export's name */
  dev: string;
  /** absolute path of the qcow2 scratch file libvirt creates (sparse: it grows with the guest's writes) */
  scratch: string;
}

/**
 * A pull-mode <domainbackup>: QEMU serves each listed disk's point-in-time view over NBD on the Unix socket
 * `socket` (export = disk target, dirty bitmap context `qemu:dirty-bitmap:backup-<disk>` with `incremental`), and
 * keeps the old content of blocks the guest overwrites in `scratch`. Every other disk is listed with backup='no'.
 */
export function pullBackupXml(
  socket: string,
  disks: readonly PullDiskSpec[],
  allDisks: readonly string[],
  opts: { incremental?: string; fullDisks?: readonly string[] } = {},
): string {
  const listed = new Set(disks.map((d) => d.dev));
  const full = new Set(opts.incremental === undefined ? [] : (opts.fullDisks ?? []));
  const lines = disks.map(
    (d) =>
      `    <disk name='${escapeXmlAttr(d.dev)}' backup='yes'${full.has(d.dev) ? ` backupmode='full'` : ''} type='file'>` +
      `<scratch file='${escapeXmlAttr(d.scratch)}'/><driver type='qcow2'/></disk>`,
  );
  for (const disk of allDisks) {
    if (!listed.has(disk)) lines.push(`    <disk name='${escapeXmlAttr(disk)}' backup='no'/>`);
  }
  const incremental =
    opts.incremental === undefined ? '' : `  <incremental>${escapeXmlAttr(opts.incremental)}</incremental>\n`;
  return (
    `<domainbackup mode='pull'>\n${incremental}  <server transport='unix' socket='${escapeXmlAttr(socket)}'/>\n` +
    `  <disks>\n${lines.join('\n')}\n  </disks>\n</domainbackup>\n`
  );
}

/**
 * The running backup job `backup-dumpxml` describes. Read by recovery to tell whose job it is, so only the fields
 * that tell it are kept and each is checked: a disk name must be a disk target, a path absolute and free of control
 * characters (one that is not is left out: such a job cannot be attributed to a staging directory of ours). Throws
 * HypervisorError `invalid` when the XML is not one `<domainbackup>` of mode push or pull.
 */
export function parseBackupJobXml(xml: string): RunningBackupJob {
  const bad = (what: string) => new HypervisorError('invalid', `backup job XML ${what}`);
  let doc: XmlNode;
  try {
    doc = parser.parse(xml) as XmlNode;
  } catch (err) {
    throw new HypervisorError('invalid', `backup job XML cannot be parsed: ${String(err)}`, { cause: err });
  }
  const root = doc['domainbackup'];
  if (Array.isArray(root)) throw bad('holds more than one <domainbackup>');
  const backup = node(root);
  if (!backup) throw bad('without <domainbackup>: not a backup job');
  const mode = attr(backup, 'mode') ?? 'push'; // libvirt's default mode
  if (mode !== 'push' && mode !== 'pull') throw bad(`has mode ${JSON.stringify(mode)}`);
  const job: RunningBackupJob = { mode, disks: [] };
  if (mode === 'pull') {
    const server = node(backup['server']);
    const transport = attr(server, 'transport') ?? 'tcp';
    job.transport = transport;
    const socket = attr(server, 'socket');
    if (transport === 'unix' && socket !== undefined && isPlainPath(socket)) job.socket = socket;
  }
  const seen = new Set<string>();
  for (const d of nodes(node(backup['disks'])?.['disk'])) {
    const name = attr(d, 'name') ?? '';
    if (!DISK_TARGET_RE.test(name)) throw bad(`names a disk ${JSON.stringify(name)}: not a disk target such as vda`);
    if (seen.has(name)) throw bad(`lists disk ${name} twice`);
    seen.add(name);
    if ((attr(d, 'backup') ?? 'yes') !== 'yes') continue;
    const where = node(d[mode === 'push' ? 'target' : 'scratch']);
    const file = attr(where, 'file') ?? attr(where, 'dev');
    job.disks.push(file !== undefined && isPlainPath(file) ? { name, file } : { name });
  }
  return job;
}

/** An absolute path without control characters (what a job file of ours always is). */
function isPlainPath(path: string): boolean {
  // eslint-disable-next-line no-control-regex
  return path.startsWith('/') && !/[\u0000-\u001f\u007f]/.test(path);
}

/** A checkpoint disk as `checkpoint-dumpxml --size` reports it. */
export interface XmlCheckpointDisk extends CheckpointDisk {
  /** bytes changed since the checkpoint; libvirt leaves it out when the bitmap is missing or inconsistent */
  size?: number;
}

export interface XmlCheckpoint extends Checkpoint {
  disks: XmlCheckpointDisk[];
}

/**
 * The checkpoint XML given to backup-begin: `bitmapDisks` get checkpoint='bitmap', every other disk of
 * the domain an explicit checkpoint='no'. libvirt 9.0 would give unlisted disks 'no' as soon as one disk
 * is listed, but 'bitmap' to all of them when <disks> is empty, and then refuses a raw disk with
 * "checkpoint for disk vdb unsupported for storage type raw": saying it for each disk leaves no default
 * to depend on.
 */
export function checkpointCreateXml(name: string, bitmapDisks: readonly string[], allDisks: readonly string[]): string {
  const bitmap = new Set(bitmapDisks);
  const lines = allDisks.map(
    (d) => `    <disk name='${escapeXmlAttr(d)}' checkpoint='${bitmap.has(d) ? 'bitmap' : 'no'}'/>`,
  );
  return `<domaincheckpoint>\n  <name>${escapeXmlAttr(name)}</name>\n  <disks>\n${lines.join('\n')}\n  </disks>\n</domaincheckpoint>\n`;
}

function checkpointFailure(what: string): HypervisorError {
  return new HypervisorError('invalid', `checkpoint XML ${what}`);
}

/**
 * Parses one `<domaincheckpoint>` (`checkpoint-dumpxml`, with or without --no-domain and --size) and checks
 * every field it keeps, because a checkpoint XML may come back from a backup target that someone else can
 * write: names must be checkpoint and disk names, the creation time a whole number. Anything else in it
 * (the <domain> copy, a description) is dropped. Throws HypervisorError `invalid` when it is not such XML.
 */
export function parseCheckpointXml(xml: string): XmlCheckpoint {
  let doc: XmlNode;
  try {
    doc = parser.parse(xml) as XmlNode;
  } catch (err) {
    throw new HypervisorError('invalid', `checkpoint XML cannot be parsed: ${String(err)}`, { cause: err });
  }
  const root = doc['domaincheckpoint'];
  if (Array.isArray(root)) throw checkpointFailure('holds more than one <domaincheckpoint>');
  const cp = node(root);
  const name = text(cp?.['name']);
  if (!cp || name === undefined) throw checkpointFailure('without <domaincheckpoint><name>: not a checkpoint');
  if (!CHECKPOINT_NAME_RE.test(name))
    throw checkpointFailure(`names a checkpoint ${JSON.stringify(name)}: not a checkpoint name`);

  const parentNode = node(cp['parent']);
  const parent = parentNode ? text(parentNode['name']) : undefined;
  if (parentNode && (parent === undefined || !CHECKPOINT_NAME_RE.test(parent))) {
    throw checkpointFailure(`of ${name} names a parent ${JSON.stringify(parent ?? '')}: not a checkpoint name`);
  }

  const created = text(cp['creationTime']);
  if (created === undefined || !/^\d{1,15}$/.test(created)) {
    throw checkpointFailure(`of ${name} has no valid <creationTime> (${JSON.stringify(created ?? '')})`);
  }

  const disksNode = node(cp['disks']);
  const seen = new Set<string>();
  const disks: XmlCheckpointDisk[] = nodes(disksNode?.['disk']).map((d) => {
    const diskName = attr(d, 'name') ?? '';
    if (!DISK_TARGET_RE.test(diskName)) {
      throw checkpointFailure(`of ${name} names a disk ${JSON.stringify(diskName)}: not a disk target such as vda`);
    }
    if (seen.has(diskName)) throw checkpointFailure(`of ${name} lists disk ${diskName} twice`);
    seen.add(diskName);
    const mode = attr(d, 'checkpoint') ?? 'bitmap';
    if (mode !== 'bitmap' && mode !== 'no') {
      throw checkpointFailure(`of ${name} has checkpoint=${JSON.stringify(mode)} for disk ${diskName}`);
    }
    if (mode === 'no') return { name: diskName, checkpoint: 'no' };
    const bitmap = attr(d, 'bitmap') ?? name;
    if (!CHECKPOINT_NAME_RE.test(bitmap)) {
      throw checkpointFailure(`of ${name} names a bitmap ${JSON.stringify(bitmap)} for disk ${diskName}`);
    }
    const disk: XmlCheckpointDisk = { name: diskName, checkpoint: 'bitmap', bitmap };
    const size = attr(d, 'size');
    if (size !== undefined && /^\d{1,18}$/.test(size)) disk.size = Number(size);
    return disk;
  });

  const checkpoint: XmlCheckpoint = { name, creationTime: Number(created), disks };
  if (parent !== undefined) checkpoint.parent = parent;
  return checkpoint;
}

/**
 * The XML `checkpoint-create --redefine` takes for `checkpoint`: name, parent, creation time (libvirt
 * refuses a redefinition without one: "missing creationTime from existing checkpoint") and the disks with
 * their bitmaps; no <domain>: a redefinition that carries one must have the domain's current UUID
 * ("definition for checkpoint c0 must use uuid ..."), which a domain defined again has changed. libvirt
 * refuses a parent it does not know ("parent c1 for moment c2 not found"): redefine parents first, and
 * leave `parent` out for a checkpoint whose parent is gone.
 */
export function checkpointRedefineXml(checkpoint: Checkpoint): string {
  const e = escapeXmlAttr;
  const disks = checkpoint.disks.map((d) =>
    d.checkpoint === 'no'
      ? `    <disk name='${e(d.name)}' checkpoint='no'/>`
      : `    <disk name='${e(d.name)}' checkpoint='bitmap' bitmap='${e(d.bitmap ?? checkpoint.name)}'/>`,
  );
  const parent =
    checkpoint.parent === undefined ? '' : `  <parent>\n    <name>${e(checkpoint.parent)}</name>\n  </parent>\n`;
  return (
    `<domaincheckpoint>\n  <name>${e(checkpoint.name)}</name>\n${parent}` +
    `  <creationTime>${checkpoint.creationTime}</creationTime>\n` +
    `  <disks>\n${disks.join('\n')}\n  </disks>\n</domaincheckpoint>\n`
  );
}

/**
 * Several `checkpoint-dumpxml` outputs printed one after the other (one virsh run with several commands):
 * each `<domaincheckpoint>...</domaincheckpoint>` document, parsed.
 */
export function parseCheckpointXmls(output: string): XmlCheckpoint[] {
  const docs = output.match(/<domaincheckpoint>[\s\S]*?<\/domaincheckpoint>/g) ?? [];
  return docs.map((d) => parseCheckpointXml(d));
}

// ------------------------------------------------------------------------------------------ whole-VM state

/** What a domain's definition says about its firmware variable store and its TPM (whole-VM backups). */
export interface VmStateXml {
  name: string;
  uuid: string;
  /** `<os><nvram>`: the file QEMU keeps the UEFI variables in (libvirt 9.0: its text; newer: `<source file>`) */
  nvram?: { path: string };
  /** the first `<tpm>` with an emulator backend (swtpm) */
  tpm?: {
    version: '1.2' | '2.0';
    /** `<backend><source type='dir' path=...>` (libvirt >= 10.10); absent: libvirt's default `<swtpm dir>/<uuid>` */
    stateDir?: string;
  };
  /** a TPM whose state vmbackup cannot read (passthrough of a host TPM, a state kept in one file): why */
  unsupportedTpm?: string;
}

/**
 * Parses the (inactive) domain XML for its NVRAM file and emulated TPM. Throws HypervisorError (failed) when it
 * is not a domain, like parseDomainXml.
 */
export function parseVmStateXml(xml: string): VmStateXml {
  const { name, uuid } = parseDomainXml(xml);
  const domain = node((parser.parse(xml) as XmlNode)['domain']) ?? {};
  const out: VmStateXml = { name, uuid };
  const nvram = node(node(domain['os'])?.['nvram']);
  if (nvram) {
    const type = attr(nvram, 'type');
    const path =
      type === undefined || type === 'file'
        ? (text(node(domain['os'])?.['nvram']) ?? attr(node(nvram['source']), 'file'))
        : undefined;
    if (path) out.nvram = { path };
  }
  const devices = node(domain['devices']) ?? {};
  for (const tpm of nodes(devices['tpm'])) {
    const backend = node(tpm['backend']);
    const type = attr(backend, 'type');
    if (type !== 'emulator') {
      out.unsupportedTpm = `its TPM has a ${type ?? 'missing'} backend (only an emulated TPM's state can be backed up)`;
      continue;
    }
    const version = attr(backend, 'version') ?? '1.2'; // libvirt's default for an emulator without a version
    if (version !== '1.2' && version !== '2.0') {
      out.unsupportedTpm = `its TPM has version ${version}`;
      continue;
    }
    const source = node(backend?.['source']);
    if (source && attr(source, 'type') !== 'dir') {
      out.unsupportedTpm = `its TPM keeps its state in a ${attr(source, 'type') ?? 'untyped'} source, not a directory`;
      continue;
    }
    const stateDir = source ? attr(source, 'path') : undefined;
    out.tpm = { version, ...(stateDir ? { stateDir } : {}) };
    delete out.unsupportedTpm;
    break;
  }
  return out;
}

/** The typed whole-VM state of a domain from its inactive XML (the TPM directory resolved to libvirt's default). */
export function vmStateOf(xml: string): VmState {
  const parsed = parseVmStateXml(xml);
  return {
    xml,
    name: parsed.name,
    uuid: parsed.uuid,
    ...(parsed.nvram ? { nvram: parsed.nvram } : {}),
    ...(parsed.tpm
      ? { tpm: { version: parsed.tpm.version, stateDir: parsed.tpm.stateDir ?? `${SWTPM_STATE_ROOT}/${parsed.uuid}` } }
      : {}),
    ...(parsed.unsupportedTpm ? { unsupportedTpm: parsed.unsupportedTpm } : {}),
  };
}
