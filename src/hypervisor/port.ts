/**
 * The hypervisor port: everything vmbackup asks of libvirt and QEMU on one host. The virsh
 * implementation (virsh.ts) calls virsh/qemu-img with argument arrays, never a shell string.
 * Methods throw HypervisorError (errors.ts) with a kind, so activities can tell permanent
 * failures (no such domain) from transient ones (libvirtd restarting).
 */
import type { DiskInfo, DomainInfo, DomainState } from '../shared/types';

export type JobType = 'None' | 'Bounded' | 'Unbounded' | 'Completed' | 'Failed' | 'Cancelled';

export interface JobInfo {
  type: JobType;
  /** libvirt's operation name, e.g. "Backup" (absent when no job) */
  operation?: string;
  dataProcessed?: number;
  dataTotal?: number;
  timeElapsedMs?: number;
  errorMessage?: string;
}

export interface BackupTargetSpec {
  /** disk target dev, e.g. vda */
  disk: string;
  /** absolute path of the qcow2 file libvirt writes */
  file: string;
}

export interface OverlaySpec {
  disk: string;
  /** absolute path of the overlay file to create */
  file: string;
}

export interface BlockJobInfo {
  /** e.g. "Active Block Commit"; undefined when no job runs on the disk */
  type?: string;
  cur: number;
  end: number;
  /** libvirt reports the job ready for pivot (cur == end and ready flag) */
  ready: boolean;
}

export interface Hypervisor {
  /** libvirt and QEMU versions of this host (QEMU from the hypervisor, not the client). */
  versions(): Promise<{ libvirt: string; qemu: string }>;
  /** Throws HypervisorError kind 'not-found' for an unknown domain. */
  inspect(domain: string, opts?: { includeAllDisks?: boolean }): Promise<DomainInfo>;
  state(domain: string): Promise<DomainState>;
  /** Live disks as libvirt sees them now (domblklist + XML), including skipped ones. */
  disks(domain: string): Promise<DiskInfo[]>;
  domainXml(domain: string, opts?: { inactive?: boolean }): Promise<string>;

  /**
   * virDomainBackupBegin in push mode, one job for all listed disks, explicit qcow2 targets. `disks`: the
   * domain's disk targets as the caller already read them (inspect), so the XML is not read again to check
   * the targets; it may leave out disks that are not backed up (libvirt backs up only the disks a backup
   * XML lists as soon as it lists one).
   */
  beginPushBackup(domain: string, targets: BackupTargetSpec[], opts?: { disks?: string[] }): Promise<void>;
  /** The running job (`domjobinfo`). */
  jobInfo(domain: string): Promise<JobInfo>;
  /** The last completed job, kept (`domjobinfo --completed --keep-completed`). */
  completedJobInfo(domain: string): Promise<JobInfo>;
  /** `domjobabort`; no error if no job runs. */
  abortJob(domain: string): Promise<void>;

  /** `snapshot-create-as --disk-only --atomic --no-metadata` with a diskspec per overlay. */
  createOverlays(domain: string, overlays: OverlaySpec[], opts: { quiesce: boolean }): Promise<void>;
  /** `blockcommit DOM DISK --active` (no wait). */
  startActiveCommit(domain: string, disk: string): Promise<void>;
  blockJobInfo(domain: string, disk: string): Promise<BlockJobInfo>;
  /** `blockjob DOM DISK --pivot` */
  pivot(domain: string, disk: string): Promise<void>;
  /** `blockjob DOM DISK --abort` */
  abortBlockJob(domain: string, disk: string): Promise<void>;
}
