/**
 * Whole-VM files (issue #14): the domain's persistent definition, its UEFI variable store (NVRAM) and its emulated
 * TPM's state, copied into the backup's staging directory at the backup point and shipped beside the images.
 *
 * The NVRAM and TPM paths are the ones libvirt reports for the domain (its inactive XML), never a path from the
 * activity's input: whoever can start an activity must not make the worker read /etc/shadow into a bucket. QEMU
 * writes the NVRAM and swtpm the TPM state while the VM runs; each file is read until two reads in a row are equal
 * (see docs/whole-vm.md for what that gives).
 */
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import { lstat, open, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Context, log } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import type { Hypervisor, VmState } from '../hypervisor/port';
import { VM_FILE_MAX_BYTES } from '../repository/manifest';
import type {
  CaptureVmStateInput,
  HostActivities,
  ShipVmFilesInput,
  StagedVmFile,
  VmCapture,
  VmFilesRecord,
} from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { PRIVATE_FILE_MODE } from '../shared/file-modes';
import { fsyncDir } from '../shared/fsync';
import { VM_NVRAM_NAME, VM_TPM_PREFIX, VM_XML_NAME, vmFileKey } from '../storage/keys';
import { hypervisorFailure, permanent } from './failures';
import type { HostPaths } from './host-paths';
import { withTarget } from './storage';
import type { StorageActivityDeps } from './storage';

export interface VmFileActivityDeps {
  hypervisor: Hypervisor;
  paths: HostPaths;
  openTarget: StorageActivityDeps['openTarget'];
}

/** swtpm's state files: `tpm2-00.permall`, `tpm2-00.volatilestate`, `tpm-00.savestate` (not its TMP*, *.bak, .lock) */
const SWTPM_STATE_FILE_RE = /^tpm2?-[0-9a-f]{2}\.[a-z]+$/;
/** the subdirectory swtpm (as libvirt starts it) keeps each TPM version's state in */
const TPM_SUBDIR = { '2.0': 'tpm2', '1.2': 'tpm1_2' } as const;
/** reads of a file a running VM writes, until two in a row are equal */
const STABLE_READ_TRIES = 8;
const STABLE_READ_PAUSE_MS = 100;

export function createVmFileActivities(
  deps: VmFileActivityDeps,
): Pick<HostActivities, 'captureVmState' | 'shipVmFiles'> {
  const { paths } = deps;
  return {
    async captureVmState(input: CaptureVmStateInput): Promise<VmCapture> {
      const activity = 'captureVmState';
      const backupId = paths.backupId(input.backupId, activity);
      const domain = paths.domainName(input.domain, activity);
      const dir = await paths.stagingDir(input.stagingDir, backupId, activity);
      let state: VmState;
      try {
        state = await deps.hypervisor.vmState(domain);
      } catch (err) {
        hypervisorFailure(err);
      }
      if (state.name !== domain) {
        throw permanent(`libvirt returned the definition of ${state.name} for ${domain}`, ErrorType.InvalidInput);
      }
      const files: StagedVmFile[] = [];
      const stage = async (name: string, body: Buffer): Promise<StagedVmFile> => {
        const file = { name, ...(await writeStaged(dir, name, body)) };
        files.push(file);
        return file;
      };

      const xml = Buffer.from(state.xml, 'utf8');
      if (xml.length > VM_FILE_MAX_BYTES.xml) {
        throw permanent(
          `The definition of ${domain} is ${xml.length} bytes, more than a backup stores (${VM_FILE_MAX_BYTES.xml}).`,
          ErrorType.InvalidInput,
        );
      }
      const x = await stage(VM_XML_NAME, xml);
      const vm: VmFilesRecord = {
        xml: { key: vmFileKey(domain, backupId, VM_XML_NAME), size: x.size, sha256: x.sha256 },
      };

      if (state.nvram) {
        const body = await readStable(state.nvram.path, VM_FILE_MAX_BYTES.nvram, `the NVRAM file of ${domain}`);
        if (body) {
          const f = await stage(VM_NVRAM_NAME, body);
          vm.nvram = {
            key: vmFileKey(domain, backupId, VM_NVRAM_NAME),
            size: f.size,
            sha256: f.sha256,
            path: state.nvram.path,
          };
        } else {
          // libvirt makes it from the template at the first start: a domain never started has none yet
          log.info('the domain has no NVRAM file yet: none is stored', { domain, path: state.nvram.path });
        }
      }

      if (state.tpm) {
        const sub = TPM_SUBDIR[state.tpm.version];
        const tpmDir = join(state.tpm.stateDir, sub);
        const tpmFiles: NonNullable<VmFilesRecord['tpm']>['files'] = [];
        for (const name of await stateFileNames(tpmDir, domain)) {
          const body = await readStable(
            join(tpmDir, name),
            VM_FILE_MAX_BYTES.tpm,
            `TPM state file ${name} of ${domain}`,
          );
          if (!body) continue; // swtpm removed it meanwhile (a volatile state after a resume)
          const stored = `${VM_TPM_PREFIX}${name}`;
          const f = await stage(stored, body);
          tpmFiles.push({
            path: `${sub}/${name}`,
            key: vmFileKey(domain, backupId, stored),
            size: f.size,
            sha256: f.sha256,
          });
        }
        if (tpmFiles.length > 0) vm.tpm = { version: state.tpm.version, files: tpmFiles };
        else log.info('the TPM has no state yet (the domain never started): none is stored', { domain, tpmDir });
      } else if (state.unsupportedTpm) {
        log.warn(`the TPM state of ${domain} is not backed up: ${state.unsupportedTpm}`, { domain });
      }
      return { files, vm };
    },

    async shipVmFiles(input: ShipVmFilesInput): Promise<void> {
      const activity = 'shipVmFiles';
      paths.checkTarget(input.target, activity);
      const backupId = paths.backupId(input.backupId, activity);
      const domain = paths.domainName(input.domain, activity);
      if (!Array.isArray(input.files) || input.files.length > 32) {
        throw permanent(`${activity}: the input lists no whole-VM files`, ErrorType.InvalidInput);
      }
      const files: StagedVmFile[] = [];
      for (const f of input.files) {
        files.push({ ...f, path: await paths.stagingVmFile(f.path, backupId, f.name, activity) });
      }
      const ctx = Context.current();
      await withTarget(deps, input.target, input.s3Options, async (target) => {
        for (const f of files) {
          const key = vmFileKey(domain, backupId, f.name);
          const there = await target.stat(key);
          if (there && there.size === f.size && there.metadata?.sha256 === f.sha256) continue;
          // the driver fails with 'checksum' unless what it stored hashes to f.sha256
          const result = await target.putImage(key, f.path, {
            signal: ctx.cancellationSignal,
            metadata: { sha256: f.sha256, domain, backupid: backupId, file: f.name },
          });
          if (result.sha256 !== f.sha256 || result.size !== f.size) {
            throw ApplicationFailure.nonRetryable(
              `${f.name} of backup ${backupId} was stored on ${target.displayUrl} with SHA-256 ${result.sha256} (${result.size} bytes) instead of ${f.sha256} (${f.size} bytes); run the backup again.`,
              ErrorType.ChecksumMismatch,
            );
          }
          ctx.heartbeat();
        }
      });
    },
  };
}

/** The names of swtpm's state files in `dir` (regular files only); none when the directory does not exist. */
async function stateFileNames(dir: string, domain: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw ApplicationFailure.retryable(`cannot list the TPM state of ${domain} in ${dir}: ${(err as Error).message}`);
  }
  const out: string[] = [];
  for (const name of names.sort()) {
    if (!SWTPM_STATE_FILE_RE.test(name)) continue;
    const st = await lstat(join(dir, name)).catch(() => undefined);
    if (st?.isFile()) out.push(name);
  }
  if (out.length > 16) {
    throw permanent(
      `the TPM state of ${domain} in ${dir} has ${out.length} files, more than a backup stores (16)`,
      ErrorType.InvalidInput,
    );
  }
  return out;
}

/**
 * The file's bytes once two reads in a row are equal (QEMU or swtpm may write it meanwhile); undefined when it does
 * not exist. A symlink or anything but a regular file is refused; more than `max` bytes too.
 */
async function readStable(path: string, max: number, what: string): Promise<Buffer | undefined> {
  let previous = await readCapped(path, max, what);
  for (let i = 0; i < STABLE_READ_TRIES; i++) {
    await new Promise((r) => setTimeout(r, STABLE_READ_PAUSE_MS));
    const current = await readCapped(path, max, what);
    if (current === undefined && previous === undefined) return undefined;
    if (current && previous && current.equals(previous)) return current;
    previous = current;
  }
  throw ApplicationFailure.retryable(
    `${what} (${path}) changed between every two of ${STABLE_READ_TRIES + 1} reads; the backup step is retried`,
    'VmFileUnstable',
  );
}

async function readCapped(path: string, max: number, what: string): Promise<Buffer | undefined> {
  let fh;
  try {
    fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    if (code === 'ELOOP') throw permanent(`${what} (${path}) is a symbolic link; refused`, ErrorType.InvalidInput);
    throw ApplicationFailure.retryable(`cannot read ${what} (${path}): ${(err as Error).message}`);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw permanent(`${what} (${path}) is not a regular file; refused`, ErrorType.InvalidInput);
    if (st.size > max) {
      throw permanent(
        `${what} (${path}) is ${st.size} bytes, more than a backup stores (${max})`,
        ErrorType.InvalidInput,
      );
    }
    // read to the end, one byte past the cap at most (the file may grow between stat and read)
    const chunks: Buffer[] = [];
    let total = 0;
    for (;;) {
      const buf = Buffer.alloc(Math.min(1 << 20, max + 1 - total));
      if (buf.length === 0) break;
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      chunks.push(buf.subarray(0, bytesRead));
      total += bytesRead;
    }
    if (total > max)
      throw permanent(`${what} (${path}) is more than a backup stores (${max} bytes)`, ErrorType.InvalidInput);
    return Buffer.concat(chunks, total);
  } finally {
    await fh.close();
  }
}

/** Writes `body` as `<dir>/<name>` (temp file, fsync, rename, mode 0600): a retry replaces it whole. */
async function writeStaged(
  dir: string,
  name: string,
  body: Buffer,
): Promise<{ path: string; size: number; sha256: string }> {
  const path = join(dir, name);
  const tmp = join(dir, `.${name}.tmp`);
  await rm(tmp, { force: true });
  const fh = await open(
    tmp,
    constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
    PRIVATE_FILE_MODE,
  );
  try {
    await fh.chmod(PRIVATE_FILE_MODE); // whatever the umask
    await fh.writeFile(body);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  await fsyncDir(dir);
  return { path, size: body.length, sha256: createHash('sha256').update(body).digest('hex') };
}
