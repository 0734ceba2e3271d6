/**
 * Names shared by workflows (sandboxed) and Node code: task queues, workflow ids, search
 * attributes. Nothing here may import Node built-ins.
 */

/** Anything touching a VM or its disk files runs on the task queue of the VM's host. */
export function hostTaskQueue(host: string): string {
  return `vmbackup-host-${host}`;
}

/**
 * The host's backup slots: a backup holds one (a long-running activity on this queue) while it does its libvirt,
 * copy and upload work. The host's worker polls it with at most `--max-concurrent-backups` activities at once, so
 * the task queue itself is the queue of backups waiting for a slot.
 */
export function hostSlotTaskQueue(host: string): string {
  return `vmbackup-host-${host}-slots`;
}

/**
 * Where the parent workflow of each scheduled run (`scheduledBackups`) runs: every `vmbackup worker` serves it. Its
 * activities and the backups it starts run on the hosts' own queues. VMBACKUP_CONTROL_QUEUE names another one (two
 * fleets in one namespace).
 */
export const DEFAULT_CONTROL_TASK_QUEUE = 'vmbackup-control';

/**
 * One workflow id per domain and host: Temporal itself refuses a second backup of the same
 * VM while one runs (WorkflowExecutionAlreadyStarted), so no lock of our own is needed.
 */
export function backupWorkflowId(host: string, domain: string): string {
  return `vmbackup-backup-${host}-${domain}`;
}

/**
 * One finish of an instant restore per domain and host: a second `restore --finish` of the same domain attaches to
 * the running one.
 */
export function finishInstantWorkflowId(host: string, domain: string): string {
  return `vmbackup-finish-instant-${host}-${domain}`;
}

/** Backup ids are file- and key-safe: `<domain>-<UTC yyyymmddThhmmssZ>-<4 hex>`. */
export function makeBackupId(domain: string, at: Date, suffix: string): string {
  const ts = at
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z');
  return `${domain}-${ts}-${suffix}`;
}

/** The domain named in a backup id made by makeBackupId; undefined for any other id. */
export function domainOfBackupId(backupId: string): string | undefined {
  return /^(.+)-\d{8}T\d{6}Z-[0-9a-f]{4}$/.exec(backupId)?.[1];
}

export const SEARCH_ATTRIBUTES = {
  domain: 'VmbackupDomain',
  host: 'VmbackupHost',
  state: 'VmbackupState',
  backupId: 'VmbackupBackupId',
  method: 'VmbackupMethod',
} as const;

/** What makeBackupId produces (and older ids): file- and key-safe, never '.' or '..'. */
export const BACKUP_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$/;

/** Bounds of `--heartbeat-timeout`: below 5 s a busy host looks dead; above an hour a dead worker goes unnoticed. */
export const MIN_HEARTBEAT_SECONDS = 5;
export const MAX_HEARTBEAT_SECONDS = 3600;

/**
 * The files a push backup makes QEMU write: `<stagingDir>/<disk>.qcow2`. Shared by the activity that starts the job
 * and the workflow, which registers the job's undo before the job starts.
 */
export function pushImageFiles(
  stagingDir: string,
  disks: ReadonlyArray<{ name: string; virtualSize: number }>,
): Array<{ name: string; format: string; path: string; virtualSize: number }> {
  return disks.map((d) => ({
    name: d.name,
    format: 'qcow2',
    path: `${stagingDir.replace(/\/+$/, '')}/${d.name}.qcow2`,
    virtualSize: d.virtualSize,
  }));
}

/** Checkpoints vmbackup creates are named `vmbackup.<backupId>`; any other checkpoint is left alone. */
export const CHECKPOINT_PREFIX = 'vmbackup.';

/** The checkpoint a push backup creates, in libvirt's alphabet ([A-Za-z0-9_.-], '+' of a domain name becomes '_'). */
export function checkpointName(backupId: string): string {
  return `${CHECKPOINT_PREFIX}${backupId.replace(/[^A-Za-z0-9_.-]/g, '_')}`;
}

/** Defaults of `--max-chain`: increments since the full before a new full. */
export const DEFAULT_MAX_CHAIN = 14;

/** Libvirt domain names we accept: no shell metacharacters, no path separators. */
export const DOMAIN_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$/;
/** `--match` globs: `*` and `?` over the characters a domain name may hold. */
export const DOMAIN_GLOB_RE = /^[A-Za-z0-9_.+*?-]{1,64}$/;

/** A matcher of domain names for globs that match DOMAIN_GLOB_RE (check them first); no globs: every name. */
export function globMatcher(globs: readonly string[]): (name: string) => boolean {
  const res = globs.map(
    (g) =>
      new RegExp(
        `^${g
          .replace(/[.+-]/g, (c) => `\\${c}`)
          .replace(/\*/g, '.*')
          .replace(/\?/g, '.')}$`,
      ),
  );
  return (name) => res.length === 0 || res.some((re) => re.test(name));
}

/** Schedule names: `vmbackup schedule create NAME`; the Temporal schedule id is `vmbackup-schedule-NAME`. */
export const SCHEDULE_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
export const SCHEDULE_ID_PREFIX = 'vmbackup-schedule-';
export function scheduleId(name: string): string {
  return `${SCHEDULE_ID_PREFIX}${name}`;
}
/** The workflow id of a schedule's runs (Temporal appends the run's scheduled time). */
export function scheduledRunWorkflowId(name: string): string {
  return `vmbackup-scheduled-${name}`;
}
/** Task queue names we accept from configuration. */
export const TASK_QUEUE_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
/** Host names used in task queues. */
export const HOST_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
