/**
 * What on this host an activity may touch. Activity inputs come from whoever can start a workflow or an
 * activity on the cluster (an activity runs as root next to every VM's disks), so no activity trusts a
 * path or a target it is given: every path it deletes, writes, reads to ship, or hands to libvirt or
 * qemu-img as an output is checked here to lie in one of this host's roots, in the directory of the
 * input's backup id, with symlinks resolved; every target must be within the worker's allow-list.
 *
 * Roots:
 * - staging: `<stateDir>/staging`, `<systemQemuDir>/staging` (where QEMU-written images go when the state
 *   dir is private, see qemu-paths.ts), and `<dir>/.staging` of an allowed local target `file://<dir>`;
 * - overlays: `<qemuStateDir>/overlays` (the snapshot method's overlays).
 *
 * A root must be a real directory (not a symlink), and it and every directory above it must be owned by
 * root or by us and not writable by anyone else (sticky directories such as /tmp excepted): then nobody
 * else can swap a directory on the way between the check and the use, and the activity uses the resolved
 * path the check returns.
 */
import { lstat, realpath } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ApplicationFailure } from '@temporalio/common';
import { ErrorType } from '../shared/errors';
import { DOMAIN_NAME_RE } from '../shared/names';
import { StorageError } from '../storage/errors';
import { canonicalTargetUrl, duplicateTargets, parseTargetUrl, redactUrl, targetWithin } from '../storage/registry';
import { permanent } from './failures';
import { SYSTEM_QEMU_DIR } from './qemu-paths';
import { isValidBackupId } from './snapshot-paths';

export interface HostPathsConfig {
  stateDir: string;
  /** where files QEMU opens itself live (overlays); default stateDir */
  qemuStateDir?: string;
  /** QEMU-reachable fallback for push staging (default /var/lib/vmbackup) */
  systemQemuDir?: string;
  /** target URL prefixes this worker ships to; undefined: every target */
  allowTargets?: readonly string[];
}

/** Disk target names (vda, sdb, hdc, ...): they become file names. */
const DISK_NAME_RE = /^[A-Za-z0-9_-]{1,32}$/;
/** Image formats an image file of ours can have. */
const IMAGE_FORMATS: ReadonlySet<string> = new Set(['qcow2', 'raw']);
const TARGET_STAGING = '.staging';
/** The whole-VM files a backup stages: `domain.xml`, `nvram.fd`, `tpm.<swtpm state file>` (storage/keys.ts). */
export const VM_FILE_NAME_RE = /^(domain\.xml|nvram\.fd|tpm\.[A-Za-z0-9_][A-Za-z0-9_.-]{0,99})$/;

export class HostPaths {
  /** configured staging roots, absolute and normalised */
  readonly stagingRoots: readonly string[];
  readonly overlayRoot: string;
  readonly systemQemuDir: string;
  readonly stateDir: string;
  private readonly allow?: readonly string[];

  constructor(config: HostPathsConfig) {
    this.stateDir = resolve(config.stateDir);
    this.systemQemuDir = resolve(config.systemQemuDir ?? SYSTEM_QEMU_DIR);
    this.stagingRoots = [join(this.stateDir, 'staging'), join(this.systemQemuDir, 'staging')];
    this.overlayRoot = join(resolve(config.qemuStateDir ?? config.stateDir), 'overlays');
    this.allow = config.allowTargets?.map((t) => canonicalTargetUrl(t));
  }

  /**
   * Every staging root recovery looks in for staging directories of dead backups: the configured roots, the default
   * target's `.staging`, and the `.staging` of each local target in the allow-list. (A local target a backup named
   * outside these is known only to that backup's workflow, which removes its own staging when it ends.)
   */
  recoveryStagingRoots(defaultTargetDir: string): string[] {
    const local = (this.allow ?? []).flatMap((url) => {
      const spec = parseTargetUrl(url);
      return spec.kind === 'file' ? [join(spec.path, TARGET_STAGING)] : [];
    });
    return [...new Set([...this.stagingRoots, join(resolve(defaultTargetDir), TARGET_STAGING), ...local])];
  }

  // ---------------------------------------------------------------- targets

  /** Whether this worker ships to `url` (a valid target URL within the allow-list, if there is one). */
  targetAllowed(url: string): boolean {
    if (!this.allow) return true;
    return this.allow.some((prefix) => targetWithin(url, prefix));
  }

  /** Throws a non-retryable failure with one sentence unless this worker ships to `url`. */
  checkTarget(url: unknown, activity: string): string {
    if (typeof url !== 'string') throw refused(`${activity}: the target is not a URL`, ErrorType.InvalidTarget);
    try {
      parseTargetUrl(url);
    } catch (err) {
      if (err instanceof StorageError) throw refused(`${activity}: ${err.message}`, ErrorType.InvalidTarget);
      throw err;
    }
    if (!this.targetAllowed(url)) {
      throw refused(
        `${activity}: this worker does not write to ${redactUrl(url)}: it is outside the targets it allows (vmbackup worker --allow-target, VMBACKUP_ALLOW_TARGETS)`,
        ErrorType.InvalidTarget,
      );
    }
    return url;
  }

  /** Checks every target of a request (allowed, no two naming the same place). */
  checkTargets(urls: unknown, activity: string): string[] {
    if (!Array.isArray(urls) || urls.length === 0) {
      throw refused(`${activity}: the request names no target`, ErrorType.InvalidInput);
    }
    for (const url of urls) this.checkTarget(url, activity);
    const dup = duplicateTargets(urls as string[])[0];
    if (dup) {
      throw refused(
        `${activity}: targets ${redactUrl(dup.first)} and ${redactUrl(dup.dup)} are the same place; name each target once`,
        ErrorType.InvalidInput,
      );
    }
    return urls as string[];
  }

  /** `<dir>/.staging` of local target `file://<dir>`. */
  targetStagingRoot(url: string): string {
    const spec = parseTargetUrl(url);
    if (spec.kind !== 'file') throw new Error(`${redactUrl(url)} is not a local target`);
    return join(resolve(spec.path), TARGET_STAGING);
  }

  // ---------------------------------------------------------------- paths

  /** `dir` must be `<staging root>/<backupId>`; returns its resolved path. */
  async stagingDir(dir: unknown, backupId: unknown, activity: string): Promise<string> {
    const id = this.backupId(backupId, activity);
    return this.inside(dir, id, 1, 'staging', activity, 'the staging directory');
  }

  /** `path` must be `<staging root>/<backupId>/<disk>.<format>`; returns its resolved path. */
  async stagingImage(
    path: unknown,
    backupId: unknown,
    image: { name: unknown; format: unknown },
    activity: string,
  ): Promise<string> {
    const id = this.backupId(backupId, activity);
    const name = this.diskName(image.name, activity);
    const format = this.imageFormat(image.format, activity);
    if (typeof path !== 'string' || basename(path) !== `${name}.${format}`) {
      throw refused(
        `${activity}: ${show(path)} is not the staging image of disk ${name} (${name}.${format})`,
        ErrorType.InvalidInput,
      );
    }
    return this.inside(path, id, 2, 'staging', activity, `the staging image of disk ${name}`);
  }

  /** `path` must be `<staging root>/<backupId>/<name>` for a whole-VM file name; returns its resolved path. */
  async stagingVmFile(path: unknown, backupId: unknown, name: unknown, activity: string): Promise<string> {
    const id = this.backupId(backupId, activity);
    if (typeof name !== 'string' || !VM_FILE_NAME_RE.test(name)) {
      throw refused(`${activity}: ${show(name)} is not the name of a whole-VM file`, ErrorType.InvalidInput);
    }
    if (typeof path !== 'string' || basename(path) !== name) {
      throw refused(`${activity}: ${show(path)} is not the staged file ${name}`, ErrorType.InvalidInput);
    }
    return this.inside(path, id, 2, 'staging', activity, `the staged file ${name}`);
  }

  /**
   * `path` must be `<staging root>/<id>/<disk>.<format>` for a valid backup id `id`: for an input that names no
   * backup id (prepareChainImages from a workflow that does not pass one yet).
   */
  async stagingImageOfAnyBackup(
    path: unknown,
    image: { name: unknown; format: unknown },
    activity: string,
  ): Promise<string> {
    const id = typeof path === 'string' ? basename(dirname(path)) : undefined;
    return this.stagingImage(path, id, image, activity);
  }

  /** `path` must be `<overlay root>/<backupId>/<file>`; returns its resolved path. */
  async overlayFile(path: unknown, backupId: unknown, activity: string): Promise<string> {
    const id = this.backupId(backupId, activity);
    return this.inside(path, id, 2, 'overlay', activity, 'the overlay');
  }

  /** `<overlay root>/<backupId>`, resolved. */
  async overlayDir(backupId: unknown, activity: string): Promise<string> {
    const id = this.backupId(backupId, activity);
    return this.inside(join(this.overlayRoot, id), id, 1, 'overlay', activity, 'the overlay directory');
  }

  backupId(backupId: unknown, activity: string): string {
    if (typeof backupId !== 'string' || !isValidBackupId(backupId)) {
      throw refused(`${activity}: ${show(backupId)} is not a valid backup id`, ErrorType.InvalidInput);
    }
    return backupId;
  }

  domainName(domain: unknown, activity: string): string {
    if (typeof domain !== 'string' || !DOMAIN_NAME_RE.test(domain)) {
      throw refused(`${activity}: ${show(domain)} is not a valid domain name`, ErrorType.InvalidInput);
    }
    return domain;
  }

  diskName(name: unknown, activity: string): string {
    if (typeof name !== 'string' || !DISK_NAME_RE.test(name)) {
      throw refused(`${activity}: ${show(name)} is not a valid disk name`, ErrorType.InvalidInput);
    }
    return name;
  }

  imageFormat(format: unknown, activity: string): string {
    if (typeof format !== 'string' || !IMAGE_FORMATS.has(format)) {
      throw refused(`${activity}: ${show(format)} is not an image format of ours (qcow2, raw)`, ErrorType.InvalidInput);
    }
    return format;
  }

  /**
   * `path` must be `<root>/<backupId>` (depth 1) or `<root>/<backupId>/<file>` (depth 2) for a root of `kind`,
   * and stay there once symlinks are resolved. Returns the resolved path.
   */
  private async inside(
    path: unknown,
    backupId: string,
    depth: 1 | 2,
    kind: 'staging' | 'overlay',
    activity: string,
    what: string,
  ): Promise<string> {
    const no = (why: string): ApplicationFailure =>
      refused(
        `${activity}: ${show(path)} is not ${what} of backup ${backupId} on this host (${why}); refused`,
        ErrorType.InvalidInput,
      );
    if (typeof path !== 'string' || path.includes('\0') || !isAbsolute(path) || normalize(path) !== path) {
      throw no('not a normalised absolute path');
    }
    const parts = path.split('/');
    const rel = parts.slice(-depth);
    const root = parts.slice(0, -depth).join('/') || '/';
    if (rel[0] !== backupId) throw no(`not in a directory named ${backupId}`);
    if (!this.isRoot(root, kind)) throw no(`not under a ${kind} directory of this host`);
    let real: string;
    let realRoot: string;
    try {
      realRoot = await realpathLoose(root);
      // the root itself is ours: a symlink there (`.staging` -> /) would move the whole root
      if (realRoot !== join(await realpathLoose(dirname(root)), basename(root))) throw no(`${root} is a symbolic link`);
      real = await realpathLoose(path);
    } catch (err) {
      if (isFailure(err)) throw err;
      throw no((err as Error).message);
    }
    if (real !== join(realRoot, ...rel)) throw no(`it resolves to ${real}`);
    const unsafe = await unsafeDirectory(realRoot);
    if (unsafe) throw no(unsafe);
    return real;
  }

  private isRoot(root: string, kind: 'staging' | 'overlay'): boolean {
    if (kind === 'overlay') return root === this.overlayRoot;
    if (this.stagingRoots.includes(root)) return true;
    if (basename(root) !== TARGET_STAGING) return false;
    const dir = dirname(root);
    if (dir === '/') return false;
    try {
      return this.targetAllowed(pathToFileURL(dir).href);
    } catch {
      return false; // not a valid target directory
    }
  }
}

function refused(message: string, type: typeof ErrorType.InvalidInput | typeof ErrorType.InvalidTarget) {
  return permanent(message, type);
}

function isFailure(err: unknown): err is ApplicationFailure {
  return err instanceof ApplicationFailure;
}

function show(value: unknown): string {
  return typeof value === 'string' ? value : (JSON.stringify(value) ?? String(value));
}

/**
 * realpath, for a path that may not exist yet: its nearest existing ancestor resolved, the rest appended. Another
 * backup may create or remove a shared directory meanwhile (a target's `.staging`, made by one backup's
 * prepareStaging and removed by another's cleanupStaging once empty): a path that appears between the realpath and
 * the lstat is resolved again, and only a real symlink to nowhere is refused.
 */
export async function realpathLoose(path: string, tries = 5): Promise<string> {
  try {
    return await realpath(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    const st = await lstat(path).catch(() => undefined);
    // a symlink to nowhere: writing through it would create its target
    if (st?.isSymbolicLink()) throw new Error(`${path} is a symbolic link to a missing file`);
    if (st) {
      if (tries <= 1) throw new Error(`${path} keeps appearing and disappearing`);
      return realpathLoose(path, tries - 1); // it appeared after the realpath: resolve it as it is now
    }
    const parent = dirname(path);
    if (parent === path) return path;
    return join(await realpathLoose(parent), basename(path));
  }
}

/**
 * Why `dir` (resolved) is not safe to act in, or undefined: it or a directory above it is owned by another
 * user, or is writable by group or others without the sticky bit.
 */
export async function unsafeDirectory(dir: string): Promise<string | undefined> {
  const me = typeof process.geteuid === 'function' ? process.geteuid() : 0;
  for (let cur = dir; ; cur = dirname(cur)) {
    const st = await lstat(cur).catch(() => undefined);
    if (st) {
      if (st.uid !== 0 && st.uid !== me) return `${cur} belongs to another user (uid ${st.uid})`;
      // a sticky directory above (/tmp) keeps others from renaming our entries; the root itself must be closed
      const sticky = cur !== dir && (st.mode & 0o1000) !== 0;
      if ((st.mode & 0o022) !== 0 && !sticky) return `${cur} is writable by other users`;
    }
    if (cur === dirname(cur)) return undefined;
  }
}
