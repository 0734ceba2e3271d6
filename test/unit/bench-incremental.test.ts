/**
 * The incremental bench group's arithmetic: the scattered 1 MiB pieces both tools get, and the ratios and goals the
 * report draws from its cases (stored bytes against the changed bytes of the same case, wall time against
 * virtnbdbackup's, the restore of a chain against that of a full).
 */
import { scatteredOffsets } from '../../bench/incremental';
import { computeRatios } from '../../bench/report';
import type { BenchResults, CaseResult } from '../../bench/report';

function results(cases: CaseResult[]): BenchResults {
  return { startedAt: '2026-11-30T00:00:00Z', durationS: 1, args: {}, machine: {}, cases };
}

const one = (id: string, samples: Array<Record<string, number>>): CaseResult => ({ id, label: id, samples });

describe('scatteredOffsets', () => {
  test('distinct 1 MiB slots inside the disk, the same for the same seed, spread over the whole disk', () => {
    const a = scatteredOffsets(4096, 512, 7);
    expect(new Set(a).size).toBe(512);
    expect(a.every((o) => Number.isInteger(o) && o >= 0 && o < 4096)).toBe(true);
    expect(scatteredOffsets(4096, 512, 7)).toEqual(a);
    expect(scatteredOffsets(4096, 512, 8)).not.toEqual(a);
    // every eighth of the disk gets some of them (~64 expected in each)
    const eighths = new Array<number>(8).fill(0);
    for (const o of a) eighths[Math.floor(o / 512)]!++;
    expect(Math.min(...eighths)).toBeGreaterThan(16);
  });

  test('the whole disk, and more pieces than it has refused', () => {
    expect([...scatteredOffsets(64, 64, 1)].sort((x, y) => x - y)).toEqual(Array.from({ length: 64 }, (_, i) => i));
    expect(() => scatteredOffsets(64, 65, 1)).toThrow('65 pieces of 1 MiB do not fit a 64 MiB disk');
  });
});

describe('incremental ratios in the report', () => {
  const cases = [
    one('4g/inc-64m-vmbackup', [
      { wallMs: 1000, storedMiB: 65, changedMiB: 64 },
      { wallMs: 1200, storedMiB: 66, changedMiB: 64 },
      { wallMs: 1100, storedMiB: 80, changedMiB: 64 },
    ]),
    one('4g/inc-64m-virtnbd', [
      { wallMs: 4000, storedMiB: 64, changedMiB: 64 },
      { wallMs: 2000, storedMiB: 64, changedMiB: 64 },
      { wallMs: 3000, storedMiB: 64, changedMiB: 64 },
    ]),
    one('4g/restore-chain', [{ wallMs: 1400 }]),
    one('4g/restore-full', [{ wallMs: 1000 }]),
    one('overhead/push-64m', [{ wallMs: 900, jobMs: 300 }]),
  ];
  const byName = new Map(computeRatios(results(cases)).map((r) => [r.name, r]));

  test('wall time against virtnbdbackup -l inc of the same change, goal <= 0.35x', () => {
    const r = byName.get('incremental, 64 MiB changed (4g): vmbackup / virtnbdbackup -l inc');
    expect(r?.value).toBeCloseTo(1100 / 3000);
    expect(r?.met).toBe(false);
  });

  test('stored bytes against the changed bytes of the same case, goal <= 1.1x', () => {
    const r = byName.get('incremental, 64 MiB changed (4g): vmbackup stored / changed bytes');
    expect(r?.value).toBeCloseTo(66 / 64);
    expect(r?.met).toBe(true);
    expect(byName.get('incremental, 64 MiB changed (4g): virtnbdbackup stored / changed bytes')?.value).toBe(1);
    expect(byName.get('incremental, 64 MiB changed (4g): vmbackup stored / virtnbdbackup stored')?.value).toBeCloseTo(
      66 / 64,
    );
  });

  test('restore of a full + 7 increments against one full, goal <= 1.3x', () => {
    const r = byName.get('restore of a full + 7 increments / of one full (4g)');
    expect(r?.value).toBeCloseTo(1.4);
    expect(r?.met).toBe(false);
  });

  test('a case against itself still means wall time / the libvirt job (the overhead ratio)', () => {
    expect(byName.get('push 64 MiB: CLI end to end / libvirt job')?.value).toBeCloseTo(3);
  });
});
