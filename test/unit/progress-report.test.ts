/**
 * spacedProgress (src/activities/progress-report.ts): a long step's progress reports to its workflow are spaced, so a
 * disk of any size adds a bounded number of events to the backup's history, and a stalled step's last bytes still
 * reach the workflow.
 */
import { REPORT_MAX_MS, REPORT_MIN_MS, spacedProgress } from '../../src/activities/progress-report';

const MiB = 1 << 20;

describe('spacedProgress', () => {
  let clock = 0;
  const now = () => clock;
  beforeEach(() => {
    jest.useFakeTimers();
    clock = 0;
  });
  afterEach(() => jest.useRealTimers());

  /** advances both the fake timers and the reporter's clock */
  async function advance(ms: number): Promise<void> {
    clock += ms;
    await jest.advanceTimersByTimeAsync(ms);
  }

  function reporter(total: number) {
    const sent: number[] = [];
    const r = spacedProgress(
      async (b) => {
        sent.push(b);
      },
      total,
      now,
    );
    return { r, sent };
  }

  test('a report per 4 MiB chunk becomes one per REPORT_MIN_MS: 2 GiB read in 10 s sends at most 5', async () => {
    const { r, sent } = reporter(2048 * MiB);
    for (let chunk = 1; chunk <= 512; chunk++) {
      r.update(chunk * 4 * MiB);
      await advance(10_000 / 512);
    }
    await r.flush();
    expect(sent.length).toBeGreaterThanOrEqual(4);
    expect(sent.length).toBeLessThanOrEqual(5);
    for (let i = 1; i < sent.length; i++) expect(sent[i]!).toBeGreaterThan(sent[i - 1]!);
  });

  test('nothing before REPORT_MIN_MS; a step that stalls then has its last bytes sent by the timer', async () => {
    const { r, sent } = reporter(100 * MiB);
    r.update(12 * MiB);
    r.update(48 * MiB);
    await advance(REPORT_MIN_MS - 1);
    expect(sent).toEqual([]);
    await advance(1);
    expect(sent).toEqual([48 * MiB]);
    // no further update: nothing more is sent
    await advance(REPORT_MAX_MS * 2);
    expect(sent).toEqual([48 * MiB]);
  });

  test('moves under 1% of the total wait REPORT_MAX_MS; a move past 1% meanwhile is sent after REPORT_MIN_MS', async () => {
    const { r, sent } = reporter(1000 * MiB);
    await advance(REPORT_MIN_MS);
    r.update(5 * MiB); // 0.5%
    await advance(REPORT_MAX_MS - REPORT_MIN_MS - 1);
    expect(sent).toEqual([]);
    await advance(1);
    expect(sent).toEqual([5 * MiB]);
    r.update(6 * MiB);
    await advance(REPORT_MIN_MS);
    expect(sent).toEqual([5 * MiB]);
    r.update(20 * MiB); // 1.5% since the last report
    await advance(0);
    expect(sent).toEqual([5 * MiB, 20 * MiB]);
  });

  test('a day-long step updated every second sends one report a minute (1,440), not one per update (86,400)', async () => {
    const total = 86_400 * MiB;
    const { r, sent } = reporter(total);
    for (let s = 1; s <= 86_400; s++) {
      r.update(s * MiB);
      await advance(1000);
    }
    await r.flush();
    // its 1% steps (864 MiB) take longer than REPORT_MAX_MS: one report a minute
    expect(sent.length).toBeLessThanOrEqual(86_400_000 / REPORT_MAX_MS + 1);
    expect(sent.length).toBeGreaterThanOrEqual(86_400_000 / REPORT_MAX_MS - 1);
  });

  test('a failed send is dropped and reporting goes on; flush stops the timer and waits for a send in flight', async () => {
    let fail = true;
    const sent: number[] = [];
    let release: () => void = () => undefined;
    const r = spacedProgress(
      (b) => {
        if (fail) return Promise.reject(new Error('no workflow'));
        sent.push(b);
        return new Promise<void>((res) => (release = res));
      },
      100,
      now,
    );
    r.update(50);
    await advance(REPORT_MIN_MS);
    fail = false;
    r.update(80);
    await advance(REPORT_MIN_MS);
    expect(sent).toEqual([80]);
    r.update(95); // waits: a send is in flight
    let flushed = false;
    const f = r.flush().then(() => (flushed = true));
    await advance(0);
    expect(flushed).toBe(false);
    release();
    await f;
    await advance(REPORT_MAX_MS);
    expect(sent).toEqual([80]); // flushed: the timer is gone, 95 is never sent
  });

  test('without a sender nothing happens', async () => {
    const r = spacedProgress(undefined, 100, now);
    r.update(50);
    await advance(REPORT_MAX_MS);
    await expect(r.flush()).resolves.toBeUndefined();
  });
});
