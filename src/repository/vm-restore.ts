/**
 * Whole-VM restore: a backup's disks, its domain definition, NVRAM and TPM state brought back as a libvirt domain,
 * from the manifests alone (no Temporal, no history: a new host only needs the target).
 *
 * - `define`: a NEW domain (new name, new UUID, new MACs unless keepMacs) on restored copies of the disks; the
 *   original, if it is still there, is not touched.
 * - `replace`: the original domain (shut off) gets the backup's disks, NVRAM and TPM state over its current files and
 *   the backup's definition with its own name, UUID and MACs.
 *
 * Everything is checked before anything is written: the manifest (and its signature when a manifest key is set), the
 * domain XML, NVRAM and TPM files (size caps, SHA-256), the rewritten definition (hypervisor/domain-xml.ts refuses
 * what would run host commands or open host files), the name. Then the files are written, the domain defined and
 * started. A failure at any step removes what this restore created and says one sentence.
 */
import { randomBytes, randomUUID, createHash } from 'node:crypto';
import { chmod, link, mkdir, open, rename, rm, rmdir, stat, unlink } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join } from 'node:path';
import { rewriteDomain, type DomainRewrite, type RewrittenDomain } from '../hypervisor/domain-xml';
import { HypervisorError } from '../hypervisor/errors';
import type { Hypervisor } from '../hypervisor/port';
import { parseDomainXml } from '../hypervisor/xml';
import { DOMAIN_NAME_RE } from '../shared/names';
import { fsyncDir } from '../shared/fsync';
import type { StorageTarget } from '../storage/contract';
import { StorageError, errnoCode } from '../storage/errors';
import type { CatalogOptions } from './catalog';
import { resolveChain } from './chain';
import { CHUNKS_FORMAT, VM_FILE_MAX_BYTES, isChunkManifest, type Manifest, type ManifestVmFile } from './manifest';
import { openChunkBackup, readChunkVmFile, type ChunkReadOptions } from './chunk-read';
import type { ChunkStore } from './chunks';
import { restoreBackup } from './restore';

/** libvirt's defaults on Debian and upstream: where it keeps a domain's NVRAM and its swtpm state. */
export const LIBVIRT_NVRAM_DIR = '/var/lib/libvirt/qemu/nvram';
export const LIBVIRT_SWTPM_DIR = '/var/lib/libvirt/swtpm';

export type VmRestoreMode = { kind: 'define'; name: string; to?: string } | { kind: 'replace'; confirmed: boolean };

export interface VmRestoreOptions extends CatalogOptions, ChunkReadOptions {
  mode: VmRestoreMode;
  start?: boolean;
  /** define only: keep the interfaces' MAC addresses (replace always keeps them) */
  keepMacs?: boolean;
  /** check everything and say what would be written and defined; write nothing */
  dryRun?: boolean;
  /** $VMBACKUP_STATE_DIR: restored disks go under `restored/<name>` when the original's directory is not on this host */
  stateDir: string;
  /** directories from which the definition may keep host files (a direct-boot kernel) besides the system ones */
  bootDirs?: readonly string[];
  signal?: AbortSignal;
  /** one line per step, for stderr */
  onStep?: (message: string) => void;
  /** libvirt's layout, for hosts that differ (tests never change it) */
  nvramDir?: string;
  swtpmDir?: string;
}

export interface VmRestoreResult {
  backupId: string;
  /** the domain the backup is of */
  from: string;
  /** the domain defined (or that would be) */
  domain: string;
  uuid: string;
  mode: 'define' | 'replace';
  dryRun: boolean;
  started: boolean;
  /** the definition given to libvirt */
  xml: string;
  disks: Array<{ name: string; path: string; format: string }>;
  nvram?: string;
  /** the swtpm state directory and the files restored into it */
  tpm?: { dir: string; files: string[] };
  /** log files the definition names */
  logFiles: string[];
  /** cdrom/floppy media that was not restored ("dev: path") */
  ejected: string[];
  /** host files the definition keeps as they are on this host (kernel, firmware) */
  keptHostFiles: string[];
}

export type VmRestoreErrorKind = 'not-found' | 'invalid' | 'exists' | 'running' | 'unconfirmed' | 'failed';

export class VmRestoreError extends Error {
  override readonly name = 'VmRestoreError';
  constructor(
    readonly kind: VmRestoreErrorKind,
    message: string,
    opts: { cause?: unknown } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
  }
}

/** A whole-VM file read from the target, checked against its manifest entry. */
interface VmFile {
  entry: ManifestVmFile;
  data: Buffer;
}

interface VmFiles {
  xml: string;
  nvram?: VmFile & { path: string };
  tpm?: { version: '1.2' | '2.0'; files: Array<VmFile & { path: string }> };
}

/** What a define or replace restore reports: the same shape whichever it was, dry run or not. */
function restoreResult(
  manifest: Manifest,
  who: Pick<VmRestoreResult, 'from' | 'domain' | 'uuid' | 'mode'>,
  opts: { dryRun?: boolean },
  made: {
    rewritten: RewrittenDomain;
    disks: DomainRewrite['disks'];
    nvramPath: string | undefined;
    tpmDir: string | undefined;
    files: VmFiles;
  },
): VmRestoreResult {
  const { rewritten, disks, nvramPath, tpmDir, files } = made;
  return {
    backupId: manifest.backupId,
    ...who,
    dryRun: Boolean(opts.dryRun),
    started: false,
    xml: rewritten.xml,
    disks: Object.entries(disks).map(([n, d]) => ({ name: n, path: d.path, format: d.format })),
    ...(nvramPath ? { nvram: nvramPath } : {}),
    ...(tpmDir && files.tpm ? { tpm: { dir: tpmDir, files: files.tpm.files.map((f) => join(tpmDir, f.path)) } } : {}),
    logFiles: rewritten.logFiles,
    ejected: rewritten.ejected,
    keptHostFiles: rewritten.keptHostFiles,
  };
}

/** What this run created or moved aside, undone in reverse on a failure. */
class Undo {
  private readonly steps: Array<() => Promise<unknown>> = [];
  add(step: () => Promise<unknown>): void {
    this.steps.push(step);
  }
  async run(): Promise<void> {
    for (const step of this.steps.reverse()) await step().catch(() => undefined);
    this.steps.length = 0;
  }
}

export async function restoreVm(
  target: StorageTarget,
  hypervisor: Hypervisor,
  backupId: string,
  opts: VmRestoreOptions,
): Promise<VmRestoreResult> {
  const as = opts.mode.kind === 'define' ? ` as ${opts.mode.name}` : ' over its domain';
  const fail = (kind: VmRestoreErrorKind, why: string, cause?: unknown) =>
    new VmRestoreError(kind, `Cannot restore backup ${backupId}${as}: ${why.replace(/\.$/, '')}.`, { cause });
  if (opts.mode.kind === 'define' && !DOMAIN_NAME_RE.test(opts.mode.name)) {
    throw fail(
      'invalid',
      `${JSON.stringify(opts.mode.name)} is not a domain name (letters, digits, '.', '_', '+', '-', at most 64, starting with a letter or digit)`,
    );
  }
  const { top } = await resolveChain(target, backupId, `Cannot restore backup ${backupId} from ${target.displayUrl}`, {
    manifestKey: opts.manifestKey,
  });
  const manifest = top.manifest;
  if (!manifest.vm) {
    throw fail(
      'not-found',
      `backup ${backupId} has no domain definition (made before vmbackup stored it); restore the disks with restore --to and define the VM by hand`,
    );
  }
  // a chunk backup: its whole-VM files are small files in the repository (encrypted like its disks)
  const store = isChunkManifest(manifest) ? await openChunkBackup(target, top, opts) : undefined;
  const files = await readVmFiles(target, manifest, fail, store);

  const rewriteOf = (r: DomainRewrite) => {
    try {
      return rewriteDomain(files.xml, manifest.domain, r);
    } catch (err) {
      if (err instanceof HypervisorError) throw fail('invalid', err.message, err);
      throw err;
    }
  };
  const common = { manifest, files, rewriteOf, fail };
  return opts.mode.kind === 'define'
    ? defineAnew(target, hypervisor, opts, opts.mode, common)
    : replaceOriginal(target, hypervisor, opts, opts.mode, common);
}

interface Common {
  manifest: Manifest;
  files: VmFiles;
  rewriteOf: (r: DomainRewrite) => ReturnType<typeof rewriteDomain>;
  fail: (kind: VmRestoreErrorKind, why: string, cause?: unknown) => VmRestoreError;
}

// ------------------------------------------------------------------------------------------ reading

async function readVmFiles(
  target: StorageTarget,
  manifest: Manifest,
  fail: Common['fail'],
  store: ChunkStore | undefined,
): Promise<VmFiles> {
  const vm = manifest.vm;
  if (!vm) throw new Error('no vm section');
  const read = async (what: string, entry: ManifestVmFile, maxBytes: number): Promise<VmFile> => {
    let data: Buffer;
    if (store) {
      // the index and every chunk are authenticated, and the size checked against the manifest
      try {
        data = await readChunkVmFile(store, {
          name: what,
          kind: 'xml',
          key: entry.key,
          size: entry.size,
          sha256: entry.sha256,
          maxBytes,
        });
      } catch (err) {
        if (err instanceof StorageError)
          throw fail(
            err.kind === 'not-found' ? 'not-found' : 'invalid',
            `its ${err.message}; restore from another copy`,
            err,
          );
        throw err;
      }
      return { entry, data };
    }
    try {
      data = await target.getBuffer(entry.key, { maxBytes });
    } catch (err) {
      if (err instanceof StorageError && err.kind === 'not-found') {
        throw fail(
          'not-found',
          `its ${what} (${entry.key}) is missing on ${target.displayUrl}; restore from another copy`,
        );
      }
      throw err;
    }
    const sha256 = createHash('sha256').update(data).digest('hex');
    if (data.length !== entry.size || sha256 !== entry.sha256) {
      throw fail(
        'invalid',
        `its ${what} on ${target.displayUrl} is corrupt (SHA-256 ${sha256}, ${data.length} bytes; the manifest says ${entry.sha256}, ${entry.size} bytes); restore from another copy`,
      );
    }
    return { entry, data };
  };
  const xmlFile = await read('domain XML', vm.xml, VM_FILE_MAX_BYTES.xml);
  let xml: string;
  try {
    xml = new TextDecoder('utf-8', { fatal: true }).decode(xmlFile.data);
  } catch {
    throw fail('invalid', 'its stored domain XML is not UTF-8 text');
  }
  const out: VmFiles = { xml };
  if (vm.nvram) out.nvram = { ...(await read('NVRAM file', vm.nvram, VM_FILE_MAX_BYTES.nvram)), path: vm.nvram.path };
  if (vm.tpm) {
    // swtpm keeps a TPM 2.0's state in tpm2/ and a 1.2's in tpm1_2/: files elsewhere would not be its state
    const versionDir = vm.tpm.version === '2.0' ? 'tpm2/' : 'tpm1_2/';
    const stray = vm.tpm.files.find((f) => !f.path.startsWith(versionDir));
    if (stray) {
      throw fail(
        'invalid',
        `its TPM ${vm.tpm.version} state names ${stray.path}, outside ${versionDir} where swtpm keeps it`,
      );
    }
    const tpmFiles: Array<VmFile & { path: string }> = [];
    for (const f of vm.tpm.files)
      tpmFiles.push({ ...(await read(`TPM file ${f.path}`, f, VM_FILE_MAX_BYTES.tpm)), path: f.path });
    out.tpm = { version: vm.tpm.version, files: tpmFiles };
  }
  return out;
}

// ------------------------------------------------------------------------------------------ files

async function exists(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined)) !== undefined;
}

/** `mkdir -p` with `mode` for the directories it makes; each one made is removed again by `undo` (when empty). */
async function makeDirs(dir: string, mode: number, undo: Undo): Promise<void> {
  const missing: string[] = [];
  for (let d = dir; !(await exists(d)); d = dirname(d)) {
    missing.unshift(d);
    if (dirname(d) === d) break;
  }
  for (const m of missing) {
    await mkdir(m, { mode });
    await chmod(m, mode); // the umask does not decide who can traverse it
    undo.add(() => rmdir(m));
  }
}

/** Writes `data` to a new file `path` (never over an existing one): a temp name, fsync, link, fsync the directory. */
async function writeNewFile(path: string, data: Buffer, undo: Undo): Promise<void> {
  const temp = await writeTemp(path, data);
  try {
    await link(temp, path);
  } catch (err) {
    if (errnoCode(err) === 'EEXIST') throw new Error(`${path} already exists`);
    throw err;
  } finally {
    await unlink(temp).catch(() => undefined);
  }
  undo.add(() => unlink(path));
  await fsyncDir(dirname(path));
}

/** `data` in a hidden temp file next to `path`, synced; returns its name. */
async function writeTemp(path: string, data: Buffer): Promise<string> {
  const temp = join(dirname(path), `.${basename(path)}.vmbackup-${randomBytes(6).toString('hex')}`);
  const fh = await open(temp, 'wx', 0o600);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await unlink(temp).catch(() => undefined);
    throw err;
  }
  await fh.close();
  return temp;
}

/** The swtpm state directory's layout: `<dir>/<uuid>` (root, 0711) holding `tpm2/` or `tpm1_2/` (0700, files 0600). */
async function writeTpmTree(root: string, files: NonNullable<VmFiles['tpm']>['files']): Promise<void> {
  for (const f of files) {
    const path = join(root, f.path);
    await mkdir(dirname(path), { recursive: true, mode: 0o700 });
    const fh = await open(path, 'wx', 0o600);
    try {
      await fh.writeFile(f.data);
      await fh.sync();
    } finally {
      await fh.close();
    }
  }
}

// ------------------------------------------------------------------------------------------ define

async function defineAnew(
  target: StorageTarget,
  hypervisor: Hypervisor,
  opts: VmRestoreOptions,
  mode: { kind: 'define'; name: string; to?: string },
  { manifest, files, rewriteOf, fail }: Common,
): Promise<VmRestoreResult> {
  const name = mode.name;
  if ((await hypervisor.listDomains()).includes(name)) {
    throw fail(
      'exists',
      `a domain named ${name} already exists on this host; pick another name with --define, or use --replace to restore over ${manifest.domain} when it is shut off`,
    );
  }
  const uuid = randomUUID();
  const dir = mode.to ?? (await defaultDir(files.xml, manifest, name, opts.stateDir));
  if (mode.to === undefined && (await exists(dir))) {
    throw fail('exists', `${dir} already exists; remove it or pass --to DIR to restore the disks elsewhere`);
  }
  const disks = Object.fromEntries(
    // a disk of a chunk backup is restored as qcow2, restoreBackup's default for it
    manifest.disks.map((d) => {
      const format = d.format === CHUNKS_FORMAT ? 'qcow2' : d.format;
      return [d.name, { path: join(dir, `${d.name}.${format}`), format }];
    }),
  );
  for (const [dev, d] of Object.entries(disks)) {
    if (d.format !== 'qcow2' && d.format !== 'raw')
      throw fail('invalid', `disk ${dev} is stored as ${d.format}, not qcow2 or raw`);
    if (await exists(d.path)) throw fail('exists', `${d.path} already exists; remove it or restore to another --to`);
  }
  const nvramPath = files.nvram ? join(opts.nvramDir ?? LIBVIRT_NVRAM_DIR, `${name}_VARS.fd`) : undefined;
  if (nvramPath && (await exists(nvramPath))) {
    throw fail('exists', `${nvramPath} already exists (the NVRAM of an older domain ${name}?); remove it first`);
  }
  const tpmDir = files.tpm ? join(opts.swtpmDir ?? LIBVIRT_SWTPM_DIR, uuid) : undefined;
  const rewritten = rewriteOf({
    name,
    uuid,
    keepMacs: opts.keepMacs ?? false,
    disks: disks as DomainRewrite['disks'],
    ...(nvramPath ? { nvramPath } : {}),
    logDir: dir,
    ...(opts.bootDirs ? { bootDirs: opts.bootDirs } : {}),
  });
  const result = restoreResult(manifest, { from: manifest.domain, domain: name, uuid, mode: 'define' }, opts, {
    rewritten,
    disks: disks as DomainRewrite['disks'],
    nvramPath,
    tpmDir,
    files,
  });
  if (opts.dryRun) return result;

  const undo = new Undo();
  let step = 'restore its disks';
  try {
    // 0711: QEMU running as its own user (libvirt relabels the images, not their directory) must traverse it
    await makeDirs(dir, 0o711, undo);
    opts.onStep?.(`restoring ${manifest.disks.length} disk(s) of backup ${manifest.backupId} into ${dir}`);
    const restored = await restoreBackup(target, manifest.backupId, {
      to: dir,
      ...(opts.manifestKey ? { manifestKey: opts.manifestKey } : {}),
      ...(opts.password ? { password: opts.password } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    for (const r of restored) undo.add(() => unlink(r.path));
    for (const log of rewritten.logFiles) undo.add(() => unlink(log)); // libvirt creates them at start
    if (nvramPath && files.nvram) {
      step = 'write its NVRAM';
      await makeDirs(dirname(nvramPath), 0o755, undo);
      await writeNewFile(nvramPath, files.nvram.data, undo);
      opts.onStep?.(`NVRAM -> ${nvramPath}`);
    }
    if (tpmDir && files.tpm) {
      step = 'write its TPM state';
      await makeDirs(dirname(tpmDir), 0o711, undo);
      await mkdir(tpmDir, { mode: 0o711 });
      undo.add(() => rm(tpmDir, { recursive: true, force: true }));
      await chmod(tpmDir, 0o711); // as libvirt makes it (the CLI's umask is 077)
      await writeTpmTree(tpmDir, files.tpm.files);
      opts.onStep?.(`TPM state -> ${tpmDir}`);
    }
    step = 'define it';
    opts.signal?.throwIfAborted();
    await hypervisor.defineDomain(rewritten.xml);
    // libvirt will not undefine a domain with an NVRAM file unless told what to do with it ("cannot undefine domain
    // with nvram"): the file is this restore's own
    undo.add(() => hypervisor.undefineDomain(name, { nvram: nvramPath !== undefined }));
    opts.onStep?.(`defined domain ${name} (UUID ${uuid})`);
    if (opts.start) {
      step = 'start it';
      await hypervisor.startDomain(name);
      result.started = true;
      opts.onStep?.(`started domain ${name}`);
    }
    return result;
  } catch (err) {
    await undo.run();
    throw failure(err, step, fail, opts.signal);
  }
}

/**
 * Where the disks of a domain defined anew go: a directory named after it next to the original's first disk when
 * that directory exists on this host (its storage pool, most likely), else the state directory.
 */
async function defaultDir(xml: string, manifest: Manifest, name: string, stateDir: string): Promise<string> {
  const fallback = join(stateDir, 'restored', name);
  let source: string | undefined;
  try {
    const first = manifest.disks[0]?.name;
    source = parseDomainXml(xml).disks.find((d) => d.target === first)?.source;
  } catch {
    return fallback; // the rewrite says what is wrong with the XML
  }
  if (!source || !isAbsolute(source)) return fallback;
  const parent = dirname(source);
  return (await stat(parent).catch(() => undefined))?.isDirectory() ? join(parent, name) : fallback;
}

function failure(err: unknown, step: string, fail: Common['fail'], signal?: AbortSignal): unknown {
  if (signal?.aborted) return fail('failed', 'it was interrupted; what it had written was removed');
  const why = err instanceof Error ? err.message.replace(/\.$/, '') : String(err);
  if (err instanceof StorageError) return err; // restoreBackup's sentence names the backup and what to do
  return fail('failed', `could not ${step} (${why}); what it had written was removed`, err);
}

// ------------------------------------------------------------------------------------------ replace

async function replaceOriginal(
  target: StorageTarget,
  hypervisor: Hypervisor,
  opts: VmRestoreOptions,
  mode: { kind: 'replace'; confirmed: boolean },
  { manifest, files, rewriteOf, fail }: Common,
): Promise<VmRestoreResult> {
  const name = manifest.domain;
  if (!(await hypervisor.listDomains()).includes(name)) {
    throw fail('not-found', `domain ${name} does not exist on this host; define it anew with --define ${name}`);
  }
  const state = await hypervisor.state(name);
  if (state !== 'shut off') {
    throw fail(
      'running',
      `domain ${name} is ${state}; shut it down first (virsh shutdown ${name}), nothing was changed`,
    );
  }
  const current = parseDomainXml(await hypervisor.domainXml(name, { inactive: true }));
  const disks: DomainRewrite['disks'] = {};
  for (const d of manifest.disks) {
    const now = current.disks.find((c) => c.target === d.name);
    if (!now?.source) {
      throw fail(
        'invalid',
        `domain ${name} has no disk ${d.name} now; restore the backup under a new name with --define`,
      );
    }
    if (now.type !== 'file' || (now.format !== 'qcow2' && now.format !== 'raw')) {
      throw fail(
        'invalid',
        `disk ${d.name} of ${name} is a ${now.type} disk (${now.format ?? 'no format'}); --replace restores over qcow2 and raw file disks only, restore under a new name with --define`,
      );
    }
    disks[d.name] = { path: now.source, format: now.format };
  }
  const nvramPath = files.nvram
    ? (current.nvram ?? join(opts.nvramDir ?? LIBVIRT_NVRAM_DIR, `${name}_VARS.fd`))
    : undefined;
  const tpmDir = files.tpm ? join(opts.swtpmDir ?? LIBVIRT_SWTPM_DIR, current.uuid) : undefined;
  const logDir = join(opts.stateDir, 'restored', name);
  const rewritten = rewriteOf({
    name,
    uuid: current.uuid,
    keepMacs: true,
    disks,
    ...(nvramPath ? { nvramPath } : {}),
    logDir,
    ...(opts.bootDirs ? { bootDirs: opts.bootDirs } : {}),
  });
  const result = restoreResult(manifest, { from: name, domain: name, uuid: current.uuid, mode: 'replace' }, opts, {
    rewritten,
    disks,
    nvramPath,
    tpmDir,
    files,
  });
  if (opts.dryRun) return result;
  if (!mode.confirmed) {
    throw fail(
      'unconfirmed',
      `--replace overwrites the disks${nvramPath ? ', NVRAM' : ''}${tpmDir ? ', TPM state' : ''} and definition of ${name}; add --yes to confirm (nothing was changed)`,
    );
  }

  // Stage every file next to its destination first; rename them into place only once all are ready.
  const undo = new Undo();
  const staged: Array<{ temp: string; path: string }> = [];
  let step = 'restore its disks';
  try {
    for (const [dev, d] of Object.entries(disks)) {
      const temp = join(dirname(d.path), `.${basename(d.path)}.vmbackup-replace-${randomBytes(6).toString('hex')}`);
      opts.onStep?.(`restoring disk ${dev} of backup ${manifest.backupId} next to ${d.path}`);
      await restoreBackup(target, manifest.backupId, {
        disk: dev,
        to: temp,
        format: d.format,
        ...(opts.manifestKey ? { manifestKey: opts.manifestKey } : {}),
        ...(opts.password ? { password: opts.password } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
      });
      undo.add(() => unlink(temp));
      staged.push({ temp, path: d.path });
    }
    if (nvramPath && files.nvram) {
      step = 'write its NVRAM';
      await makeDirs(dirname(nvramPath), 0o755, undo);
      const temp = await writeTemp(nvramPath, files.nvram.data);
      undo.add(() => unlink(temp));
      staged.push({ temp, path: nvramPath });
    }
    let tpmStage: { temp: string; path: string } | undefined;
    if (tpmDir && files.tpm) {
      step = 'write its TPM state';
      await makeDirs(tpmDir, 0o711, undo);
      const versionDir = files.tpm.version === '2.0' ? 'tpm2' : 'tpm1_2';
      const temp = join(tpmDir, `.${versionDir}.vmbackup-replace-${randomBytes(6).toString('hex')}`);
      await mkdir(temp, { mode: 0o700 });
      undo.add(() => rm(temp, { recursive: true, force: true }));
      await writeTpmTree(temp, files.tpm.files);
      tpmStage = { temp: join(temp, versionDir), path: join(tpmDir, versionDir) };
    }
    await makeDirs(logDir, 0o711, undo);
    opts.signal?.throwIfAborted();
    step = 'put the restored files in place';
    for (const s of staged) {
      await rename(s.temp, s.path);
      await fsyncDir(dirname(s.path));
    }
    if (tpmStage) {
      // the TPM state is a directory: the old one moves aside, the new one in, the old one goes
      const old = `${tpmStage.path}.vmbackup-old-${randomBytes(6).toString('hex')}`;
      const hadOld = await exists(tpmStage.path);
      if (hadOld) await rename(tpmStage.path, old);
      await rename(tpmStage.temp, tpmStage.path);
      if (hadOld) await rm(old, { recursive: true, force: true });
      await fsyncDir(dirname(tpmStage.path));
    }
    opts.onStep?.(`restored the files of ${name} in place`);
  } catch (err) {
    await undo.run();
    throw failure(err, step, fail, opts.signal);
  }
  try {
    await hypervisor.defineDomain(rewritten.xml);
  } catch (err) {
    throw fail(
      'failed',
      `its files were restored over those of ${name}, but libvirt refused the backup's definition (${(err as Error).message.replace(/\.$/, '')}); ${name} keeps its current definition`,
      err,
    );
  }
  opts.onStep?.(`defined domain ${name} from the backup`);
  if (opts.start) {
    try {
      await hypervisor.startDomain(name);
    } catch (err) {
      throw fail(
        'failed',
        `it was restored and defined, but could not be started (${(err as Error).message.replace(/\.$/, '')})`,
        err,
      );
    }
    result.started = true;
    opts.onStep?.(`started domain ${name}`);
  }
  return result;
}
