/**
 * Image files: qemu-img info/check/compare/convert (JSON where qemu-img offers it). The SHA-256 every backup
 * image gets before it is shipped is src/shared/sha256-file.ts.
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

/** Builds a HypervisorError for a failed qemu-img run. */
function imageError(result: ExecResult, action: string): HypervisorError {
  const said = toolErrorText(result.stderr) || `qemu-img exited with code ${result.code ?? result.signal}`;
  // 'Failed to get shared "write" lock': a running QEMU holds the image
  const kind = /Failed to get .* lock/i.test(result.stderr) ? 'busy' : 'failed';
  return new HypervisorError(kind, `cannot ${action}: ${said}`, { stderr: result.stderr, command: result.command });
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
  'format-specific'?: { data?: { corrupt?: boolean } };
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
 * `qemu-img info --output=json`. forceShare (default true) adds -U, needed to read an image a
 * running QEMU holds ('Failed to get shared "write" lock' otherwise).
 */
export async function imageInfo(
  path: string,
  opts: { backingChain?: boolean; forceShare?: boolean; format?: string; signal?: AbortSignal } = {},
): Promise<ImageInfo> {
  const args = ['info', '--output=json'];
  if (opts.forceShare ?? true) args.push('-U');
  if (opts.backingChain) args.push('--backing-chain');
  if (opts.format) args.push('-f', opts.format);
  args.push('--', path);
  const action = `read the image information of ${path}`;
  const result = await qemuImg(args, action, { signal: opts.signal, timeoutMs: 60_000 });
  if (result.code !== 0) throw imageError(result, action);
  return parseImageInfo(result.stdout);
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
 * `qemu-img check --output=json`. A format qemu-img cannot check (raw: "This image format does not
 * support checks", exit 63) gives { ok: true, checked: false }.
 */
export async function checkImage(
  path: string,
  opts: { forceShare?: boolean; format?: string; signal?: AbortSignal } = {},
): Promise<ImageCheck> {
  const args = ['check', '--output=json'];
  if (opts.forceShare) args.push('-U');
  if (opts.format) args.push('-f', opts.format);
  args.push('--', path);
  const action = `check the image ${path}`;
  const result = await qemuImg(args, action, { signal: opts.signal });
  if (result.code === 63 || /does not support checks/.test(result.stderr)) {
    return {
      ok: true,
      checked: false,
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      summary: 'format without consistency checks',
    };
  }
  if (result.stdout.trim().startsWith('{') && result.code !== null && [0, 1, 2, 3].includes(result.code)) {
    return parseImageCheck(result.stdout, result.code);
  }
  throw imageError(result, action);
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
 * `qemu-img convert -p -O qcow2` (sparse: zero clusters are not written). The output file is removed
 * when the conversion fails or is aborted. forceShare (default false) adds -U: without it a source
 * that a running QEMU holds is refused, which is what an offline copy wants.
 */
export async function convertImage(
  src: string,
  dst: string,
  opts: {
    srcFormat?: string;
    dstFormat?: 'qcow2' | 'raw';
    forceShare?: boolean;
    /** fraction done, 0..1 */
    onProgress?: (fraction: number) => void;
    signal?: AbortSignal;
  } = {},
): Promise<void> {
  const args = ['convert', '-p'];
  if (opts.forceShare) args.push('-U');
  if (opts.srcFormat) args.push('-f', opts.srcFormat);
  args.push('-O', opts.dstFormat ?? 'qcow2', '--', src, dst);
  const action = `convert ${src} to ${dst}`;
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
    throw imageError(result, action);
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
