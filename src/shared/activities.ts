/**
 * Inputs and outputs of the host activities. Workflows see only these types; the
 * implementations live in src/activities and run on the VM's host task queue.
 */
import type { NotifyInput, NotifyResult } from './events';
import type {
  BackupLevel,
  BackupMethod,
  CopyTool,
  DiskImage,
  DiskInfo,
  DomainInfo,
  RequestedLevel,
  S3TargetOptions,
} from './types';

/** An image file written on the host, before checks and hashing. */
export interface ImageFile {
  name: string;
  format: string;
  path: string;
  virtualSize: number;
  /** SHA-256 when the step that wrote the image already computed it (finalizeImages then trusts it) */
  sha256?: string;
}

export interface PrepareStagingInput {
  backupId: string;
  domain: string;
  targets: string[];
  /** QEMU itself writes the images (push mode): the directory must be reachable by the QEMU user */
  writtenByQemu?: boolean;
}
export interface StagingArea {
  /** absolute directory on the host, unique to the backup */
  dir: string;
  /** the target (if any) whose filesystem holds `dir`: images can be moved into it */
  localTarget?: string;
}

export interface PushBackupInput {
  backupId: string;
  domain: string;
  disks: DiskInfo[];
  stagingDir: string;
  /** the parent checkpoint of an incremental or differential backup */
  incremental?: string;
  /** the checkpoint this backup creates */
  checkpoint?: { name: string; disks: string[] };
  /** disks copied whole inside an incremental backup */
  fullDisks?: string[];
}

export interface PlanBackupInput {
  backupId: string;
  domain: string;
  host: string;
  method: BackupMethod;
  targets: string[];
  s3Options?: S3TargetOptions;
  requested: RequestedLevel;
  maxChain: number;
  fullEverySeconds?: number;
  /** the disks backed up now (inspect) */
  disks: DiskInfo[];
  /** when the backup was asked for (ISO): a chain's age counts from it */
  requestedAt: string;
}

/** The image a link's disk builds on, as the parent's manifest records it. */
export interface ParentDisk {
  name: string;
  key: string;
  sha256: string;
  format: string;
}

export interface BackupPlan {
  level: BackupLevel;
  requested: RequestedLevel;
  /** one sentence, when the level is not the one asked for */
  reason?: string;
  /** the chain's full: this backup's own id for a full */
  base: string;
  /** the checkpoint the backup creates (push with qcow2 disks) */
  checkpoint?: { name: string; disks: string[] };
  /** inc/diff: the parent checkpoint */
  incremental?: string;
  /** inc/diff: the backup this one builds on */
  parent?: { backupId: string; checkpoint: string; disks: ParentDisk[] };
  /** the checkpoint of the chain's full (kept for differentials) */
  baseCheckpoint?: string;
  /** inc/diff: the increments since the chain's full, this one included (recorded in the manifest) */
  depth?: number;
  /** inc/diff: when the chain's full started (recorded in the manifest: prune may remove the full's) */
  baseStartedAt?: string;
  /** inc/diff: disks copied whole (new to the chain, raw, or without a bitmap) */
  fullDisks: string[];
  /**
   * every target is a chunk repository: the images are stored as chunks (storeChunkImages, writeChunkManifest), not
   * shipped. Absent in plans recorded before chunk repositories, so their histories replay unchanged.
   */
  chunkRepository?: true;
}

export interface StoreChunkImagesInput {
  backupId: string;
  domain: string;
  target: string;
  s3Options?: S3TargetOptions;
  /** the staged images (finalized) */
  images: DiskImage[];
  /** the whole-VM files captured into staging, stored as small indexes */
  vm?: VmCapture;
}
/**
 * The offline method into chunk repositories: the shut-off domain's own disks (as inspectDomain reported them, checked
 * against libvirt again) are read in place, with no staging copy; the whole-VM files come from staging.
 */
export interface StoreOfflineDisksInput {
  backupId: string;
  domain: string;
  target: string;
  s3Options?: S3TargetOptions;
  disks: DiskInfo[];
  /** the backup's staging directory (the NBD sockets live there) */
  stagingDir: string;
  vm?: VmCapture;
}
/** What one disk (or whole-VM file) cost in the repository. */
export interface ChunkStoreStats {
  chunks: number;
  zeroChunks: number;
  knownChunks: number;
  uploadedChunks: number;
  uploadedBytes: number;
}
export interface StoredChunkDisk {
  name: string;
  virtualSize: number;
  /** the index id */
  index: string;
  stats: ChunkStoreStats;
}
export interface StoredChunkImages {
  disks: StoredChunkDisk[];
  /** the manifest's `vm` with every file's key its index's key */
  vm?: VmFilesRecord;
  /** bytes and chunks of the whole-VM files */
  vmStats?: ChunkStoreStats;
}
export interface ChunkManifestInput {
  target: string;
  s3Options?: S3TargetOptions;
  /**
   * the manifest with its disks as storeChunkImages stored them; the worker builds each disk's entry and the
   * `repository` section from the repository it opens (and checks every index is there)
   */
  manifest: Omit<ManifestInput['manifest'], 'disks'> & { disks: StoredChunkDisk[] };
}

/** A pull job of one backup: the same input begins it, attaches to it and ends it (paths derive from stagingDir). */
export interface BeginPullInput {
  backupId: string;
  domain: string;
  disks: DiskInfo[];
  stagingDir: string;
  /** the parent checkpoint: each export offers the dirty bitmap since it */
  incremental?: string;
  /** the checkpoint this backup creates */
  checkpoint?: { name: string; disks: string[] };
  /** inside an increment: disks read whole (no bitmap: raw, or new to the chain) */
  fullDisks?: string[];
}
export interface PullJob {
  socket: string;
  scratch: string[];
  /** true when the job of an earlier attempt was found running and attached to */
  attached: boolean;
}
export interface PullIntoRepositoriesInput {
  job: BeginPullInput;
  targets: string[];
  s3Options?: S3TargetOptions;
  /** an increment: the backup it builds on and its index per disk (unchanged chunks take its entries) */
  parent?: { backupId: string; disks: Array<{ name: string; index: string }> };
  /** the whole-VM files captured into staging at the job's start */
  vm?: VmCapture;
}
/** What a pull cost for one disk beyond the store's stats. */
export interface PullDiskResult extends StoredChunkDisk {
  pull: {
    /** chunks read from the export (an increment: only changed ones) */
    readChunks: number;
    /** chunks that took the previous backup's entry without a read */
    carriedChunks: number;
    readBytes: number;
    /** the offset this attempt started reading at (> 0: it resumed an earlier attempt's read) */
    resumedFrom: number;
  };
}
export type PulledTarget =
  | { target: string; ok: true; disks: PullDiskResult[]; vm?: VmFilesRecord; vmStats?: ChunkStoreStats }
  | { target: string; ok: false; error: string };
export interface PulledRepositories {
  targets: PulledTarget[];
  /** the scratch files' largest allocated size seen while reading (bytes, all disks) */
  scratchPeakBytes: number;
  /** the last attempt found the job running (a retry) */
  attached: boolean;
  /** the attempt of the step that finished (1: no retry) */
  attempt: number;
}

/**
 * Pull mode into local image trees: each disk written as a qcow2 in the backup's directory on each target (a full, or
 * an increment whose backing is the parent's image by the relative name push uses), committed there by rename.
 */
export interface PullIntoImageTreesInput {
  job: BeginPullInput;
  targets: string[];
  s3Options?: S3TargetOptions;
  /** an increment: the backup it builds on and its image of each disk read through the dirty bitmap */
  parent?: { backupId: string; disks: Array<{ name: string; key: string; format: string }> };
}
/** The content digest of a pulled image's guest data, as the manifest records it (ManifestDisk.content). */
export interface PulledContent {
  sha256: string;
  scheme: 'content-v1';
  chunkSize: number;
  chunks: number;
  zeroChunks: number;
}
export interface PulledTreeDisk {
  name: string;
  virtualSize: number;
  /** `<domain>/<backupId>/<disk>.qcow2`, committed */
  key: string;
  /** the qcow2 file's bytes */
  size: number;
  content: PulledContent;
  pull: {
    /** bytes read from the export and written as data (this attempt) */
    readBytes: number;
    /** bytes written as zeros (this attempt) */
    zeroedBytes: number;
    /** the offset this attempt started writing at (> 0: it resumed an earlier attempt's image) */
    resumedFrom: number;
  };
}
export type PulledTree =
  { target: string; ok: true; disks: PulledTreeDisk[] } | { target: string; ok: false; error: string };
export interface PulledImageTrees {
  targets: PulledTree[];
  scratchPeakBytes: number;
  attached: boolean;
  attempt: number;
}

export interface PrepareChainImagesInput {
  /** the backup the images are staged for (checked against their directory; older workflows do not pass it) */
  backupId?: string;
  domain: string;
  images: ImageFile[];
  /** per disk of an increment: the parent image, relative to the image (`../<parentId>/<disk>.qcow2`) */
  backing: Record<string, string>;
  /** the checkpoint the backup created: its XML goes into the manifest */
  checkpoint?: string;
}
export interface PreparedChainImages {
  checkpointXml?: string;
}
export interface DropCheckpointInput {
  domain: string;
  name: string;
}
export interface RetireCheckpointsInput {
  domain: string;
  /** checkpoints that stay (the new one, the chain's full's) */
  keep: string[];
}
export interface PushBackupJob {
  images: ImageFile[];
  /** true when an already running job of ours was found and attached to */
  attached: boolean;
}
export interface AwaitBackupJobInput {
  backupId: string;
  domain: string;
  images: ImageFile[];
}
export interface BackupJobStats {
  bytes: number;
  elapsedMs: number;
}

export interface OfflineCopyInput {
  backupId: string;
  domain: string;
  disks: DiskInfo[];
  stagingDir: string;
}

export interface FinalizeImagesInput {
  backupId: string;
  images: ImageFile[];
  /**
   * every target is a chunk repository: no SHA-256 of the whole image file (`sha256` is left empty). The chunks'
   * ids, computed as they are read, are the integrity record there, and the image file's own hash is never used.
   */
  skipFileHash?: boolean;
}

/** One overlay created by vmbackup for a disk (snapshot method). */
export interface OverlayRecord {
  disk: string;
  /** the image the disk used before the snapshot (and must use again after the pivot) */
  base: string;
  baseFormat: string;
  overlay: string;
  virtualSize: number;
}
export interface CreateOverlaysInput {
  backupId: string;
  domain: string;
  disks: DiskInfo[];
  quiesce: boolean;
  requireQuiesce: boolean;
}
export interface CreateOverlaysResult {
  overlays: OverlayRecord[];
  quiesced: boolean;
}
export interface CopyBaseImagesInput {
  backupId: string;
  domain: string;
  overlays: OverlayRecord[];
  stagingDir: string;
  copyTool: CopyTool;
}
export interface OverlaysInput {
  backupId: string;
  domain: string;
  overlays: OverlayRecord[];
}

export interface RecoverInput {
  /**
   * Backups that ran when recovery was requested. Sent for older workers, which leave exactly these alone;
   * this version ignores the list (it may be an hour old) and asks Temporal about each backup right before
   * acting on what it left.
   */
  activeBackupIds?: string[];
  /** only what backups of this domain left */
  domain?: string;
}
/** What recovery did with one overlay file. */
export interface OverlayRecovery {
  domain: string;
  disk: string;
  overlay: string;
  backupId: string;
  /** kept: an unused overlay of a closed backup changed too recently to be sure nothing still creates it */
  action: 'committed' | 'removed-unused-overlay' | 'kept' | 'failed';
  detail?: string;
}
/** What recovery did with the staging directory of a backup whose workflow is closed. */
export interface StagingRecovery {
  /** the domain named in the backup id (only ids of makeBackupId's form are taken for staging) */
  domain: string;
  backupId: string;
  staging: string;
  action: 'removed-staging' | 'failed';
  /** removed-staging: a pull backup's socket directory under /run/vmbackup-nbd, removed with it */
  socketDir?: string;
  detail?: string;
}
/** What recovery did about a backup job (push or pull) running on a domain. */
export interface JobRecovery {
  domain: string;
  /** the backup whose staging directory holds the job's files (absent: a job that is not vmbackup's) */
  backupId?: string;
  /** the job as libvirt describes it: its mode and files (targets or scratch files, and a pull job's socket) */
  job: { mode: 'push' | 'pull'; files: string[] };
  /**
   * job-ended: the job of a dead backup was ended (`domjobabort`) before its staging directory was removed;
   * job-not-ours: a job whose files are not a backup's staging files of ours, left alone; failed: the job of a dead
   * backup could not be ended, and its staging directory is kept
   */
  action: 'job-ended' | 'job-not-ours' | 'failed';
  /** job-ended: the checkpoint the dead backup was creating, deleted (its backup was never committed) */
  checkpoint?: string;
  /** job-ended: the pull job's socket directory under /run/vmbackup-nbd, removed */
  socketDir?: string;
  detail?: string;
}
export type RecoveryAction = OverlayRecovery | StagingRecovery | JobRecovery;

export interface CleanupStagingInput {
  backupId: string;
  stagingDir: string;
}

export interface ShipImageInput {
  backupId: string;
  domain: string;
  target: string;
  disk: DiskImage;
  allowMove?: boolean;
  s3Options?: S3TargetOptions;
}
export interface ShippedImage {
  key: string;
  size: number;
  sha256: string;
  bytesSent: number;
}

export interface ManifestInput {
  target: string;
  /** the backup's S3 options: the manifest is written with the same storage class, encryption and addressing as the images */
  s3Options?: S3TargetOptions;
  manifest: {
    backupId: string;
    domain: string;
    host: string;
    method: BackupMethod;
    startedAt: string;
    finishedAt: string;
    quiesced: boolean;
    libvirtVersion: string;
    qemuVersion: string;
    disks: Array<{
      name: string;
      format: string;
      virtualSize: number;
      size: number;
      sha256: string;
      key: string;
      backing?: { backupId: string; key: string; sha256: string };
      /** a pulled image: `sha256` is the content digest of its guest data (version-4 manifest) */
      content?: { scheme: 'content-v1'; chunkSize: number; chunks: number; zeroChunks: number };
    }>;
    chain?: {
      level: BackupLevel;
      requested?: RequestedLevel;
      reason?: string;
      parent?: string;
      base?: string;
      checkpoint?: string;
      checkpointXml?: string;
    };
    /** the whole-VM files (backups since the whole-vm-files patch) */
    vm?: VmFilesRecord;
  };
}

/** The manifest's `vm` record (src/repository/manifest.ts ManifestVmSchema): the whole-VM files of a backup. */
export interface VmFilesRecord {
  xml: { key: string; size: number; sha256: string };
  nvram?: { key: string; size: number; sha256: string; path: string };
  tpm?: { version: '1.2' | '2.0'; files: Array<{ path: string; key: string; size: number; sha256: string }> };
}

export interface CaptureVmStateInput {
  backupId: string;
  domain: string;
  stagingDir: string;
}
/** A whole-VM file copied into staging: `domain.xml`, `nvram.fd` or `tpm.<file>`. */
export interface StagedVmFile {
  name: string;
  path: string;
  size: number;
  sha256: string;
}
export interface VmCapture {
  files: StagedVmFile[];
  /** what the manifest records (keys are the same on every target) */
  vm: VmFilesRecord;
}
export interface ShipVmFilesInput {
  backupId: string;
  domain: string;
  target: string;
  files: StagedVmFile[];
  s3Options?: S3TargetOptions;
}

export interface DeleteBackupObjectsInput {
  target: string;
  domain: string;
  backupId: string;
  s3Options?: S3TargetOptions;
}

export interface InspectDomainInput {
  domain: string;
  includeAllDisks?: boolean;
}

/** `restore --finish NEWNAME`: the instant-restored domain whose disks are pulled from the backup. */
export interface FinishInstantInput {
  domain: string;
  /** cap of each disk's pull, MiB/s (`--bandwidth`); default none */
  bandwidthMiB?: number;
}
export interface InstantPullResult {
  domain: string;
  /** no disk read from the backup when the pull was asked for */
  alreadyStandalone: boolean;
}
export interface FinishedDisk {
  name: string;
  /** the standalone image the disk runs on (the former overlay) */
  path: string;
}
export interface FinishInstantResult {
  domain: string;
  alreadyStandalone: boolean;
  disks: FinishedDisk[];
}

/** The steps of finishInstantRestore, on the domain's host queue. */
export interface InstantActivities {
  pullInstantDisks(input: FinishInstantInput): Promise<InstantPullResult>;
  completeInstantFinish(input: FinishInstantInput): Promise<FinishedDisk[]>;
}

/**
 * Every activity the backup workflows call. The implementations (src/activities) are
 * checked against this interface; workflows proxy it onto the host's task queue.
 */
export interface HostActivities {
  inspectDomain(input: InspectDomainInput): Promise<DomainInfo>;
  prepareStaging(input: PrepareStagingInput): Promise<StagingArea>;
  cleanupStaging(input: CleanupStagingInput): Promise<void>;
  // push mode
  beginPushBackup(input: PushBackupInput): Promise<PushBackupJob>;
  awaitBackupJob(input: AwaitBackupJobInput): Promise<BackupJobStats>;
  abortPushBackup(input: AwaitBackupJobInput): Promise<void>;
  // pull mode
  beginPullBackup(input: BeginPullInput): Promise<PullJob>;
  pullIntoRepositories(input: PullIntoRepositoriesInput): Promise<PulledRepositories>;
  pullIntoImageTrees(input: PullIntoImageTreesInput): Promise<PulledImageTrees>;
  endPullBackup(input: BeginPullInput): Promise<void>;
  // shut-off domain
  copyOfflineDisks(input: OfflineCopyInput): Promise<ImageFile[]>;
  // snapshot method
  createOverlays(input: CreateOverlaysInput): Promise<CreateOverlaysResult>;
  copyBaseImages(input: CopyBaseImagesInput): Promise<ImageFile[]>;
  commitAndPivot(input: OverlaysInput): Promise<void>;
  removeOverlays(input: OverlaysInput): Promise<void>;
  recoverOverlays(input: RecoverInput): Promise<OverlayRecovery[]>;
  /** ends the backup jobs of dead backups, then removes their staging directories */
  removeDeadStaging(input: RecoverInput): Promise<Array<StagingRecovery | JobRecovery>>;
  // both
  finalizeImages(input: FinalizeImagesInput): Promise<DiskImage[]>;
  // incremental chains
  planBackup(input: PlanBackupInput): Promise<BackupPlan>;
  prepareChainImages(input: PrepareChainImagesInput): Promise<PreparedChainImages>;
  dropCheckpoint(input: DropCheckpointInput): Promise<void>;
  retireCheckpoints(input: RetireCheckpointsInput): Promise<string[]>;
  // whole-VM files: definition, NVRAM, TPM state
  captureVmState(input: CaptureVmStateInput): Promise<VmCapture>;
  shipVmFiles(input: ShipVmFilesInput): Promise<void>;
  // storage
  shipImage(input: ShipImageInput): Promise<ShippedImage>;
  writeManifest(input: ManifestInput): Promise<void>;
  // chunk repositories
  storeChunkImages(input: StoreChunkImagesInput): Promise<StoredChunkImages>;
  storeOfflineDisks(input: StoreOfflineDisksInput): Promise<StoredChunkImages>;
  writeChunkManifest(input: ChunkManifestInput): Promise<void>;
  deleteBackupObjects(input: DeleteBackupObjectsInput): Promise<void>;
  // events
  notify(input: NotifyInput): Promise<NotifyResult>;
}
