/**
 * Instant recovery (`vmbackup restore <id> --instant NEWNAME`): the VM runs at once on one qcow2 overlay per disk
 * whose backing file is the backup's own image on a local (or mounted NFS) target. QEMU opens backing files read-only
 * and the overlay takes every write, so the backup stays byte for byte what its manifest says (`verify` passes the
 * whole time). `restore --finish` (src/activities/instant.ts) later pulls the data into the overlays.
 *
 * The target's bytes may have been written by someone else, and QEMU follows the backing file each qcow2 header
 * names. So before an image is used, each link's header is read on its own (never following it) and must name
 * exactly the next link the MANIFESTS give (same file, same format), or nothing for the chain's last image; no image
 * may be a symlink or name an external data file. Only then is `qemu-img info --backing-chain` run on the top, and its
 * chain must be the manifests' chain too.
 *
 * What --instant created is recorded in `<stateDir>/instant/<NEWNAME>.json` (root's state dir, never the target):
 * `--finish` acts only on a domain with such a record, with the same UUID, whose disks are the recorded overlays.
 */
import { randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import { chmod, lstat, mkdir, open, readFile, readdir, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import type { DomainRewrite } from '../hypervisor/domain-xml';
import { HypervisorError } from '../hypervisor/errors';
import type { Hypervisor } from '../hypervisor/port';
import { createOverlayImage, imageInfo } from '../hypervisor/qemu-img';
import { canTraverse, qemuUserOf, type QemuIdentity } from '../hypervisor/qemu-user';
import { DOMAIN_NAME_RE } from '../shared/names';
import type { StorageTarget } from '../storage/contract';
import { StorageError, errnoCode } from '../storage/errors';
import type { CatalogOptions } from './catalog';
import { diskChain, resolveChain } from './chain';
import { VM_FILE_MAX_BYTES, isChunkManifest, type ManifestVmFile } from './manifest';

/** Where libvirt keeps a domain's swtpm state: `<dir>/<uuid>/tpm2/...` */
export const SWTPM_STATE_ROOT = '/var/lib/libvirt/swtpm';

export interface InstantDiskRecord {
  /** target dev, e.g. vda */
  name: string;
  /** the overlay the domain runs on (absolute) */
  overlay: string;
  /** the backup image it reads from (absolute) */
  backing: string;
  backingFormat: 'qcow2' | 'raw';
  virtualSize: number;
}

/** What `--instant` created, so `--finish` can check it acts on that and nothing else. */
export interface InstantRecord {
  version: 1;
  domain: string;
  uuid: string;
  backupId: string;
  /** the domain the backup was taken of */
  sourceDomain: string;
  /** the target's display URL */
  target: string;
  createdAt: string;
  disks: InstantDiskRecord[];
  /** the restored NVRAM file, if the backup had one */
  nvram?: string;
  /** the restored swtpm state directory, if the backup had a TPM */
  tpmDir?: string;
  /** set by --finish once no disk reads from the backup any more */
  finishedAt?: string;
  /**
   * target directories --instant made searchable (mode | 0o111) for QEMU's user, each with the mode to put back once
   * no unfinished record names it any more
   */
  openedDirs?: OpenedDir[];
  /**
   * the backup's images with their owners before the start: libvirt hands them to QEMU's user while the VM runs and,
   * once a pull dropped them from the chain, does not give them back; --finish does
   */
  images?: OwnedImage[];
}

export interface OwnedImage {
  path: string;
  uid: number;
  gid: number;
}

export interface OpenedDir {
  path: string;
  /** the permission bits before any instant restore opened it */
  mode: number;
}

export function instantRecordDir(stateDir: string): string {
  return join(stateDir, 'instant');
}

export function instantRecordPath(stateDir: string, domain: string): string {
  if (!DOMAIN_NAME_RE.test(domain)) throw instantError(`"${domain}" is not a valid domain name.`);
  return join(instantRecordDir(stateDir), `${domain}.json`);
}

/** The record of `domain`, or undefined when --instant did not create it on this host. */
export async function readInstantRecord(stateDir: string, domain: string): Promise<InstantRecord | undefined> {
  const path = instantRecordPath(stateDir, domain);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw err;
  }
  const r = JSON.parse(text) as InstantRecord;
  if (r.version !== 1 || r.domain !== domain || !Array.isArray(r.disks)) {
    throw instantError(`The instant-restore record ${path} is not one vmbackup wrote; remove it if ${domain} is gone.`);
  }
  return r;
}

export async function writeInstantRecord(stateDir: string, record: InstantRecord): Promise<void> {
  const path = instantRecordPath(stateDir, record.domain);
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.tmp`;
  await writeFile(tmp, `${JSON.stringify(record, null, 2)}\n`, { mode: 0o600 });
  await chmod(tmp, 0o600);
  const fh = await open(tmp, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
}

export async function removeInstantRecord(stateDir: string, domain: string): Promise<void> {
  await rm(instantRecordPath(stateDir, domain), { force: true });
}

function instantError(message: string, kind: 'not-found' | 'failed' | 'checksum' = 'failed'): StorageError {
  return new StorageError(kind, message, { driver: 'catalog', permanent: true });
}

// ------------------------------------------------------------------------------------------- the chain check

/** One image of a disk's chain as the manifests give it, top first. */
export interface ExpectedImage {
  backupId: string;
  path: string;
  format: string;
  size: number;
  virtualSize: number;
}

/**
 * Checks that the images of one disk are exactly the chain the manifests give: each a regular file of the recorded
 * size whose header (read without following it) names the next image and its format, the last naming none, no
 * external data file; then that `qemu-img info --backing-chain -U` of the top sees that same chain. Throws one
 * sentence otherwise.
 */
export async function checkBackingChain(
  disk: string,
  backupId: string,
  chain: readonly ExpectedImage[],
  where: string,
): Promise<void> {
  const refuse = (why: string): StorageError =>
    instantError(
      `Cannot start backup ${backupId} instantly from ${where}: ${why}; nothing was defined. Verify the backup (\`vmbackup verify ${backupId}\`) and restore it with --define instead.`,
    );
  for (const [i, link] of chain.entries()) {
    const st = await lstat(link.path).catch((err: unknown) => {
      if (errnoCode(err) === 'ENOENT')
        throw refuse(`disk ${disk} of backup ${link.backupId} is missing (${link.path})`);
      throw err;
    });
    if (!st.isFile()) throw refuse(`${link.path} (disk ${disk} of backup ${link.backupId}) is not a regular file`);
    if (st.size !== link.size) {
      throw refuse(
        `${link.path} (disk ${disk} of backup ${link.backupId}) has ${st.size} bytes, its manifest says ${link.size}`,
      );
    }
    const next = chain[i + 1];
    if (link.format === 'raw') {
      if (next) throw refuse(`disk ${disk} of backup ${link.backupId} is raw, yet its manifest names a parent image`);
      continue;
    }
    const info = await imageInfo(link.path, { format: link.format });
    if (info.dataFile !== undefined) {
      throw refuse(`the header of ${link.path} names an external data file (${info.dataFile})`);
    }
    const named = info.backingFile === undefined ? undefined : resolve(dirname(link.path), info.backingFile);
    if (!next) {
      if (named !== undefined) {
        throw refuse(`the header of ${link.path} names the backing file ${info.backingFile}, its manifest none`);
      }
      continue;
    }
    if (named !== next.path) {
      throw refuse(
        `the header of ${link.path} names the backing file ${info.backingFile ?? '(none)'}, the manifests ${next.path}`,
      );
    }
    if (info.backingFormat !== next.format) {
      throw refuse(
        `the header of ${link.path} gives its backing file the format ${info.backingFormat ?? '(none)'}, the manifests ${next.format}`,
      );
    }
  }
  const [top] = chain;
  if (!top || top.format === 'raw') return;
  // every header was checked above, so following them now opens only the manifests' files
  const seen = await imageInfo(top.path, { format: top.format, backingChain: true, forceShare: true });
  const files = [seen.filename, ...(seen.chain ?? []).map((c) => c.filename)].map((f) =>
    isAbsolute(f) ? f : resolve(dirname(top.path), f),
  );
  const want = chain.map((c) => c.path);
  if (files.length !== want.length || files.some((f, i) => f !== want[i])) {
    throw refuse(`qemu-img sees the chain ${files.join(' <- ')} for disk ${disk}, the manifests ${want.join(' <- ')}`);
  }
}

// ------------------------------------------------------------------------------------------- the instant restore

export interface InstantRestoreOptions extends CatalogOptions {
  /** the new domain's name */
  name: string;
  /** directory for the overlays, the NVRAM copy and the serial log; created 0711 when missing */
  dir: string;
  keepMacs: boolean;
  stateDir: string;
  hypervisor: Hypervisor;
  rewriteXml: (xml: string, expectDomain: string, rewrite: DomainRewrite) => string;
  /** directories the definition may keep host files from besides the system ones (`--boot-dir`) */
  bootDirs?: readonly string[];
  /** where swtpm state directories are (default /var/lib/libvirt/swtpm) */
  swtpmRoot?: string;
  /** the user QEMU will run the definition as, undefined for root (default: its DAC label, else qemu.conf) */
  qemuUserOf?: (xml: string) => Promise<QemuIdentity | undefined>;
}

export interface InstantRestoreResult {
  domain: string;
  uuid: string;
  backupId: string;
  sourceDomain: string;
  disks: InstantDiskRecord[];
  nvram?: string;
  tpmDir?: string;
}

/**
 * Defines and starts `opts.name` on overlays of backup `backupId` (a local target). On any failure everything it
 * created is removed again (the domain undefined, overlays and copies deleted) and one sentence is thrown.
 */
export async function instantRestore(
  target: StorageTarget,
  backupId: string,
  opts: InstantRestoreOptions,
): Promise<InstantRestoreResult> {
  const { name, hypervisor: hv } = opts;
  const where = target.displayUrl;
  if (!DOMAIN_NAME_RE.test(name)) {
    throw instantError(`"${name}" is not a valid domain name: use letters, digits, '.', '_', '+' and '-'.`);
  }
  const local = target.capabilities.localPath;
  if (!local) {
    throw instantError(
      `--instant runs the VM on the backup's own images, so it needs a file:// target, and ${where} is not one: restore it with --define, or mount the export and pass its directory as file://.`,
    );
  }
  if (await domainExists(hv, name)) {
    throw instantError(`A domain named ${name} already exists; pick another name for the instant restore.`);
  }

  const { top, links } = await resolveChain(target, backupId, `Cannot start backup ${backupId} instantly`, {
    manifestKey: opts.manifestKey,
  });
  const manifest = top.manifest;
  if (isChunkManifest(manifest)) {
    throw instantError(
      `Backup ${backupId} is stored in a chunk repository, and --instant runs a VM on the backup's own disk images, which a chunk repository does not have; restore it with --to or --define instead.`,
    );
  }
  const vm = manifest.vm;
  if (!vm) {
    throw instantError(
      `Backup ${backupId} holds no domain definition (it was made before vmbackup stored one); restore its disks with --to and define the VM yourself.`,
    );
  }
  const disks: InstantDiskRecord[] = [];
  for (const d of manifest.disks) {
    const chain = diskChain(links, d.name).map((l) => ({
      backupId: l.backupId,
      path: join(local, l.disk.key),
      format: l.disk.format,
      size: l.disk.size,
      virtualSize: l.disk.virtualSize,
    }));
    await checkBackingChain(d.name, backupId, chain, where);
    const format = d.format;
    if (format !== 'qcow2' && format !== 'raw') {
      throw instantError(`Disk ${d.name} of backup ${backupId} is ${format}; --instant takes qcow2 and raw images.`);
    }
    disks.push({
      name: d.name,
      overlay: join(opts.dir, `${d.name}.qcow2`),
      backing: join(local, d.key),
      backingFormat: format,
      virtualSize: d.virtualSize,
    });
  }
  const xml = (await readVmFile(target, vm.xml, VM_FILE_MAX_BYTES.xml, backupId, 'domain XML')).toString('utf8');

  const uuid = randomUUID();
  const record: InstantRecord = {
    version: 1,
    domain: name,
    uuid,
    backupId,
    sourceDomain: manifest.domain,
    target: where,
    createdAt: new Date().toISOString(),
    disks,
    ...(vm.nvram ? { nvram: join(opts.dir, `${name}_VARS.fd`) } : {}),
    ...(vm.tpm ? { tpmDir: join(opts.swtpmRoot ?? SWTPM_STATE_ROOT, uuid) } : {}),
  };
  for (const f of [...disks.map((d) => d.overlay), ...(record.nvram ? [record.nvram] : [])]) {
    // never replaced: it may be the standalone disk of an earlier instant restore of this name
    if (await lstat(f).catch(() => undefined)) {
      throw instantError(`${f} already exists; remove it or restore with another --to directory.`);
    }
  }
  const rewrite: DomainRewrite = {
    name,
    uuid,
    keepMacs: opts.keepMacs,
    disks: Object.fromEntries(disks.map((d) => [d.name, { path: d.overlay, format: 'qcow2' as const }])),
    ...(record.nvram ? { nvramPath: record.nvram } : {}),
    logDir: opts.dir,
    ...(opts.bootDirs?.length ? { bootDirs: opts.bootDirs } : {}),
  };
  let newXml: string;
  try {
    newXml = opts.rewriteXml(xml, manifest.domain, rewrite);
  } catch (err) {
    if (err instanceof HypervisorError) {
      throw instantError(`Cannot start backup ${backupId} instantly: ${err.message.replace(/\.$/, '')}.`);
    }
    throw err;
  }
  // QEMU's user (not root) must pass through the target's 0700 directories to the images: they are opened below
  const qemuUser = await (opts.qemuUserOf ?? qemuUserOf)(newXml);
  if (qemuUser) {
    const chainFiles = manifest.disks.flatMap((d) => diskChain(links, d.name).map((l) => join(local, l.disk.key)));
    record.openedDirs = await dirsToOpen(opts.stateDir, name, local, chainFiles, qemuUser, backupId);
    record.images = await imageOwners(opts.stateDir, name, chainFiles);
  }
  const madeDir = await makeQemuDir(opts.dir);
  // a record of a crashed earlier --instant of this name is replaced (its files, if any, were refused above); it is
  // written before any directory is opened, so a crash leaves the modes to put back on record
  await writeInstantRecord(opts.stateDir, record);
  const created: string[] = [];
  let defined = false;
  try {
    for (const d of record.openedDirs ?? []) await chmodDir(d.path, (mode) => mode | 0o111);
    for (const d of disks) {
      created.push(d.overlay);
      await createOverlayImage(d.overlay, d.backing, d.backingFormat, d.virtualSize);
    }
    if (vm.nvram && record.nvram) {
      const bytes = await readVmFile(target, vm.nvram, VM_FILE_MAX_BYTES.nvram, backupId, 'NVRAM');
      await writeFile(record.nvram, bytes, { mode: 0o600, flag: 'wx' });
      created.push(record.nvram);
    }
    if (vm.tpm && record.tpmDir) {
      created.push(record.tpmDir);
      // as libvirt lays it out: <uuid>/ root 0711 (swtpm runs as its own user and must pass through), the version's
      // directory 0700 and files 0600, which libvirt hands to swtpm's user when it starts it
      await mkdir(record.tpmDir, { recursive: true, mode: 0o711 });
      await chmod(record.tpmDir, 0o711);
      for (const f of vm.tpm.files) {
        const bytes = await readVmFile(target, f, VM_FILE_MAX_BYTES.tpm, backupId, 'TPM state');
        const dest = join(record.tpmDir, f.path); // f.path is tpm2/<file> or tpm1_2/<file> (manifest schema)
        await mkdir(dirname(dest), { recursive: true, mode: 0o700 });
        await writeFile(dest, bytes, { mode: 0o600, flag: 'wx' });
      }
    }
    await hv.defineDomain(newXml);
    defined = true;
    await hv.startDomain(name);
    return {
      domain: name,
      uuid,
      backupId,
      sourceDomain: manifest.domain,
      disks,
      ...(record.nvram ? { nvram: record.nvram } : {}),
      ...(record.tpmDir ? { tpmDir: record.tpmDir } : {}),
    };
  } catch (err) {
    if (defined) await hv.removeDomain(name).catch(() => undefined);
    for (const f of created) await rm(f, { recursive: true, force: true });
    // the modes go back before the record goes: a crash in between leaves them on record, never lost
    await releaseInstantAccess(opts.stateDir, record);
    await removeInstantRecord(opts.stateDir, name);
    if (madeDir) await rmdir(opts.dir).catch(() => undefined);
    if (err instanceof HypervisorError) {
      // "Cannot access storage file '.../vda.qcow2' (as uid:64055, gid:64055): Permission denied": QEMU's user
      const hint = /Permission denied/.test(err.message)
        ? ` (QEMU's user must be able to read the backup images and reach ${opts.dir}: see docs/security.md, instant recovery)`
        : '';
      throw instantError(
        `Cannot start backup ${backupId} instantly as ${name}: ${err.message.replace(/\.$/, '')}${hint}; nothing was left defined.`,
      );
    }
    throw err;
  }
}

// ------------------------------------------------------------------------------------------- QEMU's way in

/** Every directory strictly above `dir`, `/` first. */
function ancestors(dir: string): string[] {
  const out: string[] = [];
  for (let d = dirname(dir); ; d = dirname(d)) {
    out.unshift(d);
    if (d === dirname(d)) return out;
  }
}

/**
 * The target directories (from its root down to each image's directory) QEMU's user must search, each with the mode
 * to put back later: its own when it is not searchable now, or the one an unfinished record of another instant
 * domain gave for it (that domain opened it). Refuses, before anything is written, when QEMU's user cannot pass
 * through a directory above the target root (vmbackup never changes those) or a directory below it is not a plain
 * directory.
 */
async function dirsToOpen(
  stateDir: string,
  name: string,
  root: string,
  files: readonly string[],
  user: QemuIdentity,
  backupId: string,
): Promise<OpenedDir[]> {
  const as = `${user.user}:${user.group}`;
  const reaches = (dir: string): Promise<boolean> =>
    canTraverse(user, dir).catch((err: unknown) => {
      if (!(err instanceof HypervisorError)) throw err;
      throw instantError(`Cannot start backup ${backupId} instantly: ${err.message}; nothing was changed.`);
    });
  if (!(await reaches(dirname(root)))) {
    for (const a of ancestors(root)) {
      if (!(await reaches(a))) {
        throw instantError(
          `Cannot start backup ${backupId} instantly: its QEMU runs as ${as}, which cannot pass through ${a} above the target ${root}, and vmbackup opens only the target's own directories; let that user search ${a} (e.g. \`chmod o+x ${a}\`) or use a target outside it; nothing was changed.`,
        );
      }
    }
  }
  const dirs = new Set<string>();
  for (const f of files) {
    const rel = relative(root, dirname(f));
    if (rel.startsWith('..') || isAbsolute(rel)) throw instantError(`${f} is not under the target ${root}.`);
    let d = root;
    dirs.add(d);
    for (const part of rel === '' ? [] : rel.split(sep)) dirs.add((d = join(d, part)));
  }
  const inherited = new Map<string, number>();
  for (const other of await readInstantRecords(stateDir)) {
    if (other.domain === name || other.finishedAt) continue;
    for (const o of other.openedDirs ?? []) if (!inherited.has(o.path)) inherited.set(o.path, o.mode);
  }
  const out: OpenedDir[] = [];
  for (const d of dirs) {
    const st = await lstat(d);
    if (!st.isDirectory()) {
      throw instantError(
        `Cannot start backup ${backupId} instantly: ${d} in the target is not a directory (a symlink?); nothing was changed.`,
      );
    }
    const mode = st.mode & 0o7777;
    const before = inherited.get(d);
    if (before !== undefined) out.push({ path: d, mode: before });
    else if ((mode & 0o111) !== 0o111) out.push({ path: d, mode });
  }
  return out;
}

/** The owners of the chain's images, or those an unfinished record of another instant domain gave for them. */
async function imageOwners(stateDir: string, name: string, files: readonly string[]): Promise<OwnedImage[]> {
  const inherited = new Map<string, OwnedImage>();
  for (const other of await readInstantRecords(stateDir)) {
    if (other.domain === name || other.finishedAt) continue;
    for (const o of other.images ?? []) if (!inherited.has(o.path)) inherited.set(o.path, o);
  }
  const out: OwnedImage[] = [];
  for (const path of new Set(files)) {
    const st = await lstat(path); // a regular file: checkBackingChain saw it
    out.push(inherited.get(path) ?? { path, uid: st.uid, gid: st.gid });
  }
  return out;
}

/** Every readable instant record of this host (a broken one is skipped: it names nothing to keep open). */
async function readInstantRecords(stateDir: string): Promise<InstantRecord[]> {
  const entries = await readdir(instantRecordDir(stateDir)).catch((err: unknown) => {
    if (errnoCode(err) === 'ENOENT') return [] as string[];
    throw err;
  });
  const out: InstantRecord[] = [];
  for (const e of entries) {
    if (!e.endsWith('.json')) continue;
    const r = await readInstantRecord(stateDir, e.slice(0, -'.json'.length)).catch(() => undefined);
    if (r) out.push(r);
  }
  return out;
}

/** chmod of a directory that is not followed if it became a symlink. A directory that is gone is skipped. */
async function chmodDir(path: string, mode: (current: number) => number): Promise<void> {
  let fh;
  try {
    fh = await open(path, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return; // the backup was removed meanwhile
    throw err;
  }
  try {
    const current = (await fh.stat()).mode & 0o7777;
    const next = mode(current);
    if (next !== current) await fh.chmod(next);
  } finally {
    await fh.close();
  }
}

/**
 * Puts back what `record` opened for QEMU's user: the target directories' modes and the images' owners, except for
 * those an unfinished record of another instant domain still names (that domain puts them back when it is done).
 * Idempotent: run by --finish's last step and on every failure of --instant.
 */
export async function releaseInstantAccess(stateDir: string, record: InstantRecord): Promise<void> {
  if (!record.openedDirs?.length && !record.images?.length) return;
  const inUse = new Set<string>();
  for (const other of await readInstantRecords(stateDir)) {
    if (other.domain === record.domain || other.finishedAt) continue;
    for (const o of [...(other.openedDirs ?? []), ...(other.images ?? [])]) inUse.add(o.path);
  }
  for (const img of record.images ?? []) {
    if (!inUse.has(img.path)) await chownFile(img);
  }
  // deepest first, so a directory is never closed above one still being worked on
  for (const d of [...(record.openedDirs ?? [])].reverse()) {
    if (!inUse.has(d.path)) await chmodDir(d.path, () => d.mode);
  }
}

/** Gives a regular file (never followed if it became a symlink) back its owner. A file that is gone is skipped. */
async function chownFile(img: OwnedImage): Promise<void> {
  let fh;
  try {
    fh = await open(img.path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return; // the backup was removed meanwhile
    throw err;
  }
  try {
    const st = await fh.stat();
    if (st.isFile() && (st.uid !== img.uid || st.gid !== img.gid)) await fh.chown(img.uid, img.gid);
  } finally {
    await fh.close();
  }
}

async function domainExists(hv: Hypervisor, name: string): Promise<boolean> {
  try {
    await hv.state(name);
    return true;
  } catch (err) {
    if (err instanceof HypervisorError && err.kind === 'not-found') return false;
    throw err;
  }
}

/** Reads a whole-VM file of the backup, never more than its cap, and checks it is what the manifest recorded. */
async function readVmFile(
  target: StorageTarget,
  file: ManifestVmFile,
  maxBytes: number,
  backupId: string,
  what: string,
): Promise<Buffer> {
  const bytes = await target.getBuffer(file.key, { maxBytes });
  const sha = createHash('sha256').update(bytes).digest('hex');
  if (bytes.length !== file.size || sha !== file.sha256) {
    throw instantError(
      `The ${what} of backup ${backupId} on ${target.displayUrl} is corrupt (SHA-256 ${sha}, ${bytes.length} bytes; the manifest says ${file.sha256}, ${file.size} bytes); nothing was defined.`,
      'checksum',
    );
  }
  return bytes;
}

/** Makes `dir` (0711: QEMU passes through, nobody lists it) when missing; true when it made it. */
async function makeQemuDir(dir: string): Promise<boolean> {
  try {
    await mkdir(dir, { mode: 0o711 });
  } catch (err) {
    if (errnoCode(err) === 'EEXIST') return false;
    if (errnoCode(err) === 'ENOENT') {
      await mkdir(dir, { recursive: true, mode: 0o711 });
      await chmod(dir, 0o711);
      return true;
    }
    throw err;
  }
  await chmod(dir, 0o711);
  return true;
}
