/**
 * A long step's progress reports to its backup's workflow (the storeProgress signal, which the progress query and
 * `status` show). Each report is one event in the backup's history, and Temporal ends a workflow whose history passes
 * 51,200 events: reports are spaced (one per 1% of the step's bytes, at most one per 2 s, at least one a minute while
 * the bytes move), so a day-long step adds at most ~1,500 whatever the disk's size. Pull mode sent one per 4 MiB chunk
 * (513 events for 2 GiB): the pull of a 200 GiB disk would have been ended by the server.
 */

/** Reports are at least this far apart ... */
export const REPORT_MIN_MS = 2_000;
/** ... and, unless the bytes moved by 1% of the total since the last one, this far. */
export const REPORT_MAX_MS = 60_000;
/** flush() waits this long at most for a report in flight: a report never holds the step up */
const FLUSH_MS = 5_000;

export interface SpacedProgress {
  /** the latest bytes; sent now, or later by a timer, as the spacing allows (a stalled step's last bytes too) */
  update(bytesDone: number): void;
  /** stops reporting and waits (FLUSH_MS at most) for a report in flight */
  flush(): Promise<void>;
}

/** Calls `send` with the latest bytes, spaced as above; best effort (a failed send is dropped). */
export function spacedProgress(
  send: ((bytesDone: number) => Promise<void>) | undefined,
  total: number,
  now: () => number = Date.now,
): SpacedProgress {
  let lastAt = now();
  let lastBytes = 0;
  let latest = 0;
  let inFlight: Promise<void> | undefined;
  let timer: NodeJS.Timeout | undefined;
  let closed = false;
  const attempt = (): void => {
    clearTimeout(timer);
    timer = undefined;
    if (!send || inFlight || closed || latest === lastBytes) return;
    const spacing = latest - lastBytes >= total / 100 ? REPORT_MIN_MS : REPORT_MAX_MS;
    const wait = spacing - (now() - lastAt);
    if (wait > 0) {
      timer = setTimeout(attempt, wait);
      timer.unref();
      return;
    }
    lastAt = now();
    lastBytes = latest;
    inFlight = send(latest)
      .catch(() => undefined)
      .finally(() => {
        inFlight = undefined;
        attempt();
      });
  };
  return {
    update(bytesDone: number): void {
      latest = bytesDone;
      attempt();
    },
    async flush(): Promise<void> {
      closed = true;
      clearTimeout(timer);
      let wait: NodeJS.Timeout | undefined;
      await Promise.race([inFlight, new Promise((r) => (wait = setTimeout(r, FLUSH_MS)))]);
      clearTimeout(wait);
    },
  };
}
