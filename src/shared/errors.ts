/**
 * Error type names carried by ApplicationFailure.type. Activities throw these as
 * non-retryable for permanent failures; workflows and the CLI match on them.
 */
export const ErrorType = {
  DomainNotFound: 'DomainNotFound',
  DomainGone: 'DomainGone',
  DomainStarted: 'DomainStarted',
  UnsupportedDisk: 'UnsupportedDisk',
  BackupApiUnavailable: 'BackupApiUnavailable',
  BackupJobFailed: 'BackupJobFailed',
  QuiesceFailed: 'QuiesceFailed',
  PivotFailed: 'PivotFailed',
  ImageCorrupt: 'ImageCorrupt',
  ChecksumMismatch: 'ChecksumMismatch',
  InvalidInput: 'InvalidInput',
  HypervisorUnreachable: 'HypervisorUnreachable',
  /** a libvirt checkpoint cannot be used, created or found (planBackup turns these into a full backup) */
  CheckpointUnusable: 'CheckpointUnusable',
  // storage
  NotFound: 'StorageNotFound',
  PermissionDenied: 'StoragePermissionDenied',
  NoSpace: 'StorageNoSpace',
  Unreachable: 'StorageUnreachable',
  InvalidTarget: 'InvalidTarget',
  StorageFailed: 'StorageFailed',
  /** the worker has no password, or a wrong one, for an encrypted chunk repository */
  RepositoryPassword: 'RepositoryPassword',
  /** a chunk repository's config, keys or objects are not what this vmbackup reads, or are damaged */
  RepositoryInvalid: 'RepositoryInvalid',
  /** a webhook did not take an event (retryable unless it answered a 4xx other than 408/429, or a redirect) */
  NotifyFailed: 'NotifyFailed',
} as const;
export type ErrorTypeName = (typeof ErrorType)[keyof typeof ErrorType];
