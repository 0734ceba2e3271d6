/**
 * The pull bench group's arithmetic: the allocated extents its S3 baseline uploads, the amounts it writes, and the
 * ratios and goals the report draws from its cases (issue #16's: pull full <= 1.10x qemu-img convert into a local chunk
 * repository and image tree, pull incremental <= 0.25x virtnbdbackup -l inc, pull to S3 <= 1.1x the SDK's upload,
 * local disk <= the guest's writes + 64 MiB), and pull beside push.
 */
import { dataExtents, guestWriteMiB, incrementMiB, pullRatioDefs } from '../../bench/pull';
import { computeRatios } from '../../bench/report';
import type { BenchResults, CaseResult } from '../../bench/report';

const one = (id: string, samples: Array<Record<string, number>>): CaseResult => ({ id, label: id, samples });

function ratios(cases: CaseResult[]): Map<string, { value: number; met?: boolean }> {
  const r: BenchResults = { startedAt: '2026-11-30T00:00:00Z', durationS: 1, args: {}, machine: {}, cases };
  return new Map(computeRatios(r).map((q) => [q.name, q]));
}

describe('dataExtents', () => {
  test('only data extents, merged where they touch, holes and zero extents left out', () => {
    expect(
      dataExtents([
        { start: 0, length: 65536, data: true },
        { start: 65536, length: 131072, data: true },
        { start: 196608, length: 65536, data: false },
        { start: 262144, length: 4096, data: true },
        { start: 266240, length: 0, data: true },
      ]),
    ).toEqual([
      [0, 196608],
      [262144, 4096],
    ]);
    expect(dataExtents([{ start: 0, length: 1 << 30, data: false }])).toEqual([]);
  });
});

describe('amounts written', () => {
  test("the guest's writes during the S3 backup: 128 MiB on the 4 GiB disk, a 32nd of a small one", () => {
    expect(guestWriteMiB(4096)).toBe(128);
    expect(guestWriteMiB(8192)).toBe(128);
    expect(guestWriteMiB(256)).toBe(8);
    expect(guestWriteMiB(64)).toBe(4);
  });
  test('the increment: 64 MiB on the 4 GiB disk (the issue), 4 MiB on a smoke disk', () => {
    expect(incrementMiB(4096)).toBe(64);
    expect(incrementMiB(256)).toBe(4);
  });
});

describe('pull ratios in the report', () => {
  const cases = [
    one('4g/pull-qemu-img-convert', [{ wallMs: 20_000 }]),
    one('4g/pull-full-repo', [{ wallMs: 21_000 }]),
    one('4g/pull-full-floor', [{ wallMs: 30_000 }]),
    one('4g/pull-push-full-repo', [{ wallMs: 42_000 }]),
    one('4g/pull-push-full-tree', [{ wallMs: 30_000 }]),
    one('4g/pull-inc-64m', [{ wallMs: 3000 }]),
    one('4g/pull-inc-64m-virtnbd', [{ wallMs: 10_000 }]),
    one('4g/pull-inc2-64m', [{ wallMs: 4000 }]),
    one('4g/pull-inc-floor', [{ wallMs: 2600 }]),
    one('4g/pull-full-s3', [{ wallMs: 40_000 }]),
    one('4g/pull-s3-sdk-upload', [{ wallMs: 32_000 }]),
    one('4g/pull-s3-local-disk', [{ localPeakMiB: 300, allowedMiB: 320 }]),
  ];
  const byName = ratios(cases);

  test('pull full into a local chunk repository against qemu-img convert, goal <= 1.10x; beside push', () => {
    expect(byName.get('pull full, local chunk repository / qemu-img convert (4g)')).toMatchObject({
      value: 1.05,
      met: true,
    });
    expect(byName.get('pull / push, full into a local chunk repository (4g)')?.value).toBeCloseTo(0.5);
    expect(byName.get('push full, local image tree / qemu-img convert (4g)')?.value).toBeCloseTo(1.5);
  });

  test('the floor of a pull full (job + reading with SHA-256) beside qemu-img convert, no goal', () => {
    const r = byName.get(
      'floor of a pull full (libvirt job + src/nbd reading with SHA-256, nothing written) / qemu-img convert (4g)',
    );
    expect(r?.value).toBeCloseTo(1.5);
    expect(r?.met).toBeUndefined();
  });

  test('pull incremental against virtnbdbackup -l inc of the same change, goal <= 0.25x', () => {
    expect(byName.get('pull incremental after 64 MiB scattered / virtnbdbackup -l inc (4g)')).toMatchObject({
      value: 0.3,
      met: false,
    });
  });

  test('the increment on an increment (the nightly case) beside virtnbdbackup, no goal of its own', () => {
    const r = byName.get('pull incremental on an incremental after 64 MiB scattered / virtnbdbackup -l inc (4g)');
    expect(r?.value).toBeCloseTo(0.4);
    expect(r?.met).toBeUndefined();
  });

  test('the floor of an increment (CLI start + libvirt job) beside virtnbdbackup, no goal: it bounds the goal above', () => {
    const r = byName.get(
      'floor of a pull increment (CLI start + libvirt job, nothing read) / virtnbdbackup -l inc (4g)',
    );
    expect(r?.value).toBeCloseTo(0.26);
    expect(r?.met).toBeUndefined();
  });

  test('pull into S3 against the SDK upload of the same bytes, goal <= 1.1x; local disk against writes + 64 MiB', () => {
    const s3 = byName.get('pull full into S3 chunk repository / SDK Upload of the allocated data (4g)');
    expect(s3?.value).toBeCloseTo(1.25);
    expect(s3?.met).toBe(false);
    const disk = byName.get('pull to S3: peak local disk / (guest writes during it + 64 MiB) (4g)');
    expect(disk?.value).toBeCloseTo(300 / 320);
    expect(disk?.met).toBe(true);
  });

  test('a case the run does not have gives no ratio (the image tree not available)', () => {
    expect(byName.has('pull full, local image tree / qemu-img convert (4g)')).toBe(false);
    expect(byName.has('pull / push, full into a local image tree (4g)')).toBe(false);
    expect(pullRatioDefs(['1g/push-file', '4g/crepo-restic-backup1'])).toEqual([]);
  });
});
