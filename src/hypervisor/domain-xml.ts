/**
 * The domain XML a backup stored, rewritten into the definition a restore gives libvirt: a new name and UUID, the
 * restored disks, NVRAM and logs in their new places, new MAC addresses. The stored XML is data someone else may
 * have written (a bucket others can write, a manifest nobody signed), and libvirt runs what it describes as root
 * beside every other VM's disks, so anything in it that would run a host command, read or write a host file, or
 * reach a host device or socket is refused with one sentence (HypervisorError kind 'invalid'), and the rest of the
 * XML is kept as it was, in order, comments included. docs/security.md lists the rules and why.
 *
 * Parsing is fast-xml-parser with preserveOrder; entities are decoded here (the five named ones and character
 * references, nothing else: no DOCTYPE, no entity of the document's own), so the values checked are the values
 * written back out, escaped again by the builder.
 */
import { realpathSync, statSync } from 'node:fs';
import { isAbsolute, normalize, sep } from 'node:path';
import { XMLBuilder, XMLParser, XMLValidator } from 'fast-xml-parser';
import { DOMAIN_NAME_RE } from '../shared/names';
import { HypervisorError } from './errors';

export interface DomainRewrite {
  /** the new domain name (DOMAIN_NAME_RE) */
  name: string;
  /** the new UUID (crypto.randomUUID()), or the original one for --replace */
  uuid: string;
  /** keep the <mac address> of every interface; otherwise each gets a new 52:54:00:xx:xx:xx (libvirt picks when left out) */
  keepMacs: boolean;
  /** by disk target dev: the new source of every disk that was backed up (file disks; type='file') */
  disks: Record<string, { path: string; format: 'qcow2' | 'raw' }>;
  /** where the restored NVRAM file is (the domain had <nvram>); undefined: the domain has none */
  nvramPath?: string;
  /** directory for file-backed serial/console logs of the new domain (so it never appends to the original's log) */
  logDir?: string;
  /**
   * directories besides SYSTEM_BOOT_DIRS from which the definition may keep host files (a direct-boot kernel and
   * initrd, a firmware image, an option ROM): the operator's word, never the XML's
   */
  bootDirs?: readonly string[];
}

/** What a rewrite did beside the XML, for the restore to report. */
export interface RewrittenDomain {
  xml: string;
  /** cdrom/floppy drives whose media was not restored: left empty ("dev: path") */
  ejected: string[];
  /** the log and socket files the new definition names in logDir */
  logFiles: string[];
  /** host files the definition keeps (kernel, initrd, loader, NVRAM template, option ROMs), each checked */
  keptHostFiles: string[];
}

/**
 * Where a kept host file (kernel, initrd, dtb, firmware, NVRAM template, option ROM, ACPI table) may live: the
 * distribution's firmware and kernel packages and libvirt's own directory for direct-boot kernels. Not /boot: a
 * host's initramfs may hold disk keys.
 */
export const SYSTEM_BOOT_DIRS: readonly string[] = [
  '/usr/share',
  '/usr/lib',
  '/usr/lib64',
  '/usr/local/share',
  '/usr/local/lib',
  '/var/lib/libvirt/boot',
];

/** Children of <devices> a restore keeps (each with its own rules below); anything else is refused. */
const KEPT_DEVICES = new Set([
  'disk',
  'controller',
  'interface',
  'serial',
  'parallel',
  'console',
  'channel',
  'input',
  'graphics',
  'video',
  'sound',
  'audio',
  'watchdog',
  'memballoon',
  'rng',
  'panic',
  'tpm',
  'vsock',
  'iommu',
  'redirdev',
  'redirfilter',
  'hub',
  'crypto',
  'memory',
  'nvram',
]);

/** Why a device is refused, for the one sentence. */
const REFUSED_DEVICES: Record<string, string> = {
  hostdev: 'passes a host device through (<hostdev>)',
  filesystem: 'shares a host directory with the guest (<filesystem>)',
  smartcard: "gives the guest the host's smartcard readers or certificates (<smartcard>)",
  shmem: 'maps shared memory of the host (<shmem>)',
  lease: 'takes a lock-manager lease on a host file (<lease>)',
  pstore: 'writes a host file (<pstore>)',
};

const INTERFACE_TYPES = new Set(['network', 'bridge', 'direct', 'user', 'ethernet', 'mcast', 'server', 'null']);
const RNG_DEVICES = new Set(['/dev/random', '/dev/urandom', '/dev/hwrng']);
const DISK_TARGET_RE = /^[a-z]+[a-z0-9]*$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const QEMU_NAMESPACE_RE = /libvirt\.org\/schemas\/domain\/qemu/i;
/** deeper than any domain XML libvirt writes (backing chains are not in an inactive XML) */
const MAX_DEPTH = 64;
const MAX_XML_CHARS = 4 << 20;

// ------------------------------------------------------------------------------------------ the tree

/** preserveOrder nodes: an element `{ tag: children, ':@': attributes }`, a text `{ '#text': s }`, a comment. */
type XmlNode = Record<string, unknown>;
type Attrs = Record<string, string>;

const TEXT = '#text';
const COMMENT = '#comment';
const ATTRS = ':@';

function tagOf(n: XmlNode): string | undefined {
  for (const k of Object.keys(n)) if (k !== ATTRS) return k === TEXT || k === COMMENT ? undefined : k;
  return undefined;
}

function childrenOf(n: XmlNode): XmlNode[] {
  const tag = tagOf(n);
  if (tag === undefined) return [];
  const c = n[tag];
  return Array.isArray(c) ? (c as XmlNode[]) : [];
}

function attrsOf(n: XmlNode): Attrs {
  let a = n[ATTRS] as Attrs | undefined;
  if (!a) {
    a = {};
    n[ATTRS] = a;
  }
  return a;
}

function attr(n: XmlNode | undefined, name: string): string | undefined {
  const a = n?.[ATTRS] as Attrs | undefined;
  return a?.[name];
}

function elements(parent: XmlNode, tag?: string): XmlNode[] {
  return childrenOf(parent).filter((c) => {
    const t = tagOf(c);
    return t !== undefined && (tag === undefined || t === tag);
  });
}

function first(parent: XmlNode, tag: string): XmlNode | undefined {
  return elements(parent, tag)[0];
}

/** The element's text (its text children joined); undefined when it has none. */
function textOf(n: XmlNode): string | undefined {
  const texts = childrenOf(n).filter((c) => TEXT in c);
  return texts.length === 0 ? undefined : texts.map((t) => String(t[TEXT])).join('');
}

function setText(n: XmlNode, value: string): XmlNode {
  const tag = tagOf(n) as string;
  const textNode: XmlNode = { [TEXT]: value };
  n[tag] = [...childrenOf(n).filter((c) => !(TEXT in c)), textNode];
  return textNode;
}

/** Removes every child element `tag`, with the indentation before it. */
function removeChildren(parent: XmlNode, tag: string): boolean {
  const ptag = tagOf(parent) as string;
  const after: XmlNode[] = [];
  let removed = false;
  for (const c of childrenOf(parent)) {
    if (tagOf(c) !== tag) {
      after.push(c);
      continue;
    }
    removed = true;
    const last = after[after.length - 1];
    if (last && TEXT in last && String(last[TEXT]).trim() === '') after.pop();
  }
  parent[ptag] = after;
  return removed;
}

function element(tag: string, attrs: Attrs = {}, children: XmlNode[] = []): XmlNode {
  const n: XmlNode = { [tag]: children };
  if (Object.keys(attrs).length > 0) n[ATTRS] = attrs;
  return n;
}

/** Inserts `child` after the last child tagged `after` (or first, when there is none). */
function insertAfter(parent: XmlNode, child: XmlNode, after?: string): void {
  const ptag = tagOf(parent) as string;
  const list = childrenOf(parent);
  let at = 0;
  if (after !== undefined) {
    list.forEach((c, i) => {
      if (tagOf(c) === after) at = i + 1;
    });
  }
  parent[ptag] = [...list.slice(0, at), child, ...list.slice(at)];
}

// ------------------------------------------------------------------------------------------ parse / build

function invalid(message: string): HypervisorError {
  return new HypervisorError('invalid', message);
}

const NAMED_ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };

/** XML's entities: the five named ones and character references; any other `&` is not XML libvirt writes. */
function decodeEntities(value: string): string {
  return value.replace(/&([^;&\s]{0,10});|&/g, (match, body: string | undefined) => {
    if (body === undefined) throw invalid('the stored domain XML is malformed: a bare "&"');
    const named = NAMED_ENTITIES[body];
    if (named !== undefined) return named;
    const num = /^#(?:x([0-9a-fA-F]{1,6})|([0-9]{1,7}))$/.exec(body);
    if (num) {
      const code = num[1] !== undefined ? parseInt(num[1], 16) : Number(num[2]);
      const allowed =
        code === 0x9 ||
        code === 0xa ||
        code === 0xd ||
        (code >= 0x20 && code <= 0xd7ff) ||
        (code >= 0xe000 && code <= 0xfffd) ||
        (code >= 0x10000 && code <= 0x10ffff);
      if (allowed) return String.fromCodePoint(code);
    }
    throw invalid(`the stored domain XML is malformed: ${match} is not an entity libvirt writes`);
  });
}

const parser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  parseAttributeValue: false,
  parseTagValue: false,
  trimValues: false,
  commentPropName: COMMENT,
  processEntities: false,
  tagValueProcessor: (_name, value) => decodeEntities(value),
  attributeValueProcessor: (_name, value) => decodeEntities(value),
});

function escapeText(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** Attribute values: quotes, and whitespace other than a space as references (a parser would fold it to spaces). */
function escapeAttr(value: string): string {
  return escapeText(value)
    .replace(/"/g, '&quot;')
    .replace(/'/g, '&apos;')
    .replace(/\t/g, '&#9;')
    .replace(/\n/g, '&#10;')
    .replace(/\r/g, '&#13;');
}

const builder = new XMLBuilder({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: '',
  commentPropName: COMMENT,
  suppressEmptyNode: true,
  processEntities: false,
  tagValueProcessor: (_name, value) => escapeText(String(value)),
  attributeValueProcessor: (_name, value) => escapeAttr(String(value)),
});

function parseDocument(xml: string): XmlNode {
  if (xml.length > MAX_XML_CHARS) throw invalid('the stored domain XML is larger than any domain definition can be');
  // libvirt never writes a DOCTYPE; one could define entities that expand to anything (or to a billion of them)
  if (/<!DOCTYPE|<!ENTITY/i.test(xml)) throw invalid('the stored domain XML has a DOCTYPE, which libvirt never writes');
  const valid = XMLValidator.validate(xml);
  if (valid !== true) {
    // the validator reports elements left open at the end as "Invalid '[ "domain", "devices" ]' found"
    const open = /^Invalid '\[(.*)\]' found/s.exec(valid.err.msg)?.[1];
    const why = open
      ? `it ends with <${open.replace(/[\s"]/g, '').split(',').join('>, <')}> not closed`
      : `line ${valid.err.line}: ${valid.err.msg.replace(/\.$/, '')}`;
    throw invalid(`the stored domain XML is malformed (${why})`);
  }
  let doc: XmlNode[];
  try {
    doc = parser.parse(xml) as XmlNode[];
  } catch (err) {
    if (err instanceof HypervisorError) throw err;
    throw invalid(`the stored domain XML is malformed (${String((err as Error).message ?? err).replace(/\.$/, '')})`);
  }
  const roots = doc.filter((n) => tagOf(n) !== undefined && !tagOf(n)?.startsWith('?'));
  const root = roots[0];
  if (roots.length !== 1 || !root || tagOf(root) !== 'domain') {
    throw invalid('the stored domain XML is not one <domain> definition');
  }
  for (const n of doc) {
    const tag = tagOf(n);
    if (tag !== undefined && tag.startsWith('?') && tag !== '?xml') {
      throw invalid(`the stored domain XML has a processing instruction <${tag}>, which libvirt never writes`);
    }
  }
  return root;
}

// ------------------------------------------------------------------------------------------ the rewrite

interface Context {
  rewrite: DomainRewrite;
  expectDomain: string;
  /** attribute objects / text nodes a rule has checked or written: the host-path net lets these through */
  approvedAttrs: WeakMap<object, Set<string>>;
  approvedTexts: WeakSet<object>;
  ejected: string[];
  logFiles: string[];
  /** original chardev path -> its new place (a <console> mirrors <serial> 0 with the same path) */
  logPaths: Map<string, string>;
  logCounters: Map<string, number>;
  keptHostFiles: string[];
  bootDirs: string[];
  /** files this restore writes: a kept host file must not be one of them */
  restoredFiles: string[];
}

function approveAttr(ctx: Context, n: XmlNode, name: string): void {
  const a = attrsOf(n);
  let set = ctx.approvedAttrs.get(a);
  if (!set) {
    set = new Set();
    ctx.approvedAttrs.set(a, set);
  }
  set.add(name);
}

function setAttr(ctx: Context, n: XmlNode, name: string, value: string): void {
  attrsOf(n)[name] = value;
  approveAttr(ctx, n, name);
}

function deleteAttr(n: XmlNode, name: string): void {
  const a = n[ATTRS] as Attrs | undefined;
  if (a) delete a[name];
}

function isInside(path: string, dir: string): boolean {
  const d = dir.endsWith(sep) ? dir : dir + sep;
  return path.startsWith(d);
}

/**
 * A host file the definition keeps (kernel, firmware, ROM): absolute, an existing regular file inside SYSTEM_BOOT_DIRS
 * or the operator's bootDirs (after symlinks are resolved), and not a file this restore writes.
 */
function checkKeptHostFile(ctx: Context, what: string, path: string): void {
  const refuse = (why: string) =>
    invalid(
      `the stored domain XML keeps ${what} ${JSON.stringify(path)}, which ${why}: a restored definition may keep host ` +
        `files only from ${ctx.bootDirs.join(', ')} (add a directory with --boot-dir)`,
    );
  if (!isAbsolute(path) || normalize(path) !== path) throw refuse('is not a plain absolute path');
  if (!ctx.bootDirs.some((d) => isInside(path, d))) throw refuse('is outside those directories');
  let real: string;
  try {
    real = realpathSync(path);
    if (!statSync(real).isFile()) throw refuse('is not a regular file');
  } catch (err) {
    if (err instanceof HypervisorError) throw err;
    throw invalid(`the stored domain XML keeps ${what} ${JSON.stringify(path)}, which does not exist on this host`);
  }
  if (!ctx.bootDirs.some((d) => isInside(real, d))) throw refuse(`leads to ${real}, outside those directories`);
  if (ctx.restoredFiles.some((f) => f === path || f === real)) throw refuse('is a file this restore writes');
  ctx.keptHostFiles.push(path);
}

function disksOf(ctx: Context, devices: XmlNode): void {
  const seen = new Set<string>();
  for (const disk of elements(devices, 'disk')) {
    const target = first(disk, 'target');
    const dev = attr(target, 'dev');
    if (dev === undefined || !DISK_TARGET_RE.test(dev)) {
      throw invalid(`the stored domain XML has a disk without a valid <target dev> (${JSON.stringify(dev ?? '')})`);
    }
    if (seen.has(dev)) throw invalid(`the stored domain XML has disk ${dev} twice`);
    seen.add(dev);
    const type = attr(disk, 'type') ?? 'file';
    const device = attr(disk, 'device') ?? 'disk';
    const restored = Object.prototype.hasOwnProperty.call(ctx.rewrite.disks, dev) ? ctx.rewrite.disks[dev] : undefined;
    const oldSource = first(disk, 'source');
    const was = attr(oldSource, 'file') ?? attr(oldSource, 'dev') ?? attr(oldSource, 'name') ?? attr(oldSource, 'dir');
    // a restored image is whole: the original's backing chain, a running block job, network credentials are not its
    for (const tag of ['backingStore', 'mirror', 'auth']) removeChildren(disk, tag);
    if (restored) {
      setAttr(ctx, disk, 'type', 'file');
      const source = element('source', { file: restored.path });
      approveAttr(ctx, source, 'file');
      const list = childrenOf(disk);
      const at = list.findIndex((c) => tagOf(c) === 'source');
      if (at >= 0) list[at] = source;
      else insertAfter(disk, source, 'driver');
      let driver = first(disk, 'driver');
      if (!driver) {
        driver = element('driver', { name: 'qemu' });
        insertAfter(disk, driver);
      }
      setAttr(ctx, driver, 'type', restored.format);
      continue;
    }
    if (device === 'cdrom' || device === 'floppy') {
      // removable media vmbackup did not back up (an installer ISO): the drive stays, empty
      if (oldSource && removeChildren(disk, 'source') && was !== undefined) ctx.ejected.push(`${dev}: ${was}`);
      setAttr(ctx, disk, 'type', 'file');
      continue;
    }
    throw invalid(
      `the stored domain XML has disk ${dev} (${type}${was === undefined ? '' : ` ${was}`}) that was not restored: ` +
        'a restored definition keeps only the disks it restored and empty cdrom or floppy drives',
    );
  }
  for (const dev of Object.keys(ctx.rewrite.disks)) {
    if (!seen.has(dev)) throw invalid(`the stored domain XML has no disk ${dev}, which the backup holds`);
  }
}

function logPath(ctx: Context, tag: string, original: string | undefined, suffix: string): string {
  const logDir = ctx.rewrite.logDir;
  if (logDir === undefined) {
    throw invalid(`the stored domain XML has a file-backed <${tag}> and no directory was given for its new log`);
  }
  const key = original === undefined ? undefined : `${suffix}:${original}`;
  const known = key === undefined ? undefined : ctx.logPaths.get(key);
  if (known !== undefined) return known;
  const n = ctx.logCounters.get(`${tag}${suffix}`) ?? 0;
  ctx.logCounters.set(`${tag}${suffix}`, n + 1);
  const path = `${logDir.replace(/\/+$/, '')}/${tag}${n}${suffix}`;
  if (key !== undefined) ctx.logPaths.set(key, path);
  ctx.logFiles.push(path);
  return path;
}

/**
 * A character device (serial, console, channel, parallel, redirdev, an egd rng backend): QEMU opens its file or
 * socket as root, so a file goes to logDir, a listening socket too, a pty gets a fresh one, and a host device,
 * a pipe or a connection to a host socket or address is refused.
 */
function chardev(ctx: Context, dev: XmlNode, tag: string): void {
  const type = attr(dev, 'type') ?? 'pty';
  const source = first(dev, 'source');
  switch (type) {
    case 'null':
    case 'vc':
    case 'stdio':
    case 'spicevmc':
    case 'spiceport':
    case 'qemu-vdagent':
    case 'dbus':
      break;
    case 'pty':
      // the live XML's /dev/pts/N of the original
      removeChildren(dev, 'source');
      deleteAttr(dev, 'tty');
      break;
    case 'file':
      if (!source) throw invalid(`the stored domain XML has a file-backed <${tag}> without a <source path>`);
      setAttr(ctx, source, 'path', logPath(ctx, tag, attr(source, 'path'), '.log'));
      break;
    case 'unix': {
      if (!source) break;
      const mode = attr(source, 'mode') ?? 'connect';
      if (mode !== 'bind') {
        throw invalid(
          `the stored domain XML connects a <${tag}> to the host socket ${JSON.stringify(attr(source, 'path') ?? '')}, ` +
            'which would give the guest a line into a host service',
        );
      }
      const target = first(dev, 'target');
      if (tag === 'channel' && attr(target, 'type') === 'virtio') {
        // libvirt makes its own path under its channel directory when the XML names none
        deleteAttr(source, 'path');
      } else {
        setAttr(ctx, source, 'path', logPath(ctx, tag, attr(source, 'path'), '.sock'));
      }
      break;
    }
    case 'tcp':
    case 'udp': {
      const modes = elements(dev, 'source').map((s) => attr(s, 'mode') ?? 'connect');
      if (type === 'udp' || modes.includes('connect')) {
        throw invalid(
          `the stored domain XML connects a <${tag}> to a ${type} address, which would give the guest a line into ` +
            'whatever listens there (a host service on 127.0.0.1)',
        );
      }
      break;
    }
    default:
      // dev (a host tty), pipe (host FIFOs), nmdm, spiceport ...: a host file or device the guest would use
      throw invalid(
        `the stored domain XML has a <${tag}> of type ${JSON.stringify(type)}, which uses a host device or file`,
      );
  }
  const log = first(dev, 'log');
  if (log) setAttr(ctx, log, 'file', logPath(ctx, tag, attr(log, 'file'), '-log.log'));
}

function interfaceOf(ctx: Context, nic: XmlNode): void {
  const type = attr(nic, 'type') ?? 'network';
  if (!INTERFACE_TYPES.has(type)) {
    const why =
      type === 'hostdev' || type === 'vdpa'
        ? 'passes a host device through'
        : type === 'vhostuser'
          ? 'uses a host vhost-user socket'
          : type === 'client' || type === 'udp'
            ? 'connects the guest network to a host address'
            : 'is a kind vmbackup does not restore';
    throw invalid(`the stored domain XML has an <interface type=${JSON.stringify(type)}>, which ${why}`);
  }
  for (const tag of ['script', 'downscript']) {
    if (first(nic, tag)) {
      throw invalid(
        `the stored domain XML has an <interface> with a <${tag}>, which libvirt would run as root on the host`,
      );
    }
  }
  const backend = first(nic, 'backend');
  if (backend) {
    const tap = attr(backend, 'tap');
    const vhost = attr(backend, 'vhost');
    if ((tap !== undefined && tap !== '/dev/net/tun') || (vhost !== undefined && vhost !== '/dev/vhost-net')) {
      throw invalid(
        'the stored domain XML gives an <interface> other host devices than /dev/net/tun and /dev/vhost-net',
      );
    }
    if (tap !== undefined) approveAttr(ctx, backend, 'tap');
    if (vhost !== undefined) approveAttr(ctx, backend, 'vhost');
  }
  if (!ctx.rewrite.keepMacs) removeChildren(nic, 'mac');
}

function romOf(ctx: Context, n: XmlNode, where: string): void {
  for (const rom of elements(n, 'rom')) {
    const file = attr(rom, 'file');
    if (file === undefined || file === '') continue; // file='' disables the ROM
    checkKeptHostFile(ctx, `an option ROM of ${where}`, file);
    approveAttr(ctx, rom, 'file');
  }
}

function devicesOf(ctx: Context, devices: XmlNode): void {
  // libvirt picks the emulator for the domain type and architecture; the XML's could be any program
  removeChildren(devices, 'emulator');
  for (const dev of elements(devices)) {
    const tag = tagOf(dev) as string;
    const refused = REFUSED_DEVICES[tag];
    if (refused !== undefined) throw invalid(`the stored domain XML ${refused}, which a restore refuses`);
    if (!KEPT_DEVICES.has(tag)) {
      throw invalid(`the stored domain XML has a <${tag}> device, which vmbackup does not restore`);
    }
  }
  disksOf(ctx, devices);
  for (const tag of ['serial', 'parallel', 'console', 'channel', 'redirdev']) {
    for (const dev of elements(devices, tag)) chardev(ctx, dev, tag);
  }
  for (const nic of elements(devices, 'interface')) {
    interfaceOf(ctx, nic);
    romOf(ctx, nic, 'an interface');
  }
  for (const rng of elements(devices, 'rng')) {
    const backend = first(rng, 'backend');
    const model = attr(backend, 'model');
    if (backend && model === 'random') {
      const path = textOf(backend);
      if (path !== undefined && path.trim() !== '' && !RNG_DEVICES.has(path)) {
        throw invalid(`the stored domain XML feeds the guest's random number generator from ${JSON.stringify(path)}`);
      }
      for (const t of childrenOf(backend)) if (TEXT in t) ctx.approvedTexts.add(t);
    } else if (backend && model === 'egd') {
      chardev(ctx, backend, 'rng');
    }
  }
  for (const tpm of elements(devices, 'tpm')) {
    const backend = first(tpm, 'backend');
    const type = attr(backend, 'type');
    if (type !== 'emulator') {
      throw invalid(
        `the stored domain XML has a TPM of backend type ${JSON.stringify(type ?? '')}: only an emulated TPM (swtpm) is restored`,
      );
    }
    if (backend && first(backend, 'source')) {
      throw invalid('the stored domain XML keeps its TPM state in a place of its own (<backend><source>)');
    }
  }
  for (const graphics of elements(devices, 'graphics')) {
    // a socket path QEMU would create (and unlink first); libvirt makes its own when none is named
    deleteAttr(graphics, 'socket');
    for (const listen of elements(graphics, 'listen')) deleteAttr(listen, 'socket');
    if (attr(graphics, 'passwd') !== undefined) approveAttr(ctx, graphics, 'passwd');
  }
  for (const tag of ['hostdev', 'video', 'controller']) {
    for (const dev of elements(devices, tag)) romOf(ctx, dev, `a <${tag}>`);
  }
}

function osOf(ctx: Context, os: XmlNode): void {
  for (const tag of ['kernel', 'initrd', 'dtb']) {
    for (const el of elements(os, tag)) {
      const path = textOf(el) ?? '';
      checkKeptHostFile(ctx, `the ${tag === 'dtb' ? 'device tree' : tag}`, path);
      for (const t of childrenOf(el)) if (TEXT in t) ctx.approvedTexts.add(t);
    }
  }
  for (const loader of elements(os, 'loader')) {
    const path = textOf(loader);
    // pflash firmware QEMU may write to: only a read-only one can come from a shared system file
    if (attr(loader, 'type') === 'pflash' && attr(loader, 'readonly') !== 'yes') {
      throw invalid('the stored domain XML has a writable firmware (<loader type="pflash"> not readonly)');
    }
    if (path !== undefined && path.trim() !== '') {
      checkKeptHostFile(ctx, 'the firmware', path);
      for (const t of childrenOf(loader)) if (TEXT in t) ctx.approvedTexts.add(t);
    }
  }
  for (const table of elements(first(os, 'acpi') ?? element('acpi'), 'table')) {
    checkKeptHostFile(ctx, 'an ACPI table', textOf(table) ?? '');
    for (const t of childrenOf(table)) if (TEXT in t) ctx.approvedTexts.add(t);
  }
  const nvrams = elements(os, 'nvram');
  if (nvrams.length > 1) throw invalid('the stored domain XML has more than one <nvram>');
  const nvram = nvrams[0];
  if (ctx.rewrite.nvramPath !== undefined && !nvram) {
    throw invalid('the backup holds an NVRAM file but its stored domain XML has no <nvram>');
  }
  if (nvram) {
    const template = attr(nvram, 'template');
    if (template !== undefined) {
      checkKeptHostFile(ctx, 'the NVRAM template', template);
      approveAttr(ctx, nvram, 'template');
    }
    // the variable store libvirt writes: the restored one, or (none restored) libvirt's own path for the new name
    deleteAttr(nvram, 'type');
    const tag = tagOf(nvram) as string;
    nvram[tag] = [];
    if (ctx.rewrite.nvramPath !== undefined) ctx.approvedTexts.add(setText(nvram, ctx.rewrite.nvramPath));
  }
}

function sysinfoOf(ctx: Context, domain: XmlNode): void {
  for (const sysinfo of elements(domain, 'sysinfo')) {
    const visit = (n: XmlNode) => {
      for (const c of elements(n)) {
        if (tagOf(c) === 'entry' && attr(c, 'file') !== undefined) {
          throw invalid('the stored domain XML fills a firmware table from a host file (<sysinfo><entry file>)');
        }
        visit(c);
      }
    };
    visit(sysinfo);
    // libvirt refuses a <sysinfo> UUID that differs from the domain's
    for (const system of elements(sysinfo, 'system')) {
      for (const entry of elements(system, 'entry')) {
        if (attr(entry, 'name') === 'uuid') setText(entry, ctx.rewrite.uuid);
      }
    }
  }
}

/** Elements whose text and attributes are the guest's or the user's words, never a host path libvirt opens. */
const FREE_TEXT = new Set(['title', 'description', 'metadata', 'cmdline', 'sysinfo', 'seclabel', 'resource']);

function isFreeText(tag: string, parentTag: string | undefined): boolean {
  // a disk's <serial> is the guest-visible serial number, not the <serial> port device
  return FREE_TEXT.has(tag) || (tag === 'serial' && parentTag === 'disk');
}

/**
 * The last net: refuses a namespaced element (qemu:commandline, qemu:override, ...: libvirt reads them by their
 * namespace, whatever the prefix) and any value left that names a host path no rule above checked.
 */
function checkRest(
  ctx: Context,
  n: XmlNode,
  path: string,
  depth: number,
  inMetadata: boolean,
  parentTag?: string,
  inFreeText = false,
): void {
  if (depth > MAX_DEPTH) throw invalid('the stored domain XML is nested deeper than any domain definition');
  const tag = tagOf(n) as string;
  const attrs = (n[ATTRS] as Attrs | undefined) ?? {};
  for (const [name, value] of Object.entries(attrs)) {
    if ((name === 'xmlns' || name.startsWith('xmlns:')) && QEMU_NAMESPACE_RE.test(value)) {
      throw invalid(
        "the stored domain XML declares libvirt's QEMU namespace, whose elements (qemu:commandline, qemu:override) " +
          'pass QEMU arguments of their own: a restore refuses them',
      );
    }
  }
  if (!inMetadata && tag.includes(':')) {
    throw invalid(
      `the stored domain XML has <${tag}>, an element of a hypervisor namespace (such as qemu:commandline) that a ` +
        'restore refuses',
    );
  }
  const free = inFreeText || inMetadata || isFreeText(tag, parentTag);
  if (!free) {
    const approved = ctx.approvedAttrs.get(attrs);
    for (const [name, value] of Object.entries(attrs)) {
      if (name.startsWith('xmlns')) continue;
      if (value.trimStart().startsWith('/') && !approved?.has(name)) {
        throw invalid(
          `the stored domain XML names the host path ${JSON.stringify(value)} in ${path} ${name}=, which a restore does not keep`,
        );
      }
    }
  }
  for (const c of childrenOf(n)) {
    if (TEXT in c) {
      const value = String(c[TEXT]);
      if (!free && value.trimStart().startsWith('/') && !ctx.approvedTexts.has(c)) {
        throw invalid(
          `the stored domain XML names the host path ${JSON.stringify(value.trim())} in ${path}, which a restore does not keep`,
        );
      }
      continue;
    }
    const ctag = tagOf(c);
    if (ctag === undefined) continue; // a comment
    checkRest(ctx, c, `${path}<${ctag}>`, depth + 1, inMetadata || ctag === 'metadata', tag, free);
  }
}

function checkRewrite(rewrite: DomainRewrite, expectDomain: string): void {
  const abs = (what: string, p: string) => {
    if (!isAbsolute(p) || normalize(p) !== p.replace(/\/+$/, '') || p.includes('\0')) {
      throw invalid(`${what} ${JSON.stringify(p)} is not a plain absolute path`);
    }
  };
  if (!DOMAIN_NAME_RE.test(expectDomain)) throw invalid(`${JSON.stringify(expectDomain)} is not a domain name`);
  if (!DOMAIN_NAME_RE.test(rewrite.name)) throw invalid(`${JSON.stringify(rewrite.name)} is not a domain name`);
  if (!UUID_RE.test(rewrite.uuid)) throw invalid(`${JSON.stringify(rewrite.uuid)} is not a UUID`);
  for (const [dev, d] of Object.entries(rewrite.disks)) {
    if (!DISK_TARGET_RE.test(dev)) throw invalid(`${JSON.stringify(dev)} is not a disk target such as vda`);
    abs(`the restored disk ${dev}`, d.path);
    if (d.format !== 'qcow2' && d.format !== 'raw') throw invalid(`disk ${dev}: format must be qcow2 or raw`);
  }
  if (rewrite.nvramPath !== undefined) abs('the NVRAM path', rewrite.nvramPath);
  if (rewrite.logDir !== undefined) abs('the log directory', rewrite.logDir);
  for (const d of rewrite.bootDirs ?? []) abs('the boot directory', d);
}

/** See rewriteDomainXml; also says what was left out and which files the definition names. */
export function rewriteDomain(xml: string, expectDomain: string, rewrite: DomainRewrite): RewrittenDomain {
  checkRewrite(rewrite, expectDomain);
  const domain = parseDocument(xml);
  const ctx: Context = {
    rewrite,
    expectDomain,
    approvedAttrs: new WeakMap(),
    approvedTexts: new WeakSet(),
    ejected: [],
    logFiles: [],
    logPaths: new Map(),
    logCounters: new Map(),
    keptHostFiles: [],
    bootDirs: [...SYSTEM_BOOT_DIRS, ...(rewrite.bootDirs ?? []).map((d) => d.replace(/\/+$/, '') || '/')],
    restoredFiles: [
      ...Object.values(rewrite.disks).map((d) => d.path),
      ...(rewrite.nvramPath === undefined ? [] : [rewrite.nvramPath]),
    ],
  };

  const names = elements(domain, 'name');
  const stored = names.length === 1 && names[0] ? textOf(names[0]) : undefined;
  if (names.length !== 1 || stored === undefined) {
    throw invalid('the stored domain XML does not have exactly one <name>');
  }
  if (stored !== expectDomain) {
    throw invalid(
      `the stored domain XML is the definition of ${JSON.stringify(stored)}, not of ${expectDomain} whose backup it is in`,
    );
  }
  const nameNode = names[0] as XmlNode;
  setText(nameNode, rewrite.name);
  deleteAttr(domain, 'id'); // a live XML's running id

  const uuids = elements(domain, 'uuid');
  if (uuids.length > 1) throw invalid('the stored domain XML has more than one <uuid>');
  if (uuids[0]) setText(uuids[0], rewrite.uuid);
  else insertAfter(domain, element('uuid', {}, [{ [TEXT]: rewrite.uuid }]), 'name');
  // a VM generation ID tells the guest it was restored (Windows rolls back its domain-controller state on a change):
  // an empty <genid/> makes libvirt generate a new one
  for (const genid of elements(domain, 'genid')) genid['genid'] = [];

  for (const tag of ['os', 'devices']) {
    if (elements(domain, tag).length > 1) throw invalid(`the stored domain XML has more than one <${tag}>`);
  }
  sysinfoOf(ctx, domain);
  for (const os of elements(domain, 'os')) osOf(ctx, os);
  if (ctx.rewrite.nvramPath !== undefined && elements(domain, 'os').length === 0) {
    throw invalid('the backup holds an NVRAM file but its stored domain XML has no <os>');
  }
  for (const devices of elements(domain, 'devices')) devicesOf(ctx, devices);
  if (Object.keys(rewrite.disks).length > 0 && elements(domain, 'devices').length === 0) {
    throw invalid('the stored domain XML has no <devices>');
  }
  checkRest(ctx, domain, '<domain>', 0, false);

  return {
    xml: String(builder.build([domain])).replace(/\s*$/, '\n'),
    ejected: ctx.ejected,
    logFiles: ctx.logFiles,
    keptHostFiles: ctx.keptHostFiles,
  };
}

/**
 * Parses a stored domain XML, checks it is the definition of `expectDomain`, and returns the XML to define. Throws
 * HypervisorError kind 'invalid' with one sentence (malformed XML, <name> is another domain, a disk that was not
 * restored and cannot be kept, an element that would run host commands).
 */
export function rewriteDomainXml(xml: string, expectDomain: string, rewrite: DomainRewrite): string {
  return rewriteDomain(xml, expectDomain, rewrite).xml;
}
