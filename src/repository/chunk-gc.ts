/**
 * gc of a chunk repository: deletes the chunks and indexes no backup references any more (prune removes only
 * `<domain>/<backupId>/`, never a chunk: several backups share them).
 *
 * Mark: every version-3 manifest on the target whose repository id is this repository's -> its indexes (disks and
 * whole-VM files) -> their chunk ids. In an encrypted repository each manifest's repository signature is checked. Any
 * manifest that cannot be read or verified, and any index it names that cannot be read, stops gc before it deletes
 * anything: a partial mark would delete chunks a backup needs.
 *
 * Sweep: an object under `chunks/` or `indexes/` that nothing marked is deleted only when its modification time is
 * older than `start - grace`, checked again just before its delete. Backups that run meanwhile are safe by the
 * freshness rule (chunks/store.ts): a chunk or index a backup reuses was touched when older than the freshness window, so
 * it is younger than grace; one it uploaded is new. Hence grace must exceed twice the freshness window.
 *
 * S3 Object Lock (a versioned bucket): an unreferenced object one version of which is still retained is kept and
 * reported with that date (`keptLocked`); once every version's retention passed, its versions and delete markers are
 * deleted for good (a plain delete would only hide it behind a delete marker).
 */
import type { ChunkGcCounts } from '../shared/chunk-gc';
import type { ObjectInfo, ObjectVersion, StorageTarget } from '../storage/contract';
import { isStorageError } from '../storage/errors';
import { parseManifestKey } from '../storage/keys';
import { MAX_MANIFEST_BYTES } from './catalog';
import { CHUNK_MANIFEST_VERSION, hasRepositorySignature, manifestVmFiles, readManifest } from './manifest';
import {
  CONFIG_KEY,
  ID_RE,
  INDEXES_PREFIX,
  SMALL_OBJECT_MAX_BYTES,
  chunkIdOfKey,
  parseRepositoryConfig,
} from './chunks/config';
import type { OpenRepository } from './chunks/repository';
import { ChunkStore, FRESH_SECONDS } from './chunks/store';

export const DEFAULT_GRACE_SECONDS = 24 * 3600;

export interface ChunkGcPolicy {
  /** unreferenced objects younger than this stay (seconds); must be > 2 x freshSeconds */
  graceSeconds?: number;
  /** the freshness window backups use (chunks/store.ts); only tests change it */
  freshSeconds?: number;
  dryRun?: boolean;
  /** the time ages are measured from; default now (taken before the mark) */
  now?: Date;
}

export interface ChunkGcObject {
  key: string;
  size: number;
  modified: string;
}

export interface ChunkGcReport extends ChunkGcCounts {
  /** with dryRun: what would be removed; otherwise what was */
  removed: ChunkGcObject[];
  /**
   * S3 Object Lock: unreferenced objects a version of which the server still retains: kept, with the latest date
   * (a later gc removes them once it passed)
   */
  keptLocked: Array<ChunkGcObject & { retainUntil: string }>;
}

/** A gc that must not sweep: one sentence for a person. */
export class ChunkGcError extends Error {
  override readonly name = 'ChunkGcError';
  readonly permanent = true;
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
  }
}

/** Refuses a grace that a running backup's reused chunks would not survive. */
export function checkGrace(graceSeconds: number, freshSeconds: number = FRESH_SECONDS): void {
  if (!Number.isFinite(graceSeconds) || graceSeconds <= 2 * freshSeconds)
    throw new ChunkGcError(
      `The gc grace period must be longer than ${describeSeconds(2 * freshSeconds)} (twice the ${describeSeconds(freshSeconds)} a running backup may rely on a chunk without touching it), not ${describeSeconds(graceSeconds)}.`,
    );
}

function describeSeconds(s: number): string {
  if (!Number.isFinite(s)) return String(s);
  if (s % 3600 === 0) return `${s / 3600} h`;
  if (s % 60 === 0) return `${s / 60} min`;
  return `${s} s`;
}

/** The ids a mark found: indexes by id, chunks by id. Pure; the sweep's decision per object. */
export interface Mark {
  indexes: ReadonlySet<string>;
  chunks: ReadonlySet<string>;
}

/**
 * What the sweep deletes from a listing: objects under chunks/ and indexes/ that the mark does not hold and whose
 * mtime is older than `cutoffMs`. Keys that are not a chunk's or an index's (someone else's files) are never chosen.
 */
export function sweepCandidates(
  objects: Iterable<ObjectInfo>,
  mark: Mark,
  cutoffMs: number,
): { remove: ObjectInfo[]; young: ObjectInfo[] } {
  const remove: ObjectInfo[] = [];
  const young: ObjectInfo[] = [];
  for (const o of objects) {
    const chunk = chunkIdOfKey(o.key);
    const index = indexIdOfKey(o.key);
    if (chunk === undefined && index === undefined) continue;
    if (chunk !== undefined ? mark.chunks.has(chunk) : mark.indexes.has(index as string)) continue;
    if (o.modified.getTime() < cutoffMs) remove.push(o);
    else young.push(o);
  }
  return { remove, young };
}

export function indexIdOfKey(key: string): string | undefined {
  if (!key.startsWith(INDEXES_PREFIX)) return undefined;
  const id = key.slice(INDEXES_PREFIX.length);
  return ID_RE.test(id) ? id : undefined;
}

/**
 * Marks, then sweeps (see the file's comment). Idempotent: a second run finds nothing of what the first removed.
 * Throws ChunkGcError, before deleting anything, when the mark cannot be complete.
 */
export async function collectChunkGarbage(repo: OpenRepository, policy: ChunkGcPolicy = {}): Promise<ChunkGcReport> {
  const target = repo.target;
  const freshSeconds = policy.freshSeconds ?? FRESH_SECONDS;
  const graceSeconds = policy.graceSeconds ?? DEFAULT_GRACE_SECONDS;
  checkGrace(graceSeconds, freshSeconds);
  const start = (policy.now ?? new Date()).getTime();
  const cutoffMs = start - graceSeconds * 1000;

  // one listing: manifests to mark from, chunk and index objects to sweep
  const manifests: ObjectInfo[] = [];
  const stored: ObjectInfo[] = [];
  for await (const o of target.list('')) {
    if (parseManifestKey(o.key)) manifests.push(o);
    else if (chunkIdOfKey(o.key) !== undefined || indexIdOfKey(o.key) !== undefined) stored.push(o);
  }

  const { indexRefs, backups, foreignBackups } = await markManifests(repo, manifests);
  const store = new ChunkStore(repo);
  const chunkRefs = new Set<string>();
  for (const [id, usedBy] of indexRefs) {
    let index;
    try {
      index = await store.getIndex(id);
    } catch (err) {
      if (isStorageError(err) && !err.permanent && err.kind !== 'not-found') throw err; // transient: retried
      throw new ChunkGcError(
        `gc deleted nothing on ${target.displayUrl}: the index ${id} that backup ${usedBy} names cannot be read (${(err as Error).message.replace(/\.$/, '')}); run \`vmbackup verify ${usedBy}\`, and prune that backup if it is damaged.`,
        { cause: err },
      );
    }
    for (const e of index.entries) if (e !== 'zero') chunkRefs.add(e);
  }

  const mark: Mark = { indexes: new Set(indexRefs.keys()), chunks: chunkRefs };
  const { remove, young } = sweepCandidates(stored, mark, cutoffMs);
  const report: ChunkGcReport = {
    target: target.displayUrl,
    repositoryId: repo.config.repositoryId,
    dryRun: Boolean(policy.dryRun),
    graceSeconds,
    backups,
    foreignBackups,
    referencedIndexes: mark.indexes.size,
    referencedChunks: chunkRefs.size,
    chunks: stored.filter((o) => chunkIdOfKey(o.key) !== undefined).length,
    indexes: stored.filter((o) => indexIdOfKey(o.key) !== undefined).length,
    removedChunks: 0,
    removedIndexes: 0,
    removedBytes: 0,
    keptYoung: young.length,
    keptYoungBytes: young.reduce((n, o) => n + o.size, 0),
    removed: [],
    keptLocked: [],
  };
  // a versioned (Object Lock) bucket: a plain delete only adds a delete marker (the bytes stay, billed) and a
  // retained version cannot be deleted at all, so each object's versions are asked for and deleted one by one
  const lock = target.objectLock && (await target.objectLock.enabled()) ? target.objectLock : undefined;
  for (const o of remove) {
    let versions: ObjectVersion[] | undefined;
    if (lock) {
      versions = (await lock.versions(o.key)).filter((v) => v.key === o.key);
      const until = Math.max(0, ...versions.map((v) => v.retainUntil?.getTime() ?? 0));
      if (until > Date.now()) {
        report.keptLocked.push({
          key: o.key,
          size: o.size,
          modified: o.modified.toISOString(),
          retainUntil: new Date(until).toISOString(),
        });
        continue;
      }
    }
    if (!policy.dryRun) {
      // the listing may be minutes old: a backup may have touched (reused) it since. Checked again right before the
      // delete; what is left is the time between this stat and the delete (one request).
      const now = await target.stat(o.key);
      if (!now) continue; // gone already (another gc, or a retry of this one)
      if (now.modified.getTime() >= cutoffMs) {
        report.keptYoung++;
        report.keptYoungBytes += now.size;
        continue;
      }
      if (lock && versions) {
        // versions written after the listing above (a touch) are not deleted: the object stays, current
        try {
          for (const v of versions) await lock.deleteVersion(v.key, v.versionId);
        } catch (err) {
          if (!isStorageError(err) || err.kind !== 'permission') throw err;
          // retained since it was asked (a backup reused and held it meanwhile): kept, as any locked object
          const until = Math.max(0, ...(await lock.versions(o.key)).map((v) => v.retainUntil?.getTime() ?? 0));
          report.keptLocked.push({
            key: o.key,
            size: o.size,
            modified: o.modified.toISOString(),
            retainUntil: new Date(until).toISOString(),
          });
          continue;
        }
      } else await target.delete(o.key);
    }
    if (chunkIdOfKey(o.key) !== undefined) report.removedChunks++;
    else report.removedIndexes++;
    report.removedBytes += o.size;
    report.removed.push({ key: o.key, size: o.size, modified: o.modified.toISOString() });
  }
  return report;
}

/** Reads every manifest; index id -> one backup that names it. Throws ChunkGcError on any it cannot trust. */
async function markManifests(
  repo: OpenRepository,
  manifests: ObjectInfo[],
): Promise<{ indexRefs: Map<string, string>; backups: number; foreignBackups: number }> {
  const target = repo.target;
  const indexRefs = new Map<string, string>();
  let backups = 0;
  let foreignBackups = 0;
  const stop = (key: string, why: string, cause?: unknown): ChunkGcError =>
    new ChunkGcError(
      `gc deleted nothing on ${target.displayUrl}: the manifest ${key} ${why}; a gc that skipped it could delete chunks that backup needs, so remove or repair that manifest first.`,
      cause === undefined ? {} : { cause },
    );
  for (const o of manifests) {
    if (o.size > MAX_MANIFEST_BYTES) throw stop(o.key, 'is larger than any manifest');
    let body: Buffer;
    try {
      body = await target.getBuffer(o.key, { maxBytes: MAX_MANIFEST_BYTES });
    } catch (err) {
      if (isStorageError(err) && err.kind === 'not-found') continue; // pruned since the listing: nothing to keep
      if (isStorageError(err) && err.kind === 'checksum') throw stop(o.key, 'is larger than any manifest', err);
      throw err; // the target failed, not the manifest: retried
    }
    let manifest;
    try {
      manifest = readManifest(body, `${o.key} on ${target.displayUrl}`).manifest;
    } catch (err) {
      throw stop(o.key, `cannot be read (${(err as Error).message.replace(/\.$/, '')})`, err);
    }
    if (manifest.version !== CHUNK_MANIFEST_VERSION || !manifest.repository) continue; // an image-tree backup
    if (manifest.repository.id !== repo.config.repositoryId) {
      foreignBackups++;
      continue;
    }
    if (repo.keys && !hasRepositorySignature(body, repo.keys.authKey))
      throw stop(o.key, "is not signed with this repository's key (written by someone else, or changed)");
    backups++;
    for (const d of manifest.disks) if (!indexRefs.has(d.sha256)) indexRefs.set(d.sha256, manifest.backupId);
    for (const f of manifestVmFiles(manifest)) if (!indexRefs.has(f.sha256)) indexRefs.set(f.sha256, manifest.backupId);
  }
  return { indexRefs, backups, foreignBackups };
}

/** The repository id of the chunk repository on `target` (its config is plaintext: no password needed). */
export async function chunkRepositoryId(target: StorageTarget): Promise<string> {
  const body = await target.getBuffer(CONFIG_KEY, { maxBytes: SMALL_OBJECT_MAX_BYTES });
  return parseRepositoryConfig(body, target.displayUrl).repositoryId;
}
