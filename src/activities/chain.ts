/**
 * Incremental chains: which level a backup takes (planBackup), the increments made self-describing before they are
 * hashed (prepareChainImages), and the checkpoint lifecycle around a backup (dropCheckpoint, the saga's undo;
 * retireCheckpoints, once the backup is committed).
 *
 * The rule the chain never breaks: a checkpoint counts only once its backup is committed (the manifest written on
 * every target that succeeded). The checkpoint a backup creates is deleted if it fails or is cancelled, and the next
 * backup builds on the last committed one, which libvirt still has (each checkpoint keeps its own bitmap). When a
 * chain cannot continue, the plan says full, with the reason, and never fails the backup for it.
 */
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { HypervisorError } from '../hypervisor/errors';
import type { Checkpoint, Hypervisor } from '../hypervisor/port';
import { rebaseUnsafe } from '../hypervisor/qemu-img';
import { listBackups } from '../repository/catalog';
import { isChunkRepository } from '../repository/chunks';
import type { BackupEntry } from '../repository/catalog';
import { chainOf, chainProblem, findChainHead } from '../repository/chain-head';
import type { TargetCatalog } from '../repository/chain-head';
import type { Manifest } from '../repository/manifest';
import { pullImageTreeSupport } from '../repository/pull-image';
import type { StorageTarget } from '../storage/contract';
import type {
  BackupPlan,
  DropCheckpointInput,
  PlanBackupInput,
  PrepareChainImagesInput,
  PreparedChainImages,
  RetireCheckpointsInput,
} from '../shared/activities';
import { CHECKPOINT_PREFIX, checkpointName } from '../shared/names';
import type { BackupLevel } from '../shared/types';
import { redactUrl } from '../storage/registry';
import { ErrorType } from '../shared/errors';
import { hypervisorFailure, permanent } from './failures';
import type { HostPaths } from './host-paths';
import { isValidBackupId } from './snapshot-paths';
import { withTarget } from './storage';
import type { StorageActivityDeps } from './storage';

export interface ChainDeps {
  hypervisor: Hypervisor;
  openTarget: StorageActivityDeps['openTarget'];
  /** manifest signing key: with one, only manifests signed with it are built on (docs/security.md) */
  manifestKey?: Buffer;
  /** this host's staging roots and allowed targets: inputs are checked against them */
  paths: HostPaths;
}

/** Why a backup into a chunk repository is a full, whatever level was asked for. */
export const CHUNK_FULL_REASON =
  'a chunk repository stores every backup whole; unchanged chunks are not uploaded again';

/** `chunkRepository: true` in a plan once the targets are known to be chunk repositories. */
function chunkRepositoryMark(is: () => boolean): () => { chunkRepository?: true } {
  return () => (is() ? { chunkRepository: true } : {});
}

/**
 * A pull increment into a repository takes the parent's index of each disk for the chunks that did not change: each
 * index must be there (its chunks are checked one by one as they are taken). Undefined when whole, else why not.
 */
async function indexProblem(target: StorageTarget, parent: Manifest): Promise<string | undefined> {
  for (const disk of parent.disks) {
    if (!(await target.stat(disk.key)))
      return `the index of disk ${disk.name} of ${parent.backupId} is missing on ${target.displayUrl}`;
  }
  return undefined;
}

/** Attempts of planBackup that retry a transient catalog read before planning a full without that target's chain. */
const CATALOG_READ_ATTEMPTS = 3;

/** An increment's backing file as the target lays it out: the parent backup's image of the same disk. */
const PARENT_IMAGE_RE = /^\.\.\/([^/]+)\/([^/]+)\.qcow2$/;

export function createChainActivities(deps: ChainDeps) {
  const hv = deps.hypervisor;

  async function planBackup(input: PlanBackupInput): Promise<BackupPlan> {
    const { backupId, domain, requested } = input;
    deps.paths.checkTargets(input.targets, 'planBackup');
    let chunkRepository = false;
    const inRepository = chunkRepositoryMark(() => chunkRepository);
    const full = (reason?: string, checkpoint = true): BackupPlan => ({
      level: 'full',
      requested,
      ...(reason && requested !== 'full' ? { reason: `full: ${reason}` } : {}),
      base: backupId,
      fullDisks: [],
      ...(checkpoint && bitmapDisks.length > 0
        ? { checkpoint: { name: checkpointName(backupId), disks: bitmapDisks } }
        : {}),
      ...inRepository(),
    });
    // A chunk repository stores every backup whole. Push, snapshot and offline backups into one are fulls with no
    // checkpoint; a pull backup reads only what changed since the last backup's checkpoint (the rest of its index is
    // the previous index's), so it keeps a checkpoint chain there.
    const { chunk: chunkTargets, unknown } = await chunkRepositoryTargets(input);
    if (chunkTargets.length > 0) {
      // a target that could not be asked is tried as a repository: storing fails there with its own sentence
      const others = input.targets.filter((t) => !chunkTargets.includes(t) && !unknown.includes(t));
      if (others.length > 0) {
        throw permanent(
          `${chunkTargets.map(redactUrl).join(', ')} ${chunkTargets.length > 1 ? 'are chunk repositories' : 'is a chunk repository'} and ${others.map(redactUrl).join(', ')} ${others.length > 1 ? 'are not' : 'is not'}: mixing an image tree and a chunk repository in one backup is not supported; give them separate backups (or schedules)`,
          ErrorType.InvalidInput,
        );
      }
      chunkRepository = true;
      if (input.method !== 'pull') return full(CHUNK_FULL_REASON, false);
    } else if (input.method === 'pull') {
      // a pull backup writes an image tree's qcow2 in place: on a local path only (pullImageTreeSupport)
      for (const target of input.targets) {
        const support = await withTarget(deps, target, input.s3Options, (t) =>
          Promise.resolve(pullImageTreeSupport(t)),
        );
        if (!support.supported) throw permanent(support.reason, ErrorType.InvalidInput);
      }
    }
    // libvirt keeps dirty bitmaps in qcow2 images only; a raw disk is copied whole by every backup.
    const bitmapDisks = input.disks.filter((d) => d.format === 'qcow2').map((d) => d.name);
    // The backup API (libvirt >= 7.2) is also where checkpoints are stable.
    if (input.method !== 'push' && input.method !== 'pull') {
      return full(`the ${input.method} method takes full backups only (incrementals need push or pull mode)`, false);
    }
    if (bitmapDisks.length === 0) {
      return full(`no disk of ${domain} is qcow2, and libvirt keeps dirty bitmaps in qcow2 images only`, false);
    }
    if (requested === 'full') return full();

    // The chain on the targets: the same newest backup everywhere, whole, young and short enough.
    const read = await readCatalogs(input);
    if ('unreadable' in read) return full(read.unreadable);
    const catalogs = read.catalogs;
    // In a repository every backup is whole: an increment reads what changed since the newest backup, and a
    // differential would read more for the same result, so it is taken as an increment.
    const asInc = chunkRepository || requested !== 'diff';
    const head = await findChainHead(
      catalogs.map((c) => c.catalog),
      {
        domain,
        host: input.host,
        level: asInc ? 'inc' : 'diff',
        maxChain: input.maxChain,
        ...(input.fullEverySeconds !== undefined
          ? { fullNotBefore: new Date(Date.parse(input.requestedAt) - input.fullEverySeconds * 1000).toISOString() }
          : {}),
      },
    );
    if (!head.ok) return full(head.reason);
    const { parent, base, depth } = head;
    for (const { target, catalog } of catalogs) {
      const { links } = await chainOf(parent, catalog.entries, catalog.target);
      const problem = await withTarget(deps, target, input.s3Options, (t) =>
        chunkRepository ? indexProblem(t, parent) : chainProblem(t, links),
      );
      if (problem) return full(problem);
    }

    // The disks against the backup this one builds on.
    const level: BackupLevel = asInc ? 'inc' : 'diff';
    const now = new Map(input.disks.map((d) => [d.name, d]));
    for (const old of parent.disks) {
      const cur = now.get(old.name);
      if (!cur) return full(`disk ${old.name} was removed since ${parent.backupId}`);
      if (cur.virtualSize !== old.virtualSize) {
        return full(
          `disk ${old.name} was resized (${old.virtualSize} -> ${cur.virtualSize} bytes) since ${parent.backupId}`,
        );
      }
    }

    // libvirt's side: the parent's checkpoint, redefined from its manifest if libvirt lost it, and its bitmaps.
    const parentCheckpoint = parent.chain.checkpoint!;
    const known = await listCheckpoints(domain);
    if (!known.some((c) => c.name === parentCheckpoint)) {
      const why = await redefineFromManifest(domain, parent);
      if (why)
        return full(
          `the checkpoint ${parentCheckpoint} of ${parent.backupId} is gone from libvirt and could not be redefined (${why})`,
        );
    }
    let states;
    try {
      states = await hv.checkpointBitmaps(domain, parentCheckpoint, { disks: input.disks.map((d) => d.name) });
    } catch (err) {
      if (err instanceof HypervisorError && err.permanent) {
        return full(`libvirt cannot use the checkpoint ${parentCheckpoint} of ${parent.backupId} (${err.message})`);
      }
      hypervisorFailure(err);
    }
    const fullDisks: string[] = [];
    for (const disk of input.disks) {
      const state = states.find((s) => s.disk === disk.name)?.state;
      const before = parent.disks.find((d) => d.name === disk.name);
      if (state === 'broken') {
        return full(
          `the dirty bitmap of ${disk.name} was lost or broken (QEMU stopped without a clean shutdown, or libvirt lost it), so what changed since ${parent.backupId} is unknown`,
        );
      }
      // new to the chain, raw, or without a bitmap in the parent's checkpoint: copied whole inside the increment
      if (!before || state !== 'ok' || disk.format !== 'qcow2') fullDisks.push(disk.name);
    }
    if (fullDisks.length === input.disks.length) {
      return full(`no disk of ${domain} has a dirty bitmap since ${parent.backupId}`);
    }
    return {
      level,
      requested,
      ...(chunkRepository && requested === 'diff'
        ? { reason: 'inc: a chunk repository stores every backup whole, so a differential is taken as an increment' }
        : {}),
      base: base.backupId,
      depth,
      ...(head.baseStartedAt ? { baseStartedAt: head.baseStartedAt } : {}),
      incremental: parentCheckpoint,
      parent: {
        backupId: parent.backupId,
        checkpoint: parentCheckpoint,
        disks: parent.disks.map((d) => ({ name: d.name, key: d.key, sha256: d.sha256, format: d.format })),
      },
      ...(base.checkpoint ? { baseCheckpoint: base.checkpoint } : {}),
      fullDisks,
      checkpoint: { name: checkpointName(backupId), disks: bitmapDisks },
      ...inRepository(),
    };
  }

  /**
   * The targets that hold a chunk repository (`@chunk-repo/config`), and those that could not be asked. A target that
   * cannot be read must not fail the backup (the others may take it; shipping reports this one): it is left out of
   * the decision, after a transient failure was retried on the early attempts.
   */
  async function chunkRepositoryTargets(input: PlanBackupInput): Promise<{ chunk: string[]; unknown: string[] }> {
    const chunk: string[] = [];
    const unknown: string[] = [];
    for (const target of input.targets) {
      try {
        if (await withTarget(deps, target, input.s3Options, (t) => isChunkRepository(t))) chunk.push(target);
      } catch (err) {
        const transient = err instanceof ApplicationFailure && !err.nonRetryable;
        if (transient && Context.current().info.attempt < CATALOG_READ_ATTEMPTS) throw err;
        unknown.push(target);
      }
    }
    return { chunk, unknown };
  }

  /**
   * Every target's committed backups of the domain. A target that cannot be read cannot be built on, but it must not
   * fail the backup either (the other targets may take it, and shipping reports this one): the plan is then a full,
   * with the reason. A transient failure is retried first, on the activity's early attempts.
   */
  async function readCatalogs(
    input: PlanBackupInput,
  ): Promise<{ catalogs: Array<{ target: string; catalog: TargetCatalog }> } | { unreadable: string }> {
    const catalogs: Array<{ target: string; catalog: TargetCatalog }> = [];
    for (const target of input.targets) {
      let listed: BackupEntry[];
      try {
        listed = await withTarget(deps, target, input.s3Options, (t) =>
          listBackups(t, { domain: input.domain, ...(deps.manifestKey ? { manifestKey: deps.manifestKey } : {}) }),
        );
      } catch (err) {
        const transient = err instanceof ApplicationFailure && !err.nonRetryable;
        if (transient && Context.current().info.attempt < CATALOG_READ_ATTEMPTS) throw err;
        const why = err instanceof Error ? err.message.replace(/\.$/, '') : String(err);
        return { unreadable: `the catalog of ${redactUrl(target)} could not be read (${why})` };
      }
      // With a key, a manifest someone else wrote (unsigned, or signed with another key) is never built on: it could
      // name any parent and carry any checkpoint XML.
      const entries = deps.manifestKey ? listed.filter((e) => e.signed === true) : listed;
      catalogs.push({ target, catalog: { target: redactUrl(target), entries } });
    }
    return { catalogs };
  }

  async function listCheckpoints(domain: string): Promise<Checkpoint[]> {
    try {
      return await hv.listCheckpoints(domain);
    } catch (err) {
      hypervisorFailure(err);
    }
  }

  /** Gives libvirt back a checkpoint from the XML its backup's manifest kept; undefined when done, else why not. */
  async function redefineFromManifest(domain: string, m: Manifest): Promise<string | undefined> {
    const xml = m.chain.checkpointXml;
    if (!xml) return `the manifest of ${m.backupId} kept no checkpoint XML`;
    try {
      const redefined = await hv.redefineCheckpoint(domain, xml, { validate: true, dropParent: true });
      if (redefined.name !== m.chain.checkpoint) {
        return `the manifest's checkpoint XML names ${redefined.name}, not ${String(m.chain.checkpoint)}`;
      }
      Context.current().log.info('redefined a checkpoint libvirt had lost', { domain, checkpoint: redefined.name });
      return undefined;
    } catch (err) {
      if (err instanceof HypervisorError && err.permanent) return err.message;
      hypervisorFailure(err);
    }
  }

  /**
   * The images of a finished push job, made ready to hash: each increment's qcow2 names the LIVE disk as its
   * backing file; it is rebased (header only) onto the parent's image as the target lays it out
   * (`../<parentId>/<disk>.qcow2`), so a target holds a chain `qemu-img` alone can restore. Also reads the new
   * checkpoint's XML for the manifest. Idempotent: a rebase writes the same header again.
   */
  async function prepareChainImages(input: PrepareChainImagesInput): Promise<PreparedChainImages> {
    // It rewrites image headers: only staged images of ours, and only onto a parent image as a target lays it out.
    const images = await Promise.all(
      (Array.isArray(input.images) ? input.images : []).map(async (image) => {
        if (image.format !== 'qcow2') {
          throw permanent(
            `prepareChainImages: the image of disk ${String(image.name)} is ${String(image.format)}, not qcow2; refused`,
            ErrorType.InvalidInput,
          );
        }
        const path =
          input.backupId === undefined
            ? await deps.paths.stagingImageOfAnyBackup(image.path, image, 'prepareChainImages')
            : await deps.paths.stagingImage(image.path, input.backupId, image, 'prepareChainImages');
        return { ...image, path };
      }),
    );
    for (const image of images) {
      const parentFile = input.backing?.[image.name];
      const m = parentFile === undefined ? undefined : PARENT_IMAGE_RE.exec(parentFile);
      if (parentFile !== undefined && !(m && isValidBackupId(m[1] ?? '') && m[2] === image.name)) {
        throw permanent(
          `prepareChainImages: ${JSON.stringify(parentFile)} is not the parent image of disk ${image.name} (../<backupId>/${image.name}.qcow2); refused`,
          ErrorType.InvalidInput,
        );
      }
    }
    try {
      for (const image of images) {
        const parentFile = input.backing?.[image.name];
        if (parentFile) await rebaseUnsafe(image.path, parentFile, 'qcow2');
      }
      const checkpointXml = input.checkpoint ? await hv.checkpointXml(input.domain, input.checkpoint) : undefined;
      return { ...(checkpointXml ? { checkpointXml } : {}) };
    } catch (err) {
      hypervisorFailure(err);
    }
  }

  /** The saga's undo for the checkpoint a backup created: it never counts. Idempotent. */
  async function dropCheckpoint(input: DropCheckpointInput): Promise<void> {
    if (!input.name.startsWith(CHECKPOINT_PREFIX)) return; // never anything vmbackup did not create
    try {
      await hv.deleteCheckpoint(input.domain, input.name);
    } catch (err) {
      if (err instanceof HypervisorError && err.kind === 'not-found') return; // the domain is gone: nothing to undo
      hypervisorFailure(err);
    }
  }

  /**
   * After a backup is committed: vmbackup's own checkpoints that no chain can build on any more are deleted (every
   * bitmap costs the guest time on each write). Kept: the new backup's checkpoint and its chain's full's (for
   * differentials). Checkpoints vmbackup did not create are left alone.
   */
  async function retireCheckpoints(input: RetireCheckpointsInput): Promise<string[]> {
    const keep = new Set(input.keep);
    const deleted: string[] = [];
    for (const c of await listCheckpoints(input.domain)) {
      if (!c.name.startsWith(CHECKPOINT_PREFIX) || keep.has(c.name)) continue;
      try {
        if (await hv.deleteCheckpoint(input.domain, c.name)) deleted.push(c.name);
      } catch (err) {
        hypervisorFailure(err);
      }
    }
    return deleted;
  }

  return { planBackup, prepareChainImages, dropCheckpoint, retireCheckpoints };
}
