import { applyPolicy } from '../../src/repository';
import type { Manifest } from '../../src/repository/manifest';

function backup(at: string, chain?: { level: 'inc' | 'diff'; parent: string; base: string }): Manifest {
  const backupId = `web-${at}`;
  return { backupId, domain: 'web', startedAt: at, chain: chain ?? { level: 'full', base: backupId } } as Manifest;
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

describe('prune policy over chains', () => {
  // a chain per week: a full on Monday, increments Tuesday..Sunday; then a differential chain
  const chain = (days: string[]): Manifest[] => {
    const out: Manifest[] = [];
    for (const day of days) {
      const parent = out.at(-1);
      out.push(
        backup(
          `${day}T01:00:00Z`,
          parent ? { level: 'inc', parent: parent.backupId, base: out[0]!.backupId } : undefined,
        ),
      );
    }
    return out;
  };
  const week1 = chain(['2026-11-02', '2026-11-03', '2026-11-04', '2026-11-05', '2026-11-06', '2026-11-07']);
  const week2 = chain(['2026-11-09', '2026-11-10', '2026-11-11']);
  const all = [...week1, ...week2];

  test('every full, inc and diff counts as a point; a kept increment keeps its parents, saying so', () => {
    const { keep, remove } = applyPolicy(all, { keepLast: 2 });
    expect(keep.map((k) => [k.backupId.slice(4, 14), k.level, k.reasons])).toEqual([
      ['2026-11-11', 'inc', ['last']],
      ['2026-11-10', 'inc', ['last', 'parent of web-2026-11-11T01:00:00Z']],
      ['2026-11-09', 'full', ['parent of web-2026-11-10T01:00:00Z']],
    ]);
    expect(remove.map((r) => r.backupId.slice(4, 14))).toEqual([
      '2026-11-07',
      '2026-11-06',
      '2026-11-05',
      '2026-11-04',
      '2026-11-03',
      '2026-11-02',
    ]);
  });

  test('a policy that would orphan increments keeps their whole chain back to the full', () => {
    // keep-daily 1 plus keep-weekly 2 keeps the newest of week 1 (Saturday's increment): its 5 parents stay
    const { keep, remove } = applyPolicy(all, { keepWeekly: 2 });
    expect(keep.map((k) => k.backupId.slice(4, 14))).toEqual([
      '2026-11-11',
      '2026-11-10',
      '2026-11-09',
      '2026-11-07',
      '2026-11-06',
      '2026-11-05',
      '2026-11-04',
      '2026-11-03',
      '2026-11-02',
    ]);
    expect(keep.find((k) => k.backupId.startsWith('web-2026-11-02'))?.reasons).toEqual([
      'parent of web-2026-11-03T01:00:00Z',
    ]);
    expect(remove).toEqual([]);
  });

  test('differentials depend on the full only: the ones not kept go, the full stays', () => {
    const full = backup('2026-11-16T01:00:00Z');
    const diffs = ['17', '18', '19'].map((d) =>
      backup(`2026-11-${d}T01:00:00Z`, { level: 'diff', parent: full.backupId, base: full.backupId }),
    );
    const { keep, remove } = applyPolicy([full, ...diffs], { keepLast: 1 });
    expect(keep.map((k) => [k.backupId.slice(4, 14), k.reasons])).toEqual([
      ['2026-11-19', ['last']],
      ['2026-11-16', ['parent of web-2026-11-19T01:00:00Z']],
    ]);
    expect(remove.map((r) => r.backupId.slice(4, 14))).toEqual(['2026-11-18', '2026-11-17']);
  });

  test('removal order: every backup before the backups it depends on', () => {
    // keep only the newest chain: the old chain goes newest link first, its full last
    const { remove } = applyPolicy(all, { keepLast: 1 });
    const order = remove.map((r) => r.backupId);
    for (const r of remove) {
      if (r.parent) expect(order.indexOf(r.backupId)).toBeLessThan(order.indexOf(r.parent));
    }
    expect(order.at(-1)).toBe(week1[0]!.backupId);
  });

  test('a backup whose parent is gone is no restorable point: not counted, not removed, marked', () => {
    const orphaned = week2.slice(1); // its full is missing on this target
    const { keep, remove } = applyPolicy([...week1, ...orphaned], { keepLast: 1 });
    expect(keep.map((k) => [k.backupId.slice(4, 14), k.reasons])).toEqual([
      ['2026-11-11', [`not restorable: ${week2[0]!.backupId} is missing`]],
      ['2026-11-10', [`not restorable: ${week2[0]!.backupId} is missing`]],
      ['2026-11-07', ['last']],
      ['2026-11-06', ['parent of web-2026-11-07T01:00:00Z']],
      ['2026-11-05', ['parent of web-2026-11-06T01:00:00Z']],
      ['2026-11-04', ['parent of web-2026-11-05T01:00:00Z']],
      ['2026-11-03', ['parent of web-2026-11-04T01:00:00Z']],
      ['2026-11-02', ['parent of web-2026-11-03T01:00:00Z']],
    ]);
    expect(remove).toEqual([]);
  });

  test('a protected backup is kept with its chain, whatever newer manifests the target holds', () => {
    // a scheduled run protects the backup it just made: here week 1's Thursday increment, which --keep-last 1
    // alone would remove (someone put newer-looking backups on the target)
    const made = week1[3]!;
    const { keep, remove } = applyPolicy(all, { keepLast: 1, protect: [made.backupId] });
    expect(keep.map((k) => [k.backupId.slice(4, 14), k.reasons])).toEqual([
      ['2026-11-11', ['last']],
      ['2026-11-10', ['parent of web-2026-11-11T01:00:00Z']],
      ['2026-11-09', ['parent of web-2026-11-10T01:00:00Z']],
      ['2026-11-05', ['protected']],
      ['2026-11-04', ['parent of web-2026-11-05T01:00:00Z']],
      ['2026-11-03', ['parent of web-2026-11-04T01:00:00Z']],
      ['2026-11-02', ['parent of web-2026-11-03T01:00:00Z']],
    ]);
    expect(remove.map((r) => r.backupId.slice(4, 14))).toEqual(['2026-11-07', '2026-11-06']);
  });
});
