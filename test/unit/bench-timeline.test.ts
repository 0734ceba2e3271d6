/**
 * bench/lib/vmbackup.ts splitTimeline: the report's time split per activity and the workflow time outside every
 * activity ("(between activities)"), which a span without times (NaN) once turned into the whole workflow's time.
 */
import { splitTimeline } from '../../bench/lib/vmbackup';
import type { ActivitySpan } from '../../test/helpers/history';

const span = (name: string, startedAt: number, closedAt: number): ActivitySpan => ({
  name,
  local: false,
  scheduledAt: startedAt,
  startedAt,
  closedAt,
  attempts: 1,
});

test('time between activities is the workflow time no activity covers; overlaps count once; NaN spans are left out', () => {
  const out = splitTimeline({
    workflowMs: 1000,
    activities: [
      span('plan', 0, 100),
      span('ship', 200, 700),
      span('ship', 300, 800), // two targets in parallel
      span('slot', NaN, NaN), // e.g. a slot activity still held, never closed
      span('manifest', 900, 950),
    ],
  });
  expect(out['ship']).toBe(1000);
  expect(out['plan']).toBe(100);
  expect(out['(between activities)']).toBe(1000 - (100 + 600 + 50));
});
