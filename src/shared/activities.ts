/**
 * Inputs and outputs of the host activities. Workflows see only these types; the
 * implementations live in src/activities and run on the VM's host task queue.
 */
import type { BackupMethod, CopyTool, DiskImage, DiskInfo, DomainInfo, S3TargetOptions } from './types';

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
  /** backups still running on this host: their overlays are left alone */
  activeBackupIds: string[];
  domain?: string;
}
export interface RecoveryAction {
  domain: string;
  disk: string;
  overlay: string;
  backupId: string;
  action: 'committed' | 'removed-unused-overlay' | 'failed';
  detail?: string;
}

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
    disks: Array<{ name: string; format: string; virtualSize: number; size: number; sha256: string; key: string }>;
  };
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
  // shut-off domain
  copyOfflineDisks(input: OfflineCopyInput): Promise<ImageFile[]>;
  // snapshot method
  createOverlays(input: CreateOverlaysInput): Promise<CreateOverlaysResult>;
  copyBaseImages(input: CopyBaseImagesInput): Promise<ImageFile[]>;
  commitAndPivot(input: OverlaysInput): Promise<void>;
  removeOverlays(input: OverlaysInput): Promise<void>;
  recoverOverlays(input: RecoverInput): Promise<RecoveryAction[]>;
  // both
  finalizeImages(input: FinalizeImagesInput): Promise<DiskImage[]>;
  // storage
  shipImage(input: ShipImageInput): Promise<ShippedImage>;
  writeManifest(input: ManifestInput): Promise<void>;
  deleteBackupObjects(input: DeleteBackupObjectsInput): Promise<void>;
}
