/** What `schedule create` makes of its flags: Temporal's schedule spec, the group of VMs, domain globs. */
import { describeSpec, scheduleSpecOf, defaultCatchupSeconds } from '../../src/client/schedules';
import type { ScheduleSpecDescription } from '@temporalio/client';
import { groupFrom } from '../../src/cli/commands/schedule';
import { retentionPolicyProblem } from '../../src/activities/schedule';
import { globMatcher } from '../../src/shared/names';

describe('schedule timing -> Temporal spec', () => {
  test('--every alone is an interval counted from the epoch (UTC); --timezone without --at is refused', () => {
    expect(scheduleSpecOf({ everySeconds: 86_400 })).toEqual({ intervals: [{ every: '86400s' }] });
    expect(scheduleSpecOf({ everySeconds: 15, jitterSeconds: 5 })).toEqual({
      intervals: [{ every: '15s' }],
      jitter: '5s',
    });
    expect(() => scheduleSpecOf({ everySeconds: 86_400, timezone: 'Europe/Berlin' })).toThrow(
      '--timezone applies to --at only: an --every interval alone counts from 1970-01-01 UTC',
    );
  });

  test('--every 1d --at 02:00 --timezone Europe/Berlin is a calendar in that time zone', () => {
    expect(
      scheduleSpecOf({ everySeconds: 86_400, at: '02:00', timezone: 'Europe/Berlin', jitterSeconds: 1800 }),
    ).toEqual({
      calendars: [{ hour: 2, minute: 0, second: 0, comment: 'every 1d at 02:00' }],
      timezone: 'Europe/Berlin',
      jitter: '1800s',
    });
  });

  test('--every 6h --at 13:30 runs at 01:30, 07:30, 13:30 and 19:30', () => {
    expect(scheduleSpecOf({ everySeconds: 6 * 3600, at: '13:30' })).toEqual({
      calendars: [{ hour: { start: 1, end: 23, step: 6 }, minute: 30, second: 0, comment: 'every 6h at 13:30' }],
    });
  });

  test('what cannot be said as a calendar is refused with one sentence', () => {
    expect(() => scheduleSpecOf({ everySeconds: 7 * 86_400, at: '02:00' })).toThrow(
      /^--at needs --every 1d, or a number of hours that divides a day \(1h, 2h, 3h, 4h, 6h, 8h, 12h\), not 1w;/,
    );
    expect(() => scheduleSpecOf({ everySeconds: 5 * 3600, at: '02:00' })).toThrow(/not 5h/);
    expect(() => scheduleSpecOf({ everySeconds: 86_400, at: '24:00' })).toThrow(
      '--at must be a time of day such as 02:00 or 23:30:15, not "24:00"',
    );
    expect(() => scheduleSpecOf({ everySeconds: 86_400, at: '2pm' })).toThrow(/not "2pm"/);
    expect(() => scheduleSpecOf({ everySeconds: 86_400, at: '02:00', timezone: 'Mars/Olympus' })).toThrow(
      '--timezone "Mars/Olympus" is not a time zone this system knows (e.g. Europe/Berlin, UTC)',
    );
    expect(() => scheduleSpecOf({ everySeconds: 0 })).toThrow('--every must be at least one second, not 0 s');
  });

  test('a spec reads back as it was given', () => {
    const interval: ScheduleSpecDescription = { intervals: [{ every: 86_400_000, offset: 0 }], jitter: 1_800_000 };
    expect(describeSpec(interval)).toBe('every 1d, jitter 30m');
    const calendar = {
      calendars: [{ comment: 'every 1d at 02:00', hour: [], minute: [], second: [] }],
      timezone: 'Europe/Berlin',
    } as unknown as ScheduleSpecDescription;
    expect(describeSpec(calendar)).toBe('every 1d at 02:00 Europe/Berlin');
  });

  test('the catch-up window defaults to the interval, from one minute to one day', () => {
    expect(defaultCatchupSeconds(15)).toBe(60);
    expect(defaultCatchupSeconds(6 * 3600)).toBe(6 * 3600);
    expect(defaultCatchupSeconds(7 * 86_400)).toBe(86_400);
  });
});

describe('schedule group from --domain, --all, --host, --match', () => {
  const none = { domain: [] as string[], host: [] as string[], match: [] as string[] };

  test('--domain NAME is on --host, or this machine; HOST/NAME names its host', () => {
    expect(groupFrom({ ...none, domain: ['vm1', 'hv2/vm2'] }, 'here')).toEqual({
      domains: [
        { host: 'here', domain: 'vm1' },
        { host: 'hv2', domain: 'vm2' },
      ],
      allOn: [],
    });
    expect(groupFrom({ ...none, domain: ['vm1', 'vm1'], host: ['hv1'] }, 'here')).toEqual({
      domains: [{ host: 'hv1', domain: 'vm1' }],
      allOn: [],
    });
  });

  test('--all takes every --host (default this machine), with --match globs', () => {
    expect(groupFrom({ ...none, all: true }, 'here')).toEqual({ domains: [], allOn: ['here'] });
    expect(groupFrom({ ...none, all: true, host: ['hv1', 'hv2'], match: ['web-*'] }, 'here')).toEqual({
      domains: [],
      allOn: ['hv1', 'hv2'],
      match: ['web-*'],
    });
  });

  test('what does not name VMs clearly is refused with one sentence', () => {
    expect(() => groupFrom(none, 'here')).toThrow(
      'a schedule needs VMs: give --domain NAME (repeatable) or --all [--host H]',
    );
    expect(() => groupFrom({ ...none, domain: ['vm1'], host: ['a', 'b'] }, 'here')).toThrow(
      '--domain "vm1": several --host are given, say which one holds it: --domain HOST/vm1',
    );
    expect(() => groupFrom({ ...none, domain: ['vm1'], match: ['x*'] }, 'here')).toThrow(
      '--match applies to --all only',
    );
    expect(() => groupFrom({ ...none, domain: ['bad host/vm1'] }, 'here')).toThrow(
      /"bad host" is not a valid host name/,
    );
    expect(() => groupFrom({ ...none, domain: ['hv1/vm;rm'] }, 'here')).toThrow(/"vm;rm" is not a valid domain name/);
    expect(() => groupFrom({ ...none, all: true, match: ['a/b'] }, 'here')).toThrow(/--match "a\/b" is not a pattern/);
    expect(() => groupFrom({ ...none, all: true, host: ['hv1', 'hv1'] }, 'here')).toThrow('a --host is given twice');
  });
});

describe('--match globs and retention policies on the host', () => {
  test('`*` and `?` match; every other character is itself', () => {
    const m = globMatcher(['web-*', 'db?.prod']);
    expect(['web-1', 'web-', 'db1.prod', 'dbx.prod'].every(m)).toBe(true);
    expect(['xweb-1', 'db12.prod', 'db1xprod', 'web'].some(m)).toBe(false);
    expect(globMatcher([])('anything')).toBe(true);
  });

  test('a policy that keeps nothing, or odd numbers, is refused before anything is removed', () => {
    expect(retentionPolicyProblem({ keepLast: 2 })).toBeUndefined();
    expect(retentionPolicyProblem({})).toBe('the retention policy keeps nothing: give a keep rule above 0');
    expect(retentionPolicyProblem({ keepLast: 0 })).toBe(
      'the retention policy keeps nothing: give a keep rule above 0',
    );
    expect(retentionPolicyProblem({ keepDaily: -1 })).toBe('keepDaily must be a whole number from 0 to 100000, not -1');
    expect(retentionPolicyProblem({ keepLast: 1.5 })).toMatch(/not 1.5/);
    expect(retentionPolicyProblem(undefined)).toBe('the retention policy is missing');
  });
});
