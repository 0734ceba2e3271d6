/**
 * Typed errors of the hypervisor port. virsh and qemu-img only tell us what went wrong in their
 * stderr, so a classifier over the texts libvirt 9 / QEMU 7.2 print (seen on the test hosts, see
 * test/unit/hypervisor-errors.test.ts) turns them into a kind that activities can act on.
 */

export type HypervisorErrorKind =
  /** no such domain (or no such disk in it) */
  | 'not-found'
  /** libvirtd is down or restarting; retry later */
  | 'unreachable'
  /** another job holds the domain or disk; retry later */
  | 'busy'
  /** a block job is not ready for pivot yet; retry later */
  | 'not-ready'
  /** quiescing failed: no guest agent channel, or no agent answering */
  | 'quiesce'
  /** the domain or disk cannot be handled this way (network disk, backup of an inactive domain, ...) */
  | 'unsupported'
  /** a file we asked libvirt to create already exists */
  | 'exists'
  /** the domain is not running (backup, snapshot and block jobs need a running domain) */
  | 'not-running'
  /** no job (domain job or block job) to abort or pivot */
  | 'no-job'
  /** rejected before libvirt was asked: a bad domain or disk name, a relative path */
  | 'invalid'
  /**
   * a checkpoint's dirty bitmap is missing or inconsistent (QEMU was killed, or the disk was not in that
   * checkpoint): an incremental from it cannot be taken, a full backup can
   */
  | 'checkpoint-inconsistent'
  /** no checkpoint of that name (in libvirt's metadata), or a redefined checkpoint's parent is missing */
  | 'checkpoint-not-found'
  /** libvirt already has a checkpoint of that name */
  | 'checkpoint-exists'
  /** libvirt has no checkpoint of that name but the qcow2 still holds a bitmap of that name (metadata lost) */
  | 'bitmap-exists'
  /** this host or this disk cannot have checkpoints (libvirt or QEMU too old, a raw disk) */
  | 'checkpoint-unsupported'
  /** anything else */
  | 'failed';

const PERMANENT: ReadonlySet<HypervisorErrorKind> = new Set([
  'not-found',
  'unsupported',
  'quiesce',
  'exists',
  'invalid',
  'not-running',
  'no-job',
  'checkpoint-inconsistent',
  'checkpoint-not-found',
  'checkpoint-exists',
  'bitmap-exists',
  'checkpoint-unsupported',
]);

export function isPermanentKind(kind: HypervisorErrorKind): boolean {
  return PERMANENT.has(kind);
}

export interface HypervisorErrorDetails {
  /** the tool's stderr as printed (for logs; the message carries the meaningful part) */
  stderr?: string;
  /** the command line that failed, e.g. ['virsh', '-c', 'qemu:///system', 'domstate', 'vm1'] */
  command?: readonly string[];
  domain?: string;
  disk?: string;
  /** the checkpoint the error is about (checkpoint kinds) */
  checkpoint?: string;
  cause?: unknown;
}

export class HypervisorError extends Error {
  override readonly name = 'HypervisorError';
  readonly kind: HypervisorErrorKind;
  /** retrying the same call cannot succeed (no such domain, unsupported disk, target exists, ...) */
  readonly permanent: boolean;
  readonly stderr?: string;
  readonly command?: readonly string[];
  readonly domain?: string;
  readonly disk?: string;
  readonly checkpoint?: string;

  constructor(kind: HypervisorErrorKind, message: string, details: HypervisorErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.kind = kind;
    this.permanent = isPermanentKind(kind);
    this.stderr = details.stderr;
    this.command = details.command;
    this.domain = details.domain;
    this.disk = details.disk;
    this.checkpoint = details.checkpoint;
  }
}

/**
 * Checkpoint texts of libvirt 9.0 / QEMU 7.2 (captured in test/fixtures/virsh/stderr.checkpoint-*.txt, see
 * docs/checkpoints.md), checked before the general rules: "Bitmap already exists" would otherwise be
 * `exists` (a backup target), "Domain checkpoint not found" a domain, and "unsupported configuration:
 * checkpoint for disk vdb unsupported for storage type raw" a disk vmbackup cannot back up at all.
 */
const CHECKPOINT_RULES: ReadonlyArray<readonly [HypervisorErrorKind, RegExp]> = [
  // backup-begin <incremental> and checkpoint-create --redefine-validate: "checkpoint inconsistent: missing or
  // broken bitmap 'c2' for disk 'vda'"; checkpoint-delete of a checkpoint whose bitmap QEMU never stored:
  // "internal error: bitmap 'c2' not found in backing chain of 'vda'"
  [
    'checkpoint-inconsistent',
    /checkpoint inconsistent|missing or broken bitmap|bitmap '[^']*' not found in backing chain/i,
  ],
  // "Domain checkpoint not found: no domain checkpoint with matching name 'c9'", "... Checkpoint 'c9' for
  // incremental backup of disk 'vda' not found"; redefining a child first: "invalid argument: parent c1 for
  // moment c2 not found"
  [
    'checkpoint-not-found',
    /domain checkpoint not found|no domain checkpoint with matching name|parent \S+ for moment \S+ not found/i,
  ],
  // "operation failed: domain moment c0 already exists"
  ['checkpoint-exists', /domain moment \S+ already exists/i],
  // "internal error: unable to execute QEMU command 'transaction': Bitmap already exists: c0"
  ['bitmap-exists', /bitmap already exists/i],
  // a raw disk: "unsupported configuration: checkpoint for disk vdb unsupported for storage type raw"; QEMU
  // without the feature: "Operation not supported: incremental backup is not supported yet" (also
  // "creating checkpoint for incremental backup is not supported yet"); libvirt < 5.6 has no checkpoint API
  // ("this function is not supported by the connection driver: virDomainCheckpointCreateXML") and its virsh
  // no checkpoint commands ("unknown command: 'checkpoint-list'")
  [
    'checkpoint-unsupported',
    /checkpoint for disk \S+ unsupported|incremental backup is not supported|not supported by the connection driver: virDomainCheckpoint|unknown command: '?checkpoint-/i,
  ],
];

/** The checkpoint and disk named in a checkpoint error text, when it names them. */
export function checkpointErrorSubject(stderr: string): { checkpoint?: string; disk?: string } {
  const patterns: RegExp[] = [
    /missing or broken bitmap '(?<checkpoint>[^']+)' for disk '(?<disk>[^']+)'/,
    /bitmap '(?<checkpoint>[^']+)' not found in backing chain of '(?<disk>[^']+)'/,
    /Checkpoint '(?<checkpoint>[^']+)' for incremental backup of disk '(?<disk>[^']+)' not found/,
    /no domain checkpoint with matching name '(?<checkpoint>[^']+)'/,
    /parent (?<checkpoint>\S+) for moment \S+ not found/,
    /domain moment (?<checkpoint>\S+) already exists/,
    /Bitmap already exists: (?<checkpoint>[^\s;,]+)/,
    /checkpoint for disk (?<disk>\S+) unsupported/,
  ];
  for (const re of patterns) {
    const groups = re.exec(stderr)?.groups;
    if (groups) {
      const subject: { checkpoint?: string; disk?: string } = {};
      if (groups['checkpoint']) subject.checkpoint = groups['checkpoint'];
      if (groups['disk']) subject.disk = groups['disk'];
      return subject;
    }
  }
  return {};
}

/**
 * Ordered: the first match wins. "argument unsupported: QEMU guest agent is not configured" is a
 * quiesce failure before it is an unsupported one, "unsupported configuration: external snapshot
 * file ... already exists" is `exists`, and "Timed out during operation: cannot acquire state change
 * lock" is `busy`.
 */
const RULES: ReadonlyArray<readonly [HypervisorErrorKind, RegExp]> = [
  ...CHECKPOINT_RULES,
  [
    'unreachable',
    /failed to connect to the hypervisor|Failed to connect socket|Cannot recv data|Cannot write data|End of file while reading data|Connection refused|Connection reset by peer|Broken pipe|client socket is closed|no valid connection|Unable to connect|not connected to the hypervisor/i,
  ],
  [
    'not-found',
    /failed to get domain|Domain not found|no domain with matching|not found in domain|not assigned to domain/i,
  ],
  [
    'quiesce',
    /guest agent is not configured|guest agent is not responding|guest agent is not connected|guest agent.*(timed out|not available)|fsfreeze/i,
  ],
  ['not-ready', /not ready for pivot yet/i],
  [
    'busy',
    /cannot acquire state change lock|already in active block job|has a blockjob assigned|has an active block job|another job|job is already active|operation is already in progress/i,
  ],
  ['exists', /for backup of '[^']*' exists|already exists/i],
  ['no-job', /no job is active|does not have an active block job|no current block job|no domain backup job present/i],
  ['not-running', /domain is not running|for inactive domain|domain is not active/i],
  ['unsupported', /operation not supported|unsupported configuration|argument unsupported|not supported|unsupported/i],
];

export function classifyHypervisorError(stderr: string): HypervisorErrorKind {
  for (const [kind, re] of RULES) if (re.test(stderr)) return kind;
  return 'failed';
}

/**
 * The tool's own words, one line: virsh prints `error: <what it tried>` then `error: <libvirt's
 * reason>`; both are kept (the first names the domain, the second says why), prefixes dropped.
 */
export function toolErrorText(stderr: string): string {
  const lines = stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
  const errors = lines.filter((l) => /^error:/i.test(l)).map((l) => l.replace(/^error:\s*/i, ''));
  const chosen = errors.length > 0 ? errors : lines;
  return chosen
    .map((l) => l.replace(/^qemu-img:\s*/, ''))
    .join('; ')
    .replace(/[.\s]+$/, '');
}
