/**
 * Chains on a target: a full backup, its increments (`inc`: the changes since the previous link) and differentials
 * (`diff`: the changes since the chain's full). A link's disk image holds only the clusters that changed and reads
 * the rest from its parent's image.
 *
 * The chain is built from the MANIFESTS, never from the qcow2 headers: whoever can write a target can write a
 * header naming any file or an NBD server, while a manifest says which backup, which object and which SHA-256 each
 * link was built on (and, with a manifest key, is signed). Every edge is checked: the parent exists on this target,
 * belongs to the same domain, and holds each disk image with exactly the SHA-256 the child was built on.
 */
import type { StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import { findBackup, type BackupEntry, type CatalogOptions } from './catalog';
import { isChunkManifest } from './manifest';
import type { Manifest, ManifestDisk } from './manifest';

/** More links than any real chain (a new full is forced long before); a bound against a forged loop. */
const MAX_LINKS = 10_000;

export interface ChainBreak {
  /** the backup that is missing or is not what its child was built on */
  missing: string;
  /** the backup that depends on it */
  child: string;
  /**
   * What is wrong, as the end of a sentence: "it depends on backup P (the parent of C), which is not on T".
   * Callers start the sentence (`Cannot restore X from T: …`) and say what to do.
   */
  reason: string;
}

export interface ChainWalk {
  /** the backups the top one depends on and the top one itself, oldest (the chain's full) first */
  links: Manifest[];
  /** set when the walk stopped at a link that is missing or does not match: `links` then starts after it */
  broken?: ChainBreak;
}

/** The manifest of `backupId` of this domain on the target, or undefined when it has none (not committed). */
export type ManifestLookup = (backupId: string) => Promise<Manifest | undefined>;

/**
 * Walks from `top` to the full its chain starts at, through the manifests. Each edge is checked: the parent is
 * there, is of the same domain, and holds every disk image a child's disk reads from, with the SHA-256 and key the
 * child recorded. The data itself is checked by whoever reads it (restore and verify hash every link).
 */
export async function walkChain(top: Manifest, lookup: ManifestLookup, where: string): Promise<ChainWalk> {
  const newestFirst: Manifest[] = [top];
  const seen = new Set([top.backupId]);
  let child = top;
  // a backup in a chunk repository is whole: its `parent` names a checkpoint's backup, not data it depends on
  while (child.chain.level !== 'full' && !isChunkManifest(child)) {
    const parentId = child.chain.parent;
    const stop = (reason: string, missing = parentId ?? '?'): ChainWalk => ({
      links: newestFirst.reverse(),
      broken: { missing, child: child.backupId, reason },
    });
    if (!parentId) return stop(`backup ${child.backupId} is an ${child.chain.level} backup that names no parent`);
    if (seen.has(parentId) || seen.size >= MAX_LINKS) {
      return stop(`the chain of backup ${top.backupId} loops back to backup ${parentId}, so it never reaches a full`);
    }
    let parent: Manifest | undefined;
    try {
      parent = await lookup(parentId);
    } catch (err) {
      if (!(err instanceof StorageError)) throw err;
      return stop(
        `it depends on backup ${parentId} (the parent of ${child.backupId}), whose manifest cannot be used: ${err.message.replace(/\.$/, '')}`,
      );
    }
    if (!parent) {
      return stop(
        `it depends on backup ${parentId} (the parent of ${child.backupId}), which is not on ${where} (no committed manifest)`,
      );
    }
    const mismatch = edgeMismatch(child, parent);
    if (mismatch) return stop(`it depends on backup ${parentId} (the parent of ${child.backupId}), but ${mismatch}`);
    seen.add(parentId);
    newestFirst.push(parent);
    child = parent;
  }
  const full = child;
  // a backup in a chunk repository is a complete point: reading it needs nothing below it (its `base` names the full
  // of its checkpoint chain, which prune may have removed)
  if (full === top && isChunkManifest(top)) return { links: [top] };
  if (top.chain.base !== full.backupId) {
    return {
      links: newestFirst.reverse(),
      broken: {
        missing: top.chain.base,
        child: top.backupId,
        reason: `backup ${top.backupId} names ${top.chain.base} as the full of its chain, but its parents lead to ${full.backupId}`,
      },
    };
  }
  return { links: newestFirst.reverse() };
}

/** Why `parent` is not the backup `child` was built on, or undefined when every disk edge matches. */
function edgeMismatch(child: Manifest, parent: Manifest): string | undefined {
  if (parent.domain !== child.domain) return `that backup belongs to domain ${parent.domain}, not ${child.domain}`;
  for (const disk of child.disks) {
    if (!disk.backing) continue;
    if (disk.backing.backupId !== parent.backupId) {
      return `disk ${disk.name} of ${child.backupId} reads from backup ${disk.backing.backupId} instead`;
    }
    const below = parent.disks.find((d) => d.name === disk.name);
    if (!below) return `that backup has no disk ${disk.name}`;
    if (below.key !== disk.backing.key) {
      return `disk ${disk.name} of ${child.backupId} reads from ${disk.backing.key}, not ${below.key}`;
    }
    if (below.sha256 !== disk.backing.sha256) {
      return `its disk ${disk.name} has SHA-256 ${below.sha256}, while ${child.backupId} was built on ${disk.backing.sha256}`;
    }
  }
  return undefined;
}

/** One link of a disk's chain: the stored image and the backup that holds it. */
export interface DiskLink {
  backupId: string;
  disk: ManifestDisk;
}

/**
 * The images disk `name` of the newest link reads from, top first, ending at an image without backing (the full's,
 * or a disk that was new to the chain). `links` is a walk without a break.
 */
export function diskChain(links: readonly Manifest[], name: string): DiskLink[] {
  const byId = new Map(links.map((m) => [m.backupId, m]));
  const top = links.at(-1);
  let disk = top?.disks.find((d) => d.name === name);
  if (!top || !disk) throw new Error(`backup ${top?.backupId ?? '?'} has no disk ${name}`);
  const out: DiskLink[] = [{ backupId: top.backupId, disk }];
  while (disk.backing) {
    const parent = byId.get(disk.backing.backupId);
    const below: ManifestDisk | undefined = parent?.disks.find((d) => d.name === name);
    if (!parent || !below) throw new Error(`the chain of disk ${name} lost backup ${disk.backing.backupId}`);
    out.push({ backupId: parent.backupId, disk: below });
    disk = below;
  }
  return out;
}

/**
 * Looks manifests up on a target; a backup with no committed manifest there is undefined. With a manifestKey, a
 * link whose manifest is not signed with it throws (the walk reports it as the broken link).
 */
export function lookupOn(target: StorageTarget, domain: string, opts: CatalogOptions = {}): ManifestLookup {
  return async (backupId) => {
    try {
      const { manifest } = await findBackup(target, backupId, opts);
      return manifest.domain === domain ? manifest : undefined;
    } catch (err) {
      if (err instanceof StorageError && err.kind === 'not-found' && err.driver === 'catalog') return undefined;
      throw err;
    }
  };
}

export interface ResolvedChain {
  /** the backup asked for */
  top: BackupEntry;
  /** its chain, oldest (the full) first, `top` last */
  links: Manifest[];
}

/**
 * The backup and every link it depends on, read from the manifests on `target`. A broken chain throws one sentence
 * that starts with `action` ("Cannot restore X from T"), names the missing link and says what to do.
 */
export async function resolveChain(
  target: StorageTarget,
  backupId: string,
  action: string,
  opts: CatalogOptions = {},
): Promise<ResolvedChain> {
  const top = await findBackup(target, backupId, opts);
  const walk = await walkChain(top.manifest, lookupOn(target, top.manifest.domain, opts), target.displayUrl);
  if (walk.broken) throw brokenChainError(action, walk.broken, target);
  return { top, links: walk.links };
}

export function brokenChainError(action: string, broken: ChainBreak, target: StorageTarget): StorageError {
  return new StorageError(
    'not-found',
    `${action}: ${broken.reason}; copy backup ${broken.missing} to ${target.displayUrl} or use a target that holds the whole chain.`,
    { driver: 'catalog', permanent: true },
  );
}
