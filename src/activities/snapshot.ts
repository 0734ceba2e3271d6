/**
 * The snapshot method, for hosts without the backup API: an external overlay takes the guest's
 * writes while the (now quiet) base images are copied, then an active block-commit merges the
 * overlay back into the base and a pivot puts the disk back on it.
 *
 * Invariant: the VM always ends on its original images. Every activity first looks at what the
 * domain runs on now and does only what is missing, so a retry after a worker or host crash (or
 * `vmbackup recover` long after) is safe. Overlays live only under `${stateDir}/overlays/<backupId>/`
 * and nothing outside that directory is ever touched.
 */
import { chmod, readdir, readFile, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Context } from '@temporalio/activity';
import { execTool } from '../hypervisor/exec';
import { classifyHypervisorError, HypervisorError, toolErrorText } from '../hypervisor/errors';
import type { Hypervisor } from '../hypervisor/port';
import { VirshHypervisor } from '../hypervisor/virsh';
import { parseDomainXml } from '../hypervisor/xml';
import type {
  CopyBaseImagesInput,
  CreateOverlaysInput,
  CreateOverlaysResult,
  ImageFile,
  OverlayRecord,
  OverlaysInput,
  OverlayRecovery,
  RecoverInput,
} from '../shared/activities';
import { ErrorType } from '../shared/errors';
import { makeDirs, makeFilePrivate, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, QEMU_DIR_MODE } from '../shared/file-modes';
import { sha256File } from '../shared/sha256-file';
import type { DiskInfo, DomainState } from '../shared/types';
import { isAbandoned, lastChange } from './backup-states';
import type { BackupStates } from './backup-states';
import { hypervisorFailure, permanent } from './failures';
import { HostPaths } from './host-paths';
import { pollDelays } from './poll';
import { copyImage } from './snapshot-copy';
import type { CopyHeartbeat } from './snapshot-copy';
import { OverlayPaths } from './snapshot-paths';

export type { CopyHeartbeat } from './snapshot-copy';

export interface SnapshotDeps {
  hypervisor: Hypervisor;
  stateDir: string;
  /** rsync binary (default: `rsync` on PATH) */
  rsyncPath?: string;
  /** how often block jobs are polled (ms) */
  pollIntervalMs?: number;
  /**
   * Names of all domains on this host (running or not). The port has no listing yet; the default
   * runs `virsh list --all --name` on `libvirtUri`.
   */
  listDomains?: () => Promise<string[]>;
  libvirtUri?: string;
  /** whether a backup's workflow still runs, asked before recovery acts on what the backup left */
  backupStates: BackupStates;
  /** this host's roots (staging, overlays): paths in an input are checked against them; default from stateDir */
  hostPaths?: HostPaths;
}

/** What commitAndPivot heartbeats. */
export interface CommitHeartbeat {
  phase: 'commit';
  disks: Record<string, { cur: number; end: number; ready: boolean }>;
}

interface CommitTarget {
  disk: string;
  overlay: string;
  base: string;
}

interface SnapshotMarker {
  backupId: string;
  domain: string;
  quiesced: boolean;
  createdAt: string;
}

const ACTIVE_COMMIT = 'Active Block Commit';
/** A job reported ready may still refuse the pivot for a moment; past this we let Temporal retry. */
const PIVOT_NOT_READY_LIMIT_MS = 60_000;
/** How long an aborted block job may take to disappear. */
const ABORT_WAIT_MS = 30_000;
/**
 * Recovery keeps an unused overlay file of a closed backup that changed more recently: a terminated
 * workflow's createOverlays may still run on some worker (its activity ends at its timeout), and libvirt
 * creates the file before the disk switches to it.
 */
const RECENT_OVERLAY_MS = 5 * 60_000;

export function createSnapshotActivities(deps: SnapshotDeps) {
  const hv = deps.hypervisor;
  const paths = new OverlayPaths(deps.stateDir);
  const host = deps.hostPaths ?? new HostPaths({ stateDir: deps.stateDir });
  if (host.overlayRoot !== paths.root) {
    throw new Error(`the overlay root ${paths.root} is not this host's (${host.overlayRoot})`);
  }
  const pollMs = deps.pollIntervalMs ?? 200;
  const rsyncPath = deps.rsyncPath ?? 'rsync';
  // The URI the port itself talks to, unless told otherwise: recovery must scan the same libvirt.
  const uri = deps.libvirtUri ?? (hv instanceof VirshHypervisor ? hv.uri : undefined);
  const listDomains = deps.listDomains ?? (() => virshListDomains(uri));

  // ---------------------------------------------------------------- looking at the world

  /** Live disks; a domain that no longer exists is a permanent failure. */
  async function liveDisks(domain: string): Promise<DiskInfo[]> {
    try {
      return await hv.disks(domain);
    } catch (err) {
      if (err instanceof HypervisorError && err.kind === 'not-found') {
        throw permanent(`${domain} no longer exists on this host`, ErrorType.DomainGone);
      }
      hypervisorFailure(err);
    }
  }

  async function domainState(domain: string): Promise<DomainState> {
    try {
      return await hv.state(domain);
    } catch (err) {
      if (err instanceof HypervisorError && err.kind === 'not-found') {
        throw permanent(`${domain} no longer exists on this host`, ErrorType.DomainGone);
      }
      hypervisorFailure(err);
    }
  }

  /** Disks of `domain` running on an overlay of `backupId`, as commit targets. */
  function ownedOverlayDisks(live: DiskInfo[], backupId: string): CommitTarget[] {
    const out: CommitTarget[] = [];
    for (const d of live) {
      const loc = paths.locate(d.source);
      const base = d.backingChain[0];
      if (loc?.backupId === backupId && base) out.push({ disk: d.name, overlay: d.source, base });
    }
    return out;
  }

  function usesFile(d: DiskInfo, file: string): boolean {
    return d.source === file || d.backingChain.includes(file);
  }

  // ---------------------------------------------------------------- createOverlays

  async function createOverlays(input: CreateOverlaysInput): Promise<CreateOverlaysResult> {
    const backupId = host.backupId(input.backupId, 'createOverlays');
    const domain = host.domainName(input.domain, 'createOverlays');
    if (!Array.isArray(input.disks) || input.disks.length === 0) {
      throw permanent(`no disk of ${domain} to snapshot`, ErrorType.InvalidInput);
    }
    const records: OverlayRecord[] = input.disks.map((d) => {
      host.diskName(d.name, 'createOverlays');
      if (d.backingChain.length > 0) {
        throw permanent(
          `disk ${d.name} of ${domain} has a backing chain (${d.backingChain.join(' <- ')}); the snapshot method copies single-file images only: use --method push`,
          ErrorType.UnsupportedDisk,
        );
      }
      if (d.format !== 'qcow2' && d.format !== 'raw') {
        throw permanent(
          `disk ${d.name} of ${domain} is ${d.format}; only qcow2 and raw are supported`,
          ErrorType.UnsupportedDisk,
        );
      }
      return {
        disk: d.name,
        base: d.source,
        baseFormat: d.format,
        overlay: paths.overlay(backupId, domain, d.name),
        virtualSize: d.virtualSize,
      };
    });

    // The state matters only for a new snapshot; asked now, beside the XML, it costs no round trip of its own.
    const statePromise = domainState(domain);
    statePromise.catch(() => undefined); // awaited below, after the checks on the live disks
    const live = await liveDisks(domain);
    const onOverlay: string[] = [];
    const onBase: string[] = [];
    for (const r of records) {
      const d = live.find((x) => x.name === r.disk);
      if (!d) throw permanent(`disk ${r.disk} is no longer attached to ${domain}`, ErrorType.UnsupportedDisk);
      if (d.source === r.overlay && d.backingChain[0] === r.base) onOverlay.push(r.disk);
      else if (d.source === r.base && d.format === r.baseFormat) onBase.push(r.disk);
      else {
        throw permanent(
          `disk ${r.disk} of ${domain} runs on ${d.source} (${d.format}), neither its image ${r.base} (${r.baseFormat}) nor overlay ${r.overlay}: its chain changed since the backup was planned`,
          ErrorType.UnsupportedDisk,
        );
      }
    }
    if (onOverlay.length === records.length) {
      // A retry after libvirt made the snapshot: reuse it, never stack a second overlay.
      return { overlays: records, quiesced: (await readMarker(backupId, domain))?.quiesced ?? false };
    }
    if (onOverlay.length > 0) {
      throw permanent(
        `${domain} is half-snapshotted (${onOverlay.join(', ')} on overlays of ${backupId}, ${onBase.join(', ')} not), which --atomic should prevent: run \`vmbackup recover\` to commit them`,
        ErrorType.PivotFailed,
      );
    }

    const state = await statePromise;
    if (state !== 'running' && state !== 'paused') {
      throw permanent(`${domain} is ${state}: the snapshot method needs a running domain`, ErrorType.DomainGone);
    }

    // QEMU opens the overlays itself: their directory must be reachable by it (0711), not listable
    await makeDirs(paths.backupDir(backupId), QEMU_DIR_MODE);
    const dir = await host.overlayDir(backupId, 'createOverlays');
    // Left by a crash between libvirt creating the file and the disk switching to it; no disk uses it
    // (checked above). Avoids "external snapshot file for disk vda already exists and is not a block device".
    for (const r of records) await rm(await host.overlayFile(r.overlay, backupId, 'createOverlays'), { force: true });

    const specs = records.map((r) => ({ disk: r.disk, file: r.overlay }));
    let quiesced = input.quiesce;
    try {
      await hv.createOverlays(domain, specs, { quiesce: input.quiesce });
    } catch (err) {
      if (!(input.quiesce && err instanceof HypervisorError && err.kind === 'quiesce')) {
        await removeUnusedFiles(records, domain);
        await removeEmptyDir(dir);
        throw snapshotFailure(err, domain, dir);
      }
      // "QEMU guest agent is not configured" (no channel) / "Guest agent is not responding: QEMU guest
      // agent is not connected" (channel, no agent): --atomic created nothing.
      await removeUnusedFiles(records, domain);
      if (input.requireQuiesce) {
        await removeEmptyDir(dir);
        throw permanent(
          `cannot quiesce ${domain}: ${err.message}; no overlay was created. Start qemu-guest-agent in the guest (with an org.qemu.guest_agent.0 channel) or back up without --require-quiesce`,
          ErrorType.QuiesceFailed,
        );
      }
      Context.current().log.warn('guest agent unavailable: falling back to a crash-consistent snapshot', {
        domain,
        reason: err.message,
      });
      quiesced = false;
      try {
        await hv.createOverlays(domain, specs, { quiesce: false });
      } catch (err2) {
        await removeUnusedFiles(records, domain);
        await removeEmptyDir(dir);
        throw snapshotFailure(err2, domain, dir);
      }
    }
    await writeMarker({ backupId, domain, quiesced, createdAt: new Date().toISOString() });

    const after = await liveDisks(domain);
    for (const r of records) {
      const d = after.find((x) => x.name === r.disk);
      if (d?.source !== r.overlay || d.backingChain[0] !== r.base) {
        throw permanent(
          `libvirt reported the snapshot of ${domain} done but disk ${r.disk} runs on ${d?.source ?? 'nothing'}, not on ${r.overlay}`,
          ErrorType.PivotFailed,
        );
      }
    }
    return { overlays: records, quiesced };
  }

  function snapshotFailure(err: unknown, domain: string, dir: string): unknown {
    // "unable to execute QEMU command 'blockdev-add': Could not open '.../vda.qcow2': Permission denied":
    // QEMU runs as its own user (libvirt-qemu on Debian) and must be able to reach the overlay directory.
    if (err instanceof HypervisorError && /Could not open .*Permission denied/.test(err.message)) {
      return permanent(
        `QEMU cannot open the overlay of ${domain} in ${dir} (Permission denied): every directory above it must be searchable by the QEMU user (chmod o+x)`,
        ErrorType.InvalidInput,
      );
    }
    try {
      hypervisorFailure(err);
    } catch (failure) {
      return failure;
    }
  }

  /** Delete overlay files of `records` no disk of `domain` uses. */
  async function removeUnusedFiles(records: OverlayRecord[], domain: string): Promise<void> {
    const live = await hv.disks(domain).catch(() => undefined);
    if (!live) return; // cannot tell: keep them, recovery will look again
    for (const r of records) {
      if (!live.some((d) => usesFile(d, r.overlay))) await rm(r.overlay, { force: true });
    }
  }

  async function readMarker(backupId: string, domain: string): Promise<SnapshotMarker | undefined> {
    try {
      return JSON.parse(await readFile(paths.marker(backupId, domain), 'utf8')) as SnapshotMarker;
    } catch {
      return undefined; // crash between the snapshot and the marker: do not claim a quiesced snapshot
    }
  }

  async function writeMarker(marker: SnapshotMarker): Promise<void> {
    const file = await host.overlayFile(
      paths.marker(marker.backupId, marker.domain),
      marker.backupId,
      'createOverlays',
    );
    const tmp = `${file}.tmp`;
    await writeFile(tmp, JSON.stringify(marker), { mode: PRIVATE_FILE_MODE });
    await chmod(tmp, PRIVATE_FILE_MODE); // writeFile's mode counts only when it creates the file, less the umask
    await rename(tmp, file);
  }

  // ---------------------------------------------------------------- copyBaseImages

  async function copyBaseImages(input: CopyBaseImagesInput): Promise<ImageFile[]> {
    const ctx = Context.current();
    const { domain } = input;
    const backupId = host.backupId(input.backupId, 'copyBaseImages');
    const stagingDir = await host.stagingDir(input.stagingDir, backupId, 'copyBaseImages');
    const overlays = await checkedOverlays(input, 'copyBaseImages');
    const previous = ctx.info.heartbeatDetails as CopyHeartbeat | undefined;
    if (previous) ctx.log.info('resuming the copy', { domain, disk: previous.disk, bytesDone: previous.bytesDone });

    await assertOnOverlays(domain, overlays, 'before the copy');
    await assertBaseFormats(domain, overlays);
    await makeDirs(stagingDir, PRIVATE_DIR_MODE);
    const images: ImageFile[] = [];
    const disksDone: string[] = [];
    for (const r of overlays) {
      const dest = await host.stagingImage(
        join(stagingDir, `${r.disk}.${r.baseFormat}`),
        backupId,
        { name: r.disk, format: r.baseFormat },
        'copyBaseImages',
      );
      const bytesTotal = (await stat(r.base)).size;
      let resumedFrom = 0;
      let durable: number | undefined;
      const beat = (phase: CopyHeartbeat['phase'], bytesDone: number, bytesCopied?: number) =>
        ctx.heartbeat({
          disk: r.disk,
          phase,
          bytesDone,
          bytesTotal,
          resumedFrom,
          bytesCopied,
          durable,
          disksDone: [...disksDone],
        });

      beat('copy', 0);
      const outcome = await copyImage({
        source: r.base,
        dest,
        tool: input.copyTool,
        rsyncPath,
        signal: ctx.cancellationSignal,
        onProgress: (n, phase) => beat(phase, n),
        onCheckpoint: (n) => (durable = n),
      });
      resumedFrom = outcome.resumedFrom;
      ctx.log.info('base image copied', { domain, disk: r.disk, resumedFrom, bytesCopied: outcome.bytesCopied });

      // The own copy hashed the very bytes it wrote (one read of the base). An external tool's copy is
      // proven equal to the base instead, which is quiet (the overlay takes every write): same hash.
      let sha256 = outcome.sha256;
      if (sha256 === undefined) {
        beat('verify', 0, outcome.bytesCopied);
        let readBase = 0;
        let readCopy = 0;
        const progress = () => beat('verify', Math.min(readBase, readCopy), outcome.bytesCopied);
        const [want, got] = await Promise.all([
          sha256File(r.base, { signal: ctx.cancellationSignal, onProgress: (n) => ((readBase = n), progress()) }),
          sha256File(dest, { signal: ctx.cancellationSignal, onProgress: (n) => ((readCopy = n), progress()) }),
        ]);
        if (want !== got) {
          await rm(dest, { force: true });
          throw permanent(
            `the copy of disk ${r.disk} of ${domain} does not match its base ${r.base} (sha256 ${got} != ${want}); the copy was deleted`,
            ErrorType.ChecksumMismatch,
          );
        }
        sha256 = got;
      }
      // rsync and cp give the copy the base image's mode; a file of ours is private
      await makeFilePrivate(dest);
      disksDone.push(r.disk);
      beat(outcome.sha256 === undefined ? 'verify' : 'copy', bytesTotal, outcome.bytesCopied);
      images.push({ name: r.disk, format: r.baseFormat, path: dest, virtualSize: r.virtualSize, sha256 });
    }
    await assertOnOverlays(domain, overlays, 'after the copy');
    return images;
  }

  /** The overlays of an input, each checked: an overlay file of this backup, a valid disk name and image format. */
  async function checkedOverlays(input: OverlaysInput, activity: string): Promise<OverlayRecord[]> {
    if (!Array.isArray(input.overlays)) throw permanent(`${activity}: no overlays given`, ErrorType.InvalidInput);
    for (const r of input.overlays) {
      host.diskName(r.disk, activity);
      host.imageFormat(r.baseFormat, activity);
      await host.overlayFile(r.overlay, input.backupId, activity);
    }
    return input.overlays;
  }

  /**
   * The base images are read as the input says, so their paths and formats must be what libvirt reports
   * under our overlays (assertOnOverlays checks the paths): a raw base labelled qcow2 would let the guest's
   * bytes be parsed as an image header later.
   */
  async function assertBaseFormats(domain: string, overlays: OverlayRecord[]): Promise<void> {
    let xml;
    try {
      xml = parseDomainXml(await hv.domainXml(domain));
    } catch (err) {
      hypervisorFailure(err);
    }
    for (const r of overlays) {
      const base = xml.disks.find((d) => d.target === r.disk)?.backingChain?.[0];
      if (base?.path !== r.base || (base.format !== undefined && base.format !== r.baseFormat)) {
        throw permanent(
          `disk ${r.disk} of ${domain} is not backed by ${r.base} (${r.baseFormat}) according to libvirt${base?.path ? ` but by ${base.path} (${base.format ?? 'unknown format'})` : ''}; refused`,
          ErrorType.InvalidInput,
        );
      }
    }
  }

  /** While a disk runs on our overlay its base receives no write; otherwise the copy is not a point in time. */
  async function assertOnOverlays(domain: string, overlays: OverlayRecord[], when: string): Promise<void> {
    const live = await liveDisks(domain);
    for (const r of overlays) {
      const d = live.find((x) => x.name === r.disk);
      if (d?.source !== r.overlay || d.backingChain[0] !== r.base) {
        throw permanent(
          `disk ${r.disk} of ${domain} was not on its overlay ${r.overlay} ${when} (it runs on ${d?.source ?? 'nothing'}): its base may have changed, so the copy is not one point in time; back up again`,
          ErrorType.BackupJobFailed,
        );
      }
    }
  }

  // ---------------------------------------------------------------- commitAndPivot

  async function commitAndPivot(input: OverlaysInput): Promise<void> {
    host.backupId(input.backupId, 'commitAndPivot');
    host.domainName(input.domain, 'commitAndPivot');
    await checkedOverlays(input, 'commitAndPivot');
    const live = await liveDisks(input.domain);
    // Also disks on overlays of this backup that the caller does not know about (it may call us as an
    // undo step before createOverlays returned).
    const targets = new Map<string, CommitTarget>();
    for (const r of input.overlays) targets.set(r.disk, { disk: r.disk, overlay: r.overlay, base: r.base });
    for (const t of ownedOverlayDisks(live, input.backupId)) if (!targets.has(t.disk)) targets.set(t.disk, t);
    for (const t of targets.values()) {
      if (paths.locate(t.overlay)?.backupId !== input.backupId) {
        throw permanent(
          `${t.overlay} is not an overlay of backup ${input.backupId}; it was left alone`,
          ErrorType.InvalidInput,
        );
      }
    }
    await commitDisks(input.domain, [...targets.values()], live);
  }

  /**
   * Active-commit each target's overlay into its base and pivot back to the base. A disk already
   * on its base is skipped; a commit job already running on it (a previous attempt's) is attached to.
   */
  async function commitDisks(domain: string, targets: CommitTarget[], seen?: DiskInfo[]): Promise<void> {
    const ctx = Context.current();
    const live = seen ?? (await liveDisks(domain));
    const pending = new Map<string, CommitTarget>();
    for (const t of targets) {
      const d = live.find((x) => x.name === t.disk);
      if (!d) {
        throw permanent(
          `disk ${t.disk} was detached from ${domain}; its overlay ${t.overlay} was kept`,
          ErrorType.PivotFailed,
        );
      }
      if (d.source === t.base) continue; // pivoted already (a retry after the pivot)
      if (d.source !== t.overlay) {
        throw permanent(
          `disk ${t.disk} of ${domain} runs on ${d.source}, on top of overlay ${t.overlay}: remove that snapshot first, then run \`vmbackup recover\``,
          ErrorType.PivotFailed,
        );
      }
      if (d.backingChain[0] !== t.base) {
        // A finished block pull drops the overlay's backing file; a commit then fails with
        // "could not find base image in chain for 'vda'".
        throw permanent(
          `overlay ${t.overlay} of disk ${t.disk} of ${domain} is no longer backed by ${t.base} (a block pull ran?): its writes cannot be committed; the VM stays on the overlay`,
          ErrorType.PivotFailed,
        );
      }
      pending.set(t.disk, t);
    }
    if (pending.size === 0) return;

    const state = await domainState(domain);
    if (state !== 'running' && state !== 'paused') {
      // blockcommit: "Requested operation is not valid: domain is not running"; and the domain's
      // definition now names the overlay, so the overlay must stay.
      throw permanent(
        `${domain} is ${state} while ${[...pending.keys()].join(', ')} run on overlays: start it and run \`vmbackup recover\` to put it back on its images`,
        ErrorType.PivotFailed,
      );
    }

    for (const t of pending.values()) await ensureCommitJob(ctx, domain, t);

    const progress: CommitHeartbeat = { phase: 'commit', disks: {} };
    const notReadySince = new Map<string, number>();
    const nextWait = pollDelays(pollMs); // a quiet overlay commits in a few ms
    while (pending.size > 0) {
      for (const t of [...pending.values()]) {
        const job = await hv.blockJobInfo(domain, t.disk).catch((err: unknown) => hypervisorFailure(err));
        if (job.type === undefined) {
          // The job ended without our pivot: pivoted by an earlier attempt, or aborted/failed.
          const d = (await liveDisks(domain)).find((x) => x.name === t.disk);
          if (d?.source === t.base) {
            pending.delete(t.disk);
            continue;
          }
          // Retryable: the next attempt starts a new commit.
          throw new Error(
            `the commit job of disk ${t.disk} of ${domain} ended without a pivot; it still runs on ${t.overlay}`,
          );
        }
        if (job.type !== ACTIVE_COMMIT) {
          throw new Error(`a ${job.type} job replaced the commit of disk ${t.disk} of ${domain}`);
        }
        progress.disks[t.disk] = { cur: job.cur, end: job.end, ready: job.ready };
        if (!job.ready) continue;
        try {
          await hv.pivot(domain, t.disk);
          pending.delete(t.disk);
        } catch (err) {
          // Ready in blockjob info, yet "block copy still active: block job 'commit-vda-libvirt-3-format'
          // not ready for pivot yet" until QEMU's ready event is processed: poll again (not a retry).
          if (!(err instanceof HypervisorError && err.kind === 'not-ready')) hypervisorFailure(err);
          const since = notReadySince.get(t.disk) ?? Date.now();
          notReadySince.set(t.disk, since);
          if (Date.now() - since > PIVOT_NOT_READY_LIMIT_MS) {
            throw new Error(
              `disk ${t.disk} of ${domain} refused the pivot for ${PIVOT_NOT_READY_LIMIT_MS / 1000} s: ${err.message}`,
            );
          }
        }
      }
      ctx.heartbeat(progress);
      if (pending.size > 0) await ctx.sleep(nextWait());
    }

    const after = await liveDisks(domain);
    const wrong = targets.filter((t) => after.find((x) => x.name === t.disk)?.source !== t.base);
    if (wrong.length > 0) {
      throw permanent(
        `after the pivot ${wrong.map((t) => t.disk).join(', ')} of ${domain} still do not run on their images (${wrong.map((t) => t.base).join(', ')})`,
        ErrorType.PivotFailed,
      );
    }
  }

  /**
   * Makes sure an active commit runs on the disk. Rule for a foreign block job (pull, copy, a
   * non-active commit) on a disk that runs on our overlay: abort it at once. Aborting leaves the chain
   * as it was, while letting it finish could make the commit impossible (a finished pull drops the
   * overlay's backing file), and a second job is refused anyway: "disk 'vda' already in active block job".
   */
  async function ensureCommitJob(ctx: Context, domain: string, t: CommitTarget): Promise<void> {
    let job = await hv.blockJobInfo(domain, t.disk).catch((err: unknown) => hypervisorFailure(err));
    if (job.type === ACTIVE_COMMIT) return; // ours, from an earlier attempt (or an identical one): attach
    if (job.type !== undefined) {
      ctx.log.warn('aborting a foreign block job on a disk that runs on our overlay', {
        domain,
        disk: t.disk,
        job: job.type,
      });
      await hv.abortBlockJob(domain, t.disk).catch((err: unknown) => {
        if (!(err instanceof HypervisorError && err.kind === 'no-job')) hypervisorFailure(err);
      });
      const deadline = Date.now() + ABORT_WAIT_MS;
      while ((job = await hv.blockJobInfo(domain, t.disk)).type !== undefined) {
        if (Date.now() > deadline)
          throw new Error(`the ${job.type} job on disk ${t.disk} of ${domain} did not end after abort`);
        await ctx.sleep(pollMs);
      }
    }
    try {
      await hv.startActiveCommit(domain, t.disk);
    } catch (err) {
      hypervisorFailure(err); // 'busy' ("already in active block job") stays retryable
    }
  }

  // ---------------------------------------------------------------- removeOverlays

  async function removeOverlays(input: OverlaysInput): Promise<void> {
    const backupId = host.backupId(input.backupId, 'removeOverlays');
    const domain = host.domainName(input.domain, 'removeOverlays');
    if (!Array.isArray(input.overlays)) throw permanent('removeOverlays: no overlays given', ErrorType.InvalidInput);
    const dir = await host.overlayDir(backupId, 'removeOverlays');
    const files = new Set<string>();
    for (const r of input.overlays) {
      if (paths.locate(r.overlay)?.backupId !== backupId) {
        throw permanent(
          `${r.overlay} is not an overlay of backup ${backupId}; it was left alone`,
          ErrorType.InvalidInput,
        );
      }
      files.add(r.overlay);
    }
    for (const f of await listDir(dir)) {
      if (f.startsWith(`${domain}.`) && f.endsWith('.qcow2')) files.add(join(paths.backupDir(backupId), f));
    }
    let live: DiskInfo[] = [];
    try {
      live = await hv.disks(domain);
    } catch (err) {
      // a domain that no longer exists uses no file
      if (!(err instanceof HypervisorError && err.kind === 'not-found')) hypervisorFailure(err);
    }
    for (const file of files) {
      const user = live.find((d) => usesFile(d, file));
      if (user) {
        throw permanent(
          `overlay ${file} is still used by disk ${user.name} of ${domain}; it was not removed: run \`vmbackup recover\``,
          ErrorType.PivotFailed,
        );
      }
    }
    for (const file of files) await rm(await host.overlayFile(file, backupId, 'removeOverlays'), { force: true });
    await rm(await host.overlayFile(paths.marker(backupId, domain), backupId, 'removeOverlays'), { force: true });
    await removeEmptyDir(dir);
  }

  // ---------------------------------------------------------------- recoverOverlays

  /**
   * Disks of each domain. A domain that vanished meanwhile is left out; one whose disks cannot be read
   * is reported in `unreadable` (its disks might use an overlay, so no overlay file is deleted then).
   */
  async function readDomains(
    domains: string[],
  ): Promise<{ disks: Map<string, DiskInfo[]>; unreadable: Map<string, string> }> {
    const disks = new Map<string, DiskInfo[]>();
    const unreadable = new Map<string, string>();
    for (const domain of domains) {
      try {
        disks.set(domain, await hv.disks(domain));
      } catch (err) {
        if (err instanceof HypervisorError && err.kind === 'not-found') continue;
        if (err instanceof HypervisorError && err.kind === 'unreachable') hypervisorFailure(err);
        unreadable.set(domain, err instanceof Error ? err.message : String(err));
      }
    }
    return { disks, unreadable };
  }

  /** Asked right before each action, never from a list read earlier: a backup may have started since. */
  function abandoned(backupId: string): Promise<boolean> {
    Context.current().heartbeat({ phase: 'recover' }); // many backups to ask about is progress too
    return isAbandoned(deps.backupStates, backupId, paths.backupDir(backupId));
  }

  /**
   * Commits what backups whose workflow is closed left: disks still on their overlays are committed and
   * pivoted back; overlay files no disk uses are removed. Overlays of running backups are never touched.
   */
  async function recoverOverlays(input: RecoverInput): Promise<OverlayRecovery[]> {
    const ctx = Context.current();
    const actions: OverlayRecovery[] = [];
    const domains = input.domain ? [input.domain] : await listDomains();

    // 1. disks running on an overlay of an abandoned backup: commit, pivot, remove.
    const before = await readDomains(domains);
    if (input.domain && before.unreadable.has(input.domain)) {
      throw new Error(`cannot read the disks of ${input.domain}: ${before.unreadable.get(input.domain)}`);
    }
    for (const [domain, why] of before.unreadable) ctx.log.warn('cannot read the disks of a domain', { domain, why });
    for (const [domain, live] of before.disks) {
      const byBackup = new Map<string, CommitTarget[]>();
      const problems: OverlayRecovery[] = [];
      for (const d of live) {
        const loc = paths.locate(d.source);
        if (loc) {
          const base = d.backingChain[0];
          if (base) {
            byBackup.set(loc.backupId, [
              ...(byBackup.get(loc.backupId) ?? []),
              { disk: d.name, overlay: d.source, base },
            ]);
          } else {
            const detail = 'the overlay has no backing file any more (a block pull ran?): left as it is';
            problems.push({
              domain,
              disk: d.name,
              overlay: d.source,
              backupId: loc.backupId,
              action: 'failed',
              detail,
            });
          }
        }
        // Someone's snapshot stacked on one of our overlays: not ours to flatten.
        for (const below of d.backingChain) {
          const under = paths.locate(below);
          if (under) {
            const detail = `the disk runs on ${d.source}, stacked on the overlay: remove that snapshot first`;
            problems.push({ domain, disk: d.name, overlay: below, backupId: under.backupId, action: 'failed', detail });
          }
        }
      }
      for (const p of problems) if (await abandoned(p.backupId)) actions.push(p);
      for (const [backupId, targets] of byBackup) {
        if (!(await abandoned(backupId))) continue;
        try {
          await commitDisks(domain, targets);
          const after = await liveDisks(domain);
          for (const t of targets) {
            if (!after.some((d) => usesFile(d, t.overlay))) await rm(t.overlay, { force: true });
            actions.push({ domain, disk: t.disk, overlay: t.overlay, backupId, action: 'committed' });
          }
        } catch (err) {
          const detail = err instanceof Error ? err.message : String(err);
          for (const t of targets)
            actions.push({ domain, disk: t.disk, overlay: t.overlay, backupId, action: 'failed', detail });
        }
        ctx.heartbeat({ phase: 'recover', actions: actions.length });
      }
    }

    // 2. overlay files of abandoned backups that no domain uses (a crash before the snapshot took them, or
    //    after the pivot): remove. Usage is checked over every domain, whatever input.domain says.
    const entries = await readdir(paths.root, { withFileTypes: true }).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return [];
      throw err;
    });
    const backupIds = entries.filter((e) => e.isDirectory() && paths.isValidBackupId(e.name)).map((e) => e.name);
    let usage: { used: Set<string>; unsure?: string } | undefined;
    for (const backupId of backupIds) {
      const dir = paths.backupDir(backupId);
      usage ??= await overlayUsage();
      if (!(await abandoned(backupId))) continue;
      const { used, unsure } = usage;
      for (const file of await listDir(dir)) {
        const path = join(dir, file);
        const loc = paths.locate(path);
        if (!loc?.domain || !loc.disk) continue; // not an overlay file of ours
        if (input.domain && loc.domain !== input.domain) continue;
        if (used.has(path)) continue; // a failed commit above: reported there
        const found = { domain: loc.domain, disk: loc.disk, overlay: path, backupId };
        if (unsure) {
          actions.push({ ...found, action: 'failed', detail: unsure });
          continue;
        }
        const changed = await lastChange(path);
        if (changed !== undefined && Date.now() - changed < RECENT_OVERLAY_MS) {
          const detail = `changed less than ${RECENT_OVERLAY_MS / 60_000} min ago: a step of the closed backup may still be creating it; run \`vmbackup recover\` again later`;
          actions.push({ ...found, action: 'kept', detail });
          continue;
        }
        await rm(path, { force: true });
        actions.push({ ...found, action: 'removed-unused-overlay' });
      }
      // a domain's marker goes with its last overlay; anything else in the directory is not ours
      const left = await listDir(dir);
      for (const file of left) {
        const owner = /^(.+)\.snapshot\.json$/.exec(file)?.[1];
        if (owner && !left.some((f) => f.startsWith(`${owner}.`) && f.endsWith('.qcow2'))) {
          await rm(join(dir, file), { force: true });
        }
      }
      await removeEmptyDir(dir);
      ctx.heartbeat({ phase: 'recover', actions: actions.length });
    }
    return actions;
  }

  /** Every file a disk of any domain uses now; `unsure` says which domains could not be read. */
  async function overlayUsage(): Promise<{ used: Set<string>; unsure?: string }> {
    const now = await readDomains(await listDomains());
    const used = new Set<string>();
    for (const live of now.disks.values())
      for (const d of live) for (const f of [d.source, ...d.backingChain]) used.add(f);
    const unsure =
      now.unreadable.size > 0
        ? `kept: the disks of ${[...now.unreadable.keys()].join(', ')} could not be read (${[...now.unreadable.values()][0]})`
        : undefined;
    return { used, unsure };
  }

  return { createOverlays, copyBaseImages, commitAndPivot, removeOverlays, recoverOverlays };
}

async function listDir(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

async function removeEmptyDir(dir: string): Promise<void> {
  try {
    await rmdir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
  }
}

/** `virsh list --all --name`: the port has no listing of domains (yet). */
async function virshListDomains(uri?: string): Promise<string[]> {
  const args = [...(uri ? ['-c', uri] : []), 'list', '--all', '--name'];
  const result = await execTool('virsh', args, { timeoutMs: 60_000 });
  if (result.code !== 0) {
    const err = new HypervisorError(
      classifyHypervisorError(result.stderr),
      `cannot list the domains: ${toolErrorText(result.stderr)}`,
      {
        stderr: result.stderr,
        command: result.command,
      },
    );
    hypervisorFailure(err);
  }
  return result.stdout
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
}
