import { Command } from 'commander';
import { addS3Options, s3OptionsFrom } from '../../src/cli/commands/s3-options';
import { lockedRequest, resolvedLock, retentionReachDays } from '../../src/shared/object-lock';
import type { BackupRequest } from '../../src/shared/types';
import { buildManifest } from '../../src/repository/manifest';

function s3Flags(args: string[]): Record<string, unknown> {
  const cmd = addS3Options(new Command('x').exitOverride());
  cmd.parse(args, { from: 'user' });
  return cmd.opts();
}

describe('--s3-object-lock', () => {
  test('DAYS, governance by default, or DAYS:compliance', () => {
    expect(s3OptionsFrom(s3Flags(['--s3-object-lock', '30']))).toEqual({
      objectLock: { days: 30, mode: 'governance' },
    });
    expect(s3OptionsFrom(s3Flags(['--s3-object-lock', '365:COMPLIANCE']))).toEqual({
      objectLock: { days: 365, mode: 'compliance' },
    });
  });

  test.each(['0', '-1', '1.5', '30:forever', '36501', 'thirty', '30:'])('"%s" is refused with one sentence', (bad) => {
    expect(() => s3OptionsFrom(s3Flags(['--s3-object-lock', bad]))).toThrow(
      `--s3-object-lock "${bad}" is not a lock: give DAYS (1 to 36500) and optionally :governance or :compliance, e.g. 30 or 365:compliance.`,
    );
  });
});

describe('the lock date of a backup', () => {
  const req: BackupRequest = {
    backupId: 'web-20261130T020000Z-1a2b',
    domain: 'web',
    host: 'hv1',
    method: 'auto',
    targets: ['s3://b/p'],
    options: {
      s3: { partSizeMiB: 5, objectLock: { mode: 'governance', days: 30, retainUntil: '2020-01-01T00:00:00Z' } },
    },
    requestedAt: '2026-11-30T01:59:59.000Z',
  } as BackupRequest;

  test("is the backup's start + DAYS, whatever date the request carried", () => {
    expect(lockedRequest(req, '2026-11-30T02:00:00.500Z').options.s3).toEqual({
      partSizeMiB: 5,
      objectLock: { mode: 'governance', days: 30, retainUntil: '2026-12-30T02:00:00.500Z' },
    });
  });

  test('a request without a lock is left alone', () => {
    const plain = { ...req, options: { s3: { partSizeMiB: 5 } } } as BackupRequest;
    expect(lockedRequest(plain, '2026-11-30T02:00:00.500Z')).toBe(plain);
  });

  test('without a backup (copy), the time the target is opened + DAYS', () => {
    expect(resolvedLock({ mode: 'compliance', days: 2 }, new Date('2026-11-30T00:00:00Z'))).toEqual({
      mode: 'compliance',
      days: 2,
      retainUntil: '2026-12-02T00:00:00.000Z',
    });
  });
});

describe('a schedule retention policy against the lock', () => {
  const day = 86_400;
  test.each([
    [{ keepLast: 7 }, day, 7],
    [{ keepLast: 7 }, 6 * 3600, 1.75],
    [{ keepDaily: 7 }, 6 * 3600, 7],
    [{ keepDaily: 7, keepWeekly: 4 }, day, 28],
    [{ keepMonthly: 2 }, day, 56],
    [{ keepDaily: 3 }, 7 * day, 21],
  ])('%j every %i s keeps backups at least %d days', (policy, every, days) => {
    expect(retentionReachDays(policy, every)).toBeCloseTo(days);
  });
});

describe('the manifest records the lock', () => {
  const input = {
    backupId: 'web-20261130T020000Z-1a2b',
    domain: 'web',
    host: 'hv1',
    method: 'push' as const,
    startedAt: '2026-11-30T02:00:00Z',
    finishedAt: '2026-11-30T02:01:00Z',
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    disks: [
      {
        name: 'vda',
        format: 'qcow2',
        virtualSize: 1 << 20,
        size: 1 << 20,
        sha256: 'a'.repeat(64),
        key: 'web/web-20261130T020000Z-1a2b/vda.qcow2',
      },
    ],
  };

  test('as objectLock {mode, retainUntil}, in a version 2 manifest', () => {
    const m = buildManifest({ ...input, objectLock: { mode: 'governance', retainUntil: '2026-12-30T02:00:00.000Z' } });
    expect(m.version).toBe(2);
    expect(m.objectLock).toEqual({ mode: 'governance', retainUntil: '2026-12-30T02:00:00.000Z' });
  });

  test('a lock that is not one is refused', () => {
    expect(() =>
      buildManifest({ ...input, objectLock: { mode: 'forever', retainUntil: 'soon' } } as unknown as typeof input),
    ).toThrow(/objectLock/);
  });
});
