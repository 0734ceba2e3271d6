/**
 * Domain XML in, typed objects out (fast-xml-parser), and the backup XML we hand to libvirt.
 * Only what vmbackup needs is read: disks (source, format, backing chain, block-job mirror),
 * and the guest agent channel.
 */
import { XMLParser } from 'fast-xml-parser';
import type { BackupTargetSpec } from './port';
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

  const disks: XmlDisk[] = nodes(devices['disk']).map((d) => {
    const type = attr(d, 'type') ?? 'file';
    const source = node(d['source']);
    return {
      target: attr(node(d['target']), 'dev') ?? '',
      bus: attr(node(d['target']), 'bus'),
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
    };
  });

  const channels: XmlChannel[] = nodes(devices['channel']).map((c) => ({
    type: attr(c, 'type'),
    targetType: attr(node(c['target']), 'type'),
    targetName: attr(node(c['target']), 'name'),
  }));

  const id = attr(domain, 'id');
  return {
    name,
    uuid: text(domain['uuid']) ?? '',
    type: attr(domain, 'type') ?? '',
    id: id === undefined ? undefined : Number(id),
    disks,
    channels,
    hasGuestAgentChannel: channels.some((c) => c.targetName === GUEST_AGENT_CHANNEL),
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

/**
 * A push-mode <domainbackup> that backs up exactly `targets`: every other disk of the domain is
 * listed with backup='no', because libvirt backs up an unlisted disk with a generated file name.
 */
export function pushBackupXml(targets: readonly BackupTargetSpec[], allDisks: readonly string[]): string {
  const listed = new Set(targets.map((t) => t.disk));
  const lines = targets.map(
    (t) =>
      `    <disk name='${escapeXmlAttr(t.disk)}' backup='yes' type='file'>` +
      `<target file='${escapeXmlAttr(t.file)}'/><driver type='qcow2'/></disk>`,
  );
  for (const disk of allDisks) {
    if (!listed.has(disk)) lines.push(`    <disk name='${escapeXmlAttr(disk)}' backup='no'/>`);
  }
  return `<domainbackup mode='push'>\n  <disks>\n${lines.join('\n')}\n  </disks>\n</domainbackup>\n`;
}
