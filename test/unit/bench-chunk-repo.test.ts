/**
 * The chunk-repo bench group's arithmetic: the changed chunks' bytes its scattered 64 KiB writes make, and the ratios
 * and goals the report draws from its cases (issue #15's: ingest faster than restic and borg, a repository no larger,
 * the second backup uploading <= 1.1x the changed chunks' bytes, restore >= restic and >= 0.8x qemu-img convert).
 */
import { changedChunkMiB, chunkRepoRatioDefs } from '../../bench/chunk-repo';
import { computeRatios } from '../../bench/report';
import type { BenchResults, CaseResult } from '../../bench/report';

const MiB = 1 << 20;
const one = (id: string, samples: Array<Record<string, number>>): CaseResult => ({ id, label: id, samples });

function ratios(cases: CaseResult[]): Map<string, { value: number; met?: boolean }> {
  const r: BenchResults = { startedAt: '2026-11-30T00:00:00Z', durationS: 1, args: {}, machine: {}, cases };
  return new Map(computeRatios(r).map((q) => [q.name, q]));
}

describe('changedChunkMiB', () => {
  test('64 KiB writes count each 4 MiB chunk they touch once', () => {
    // two writes in chunk 0, one at the last 64 KiB of chunk 1, one in chunk 1023
    expect(changedChunkMiB([0, 64 * 1024, 8 * MiB - 64 * 1024, 1023 * 4 * MiB + 5 * 64 * 1024])).toBe(12);
    expect(changedChunkMiB([])).toBe(0);
  });
});

describe('chunk-repo ratios in the report', () => {
  const cases = [
    one('4g/crepo-vmbackup-file-backup1', [{ wallMs: 20_000, repoMiB: 2050 }]),
    one('4g/crepo-restic-backup1', [{ wallMs: 40_000, repoMiB: 2060 }]),
    one('4g/crepo-borg-backup1', [{ wallMs: 15_000, repoMiB: 2049 }]),
    one('4g/crepo-vmbackup-file-backup2', [{ wallMs: 9000, repoMiB: 3900, uploadedMiB: 1800, changedChunkMiB: 1772 }]),
    one('4g/crepo-restic-backup2', [{ wallMs: 30_000, repoMiB: 2400, storedMiB: 340, changedChunkMiB: 1772 }]),
    one('4g/crepo-borg-backup2', [{ wallMs: 12_000, repoMiB: 3830, storedMiB: 1781, changedChunkMiB: 1772 }]),
    one('4g/crepo-vmbackup-file-restore', [{ wallMs: 10_000 }]),
    one('4g/crepo-restic-restore', [{ wallMs: 12_000 }]),
    one('4g/crepo-qemu-img-convert', [{ wallMs: 7000 }]),
  ];
  const byName = ratios(cases);

  test('ingest: the first backup against each peer, goal <= 1x', () => {
    expect(byName.get('chunk repo, first backup: vmbackup / restic (4g)')).toMatchObject({ value: 0.5, met: true });
    const borg = byName.get('chunk repo, first backup: vmbackup / borg (4g)');
    expect(borg?.value).toBeCloseTo(20 / 15);
    expect(borg?.met).toBe(false);
  });

  test('repository size after the first backup and after both against each peer, goal <= 1x', () => {
    expect(byName.get('chunk repo size after the first backup: vmbackup / restic (4g)')?.met).toBe(true);
    expect(byName.get('chunk repo size after the first backup: vmbackup / borg (4g)')?.value).toBeCloseTo(2050 / 2049);
    expect(byName.get('chunk repo size after 2 backups: vmbackup / restic (4g)')?.met).toBe(false);
    expect(byName.get('chunk repo size after 2 backups: vmbackup / borg (4g)')?.value).toBeCloseTo(3900 / 3830);
  });

  test("second backup: uploaded bytes against the changed chunks' bytes of the same case, goal <= 1.1x", () => {
    const r = byName.get("chunk repo, second backup: vmbackup uploaded / changed chunks' bytes (4g)");
    expect(r?.value).toBeCloseTo(1800 / 1772);
    expect(r?.met).toBe(true);
    expect(byName.get("chunk repo, second backup: restic stored / changed chunks' bytes (4g)")?.value).toBeCloseTo(
      340 / 1772,
    );
  });

  test('restore throughput: at least restic, >= 0.8x qemu-img convert', () => {
    expect(byName.get('chunk repo restore throughput: vmbackup / restic (4g)')).toMatchObject({
      value: 1.2,
      met: true,
    });
    expect(byName.get('chunk repo restore throughput: vmbackup / qemu-img convert (4g)')).toMatchObject({
      value: 0.7,
      met: false,
    });
  });

  test('a case the run does not have gives no ratio (S3 not measured, borg restore missing)', () => {
    expect(byName.has('chunk repo, first backup: vmbackup to S3 / to file (4g)')).toBe(false);
    expect(byName.has('chunk repo restore throughput: vmbackup / borg (4g)')).toBe(false);
    expect(chunkRepoRatioDefs(['1g/push-file', '4g/inc-64m-vmbackup'])).toEqual([]);
  });
});
