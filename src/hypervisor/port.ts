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

/** A disk as a checkpoint records it. */
export interface CheckpointDisk {
  /** disk target, e.g. vda */
  name: string;
  /** 'bitmap': QEMU tracks this disk's writes since the checkpoint; 'no': it does not */
  checkpoint: 'bitmap' | 'no';
  /** the QEMU dirty bitmap's name (libvirt 9.0 names it after the checkpoint) */
  bitmap?: string;
}

/** A libvirt checkpoint (`checkpoint-dumpxml`): a point in time from which QEMU tracks each disk's writes. */
export interface Checkpoint {
  name: string;
  /**
   * the checkpoint that was libvirt's newest when this one was made (NOT necessarily the one its backup was
   * incremental from); absent for a root. Each checkpoint has its own bitmap that records every write since it
   * was made, so an incremental from any checkpoint is exact whatever its parent is, and deleting one never
   * changes another.
   */
  parent?: string;
  /** seconds since the epoch */
  creationTime: number;
  disks: CheckpointDisk[];
}

/** The checkpoint a backup creates: its name and the disks QEMU tracks from now on. */
export interface CheckpointSpec {
  name: string;
  /** disks with checkpoint='bitmap' (qcow2 only); every other disk of the domain gets checkpoint='no' */
  disks: string[];
}

export interface PushBackupOptions {
  /**
   * the domain's disk targets as the caller already read them (inspect), so the XML is not read again to check
   * the targets; it may leave out disks that are not backed up (libvirt backs up only the disks a backup XML
   * lists as soon as it lists one).
   */
  disks?: string[];
  /** the parent checkpoint: the backup is incremental, each image holds only what changed since it */
  incremental?: string;
  /** the checkpoint to create with the backup, at the backup's point in time */
  checkpoint?: CheckpointSpec;
  /** inside an incremental backup, disks copied whole (backupmode='full'): a disk new to the chain */
  fullDisks?: string[];
}

export interface PullBackupOptions {
  /** the Unix socket QEMU's NBD server listens on (absolute; its directory must exist and be reachable by QEMU) */
  socket: string;
  /** the disks to export, each with its scratch file */
  disks: Array<{ dev: string; scratch: string }>;
  /** the domain's disk targets as the caller read them (inspect): the others are listed backup='no' */
  allDisks?: string[];
  /** the parent checkpoint: each export offers `qemu:dirty-bitmap:backup-<disk>`, the writes since it */
  incremental?: string;
  /** the checkpoint to create with the backup, at the backup's point in time */
  checkpoint?: CheckpointSpec;
  /** inside an incremental backup, disks exported whole (backupmode='full'): raw, or new to the chain */
  fullDisks?: string[];
}

/**
 * A backup job running on a domain, as `backup-dumpxml` describes it: where QEMU writes (push: each disk's target
 * file; pull: each disk's scratch file, and the NBD socket). Only what tells whose job it is; paths as libvirt
 * reports them, never resolved.
 */
export interface RunningBackupJob {
  mode: 'push' | 'pull';
  /** pull: the Unix socket of the NBD server (absent for a TCP server) */
  socket?: string;
  /** pull: the server's transport as libvirt reports it (unix, tcp) */
  transport?: string;
  /** the disks the job backs up (backup='yes'), each with its target (push) or scratch (pull) file or device */
  disks: Array<{ name: string; file?: string }>;
}

/** Whether an incremental from a checkpoint can be taken for one disk, as libvirt sees it now. */
export interface CheckpointBitmapState {
  disk: string;
  /**
   * ok: the bitmap exists and records writes; broken: missing, or inconsistent since QEMU stopped without
   * saving it (kill -9); no-bitmap: the checkpoint has checkpoint='no' for this disk; no-disk: the domain no
   * longer has this disk
   */
  state: 'ok' | 'broken' | 'no-bitmap' | 'no-disk';
  /** bytes written since the checkpoint (state ok only), in the bitmap's granularity (64 KiB clusters) */
  changedBytes?: number;
}

export interface BlockJobInfo {
  /** e.g. "Active Block Commit"; undefined when no job runs on the disk */
  type?: string;
  cur: number;
  end: number;
  /** libvirt reports the job ready for pivot (cur == end and ready flag) */
  ready: boolean;
}

/** libvirt's swtpm state root (qemu driver, system instance): a domain's TPM state is in `<root>/<uuid>/` by default */
export const SWTPM_STATE_ROOT = '/var/lib/libvirt/swtpm';

/** What a whole-VM backup reads besides the disks, as libvirt reports it for the domain. */
export interface VmState {
  /** `virsh dumpxml --inactive`: the persistent definition */
  xml: string;
  name: string;
  uuid: string;
  /** the UEFI variable store (`<os><nvram>`) */
  nvram?: { path: string };
  /** the emulated TPM: swtpm's state directory (`<backend><source type='dir'>`, or libvirt's `<swtpm root>/<uuid>`) */
  tpm?: { version: '1.2' | '2.0'; stateDir: string };
  /** a TPM whose state is not backed up (a passthrough TPM, state in one file): why, one clause */
  unsupportedTpm?: string;
}

export interface Hypervisor {
  /** libvirt and QEMU versions of this host (QEMU from the hypervisor, not the client). */
  versions(): Promise<{ libvirt: string; qemu: string }>;
  /** Names of every domain libvirt has on this host, running or not (`virsh list --all --name`). */
  listDomains(): Promise<string[]>;
  /** Throws HypervisorError kind 'not-found' for an unknown domain. */
  inspect(domain: string, opts?: { includeAllDisks?: boolean }): Promise<DomainInfo>;
  state(domain: string): Promise<DomainState>;
  /** Live disks as libvirt sees them now (domblklist + XML), including skipped ones. */
  disks(domain: string): Promise<DiskInfo[]>;
  domainXml(domain: string, opts?: { inactive?: boolean }): Promise<string>;
  /**
   * `virsh define --validate` of a domain XML (libvirt checks it against its schema): a new persistent domain, or the
   * new definition of an existing one with the same name and UUID.
   */
  defineDomain(xml: string): Promise<void>;
  /** `virsh start`; throws 'not-found' for an unknown domain. */
  startDomain(domain: string): Promise<void>;
  /**
   * `virsh undefine` with the checkpoint and snapshot metadata (`nvram`/`tpm`: also the NVRAM file and the swtpm state
   * libvirt keeps for it). Idempotent: resolves false when there was no such domain.
   */
  undefineDomain(domain: string, opts?: { nvram?: boolean; tpm?: boolean }): Promise<boolean>;
  /** The persistent definition and where its NVRAM and TPM state are (read from the inactive XML). */
  vmState(domain: string): Promise<VmState>;

  /**
   * virDomainBackupBegin in push mode, one job for all listed disks, explicit qcow2 targets; with
   * `incremental` only what changed since that checkpoint (an increment's image names the LIVE disk as its
   * backing file: rebase it before use), with `checkpoint` a new checkpoint at this backup's point in time. A
   * backup-begin that libvirt refuses creates no checkpoint; once the job runs the checkpoint stays, even if
   * the job then fails or is aborted (delete it then).
   */
  beginPushBackup(domain: string, targets: BackupTargetSpec[], opts?: PushBackupOptions): Promise<void>;
  /**
   * virDomainBackupBegin in pull mode: QEMU exports each disk's point-in-time view over NBD on a Unix socket until
   * the job is ended with abortJob (`domjobabort`: how a pull job ends). Checkpoint behaviour as for push.
   */
  beginPullBackup(domain: string, opts: PullBackupOptions): Promise<void>;
  /** The running job (`domjobinfo`). */
  jobInfo(domain: string): Promise<JobInfo>;
  /** The last completed job, kept (`domjobinfo --completed --keep-completed`). */
  completedJobInfo(domain: string): Promise<JobInfo>;
  /** `domjobabort`; no error if no job runs. */
  abortJob(domain: string): Promise<void>;
  /**
   * The backup job running on the domain (`backup-dumpxml`), or undefined when none runs (also when the domain is not
   * running). Throws `not-found` for an unknown domain, `invalid` when libvirt's XML is not a backup description.
   */
  backupJob(domain: string): Promise<RunningBackupJob | undefined>;

  /** `snapshot-create-as --disk-only --atomic --no-metadata` with a diskspec per overlay. */
  createOverlays(domain: string, overlays: OverlaySpec[], opts: { quiesce: boolean }): Promise<void>;
  /** `blockcommit DOM DISK --active` (no wait). */
  startActiveCommit(domain: string, disk: string): Promise<void>;
  blockJobInfo(domain: string, disk: string): Promise<BlockJobInfo>;
  /** `blockjob DOM DISK --pivot` */
  pivot(domain: string, disk: string): Promise<void>;
  /** `blockjob DOM DISK --abort` */
  abortBlockJob(domain: string, disk: string): Promise<void>;
  /**
   * `blockpull DOM DISK [--bandwidth MiB/s]` (no wait): copies every cluster the disk reads from its backing chain
   * into its top image; when the job completes QEMU writes no backing file into the top image's header and libvirt
   * drops the chain. The disk keeps running on the same file the whole time.
   */
  startBlockPull(domain: string, disk: string, opts?: { bandwidthMiB?: number }): Promise<void>;

  /** `destroy DOM` (no error when it is not running) then `undefine DOM --nvram --tpm` (no error when it is gone). */
  removeDomain(domain: string): Promise<void>;

  /** The domain's checkpoints as libvirt's metadata has them, parents before children. */
  listCheckpoints(domain: string): Promise<Checkpoint[]>;
  /**
   * `checkpoint-dumpxml --no-domain`: the XML to keep (in a manifest) and give to redefineCheckpoint when
   * libvirt has lost its metadata. Throws `checkpoint-not-found`.
   */
  checkpointXml(domain: string, name: string): Promise<string>;
  /**
   * For each disk of the checkpoint: can an incremental from it be taken now? Asks libvirt the same question
   * backup-begin asks (`checkpoint-dumpxml --size`), without starting a job. Needs a running domain. `disks`:
   * the domain's disk targets if the caller has them. Throws `checkpoint-not-found`.
   */
  checkpointBitmaps(domain: string, name: string, opts?: { disks?: string[] }): Promise<CheckpointBitmapState[]>;
  /**
   * `checkpoint-delete`: the metadata and each disk's bitmap (`metadataOnly`: the metadata only, bitmaps stay in
   * the qcow2). A disk whose bitmap is already gone (QEMU killed before it stored the bitmap) does not stop
   * the others' bitmaps from being removed. Idempotent: resolves false when there was no such checkpoint.
   */
  deleteCheckpoint(domain: string, name: string, opts?: { metadataOnly?: boolean }): Promise<boolean>;
  /**
   * `checkpoint-create --redefine [--redefine-validate]` of a checkpoint XML (checkpointXml's output, e.g. from
   * a manifest): gives libvirt back the metadata of a checkpoint whose bitmaps are still in the disks. The XML
   * is parsed and written anew (name, parent, creation time, disks) so nothing else in it reaches libvirt, and
   * each bitmap must be named after the checkpoint, as libvirt names them (`invalid` otherwise). With
   * `validate`, libvirt checks that each bitmap exists and is consistent (`checkpoint-inconsistent`
   * otherwise). Its parent must exist (redefine parents first) or be left out (`dropParent`). Redefining a
   * checkpoint libvirt has replaces its metadata. Resolves the checkpoint as redefined.
   */
  redefineCheckpoint(
    domain: string,
    xml: string,
    opts: { validate: boolean; dropParent?: boolean },
  ): Promise<Checkpoint>;
}
