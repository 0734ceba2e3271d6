/** Types exchanged between the CLI, workflows and activities (all JSON-serialisable). */

export type BackupMethod = 'push' | 'snapshot' | 'offline' | 'pull';
/** full: every cluster; inc: what changed since the previous backup of the chain; diff: since the chain's full. */
export type BackupLevel = 'full' | 'inc' | 'diff';
/** auto: an incremental when every target holds a chain that can continue, else a full. */
export type RequestedLevel = 'auto' | BackupLevel;
export type RequestedMethod = 'auto' | 'push' | 'snapshot' | 'pull';
export type DomainState = 'running' | 'paused' | 'shut off' | 'other';

export interface DiskInfo {
  /** target dev, e.g. vda */
  name: string;
  /** absolute path of the image the disk currently uses */
  source: string;
  /** qcow2 | raw */
  format: string;
  device: 'disk' | 'cdrom' | 'floppy' | 'lun';
  readonly: boolean;
  shareable: boolean;
  /** bytes the guest sees */
  virtualSize: number;
  /** bytes allocated on the host */
  allocation: number;
  /** backing chain below `source` (file paths, top first); empty for a standalone image */
  backingChain: string[];
  /** its I/O runs in an IOThread (set only then): pull mode refuses such disks (src/workflows/backup.ts) */
  iothread?: boolean;
}

export interface SkippedDisk {
  name: string;
  reason: string;
}

export interface DomainInfo {
  domain: string;
  uuid: string;
  state: DomainState;
  /** disks vmbackup will back up */
  disks: DiskInfo[];
  /** disks left out (cdrom, read-only, shareable unless asked for) */
  skipped: SkippedDisk[];
  libvirtVersion: string;
  qemuVersion: string;
  /** virDomainBackupBegin usable: libvirt >= 7.2 and QEMU >= 4.2 */
  backupApi: boolean;
  hasGuestAgent: boolean;
}

/**
 * How the snapshot method copies a base image: `auto` is vmbackup's own single-pass copy (reads the base
 * once and hashes what it writes); `rsync` and `cp` run that tool and then hash the base and the copy.
 */
export type CopyTool = 'auto' | 'rsync' | 'cp';

export interface BackupOptions {
  /** include cdrom, read-only and shareable disks */
  includeAllDisks?: boolean;
  /** snapshot method: freeze guest filesystems through the guest agent */
  quiesce?: boolean;
  /** snapshot method: fail rather than fall back to crash-consistent */
  requireQuiesce?: boolean;
  /** snapshot method: how the base images are copied (default `auto`) */
  copyTool?: CopyTool;
  /** S3 options applied to every s3:// target */
  s3?: S3TargetOptions;
  /** how long a silent long-running step may go before Temporal retries it on another worker (default 30) */
  heartbeatTimeoutSeconds?: number;
  /** which level to take (default auto) */
  level?: RequestedLevel;
  /** auto/inc: a chain with this many increments since its full gets a new full (default 14) */
  maxChain?: number;
  /** auto/inc/diff: a chain whose full is older than this gets a new full (default: never) */
  fullEverySeconds?: number;
  /** a webhook told about this backup's end (src/activities/notify.ts): failure and partial, success when asked */
  notify?: NotifyOptions;
}

export interface NotifyOptions {
  url: string;
  /** also tell about a backup stored on every target */
  onSuccess?: boolean;
}

export interface S3TargetOptions {
  forcePathStyle?: boolean;
  storageClass?: string;
  serverSideEncryption?: string;
  partSizeMiB?: number;
  concurrency?: number;
  /** bytes per second, 0 = unlimited */
  bandwidthLimit?: number;
  /** S3 Object Lock: every object written is locked (src/shared/object-lock.ts) */
  objectLock?: ObjectLockOption;
}

/** `--s3-object-lock DAYS[:governance|compliance]`, and the date it means for one backup. */
export interface ObjectLockOption {
  mode: 'governance' | 'compliance';
  days: number;
  /**
   * ISO date every object of this backup is retained until: the backup's start time + days, set by the backup
   * workflow so one date describes the whole backup; absent, the time the target is opened + days (copy).
   */
  retainUntil?: string;
}

export interface BackupRequest {
  backupId: string;
  domain: string;
  host: string;
  method: RequestedMethod;
  /** target URLs (file://, nfs://, s3://); never empty (the CLI fills the default) */
  targets: string[];
  options: BackupOptions;
  /** ISO time the request was made (set by the client; workflows have no clock for logic) */
  requestedAt: string;
}

/** An image produced on the host, ready for shipping. */
export interface DiskImage {
  name: string;
  /** format of the backup image (qcow2 for push/offline, same as the base for snapshot) */
  format: string;
  /** absolute path of the image on the host */
  path: string;
  virtualSize: number;
  /** bytes of the image file */
  size: number;
  sha256: string;
  /**
   * `ino:size:mtimeMs` of the file when `sha256` was computed: a target that can take the file by
   * rename trusts the digest while the file still has this stamp, instead of reading it again.
   */
  stamp?: string;
}

export interface TargetResult {
  target: string;
  ok: boolean;
  error?: string;
  /** per disk: where it was stored on that target (key or URL) */
  locations?: Record<string, string>;
  /** a chunk repository: what this backup cost there (disks and whole-VM files together) */
  chunks?: TargetChunkStats;
}

/** What a backup stored in one chunk repository. */
export interface TargetChunkStats {
  /** bytes sent to the target (encoded chunks; indexes and the manifest not counted) */
  uploadedBytes: number;
  /** chunks this backup stored */
  newChunks: number;
  /** chunks the repository held already */
  knownChunks: number;
  /** all-zero chunks (never stored) */
  zeroChunks: number;
  /** per disk: its index id */
  indexes: Record<string, string>;
  /** per disk: bytes sent for it */
  diskBytes: Record<string, number>;
}

export type BackupStatus = 'running' | 'completed' | 'failed' | 'cancelled' | 'partial';

export type BackupPhase =
  | 'starting'
  /** waiting for one of its host's backup slots (`vmbackup worker --max-concurrent-backups`) */
  | 'queued'
  | 'inspecting'
  | 'planning'
  | 'creating-overlays'
  | 'backing-up'
  | 'copying'
  | 'committing'
  | 'finalizing'
  | 'uploading'
  | 'cleaning-up'
  | 'done';

export interface BackupProgress {
  backupId: string;
  domain: string;
  host: string;
  method?: BackupMethod;
  /** once planned */
  level?: BackupLevel;
  phase: BackupPhase;
  bytesDone: number;
  bytesTotal: number;
  /** per-target upload progress */
  targets: Record<
    string,
    { bytesDone: number; bytesTotal: number; state: 'pending' | 'uploading' | 'done' | 'failed' }
  >;
  error?: string;
}

/** Where a backup stands in its chain. */
export interface BackupChainInfo {
  level: BackupLevel;
  /** what was asked for */
  requested: RequestedLevel;
  /** one sentence, when the level is not the one asked for (auto counts as asking for an incremental) */
  reason?: string;
  /** inc: the previous link; diff: the chain's full */
  parent?: string;
  /** the chain's full (the backup itself for a full) */
  base: string;
  /** the libvirt checkpoint the next backup can build on */
  checkpoint?: string;
}

export interface BackupResult {
  backupId: string;
  domain: string;
  host: string;
  method: BackupMethod;
  /** absent for backups started before incremental chains existed (always full) */
  chain?: BackupChainInfo;
  status: BackupStatus;
  startedAt: string;
  finishedAt: string;
  quiesced: boolean;
  libvirtVersion: string;
  qemuVersion: string;
  disks: Array<{ name: string; format: string; virtualSize: number; size: number; sha256: string; location: string }>;
  skipped: SkippedDisk[];
  targets: TargetResult[];
  /** pull mode: what reading the job's exports cost */
  pull?: PullStats;
}

/** What a pull backup read and how much scratch space QEMU used meanwhile. */
export interface PullStats {
  /** the scratch files' peak allocated size (bytes, all disks): the guest's writes during the job */
  scratchPeakBytes: number;
  /** the read found the job of an earlier attempt running (a retried step) */
  attached: boolean;
  /** the attempt of the read step that finished: > 1 with attached false means the job was begun again */
  attempt: number;
  /** per disk, on the first target that took the backup */
  /**
   * per disk, on the first target that took the backup; into a chunk repository: the chunks read and carried over,
   * into an image tree: the bytes written as zeros
   */
  disks: Record<
    string,
    { readChunks?: number; carriedChunks?: number; zeroedBytes?: number; readBytes: number; resumedFrom: number }
  >;
}

/** What Temporal shows of a backup's workflow: running, closed, or unknown (no run with that backup id is visible). */
export type BackupState = 'running' | 'closed' | 'unknown';
