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

  constructor(kind: HypervisorErrorKind, message: string, details: HypervisorErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.kind = kind;
    this.permanent = isPermanentKind(kind);
    this.stderr = details.stderr;
    this.command = details.command;
    this.domain = details.domain;
    this.disk = details.disk;
  }
}

/**
 * Ordered: the first match wins. "argument unsupported: QEMU guest agent is not configured" is a
 * quiesce failure before it is an unsupported one, "unsupported configuration: external snapshot
 * file ... already exists" is `exists`, and "Timed out during operation: cannot acquire state change
 * lock" is `busy`.
 */
const RULES: ReadonlyArray<readonly [HypervisorErrorKind, RegExp]> = [
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
  ['no-job', /no job is active|does not have an active block job|no current block job/i],
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
