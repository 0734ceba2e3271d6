/**
 * The error classifier against the stderr virsh and qemu-img printed on the test hosts
 * (test/fixtures/virsh/stderr.*.txt, captured by capture.sh) and texts recorded in the stack notes.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  HypervisorError,
  checkpointErrorSubject,
  classifyHypervisorError,
  toolErrorText,
} from '../../src/hypervisor/errors';
import type { HypervisorErrorKind } from '../../src/hypervisor/errors';

const captured = (file: string): string => readFileSync(join(__dirname, '..', 'fixtures', 'virsh', file), 'utf8');

describe('classifyHypervisorError on captured stderr', () => {
  const cases: Array<[string, HypervisorErrorKind]> = [
    ['stderr.no-domain.txt', 'not-found'],
    ['stderr.no-disk.txt', 'not-found'],
    ['stderr.exists.txt', 'exists'],
    ['stderr.overlay-exists.txt', 'exists'],
    ['stderr.quiesce-no-agent.txt', 'quiesce'],
    ['stderr.quiesce-no-channel.txt', 'quiesce'],
    ['stderr.not-ready.txt', 'not-ready'],
    ['stderr.commit-busy.txt', 'busy'],
    ['stderr.backup-busy.txt', 'busy'],
    ['stderr.no-job.txt', 'no-job'],
    ['stderr.no-block-job.txt', 'no-job'],
    // backup-dumpxml of a domain without a backup job (running or not)
    ['stderr.no-backup-job.txt', 'no-job'],
    ['stderr.not-running.txt', 'not-running'],
    ['stderr.no-base.txt', 'failed'],
    // checkpoints (the capture.sh `checkpoints` section)
    ['stderr.checkpoint-inconsistent.txt', 'checkpoint-inconsistent'],
    ['stderr.checkpoint-validate.txt', 'checkpoint-inconsistent'],
    ['stderr.checkpoint-bitmap-missing.txt', 'checkpoint-inconsistent'],
    ['stderr.checkpoint-not-found.txt', 'checkpoint-not-found'],
    ['stderr.checkpoint-incremental-not-found.txt', 'checkpoint-not-found'],
    ['stderr.checkpoint-parent-missing.txt', 'checkpoint-not-found'],
    ['stderr.checkpoint-exists.txt', 'checkpoint-exists'],
    ['stderr.bitmap-exists.txt', 'bitmap-exists'],
    ['stderr.checkpoint-raw.txt', 'checkpoint-unsupported'],
    ['stderr.undefine-checkpoints.txt', 'failed'],
  ];
  test.each(cases)('%s -> %s', (file, kind) => {
    expect(classifyHypervisorError(captured(file))).toBe(kind);
  });
});

describe('checkpoint errors: which checkpoint and disk the text names', () => {
  const cases: Array<[string, { checkpoint?: string; disk?: string }]> = [
    ['stderr.checkpoint-inconsistent.txt', { checkpoint: 'c1', disk: 'vda' }],
    ['stderr.checkpoint-bitmap-missing.txt', { checkpoint: 'c2', disk: 'vda' }],
    ['stderr.checkpoint-not-found.txt', { checkpoint: 'nosuch' }],
    ['stderr.checkpoint-incremental-not-found.txt', { checkpoint: 'nosuch', disk: 'vda' }],
    ['stderr.checkpoint-parent-missing.txt', { checkpoint: 'ghost' }],
    ['stderr.checkpoint-exists.txt', { checkpoint: 'c1' }],
    ['stderr.bitmap-exists.txt', { checkpoint: 'c3' }],
    ['stderr.checkpoint-raw.txt', { disk: 'vdb' }],
    ['stderr.no-domain.txt', {}],
  ];
  test.each(cases)('%s', (file, subject) => {
    expect(checkpointErrorSubject(captured(file))).toEqual(subject);
  });
});

describe('classifyHypervisorError on recorded texts', () => {
  const cases: Array<[string, HypervisorErrorKind]> = [
    // libvirtd down, or restarting under a running call
    [
      "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory",
      'unreachable',
    ],
    ["error: Failed to connect socket to '/var/run/libvirt/libvirt-sock': Connection refused", 'unreachable'],
    ['error: Cannot recv data: Connection reset by peer', 'unreachable'],
    ['error: End of file while reading data: Input/output error', 'unreachable'],
    ["error: Domain not found: no domain with matching name 'vm1'", 'not-found'],
    [
      'error: Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainBackupBegin)',
      'busy',
    ],
    ['error: Requested operation is not valid: domain is not running', 'not-running'],
    ["error: operation failed: domain 'cap1' already exists with uuid 77a1b499-f0c6-4b89-863a-256e69eb5b0b", 'exists'],
    ['error: invalid argument: invalid path vdz not assigned to domain', 'not-found'],
    ['error: this function is not supported by the connection driver: virDomainBackupBegin', 'unsupported'],
    // hosts without checkpoints: libvirt < 5.6 (no API, and its virsh has no checkpoint commands), QEMU
    // without the bitmap features libvirt needs (libvirt's qemu_checkpoint.c / qemu_backup.c texts)
    [
      'error: this function is not supported by the connection driver: virDomainCheckpointCreateXML',
      'checkpoint-unsupported',
    ],
    ["error: unknown command: 'checkpoint-list'", 'checkpoint-unsupported'],
    ['error: Operation not supported: incremental backup is not supported yet', 'checkpoint-unsupported'],
    [
      'error: Operation not supported: creating checkpoint for incremental backup is not supported yet',
      'checkpoint-unsupported',
    ],
    ['error: Operation not supported: cannot delete checkpoint for inactive domain', 'not-running'],
    [
      "error: internal error: unable to execute QEMU command 'blockdev-add': Could not open '/root/x/full.qcow2': Permission denied",
      'failed',
    ],
    ['', 'failed'],
  ];
  test.each(cases)('%s -> %s', (stderr, kind) => {
    expect(classifyHypervisorError(stderr)).toBe(kind);
  });
});

describe('toolErrorText', () => {
  test("keeps virsh's error lines, without the prefixes", () => {
    expect(toolErrorText(captured('stderr.exists.txt'))).toBe(
      "invalid argument: store '/VM/full.qcow2' for backup of 'vda' exists",
    );
    expect(
      toolErrorText(
        "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/x': No such file or directory\n",
      ),
    ).toBe("failed to connect to the hypervisor; Failed to connect socket to '/x': No such file or directory");
  });

  test('qemu-img: the first line says it', () => {
    expect(toolErrorText(captured('qemu-img-check.locked.stderr.txt'))).toBe(
      `Could not open '/VM/vda.qcow2': Failed to get shared "write" lock; Is another process using the image [/VM/vda.qcow2]?`,
    );
  });
});

describe('HypervisorError', () => {
  test('permanent follows the kind', () => {
    const permanent: HypervisorErrorKind[] = [
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
    ];
    const transient: HypervisorErrorKind[] = ['unreachable', 'busy', 'not-ready', 'failed'];
    for (const kind of permanent) expect(new HypervisorError(kind, 'x').permanent).toBe(true);
    for (const kind of transient) expect(new HypervisorError(kind, 'x').permanent).toBe(false);
  });

  test('keeps stderr, command, domain and cause', () => {
    const cause = new Error('inner');
    const err = new HypervisorError('busy', 'cannot start', {
      stderr: 'error: x',
      command: ['virsh', 'backup-begin'],
      domain: 'vm1',
      disk: 'vda',
      cause,
    });
    expect(err).toBeInstanceOf(Error);
    expect(err).toMatchObject({
      name: 'HypervisorError',
      kind: 'busy',
      stderr: 'error: x',
      domain: 'vm1',
      disk: 'vda',
    });
    expect(err.cause).toBe(cause);
  });
});
