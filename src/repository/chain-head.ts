/**
 * Which committed backup a new incremental or differential backup of a domain can build on: the newest backup of
 * this domain from this host, the same on every target, whose chain is whole on each of them. Anything else means a
 * full backup, and the one sentence that says why (the level is never silently different from the one asked for).
 */
import type { StorageTarget } from '../storage/contract';
import type { BackupEntry } from './catalog';
import { walkChain } from './chain';
import type { ChainWalk } from './chain';
import { storedDigest } from './manifest';
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
      /** the chain's full */
      base: Manifest;
      /** links the new backup will have after the full (1 for a diff) */
      depth: number;
    }
  | { ok: false; reason: string };

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
  let result: { parent: Manifest; base: Manifest; depth: number } | undefined;
  for (const { target, entries } of heads) {
    const { links, broken } = await chainOf(head, entries, target);
    if (broken) return { ok: false, reason: `the chain of ${head.backupId} on ${target} is broken: ${broken.reason}` };
    const base = links[0]!;
    if (q.level === 'inc') {
      // links after the full, and the new one
      result = { parent: head, base, depth: links.length };
    } else {
      if (!base.chain.checkpoint) {
        return { ok: false, reason: `the full backup ${base.backupId} left no checkpoint to build a differential on` };
      }
      result = { parent: base, base, depth: 1 };
    }
  }
  if (!result) return { ok: false, reason: 'no target was given' };
  if (q.level === 'inc' && result.depth > q.maxChain) {
    return {
      ok: false,
      reason: `the chain since ${result.base.backupId} already has ${result.depth - 1} increments (--max-chain ${q.maxChain})`,
    };
  }
  if (q.fullNotBefore && Date.parse(result.base.startedAt) < Date.parse(q.fullNotBefore)) {
    return {
      ok: false,
      reason: `the chain's full backup ${result.base.backupId} is from ${result.base.startedAt}, older than --full-every allows`,
    };
  }
  return { ok: true, ...result };
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
