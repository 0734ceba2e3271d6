/**
 * Pull mode into a LOCAL image tree (issue #16): one pulled disk written as a qcow2, full or increment, through a
 * private writable `qemu-nbd` of the new image, with our NBD client on both sides. The data is hashed as it is read
 * (the content digest, content-digest.ts), so the manifest's integrity record costs no second read of the image.
 *
 * - full: the export's `base:allocation` data extents are copied; holes and zero extents are not touched (a new
 *   qcow2 reads zeros there); data that turns out all zero is written as WRITE_ZEROES, never allocated.
 * - increment: the dirty ranges of the bitmap context, widened to whole clusters (pull-plan.ts), are copied where
 *   the export has data and zeroed where it has holes or zeros (they must read zero over the backing file).
 * - resumable: `from` (a multiple of 4 MiB the last progress report gave) reopens the image instead of recreating
 *   it; what is before it is not written again (its digest is recomputed from the image: the only re-read, and only
 *   on resume). A resume offset is reported only after a FLUSH made everything before it durable.
 */
import { open, rm, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { NbdClient, READ_REQUEST_BYTES, extents, readRanges } from '../nbd';
import type { BlockExtent } from '../nbd';
import { createImage } from '../hypervisor/qemu-img';
import { HypervisorError } from '../hypervisor/errors';
import { startQemuNbd } from '../hypervisor/qemu-nbd';
import type { QemuNbdServer } from '../hypervisor/qemu-nbd';
import { BufferPool } from '../shared/buffer-pool';
import { StorageError } from '../storage/errors';
import { CONTENT_DIGEST_CHUNK, ContentDigest, isAllZero } from './content-digest';
import type { ContentDigestResult } from './content-digest';
import { planPullWindow } from './pull-plan';

export const ALLOCATION_CONTEXT = 'base:allocation';
/** The new image's cluster size, and the unit dirty ranges are widened to. */
export const PULL_IMAGE_CLUSTER = 64 * 1024;
/** Zero detection inside data: all-zero runs of this many aligned bytes are written as WRITE_ZEROES. */
const ZERO_GRAIN = 64 * 1024;

export interface PullSource {
  socketPath: string;
  exportName: string;
}

export interface WritePulledImageOptions {
  /** the pull export: a connection with `base:allocation` (and `context`) negotiated, or where to connect */
  source: NbdClient | PullSource;
  /**
   * 'base:allocation' for a full; for an increment the dirty bitmap's context ('qemu:dirty-bitmap:backup-vda' from
   * libvirt), and then `backing` is required
   */
  context: string;
  virtualSize: number;
  /** the new image's path (absolute; the caller's temp name in the backup's directory on the local target) */
  dest: string;
  /**
   * an increment's parent: `name` is written into the header as is (push increments use `../<parentId>/<disk>.qcow2`,
   * relative to dest's directory); `path` is the parent's file, opened by qemu-nbd without its own backing
   */
  backing?: { name: string; path: string; format: 'qcow2' };
  /** resume: a `resumeFrom` a progress report of the same image gave (default 0: a new image) */
  from?: number;
  /** requests in flight on each side (default 8) */
  inFlight?: number;
  /** bytes per request (default 4 MiB) */
  requestSize?: number;
  /** a FLUSH and a resumable progress report after each this many bytes of the disk (default 1 GiB; x 4 MiB) */
  window?: number;
  /** the writable qemu-nbd's cache mode (default none, writeback where O_DIRECT is refused; see startWriter) */
  cache?: 'none' | 'writeback';
  /** where the private socket directory of the writable qemu-nbd is made (default the OS temp dir) */
  runDir?: string;
  signal?: AbortSignal;
  onProgress?: (p: PullImageProgress) => void;
}

export interface PullImageProgress {
  /** everything before this offset is written and flushed: pass it as `from` to resume */
  resumeFrom: number;
  virtualSize: number;
  /** bytes read from the export and written (this call) */
  copiedBytes: number;
  /** bytes written as zeros (this call) */
  zeroedBytes: number;
}

export interface PulledImage {
  path: string;
  /** the qcow2 file's bytes */
  size: number;
  virtualSize: number;
  /** the content digest of the image's own guest data (what the manifest records, see ManifestDisk.content) */
  content: ContentDigestResult;
  copiedBytes: number;
  zeroedBytes: number;
}

function invalid(message: string): StorageError {
  return new StorageError('failed', message, { driver: 'pull', permanent: true });
}

/** Writes one pulled disk into a new (or, with `from`, a partly written) qcow2 at `dest`. */
export async function writePulledImage(opts: WritePulledImageOptions): Promise<PulledImage> {
  const { virtualSize, dest } = opts;
  const full = opts.context === ALLOCATION_CONTEXT;
  const from = opts.from ?? 0;
  const window = opts.window ?? 1 << 30;
  if (!full && !opts.backing) {
    throw invalid(`An increment pulled into ${dest} needs its parent image as backing; none was given.`);
  }
  if (full && opts.backing) throw invalid(`A full pulled into ${dest} takes no backing image.`);
  if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0 || virtualSize % 512 !== 0) {
    throw invalid(`Cannot pull into ${dest}: the virtual size ${virtualSize} is not a positive multiple of 512.`);
  }
  if (window <= 0 || window % CONTENT_DIGEST_CHUNK !== 0) {
    throw invalid(`Cannot pull into ${dest}: the window ${window} is not a multiple of ${CONTENT_DIGEST_CHUNK}.`);
  }
  if (
    !Number.isSafeInteger(from) ||
    from < 0 ||
    from > virtualSize ||
    (from % CONTENT_DIGEST_CHUNK !== 0 && from !== virtualSize)
  ) {
    throw invalid(`Cannot resume the pull into ${dest} from offset ${from}: not an offset a progress report gives.`);
  }

  const digest = new ContentDigest(virtualSize);
  if (from === 0) {
    await rm(dest, { force: true }); // a leftover of an attempt that never reported progress
    await (await open(dest, 'wx', 0o600)).close(); // qemu-img writes into it and keeps the mode
    await createImage(dest, virtualSize, {
      clusterSize: PULL_IMAGE_CLUSTER,
      ...(opts.backing ? { backing: { name: opts.backing.name, format: opts.backing.format } } : {}),
    });
  } else {
    const there = await stat(dest).catch(() => undefined);
    if (!there?.isFile()) throw invalid(`Cannot resume the pull into ${dest}: the image is not there.`);
    // the digest of what is already written, from the image itself (its own clusters, no backing)
    const reader = await startQemuNbd(
      { path: dest, format: 'qcow2', backing: null },
      { readOnly: true, runDir: opts.runDir },
    );
    try {
      await digestImage(reader, digest, from, opts);
    } finally {
      await reader.stop();
    }
  }

  const writer = await startWriter(opts);
  const ownSource = !(opts.source instanceof NbdClient);
  let source: NbdClient | undefined;
  let target: NbdClient | undefined;
  let done = false;
  try {
    target = await NbdClient.connect({ socketPath: writer.socketPath, exportName: writer.exportName });
    source =
      opts.source instanceof NbdClient
        ? opts.source
        : await NbdClient.connect({
            socketPath: opts.source.socketPath,
            exportName: opts.source.exportName,
            metaContexts: full ? [ALLOCATION_CONTEXT] : [ALLOCATION_CONTEXT, opts.context],
          });
    if (source.info.size !== virtualSize || target.info.size !== virtualSize) {
      throw invalid(
        `Cannot pull into ${dest}: the export has ${source.info.size} bytes and the image ${target.info.size}, not ${virtualSize}.`,
      );
    }
    const stats = await copyExtents(source, target, digest, { ...opts, from, window, full });
    await target.flush();
    await target.disconnect();
    target = undefined;
    await writer.close();
    done = true;
    const fh = await open(dest, 'r+');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    await syncDir(dirname(dest));
    digest.skipTo(virtualSize);
    return { path: dest, size: (await stat(dest)).size, virtualSize, content: digest.digest(), ...stats };
  } finally {
    target?.close();
    if (ownSource) await source?.disconnect().catch(() => source?.close());
    if (!done) await writer.stop();
  }
}

/**
 * The writable qemu-nbd of the new image: O_DIRECT (`--cache=none`) unless the caller chose. Written once and read
 * by nobody during the backup, the image gains nothing from the page cache: measured on a 2 GiB pull (bench/pull.ts),
 * copying every write into it cost qemu-nbd 2.3 s of the worker's 7.2 s of CPU. Durability is the same either way
 * (FLUSH at each window, fsync at the end). A file system that refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE)
 * fails the open with EINVAL: the page cache then.
 */
async function startWriter(opts: WritePulledImageOptions): Promise<QemuNbdServer> {
  const image = {
    path: opts.dest,
    format: 'qcow2' as const,
    // whole clusters only are written, so QEMU never reads the backing file; it is opened so that zeroing keeps
    // zero clusters (a qcow2 without backing may deallocate them instead, which would read the parent's data)
    backing: opts.backing ? { path: opts.backing.path, format: opts.backing.format, backing: null } : null,
  };
  const start = (cache: 'none' | 'writeback') => startQemuNbd(image, { readOnly: false, cache, runDir: opts.runDir });
  if (opts.cache) return start(opts.cache);
  try {
    return await start('none');
  } catch (err) {
    if (err instanceof HypervisorError && /Invalid argument/.test(`${err.message} ${err.stderr ?? ''}`))
      return start('writeback');
    throw err;
  }
}

async function copyExtents(
  source: NbdClient,
  target: NbdClient,
  digest: ContentDigest,
  opts: WritePulledImageOptions & { from: number; window: number; full: boolean },
): Promise<{ copiedBytes: number; zeroedBytes: number }> {
  const { virtualSize, signal } = opts;
  const inFlight = Math.max(1, opts.inFlight ?? 8);
  const requestSize = Math.min(opts.requestSize ?? READ_REQUEST_BYTES, source.requestLimit);
  const pool = new BufferPool(requestSize);
  let copiedBytes = 0;
  let zeroedBytes = 0;
  const writes = new Set<Promise<void>>();
  let failure: unknown;
  const issue = async (work: Promise<void>): Promise<void> => {
    const tracked: Promise<void> = work.then(
      () => void writes.delete(tracked),
      (err: unknown) => {
        writes.delete(tracked);
        failure ??= err;
      },
    );
    writes.add(tracked);
    while (writes.size >= inFlight) await Promise.race(writes);
    if (failure) throw failure;
  };
  // zeros over a backing file must stay allocated as zero clusters (NO_HOLE); in a full a hole reads zero as well
  const zero = (offset: number, length: number) =>
    issue(target.writeZeroes(offset, length, opts.full ? {} : { noHole: true })).then(
      () => void (zeroedBytes += length),
    );

  for (let start = opts.from; start < virtualSize; start += opts.window) {
    signal?.throwIfAborted();
    const end = Math.min(virtualSize, start + opts.window);
    const allocation = await collect(
      extents(source, { context: ALLOCATION_CONTEXT, offset: start, length: end - start }),
    );
    const dirty = opts.full
      ? undefined
      : await collect(extents(source, { context: opts.context, offset: start, length: end - start }));
    const ops = planPullWindow({ start, end, allocation, dirty, cluster: PULL_IMAGE_CLUSTER });
    const copies = ops.filter((o) => o.kind === 'copy');
    // zeros first (small requests), then the data in order
    for (const op of ops) if (op.kind === 'zero') await zero(op.offset, op.length);
    for await (const piece of readRanges(source, copies, { inFlight, requestSize, pool })) {
      signal?.throwIfAborted();
      digest.update(piece.offset, piece.data);
      const sent: Array<Promise<void>> = [];
      for (const run of zeroRuns(piece.offset, piece.data)) {
        if (run.zero) await zero(run.offset, run.length);
        else {
          const write = target.write(
            run.offset,
            piece.data.subarray(run.offset - piece.offset, run.offset - piece.offset + run.length),
          );
          sent.push(write);
          await issue(write);
          copiedBytes += run.length;
        }
      }
      // the buffer is reused once the target answered every write from it (its bytes have left the socket); a
      // failed write drops it
      void Promise.all(sent).then(
        () => pool.give(piece.data),
        () => undefined,
      );
    }
    await Promise.all(writes);
    if (failure) throw failure;
    await target.flush();
    digest.skipTo(end);
    opts.onProgress?.({ resumeFrom: end, virtualSize, copiedBytes, zeroedBytes });
  }
  return { copiedBytes, zeroedBytes };
}

/** DATA at OFFSET cut at ZERO_GRAIN-aligned offsets into runs that are all zero or not, adjacent runs joined. */
export function zeroRuns(offset: number, data: Buffer): Array<{ offset: number; length: number; zero: boolean }> {
  const runs: Array<{ offset: number; length: number; zero: boolean }> = [];
  let at = offset;
  const end = offset + data.length;
  while (at < end) {
    const next = Math.min(end, (Math.floor(at / ZERO_GRAIN) + 1) * ZERO_GRAIN);
    const zero = isAllZero(data.subarray(at - offset, next - offset));
    const last = runs.at(-1);
    if (last && last.zero === zero) last.length += next - at;
    else runs.push({ offset: at, length: next - at, zero });
    at = next;
  }
  return runs;
}

/** Feeds DIGEST with the guest data of the image served by SERVER, from the digest's offset up to END. */
async function digestImage(
  server: QemuNbdServer,
  digest: ContentDigest,
  end: number,
  opts: { inFlight?: number; signal?: AbortSignal },
): Promise<void> {
  const client = await NbdClient.connect({
    socketPath: server.socketPath,
    exportName: server.exportName,
    metaContexts: [ALLOCATION_CONTEXT],
  });
  try {
    if (end > client.info.size) throw invalid(`The image served at ${server.socketPath} is smaller than ${end} bytes.`);
    const start = digest.offset;
    const data: Array<{ offset: number; length: number }> = [];
    for await (const e of extents(client, { context: ALLOCATION_CONTEXT, offset: start, length: end - start })) {
      if ((e.flags & 3) === 0) data.push({ offset: e.offset, length: e.length });
    }
    for await (const piece of readRanges(client, data, { inFlight: opts.inFlight ?? 8 })) {
      opts.signal?.throwIfAborted();
      digest.update(piece.offset, piece.data);
    }
    digest.skipTo(end);
  } finally {
    await client.disconnect().catch(() => client.close());
  }
}

/**
 * The content digest of a stored qcow2 image's own guest data (no backing file opened: an increment's unallocated
 * clusters read as zero, exactly what its writer hashed). What verify and restore compare with the manifest.
 */
export async function imageContentDigest(
  path: string,
  virtualSize: number,
  opts: { runDir?: string; signal?: AbortSignal } = {},
): Promise<ContentDigestResult> {
  const server = await startQemuNbd({ path, format: 'qcow2', backing: null }, { readOnly: true, runDir: opts.runDir });
  try {
    const digest = new ContentDigest(virtualSize);
    await digestImage(server, digest, virtualSize, opts);
    return digest.digest();
  } finally {
    await server.stop();
  }
}

async function collect(it: AsyncIterable<BlockExtent>): Promise<BlockExtent[]> {
  const out: BlockExtent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export type PullImageTreeSupport = { supported: true; localPath: string } | { supported: false; reason: string };

/**
 * Whether a pull backup can write an image tree on TARGET: only where the target is a local path (`file://`, an NFS
 * mount given as `file://` included), since the new qcow2 is written through a local qemu-nbd in place. On `nfs://`
 * and `s3://` image trees it is refused (no staging disk is what pull mode is for); a chunk repository on the same
 * backend takes pull backups, or push mode stages and ships the image.
 */
export function pullImageTreeSupport(target: {
  displayUrl: string;
  capabilities: { localPath?: string };
}): PullImageTreeSupport {
  const localPath = target.capabilities.localPath;
  if (localPath) return { supported: true, localPath };
  return {
    supported: false,
    reason: `A pull backup cannot write an image tree on ${target.displayUrl}: it writes the qcow2 in place through a local qemu-nbd, so only file:// image trees take it; use a chunk repository there, or --method push.`,
  };
}
