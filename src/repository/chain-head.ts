/**
 * Which committed backup a new incremental or differential backup of a domain can build on: the newest backup of
 * this domain from this host, the same on every target, whose chain is whole on each of them. Anything else means a
 * full backup, and the one sentence that says why (the level is never silently different from the one asked for).
 */
import type { StorageTarget } from '../storage/contract';
import type { BackupEntry } from './catalog';
import { walkChain } from './chain';
import type { ChainWalk } from './chain';
import { isChunkManifest, storedDigest } from './manifest';
import type { Manifest } from './manifest';

export interface ChainHeadQuery {
  domain: string;
  host: string;
  /** inc: build on the newest backup; diff: on the full of the newest backup's chain */
  level: 'inc' | 'diff';
  /** inc only: a chain with this many increments since its full is not continued */
  maxChain: number;
  /** a chain whose full started before this time (ISO) is not continued */
  fullNotBefore?: string;
}

export type ChainHead =
  | {
      ok: true;
      /** the backup the new one is incremental from */
      parent: Manifest;
      /** the chain's full: its id and checkpoint (in a chunk repository prune may have removed its manifest) */
      base: ChainBase;
      /** links the new backup will have after the full (1 for a diff) */
      depth: number;
      /** when the chain's full started, when known */
      baseStartedAt?: string;
    }
  | { ok: false; reason: string };

export interface ChainBase {
  backupId: string;
  /** its libvirt checkpoint, when its manifest is there to say */
  checkpoint?: string;
}

/** One target's committed backups (listBackups) under the name it is shown with. */
export interface TargetCatalog {
  target: string;
  entries: BackupEntry[];
}

/**
 * The links `head` depends on and itself, oldest first, from one target's committed backups (the walk and its
 * checks are the repository's one chain walk, src/repository/chain.ts); `broken`: why the chain does not reach a full.
 */
export async function chainOf(head: Manifest, entries: BackupEntry[], where: string): Promise<ChainWalk> {
  const byId = new Map(entries.map((e) => [e.manifest.backupId, e.manifest]));
  return walkChain(head, (id) => Promise.resolve(byId.get(id)), where);
}

/** Decides on the manifests alone (no I/O): see the file comment. */
export async function findChainHead(catalogs: TargetCatalog[], q: ChainHeadQuery): Promise<ChainHead> {
  if (catalogs.length === 0) return { ok: false, reason: 'no target was given' };
  const heads: Array<{ target: string; head: Manifest; entries: BackupEntry[] }> = [];
  for (const { target, entries } of catalogs) {
    const ours = entries.filter((e) => e.manifest.domain === q.domain && e.manifest.host === q.host);
    const newest = ours.at(-1)?.manifest; // listBackups sorts oldest first
    if (!newest) return { ok: false, reason: `${target} holds no earlier backup of ${q.domain} from ${q.host}` };
    heads.push({ target, head: newest, entries: ours });
  }
  const first = heads[0]!;
  const other = heads.find((h) => h.head.backupId !== first.head.backupId);
  if (other) {
    return {
      ok: false,
      reason: `the targets disagree on the newest backup (${first.target} has ${first.head.backupId}, ${other.target} has ${other.head.backupId}): a target missed a backup`,
    };
  }
  const head = first.head;
  if (!head.chain.checkpoint) {
    return { ok: false, reason: `the newest backup ${head.backupId} (${head.method}) left no checkpoint to build on` };
  }
  if (isChunkManifest(head)) return chunkChainHead(head, heads, q);
  let result: PolicyInput | undefined;
  for (const { target, entries } of heads) {
    const { links, broken } = await chainOf(head, entries, target);
    if (broken) return { ok: false, reason: `the chain of ${head.backupId} on ${target} is broken: ${broken.reason}` };
    const base = links[0]!;
    if (q.level === 'inc') {
      // links after the full, and the new one
      result = { parent: head, base: baseOf(base), depth: links.length, baseStartedAt: base.startedAt };
    } else {
      if (!base.chain.checkpoint) {
        return { ok: false, reason: `the full backup ${base.backupId} left no checkpoint to build a differential on` };
      }
      result = { parent: base, base: baseOf(base), depth: 1, baseStartedAt: base.startedAt };
    }
  }
  if (!result) return { ok: false, reason: 'no target was given' };
  return checkPolicy(result, q);
}

function baseOf(m: Manifest): ChainBase {
  return { backupId: m.backupId, ...(m.chain.checkpoint ? { checkpoint: m.chain.checkpoint } : {}) };
}

interface PolicyInput {
  parent: Manifest;
  base: ChainBase;
  depth: number;
  baseStartedAt: string | undefined;
}

/** --max-chain and --full-every against the chain a new increment would continue. */
function checkPolicy(result: PolicyInput, q: ChainHeadQuery): ChainHead {
  const { parent, base, depth, baseStartedAt } = result;
  if (q.level === 'inc' && depth > q.maxChain) {
    return {
      ok: false,
      reason: `the chain since ${base.backupId} already has ${depth - 1} increments (--max-chain ${q.maxChain})`,
    };
  }
  if (q.fullNotBefore) {
    if (baseStartedAt === undefined) {
      return {
        ok: false,
        reason: `the chain's full backup ${base.backupId} is no longer in the repository, so its age (--full-every) is unknown`,
      };
    }
    if (Date.parse(baseStartedAt) < Date.parse(q.fullNotBefore)) {
      return {
        ok: false,
        reason: `the chain's full backup ${base.backupId} is from ${baseStartedAt}, older than --full-every allows`,
      };
    }
  }
  return { ok: true, parent, base, depth, ...(baseStartedAt !== undefined ? { baseStartedAt } : {}) };
}

/**
 * A chunk repository's head: every backup there is whole, so an increment needs the head's checkpoint and indexes
 * and nothing of the backups before it (prune may have removed any of them, the chain's full included). Its place in
 * the checkpoint chain is in its own manifest: `base` (the full), `depth` (its increments since that full) and
 * `baseStartedAt`; a manifest from before they were recorded is counted along the parents that are still there.
 */
function chunkChainHead(
  head: Manifest,
  heads: Array<{ target: string; head: Manifest; entries: BackupEntry[] }>,
  q: ChainHeadQuery,
): ChainHead {
  const byId = new Map(heads[0]!.entries.map((e) => [e.manifest.backupId, e.manifest]));
  if (head.chain.level === 'full') {
    return checkPolicy({ parent: head, base: baseOf(head), depth: 1, baseStartedAt: head.startedAt }, q);
  }
  const baseId = head.chain.base;
  if (!baseId) return { ok: false, reason: `the ${head.chain.level} backup ${head.backupId} names no full backup` };
  const full = byId.get(baseId);
  const recorded = head.chain.depth;
  let links = 1;
  if (typeof recorded === 'number' && Number.isSafeInteger(recorded) && recorded >= 1) links = recorded;
  else {
    // older manifests: the parents still in the repository (a bound against a forged loop)
    const seen = new Set([head.backupId]);
    for (let m = byId.get(head.chain.parent ?? ''); m && m.chain.level !== 'full' && !seen.has(m.backupId);) {
      seen.add(m.backupId);
      links += 1;
      m = byId.get(m.chain.parent ?? '');
    }
  }
  const recordedStart = head.chain.baseStartedAt;
  const baseStartedAt =
    full?.startedAt ??
    (typeof recordedStart === 'string' && !Number.isNaN(Date.parse(recordedStart)) ? recordedStart : undefined);
  const base: ChainBase = full && isChunkManifest(full) ? baseOf(full) : { backupId: baseId };
  return checkPolicy({ parent: head, base, depth: links + 1, baseStartedAt }, q);
}

/**
 * The structural check of a chain on one target before building on it: every image of every link is there with the
 * size (and, where the driver keeps it, the SHA-256) its manifest records. It reads no image: a full hash of a whole
 * chain on S3 every night is what `vmbackup verify` is for. Resolves undefined when whole, else one sentence.
 */
export async function chainProblem(target: StorageTarget, links: Manifest[]): Promise<string | undefined> {
  for (const link of links) {
    for (const disk of link.disks) {
      const info = await target.stat(disk.key);
      if (!info) return `disk ${disk.name} of ${link.backupId} is missing on ${target.displayUrl}`;
      const stored = storedDigest(disk, info.metadata);
      if (info.size !== disk.size || (stored !== undefined && stored !== disk.sha256)) {
        return `disk ${disk.name} of ${link.backupId} on ${target.displayUrl} is not the image its manifest records`;
      }
    }
  }
  return undefined;
}
