/**
 * Image files: qemu-img info/check/compare/convert (JSON where qemu-img offers it). The SHA-256 every backup
 * image gets before it is shipped is src/shared/sha256-file.ts.
 *
 * A guest controls every byte of a raw disk, so a copy of it may start with a qcow2 header naming any backing
 * file (`/etc/hostname`, `json:{"driver":"nbd",...}`). qemu-img probes the format when it is not given and opens
 * the backing file a header names, so every call here that reads an image we did not configure ourselves names its
 * format and opens it through an explicit `json:` spec whose backing is the one we name, or none (ImageSpec).
 */
import { rm } from 'node:fs/promises';
import { HypervisorError, toolErrorText } from './errors';
import { ExecStartError, execTool } from './exec';
import type { ExecOptions, ExecResult } from './exec';

const QEMU_IMG = 'qemu-img';

export interface ImageInfo {
  filename: string;
  /** qcow2, raw, ... */
  format: string;
  /** bytes the guest sees */
  virtualSize: number;
  /** bytes allocated on the host */
  actualSize: number;
  clusterSize?: number;
  /** the direct backing file as recorded in the image (absolute when qemu-img could resolve it) */
  backingFile?: string;
  backingFormat?: string;
  dirty: boolean;
  /** qcow2's corrupt flag */
  corrupt?: boolean;
  /** qcow2's external data file (the guest's data lives in that file, not in the image) */
  dataFile?: string;
  /** with { backingChain: true }: the images below this one, top first */
  chain?: ImageInfo[];
}

export interface ImageCheck {
  /** no corruptions and no check errors (leaked clusters waste space but lose no data) */
  ok: boolean;
  /** false for formats qemu-img cannot check (raw) */
  checked: boolean;
  format?: string;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  /** one line for messages: "2 corruptions, 0 leaks" */
  summary: string;
}

/**
 * Builds a HypervisorError for a failed qemu-img run. `opened` is the json: filename qemu-img was given and `path`
 * the file it stands for: qemu-img repeats the filename in its errors, and a person wants to read the path.
 */
function imageError(result: ExecResult, action: string, opened?: { filename: string; path: string }): HypervisorError {
  let said = toolErrorText(result.stderr) || `qemu-img exited with code ${result.code ?? result.signal}`;
  if (opened) said = said.split(opened.filename).join(opened.path);
  // 'Failed to get shared "write" lock': a running QEMU holds the image
  const kind = /Failed to get .* lock/i.test(result.stderr) ? 'busy' : 'failed';
  return new HypervisorError(kind, `cannot ${action}: ${said}`, { stderr: result.stderr, command: result.command });
}

/**
 * One image opened exactly as described: its format, and for a format with backing files the image below it as
 * WE name it (from a manifest), or none. The backing file recorded in the image's header is never followed.
 */
export interface ImageSpec {
  path: string;
  /** qcow2, raw, ...: never probed */
  format: string;
  /** the image its unallocated clusters read from; null or absent: none (the header's backing name is ignored) */
  backing?: ImageSpec | null;
}

/** Formats whose images can name a backing file; only these take (and need) an explicit `backing`. */
const BACKING_FORMATS: ReadonlySet<string> = new Set(['qcow2', 'qcow', 'qed', 'vmdk']);

function specNode(spec: ImageSpec): Record<string, unknown> {
  if (!/^[a-z0-9]+$/.test(spec.format)) throw new Error(`"${spec.format}" is not an image format name`);
  const node: Record<string, unknown> = { driver: spec.format, file: { driver: 'file', filename: spec.path } };
  if (BACKING_FORMATS.has(spec.format)) node.backing = spec.backing ? specNode(spec.backing) : null;
  else if (spec.backing) throw new Error(`a ${spec.format} image has no backing file (${spec.path})`);
  return node;
}

/**
 * The `json:` filename that opens `spec` (and the backing chain it names) with every format given and no backing
 * file read from a header: `json:{"driver":"qcow2","file":{"driver":"file","filename":…},"backing":null}`.
 */
export function imageSpecFilename(spec: ImageSpec): string {
  return `json:${JSON.stringify(specNode(spec))}`;
}

/** A chain of images top first (each reads its unallocated clusters from the next) as one ImageSpec. */
export function chainSpec(links: ReadonlyArray<{ path: string; format: string }>): ImageSpec {
  const [top, ...below] = links;
  if (!top) throw new Error('an image chain needs at least one image');
  return { path: top.path, format: top.format, backing: below.length > 0 ? chainSpec(below) : null };
}

async function qemuImg(args: readonly string[], action: string, opts: ExecOptions = {}): Promise<ExecResult> {
  try {
    return await execTool(QEMU_IMG, args, opts);
  } catch (err) {
    if (err instanceof ExecStartError) {
      throw new HypervisorError(
        err.code === 'ENOENT' ? 'unsupported' : 'failed',
        err.code === 'ENOENT'
          ? `cannot ${action}: qemu-img is not installed (apt-get install qemu-utils)`
          : `cannot ${action}: ${err.message}`,
        { command: err.command, cause: err },
      );
    }
    throw err;
  }
}

interface QemuImgInfoJson {
  filename?: string;
  format?: string;
  'virtual-size'?: number;
  'actual-size'?: number;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  'format-specific'?: { data?: { corrupt?: boolean; 'data-file'?: string } };
}

function toImageInfo(j: QemuImgInfoJson): ImageInfo {
  return {
    filename: j.filename ?? '',
    format: j.format ?? 'raw',
    virtualSize: j['virtual-size'] ?? 0,
    actualSize: j['actual-size'] ?? 0,
    clusterSize: j['cluster-size'],
    backingFile: j['full-backing-filename'] ?? j['backing-filename'],
    backingFormat: j['backing-filename-format'],
    dirty: j['dirty-flag'] ?? false,
    corrupt: j['format-specific']?.data?.corrupt,
    ...(j['format-specific']?.data?.['data-file'] !== undefined
      ? { dataFile: j['format-specific'].data['data-file'] }
      : {}),
  };
}

/** Parses `qemu-img info --output=json [--backing-chain]` (an object, or an array top first). */
export function parseImageInfo(json: string): ImageInfo {
  const parsed = JSON.parse(json) as QemuImgInfoJson | QemuImgInfoJson[];
  if (!Array.isArray(parsed)) return toImageInfo(parsed);
  const [top, ...below] = parsed.map(toImageInfo);
  if (!top) throw new Error('qemu-img info returned an empty backing chain');
  return { ...top, chain: below };
}

/**
 * `qemu-img info --output=json` of an image in a known format (never probed). The image is opened without its
 * backing file, whatever its header names. backingChain: true follows the chain the header names instead, for a
 * running domain's own disk, whose header the host configured (a guest writes only what the image holds).
 * forceShare (default true) adds -U, needed to read an image a running QEMU holds ('Failed to get shared "write"
 * lock' otherwise).
 */
export async function imageInfo(
  path: string,
  opts: { format: string; backingChain?: boolean; forceShare?: boolean; signal?: AbortSignal },
): Promise<ImageInfo> {
  const args = ['info', '--output=json'];
  if (opts.forceShare ?? true) args.push('-U');
  const filename = opts.backingChain ? path : imageSpecFilename({ path, format: opts.format, backing: null });
  if (opts.backingChain) args.push('--backing-chain');
  args.push('-f', opts.format, '--', filename);
  const action = `read the image information of ${path}`;
  const result = await qemuImg(args, action, { signal: opts.signal, timeoutMs: 60_000 });
  if (result.code !== 0) throw imageError(result, action, { filename, path });
  const info = parseImageInfo(result.stdout);
  return opts.backingChain ? info : { ...info, filename: path };
}

interface QemuImgCheckJson {
  format?: string;
  corruptions?: number;
  leaks?: number;
  'check-errors'?: number;
}

/** Parses `qemu-img check --output=json`, given its exit code (0 ok, 2 corrupt, 3 leaks, 1 check failed). */
export function parseImageCheck(json: string, exitCode: number): ImageCheck {
  const j = JSON.parse(json) as QemuImgCheckJson;
  const corruptions = j.corruptions ?? 0;
  const leaks = j.leaks ?? 0;
  const checkErrors = j['check-errors'] ?? 0;
  const incomplete = exitCode === 1;
  const parts = [`${corruptions} corruptions`, `${leaks} leaked clusters`];
  if (checkErrors > 0) parts.push(`${checkErrors} check errors`);
  if (incomplete) parts.push('the check could not complete');
  return {
    ok: corruptions === 0 && checkErrors === 0 && !incomplete,
    checked: true,
    format: j.format,
    corruptions,
    leaks,
    checkErrors,
    summary: parts.join(', '),
  };
}

/**
 * `qemu-img check --output=json`: THE consistency check of an image (backup staging, verify, restore), in its known
 * format and without opening any backing file (the header's backing name is ignored). A format qemu-img cannot
 * check (raw: "This image format does not support checks", exit 63) gives { ok: true, checked: false }.
 * forceShare adds -U for an image a running QEMU may hold.
 */
export async function checkImage(
  path: string,
  opts: { format: string; forceShare?: boolean; signal?: AbortSignal },
): Promise<ImageCheck> {
  const args = ['check', '--output=json'];
  if (opts.forceShare) args.push('-U');
  const filename = imageSpecFilename({ path, format: opts.format, backing: null });
  args.push('-f', opts.format, '--', filename);
  const action = `check the image ${path}`;
  const result = await qemuImg(args, action, { signal: opts.signal });
  if (result.code === 63 || /does not support checks/.test(result.stderr)) {
    return {
      ok: true,
      checked: false,
      format: opts.format,
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      summary: 'format without consistency checks',
    };
  }
  if (result.stdout.trim().startsWith('{') && result.code !== null && [0, 1, 2, 3].includes(result.code)) {
    return parseImageCheck(result.stdout, result.code);
  }
  throw imageError(result, action, { filename, path });
}

/**
 * `qemu-img compare -U` (a running disk is locked): true when the guest-visible contents are
 * identical (an image and its copy in another format compare equal). Throws when either cannot be read.
 */
export async function compareImages(
  a: string,
  b: string,
  opts: { formatA?: string; formatB?: string; signal?: AbortSignal } = {},
): Promise<boolean> {
  const args = ['compare', '-U'];
  if (opts.formatA) args.push('-f', opts.formatA);
  if (opts.formatB) args.push('-F', opts.formatB);
  args.push('--', a, b);
  const action = `compare ${a} with ${b}`;
  const result = await qemuImg(args, action, { signal: opts.signal });
  if (result.code === 0) return true;
  if (result.code === 1) return false;
  throw imageError(result, action);
}

interface QemuImgMapJson {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/**
 * Parses `qemu-img map -f raw --output=json`: the byte ranges of the file it reports as holes (no data,
 * reads as zeros), adjacent ones merged. A range it does not mention is not a hole.
 */
export function parseFileHoles(json: string): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const e of JSON.parse(json) as QemuImgMapJson[]) {
    if (e.data !== false || e.zero !== true || !(e.length > 0)) continue;
    const last = out.at(-1);
    if (last && last[1] === e.start) last[1] = e.start + e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

/**
 * The holes of the FILE `path`, whatever its format (`-f raw`: the file's own allocation, which QEMU
 * finds with SEEK_DATA/SEEK_HOLE as `cp --sparse` does). `-U`: a running QEMU holds the image.
 */
export async function fileHoles(path: string, opts: { signal?: AbortSignal } = {}): Promise<Array<[number, number]>> {
  const action = `map the holes of ${path}`;
  const result = await qemuImg(['map', '-U', '-f', 'raw', '--output=json', '--', path], action, {
    signal: opts.signal,
    timeoutMs: 60_000,
  });
  if (result.code !== 0) throw imageError(result, action);
  return parseFileHoles(result.stdout);
}

/** The last `(12.34/100%)` in a chunk of `qemu-img convert -p` output, as a fraction. */
export function parseConvertProgress(chunk: string): number | undefined {
  let last: string | undefined;
  for (const m of chunk.matchAll(/\((\d+(?:\.\d+)?)\/100%\)/g)) last = m[1];
  return last === undefined ? undefined : Math.min(1, Number(last) / 100);
}

/**
 * A domain's own disk as QEMU runs it: a qcow2 one reads the backing chain its header names, which the host
 * configured (the guest writes only what the images hold). Only for a domain's configured disk, never for an image
 * a guest could have written the header of (a backup copy of a raw disk) or one read from a target.
 */
export interface DomainDiskSource {
  path: string;
  format: string;
  backing: 'from-header';
}

/**
 * `qemu-img convert -p` (sparse: zero clusters are not written) to a standalone image (no backing file). The
 * output file is removed when the conversion fails or is aborted; when it exists already (created 0600 by the
 * caller) qemu-img writes into it and its mode stays. forceShare (default false) adds -U: without it a source that
 * a running QEMU holds is refused, which is what an offline copy wants.
 *
 * `src` is an ImageSpec (an image and the backing chain WE name, e.g. a backup chain from its manifests, read in
 * one pass with no header's backing name followed) or a domain's own disk.
 */
export async function convertImage(
  src: ImageSpec | DomainDiskSource,
  dst: string,
  opts: {
    dstFormat?: 'qcow2' | 'raw';
    forceShare?: boolean;
    /** fraction done, 0..1 */
    onProgress?: (fraction: number) => void;
    signal?: AbortSignal;
  } = {},
): Promise<void> {
  const args = ['convert', '-p'];
  if (opts.forceShare) args.push('-U');
  const source = src.backing === 'from-header' ? src.path : imageSpecFilename(src);
  args.push('-f', src.format, '-O', opts.dstFormat ?? 'qcow2', '--', source, dst);
  const action = `convert ${src.path} to ${dst}`;
  let last = -1;
  const onStdout = opts.onProgress
    ? (chunk: string): void => {
        const p = parseConvertProgress(chunk);
        if (p !== undefined && p !== last) {
          last = p;
          opts.onProgress?.(p);
        }
      }
    : undefined;
  let result: ExecResult;
  try {
    result = await qemuImg(args, action, { signal: opts.signal, onStdout, maxOutput: 64 << 10 });
  } catch (err) {
    await rm(dst, { force: true });
    throw err;
  }
  if (result.code !== 0) {
    await rm(dst, { force: true });
    throw imageError(result, action, { filename: source, path: src.path });
  }
  if (last < 1) opts.onProgress?.(1);
}

/**
 * `qemu-img rebase -u -f qcow2 -F FMT -b BACKING IMAGE`: rewrites the backing file name recorded in a qcow2 header
 * and nothing else (-u: the backing file is not opened, so it need not exist yet; a relative name is relative to
 * the image's directory). Idempotent.
 */
export async function rebaseUnsafe(path: string, backing: string, backingFormat: 'qcow2' | 'raw'): Promise<void> {
  const action = `set the backing file of ${path} to ${backing}`;
  const result = await qemuImg(
    ['rebase', '-u', '-f', 'qcow2', '-F', backingFormat, '-b', backing, '--', path],
    action,
    {
      timeoutMs: 60_000,
    },
  );
  if (result.code !== 0) throw imageError(result, action);
}

/**
 * `qemu-img create -f qcow2 -F FMT -b BACKING -u OVERLAY SIZE`: an empty qcow2 whose unallocated clusters read from
 * BACKING (an absolute path the caller checked). -u: the backing file is not opened, so nothing its header names is
 * followed here. The file must not exist (the caller removes a leftover first).
 */
export async function createOverlayImage(
  path: string,
  backing: string,
  backingFormat: 'qcow2' | 'raw',
  virtualSize: number,
): Promise<void> {
  const action = `create the overlay ${path} on ${backing}`;
  const result = await qemuImg(
    ['create', '-q', '-f', 'qcow2', '-F', backingFormat, '-b', backing, '-u', '--', path, String(virtualSize)],
    action,
    { timeoutMs: 60_000 },
  );
  if (result.code !== 0) throw imageError(result, action);
}

/**
 * `qemu-img create -f qcow2 -o cluster_size=C [-F qcow2 -b NAME -u] PATH SIZE`: a new empty qcow2, with NAME recorded
 * as its backing file (as given: a relative name is relative to the image's directory; -u: not opened). The file
 * must not exist, or be empty (the caller creates it 0600 first: qemu-img keeps the mode).
 */
export async function createImage(
  path: string,
  virtualSize: number,
  opts: { clusterSize?: number; backing?: { name: string; format: 'qcow2' | 'raw' } } = {},
): Promise<void> {
  const action = `create the image ${path}`;
  const backing = opts.backing ? ['-F', opts.backing.format, '-b', opts.backing.name, '-u'] : [];
  const result = await qemuImg(
    [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      `cluster_size=${opts.clusterSize ?? 65536}`,
      ...backing,
      '--',
      path,
      String(virtualSize),
    ],
    action,
    { timeoutMs: 60_000 },
  );
  if (result.code !== 0) throw imageError(result, action);
}
