/**
 * gc of a chunk repository as a Temporal workflow: its input and result, its activity, its workflow id. One workflow
 * id per repository (`gc-chunks-<repositoryId>`): Temporal, not a lock file of ours, keeps two gcs of one repository
 * from running at once, and a host that dies leaves no lock behind. Sandbox-safe: types and names only.
 */
import type { S3TargetOptions } from './types';

export interface ChunkGcInput {
  /** the host whose worker runs it (a file:// target is that host's directory) */
  host: string;
  target: string;
  s3Options?: S3TargetOptions;
  /** unreferenced objects younger than this stay; the worker refuses one not above twice its freshness window */
  graceSeconds: number;
  dryRun?: boolean;
}

/** What a gc of a chunk repository found and did: the figures its report and its workflow result share. */
export interface ChunkGcCounts {
  target: string;
  repositoryId: string;
  dryRun: boolean;
  graceSeconds: number;
  /** version-3 manifests of this repository that were marked */
  backups: number;
  /** version-3 manifests of another repository (left alone; their indexes are not here) */
  foreignBackups: number;
  referencedIndexes: number;
  referencedChunks: number;
  /** chunk and index objects found */
  chunks: number;
  indexes: number;
  /** unreferenced, deleted (or, with dryRun, would be) */
  removedChunks: number;
  removedIndexes: number;
  removedBytes: number;
  /** unreferenced but younger than grace (or touched since the listing): kept */
  keptYoung: number;
  keptYoungBytes: number;
}

/** The workflow's result: the counts, and the keys it names cut to MAX_LISTED (a history payload stays small). */
export interface ChunkGcResult extends ChunkGcCounts {
  /** the first MAX_LISTED removed (or, dry run, removable) keys; a history payload stays small */
  removedKeys: string[];
  /** how many more were removed than removedKeys lists */
  moreRemoved: number;
  /** S3 Object Lock: unreferenced objects kept because a version is still retained (a later gc removes them) */
  keptLocked: number;
  /** the first MAX_LISTED of them, each with the date its retention passes */
  keptLockedKeys: Array<{ key: string; retainUntil: string }>;
}

export const CHUNK_GC_MAX_LISTED = 1000;

export interface ChunkGcActivities {
  collectChunkGarbage(input: ChunkGcInput): Promise<ChunkGcResult>;
}

/** The one workflow id a gc of repository `repositoryId` runs under. */
export function chunkGcWorkflowId(repositoryId: string): string {
  return `gc-chunks-${repositoryId}`;
}
