/**
 * How often a job (push backup, active commit) is polled. With virsh sessions a query costs ~1 ms, so the
 * end of a short job is worth noticing at once: every 10 ms during the first second, then doubling up to
 * the configured interval, so a long job is polled no more often than before.
 */
const FINE_MS = 10;
const FINE_FOR_MS = 1_000;

/** The waits between polls: call it before each sleep. */
export function pollDelays(intervalMs: number): () => number {
  const start = Date.now();
  let wait = Math.min(FINE_MS, intervalMs);
  return () => {
    if (Date.now() - start >= FINE_FOR_MS) wait = Math.min(wait * 2, intervalMs);
    return wait;
  };
}
