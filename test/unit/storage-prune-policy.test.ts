import { applyPolicy } from '../../src/repository';
import type { Manifest } from '../../src/repository/manifest';

function backup(at: string): Manifest {
  return { backupId: `web-${at}`, domain: 'web', startedAt: at } as Manifest;
}

const ids = (ds: Array<{ backupId: string }>): string[] => ds.map((d) => d.backupId.slice(4));

describe('prune policy (restic semantics)', () => {
  // two a day for ten days at the end of November, plus one in October and one last year
  const days = Array.from({ length: 10 }, (_, i) => `2026-11-${String(i + 10).padStart(2, '0')}`);
  const all = [
    ...days.flatMap((d) => [backup(`${d}T01:00:00Z`), backup(`${d}T13:00:00Z`)]),
    backup('2026-10-03T05:00:00Z'),
    backup('2025-12-31T23:00:00Z'),
  ];

  test('--keep-last keeps the newest n', () => {
    const { keep, remove } = applyPolicy(all, { keepLast: 3 });
    expect(ids(keep)).toEqual(['2026-11-19T13:00:00Z', '2026-11-19T01:00:00Z', '2026-11-18T13:00:00Z']);
    expect(remove).toHaveLength(all.length - 3);
  });

  test('--keep-daily keeps the newest backup of each of the last n days with backups', () => {
    const { keep } = applyPolicy(all, { keepDaily: 3 });
    expect(ids(keep)).toEqual(['2026-11-19T13:00:00Z', '2026-11-18T13:00:00Z', '2026-11-17T13:00:00Z']);
  });

  test('--keep-weekly uses ISO weeks (Monday start) and --keep-monthly calendar months', () => {
    // 2026-11-16 is a Monday: the week of the 16th..19th, the week of the 10th..15th
    expect(ids(applyPolicy(all, { keepWeekly: 2 }).keep)).toEqual(['2026-11-19T13:00:00Z', '2026-11-15T13:00:00Z']);
    expect(ids(applyPolicy(all, { keepMonthly: 3 }).keep)).toEqual([
      '2026-11-19T13:00:00Z',
      '2026-10-03T05:00:00Z',
      '2025-12-31T23:00:00Z',
    ]);
  });

  test('rules combine and each kept backup says why', () => {
    const { keep } = applyPolicy(all, { keepLast: 1, keepDaily: 2, keepMonthly: 2 });
    expect(keep.map((k) => [k.backupId.slice(4), k.reasons])).toEqual([
      ['2026-11-19T13:00:00Z', ['last', 'daily', 'monthly']],
      ['2026-11-18T13:00:00Z', ['daily']],
      ['2026-10-03T05:00:00Z', ['monthly']],
    ]);
  });

  test('the only backup of a domain is always kept', () => {
    const { keep, remove } = applyPolicy([backup('2020-01-01T00:00:00Z')], {
      keepDaily: 0,
      keepLast: 0,
      keepWeekly: 0,
      keepMonthly: 0,
    });
    expect(keep.map((k) => k.reasons)).toEqual([['only backup']]);
    expect(remove).toEqual([]);
  });
});
