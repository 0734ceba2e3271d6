/**
 * Scheduled backups: what a schedule's run is given (the action's workflow input, which `vmbackup schedule describe`
 * and `vmbackup report` read back) and what it returns, and the activities it and the backups' host slots call.
 * Sandbox-safe: types only.
 */
import type { BackupLevel, BackupOptions, RequestedMethod } from './types';

/** One VM of a schedule: a libvirt domain on the host whose worker serves `vmbackup-host-<host>`. */
export interface ScheduleMember {
  host: string;
  domain: string;
}

/** Which VMs a run backs up, resolved when the run starts (a VM added to a host is picked up by the next run). */
export interface ScheduleGroup {
  /** named VMs (`--domain vm1`, `--domain hv2/vm1`) */
  domains: ScheduleMember[];
  /** `--all --host H`: every domain libvirt has on these hosts when the run starts */
  allOn: string[];
  /** with `allOn`: only domains whose name matches one of these globs (`*`, `?`); none: every domain */
  match?: string[];
}

/** restic's retention policy (src/repository/prune.ts), applied per VM and target after each new backup. */
export interface RetentionPolicy {
  keepLast?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
}

export interface ScheduledBackupsInput {
  /** the schedule's name (not its Temporal id) */
  schedule: string;
  group: ScheduleGroup;
  method: RequestedMethod;
  targets: string[];
  /** every backup's options (level, chain limits, S3 options, notify) */
  options: BackupOptions;
  retention?: RetentionPolicy;
  /**
   * How long a run waits for its backups, in seconds (the schedule's interval): backups still running then go on
   * on their own, the run reports them `running` and ends, so a host that hangs never holds up the schedule's next
   * run (which reports such a VM `skipped` while its backup runs).
   */
  waitSeconds: number;
}

/**
 * completed/partial/failed/cancelled: how the VM's backup ended; skipped: a backup of it was already running;
 * running: still running when the run stopped waiting.
 */
export type ScheduledVmStatus = 'completed' | 'partial' | 'failed' | 'cancelled' | 'skipped' | 'running';

export interface ScheduledVmResult {
  host: string;
  domain: string;
  status: ScheduledVmStatus;
  /** the backup's workflow (`vmbackup-backup-<host>-<domain>`) */
  workflowId: string;
  backupId?: string;
  level?: BackupLevel;
  /** one sentence for failed, skipped and partial */
  error?: string;
}

export interface RetentionResult {
  host: string;
  domain: string;
  /** the target, credentials removed */
  target: string;
  removed: Array<{ backupId: string; startedAt: string; level: BackupLevel }>;
  /** backups of the domain left on the target */
  kept: number;
  /** why retention did not run this time (a backup of the domain was running) */
  deferred?: string;
  /** why retention failed (one sentence); the backup itself is not affected */
  error?: string;
}

export interface ScheduledBackupsResult {
  schedule: string;
  vms: ScheduledVmResult[];
  retention: RetentionResult[];
  /** hosts of `--all` whose domains could not be listed, with the sentence */
  unlistedHosts: Array<{ host: string; error: string }>;
}

// ------------------------------------------------------------------------------------------ activities

export interface ListDomainsInput {
  /** globs on the domain name; none: every domain */
  match?: string[];
}
export interface ListedDomains {
  domains: string[];
  /** domains left out because vmbackup cannot name them (their name is not a valid domain name) */
  skipped: Array<{ domain: string; reason: string }>;
}

export interface ApplyRetentionInput {
  target: string;
  domain: string;
  policy: RetentionPolicy;
  /** the backup this run just made: never removed, whatever the policy or the target's other manifests say */
  newBackupId: string;
  /** the run of that backup's workflow: visibility may show it running for a moment after it ended */
  backupRunId?: string;
  s3Options?: BackupOptions['s3'];
}
export type AppliedRetention = Omit<RetentionResult, 'host' | 'domain'>;

/** Activities a scheduled run calls on a host's queue (the host's worker). */
export interface ScheduleActivities {
  listDomains(input: ListDomainsInput): Promise<ListedDomains>;
  applyRetention(input: ApplyRetentionInput): Promise<AppliedRetention>;
}

export interface HoldBackupSlotInput {
  backupId: string;
  /** sent back with the slotGranted signal */
  token: string;
}

/** The activity on `vmbackup-host-<host>-slots` that a backup runs while it holds one of its host's slots. */
export interface SlotActivities {
  holdBackupSlot(input: HoldBackupSlotInput): Promise<void>;
}
