/**
 * A deadline for every virsh and qemu-img call made on behalf of one activity attempt.
 *
 * Temporal retries an activity once its start-to-close timeout passed, whether or not the first attempt's child
 * process still runs. A `virsh snapshot-create-as` given 120 s inside a step that Temporal times out after 60 s
 * let a retry remove an overlay that the first attempt's snapshot was still creating. The activity layer runs each
 * attempt inside `withDeadline(its timeout - a margin)`, and execTool and the virsh port never give a child longer
 * than what is left, so no child outlives the attempt that started it.
 */
import { AsyncLocalStorage } from 'node:async_hooks';

const deadlines = new AsyncLocalStorage<number>();

/** Runs `fn` with every tool call inside it bounded by `deadline` (epoch ms). A nested call keeps the earlier one. */
export function withDeadline<T>(deadline: number, fn: () => Promise<T>): Promise<T> {
  const outer = deadlines.getStore();
  return deadlines.run(outer === undefined ? deadline : Math.min(outer, deadline), fn);
}

/** Milliseconds left before the current deadline; undefined outside one. */
export function timeLeftMs(): number | undefined {
  const d = deadlines.getStore();
  return d === undefined ? undefined : d - Date.now();
}

/** `wanted` (or no limit) cut to what is left of the current deadline, at least 1 ms. */
export function boundedTimeout(wanted: number | undefined): number | undefined {
  const left = timeLeftMs();
  if (left === undefined) return wanted;
  const bounded = Math.max(1, left);
  return wanted === undefined ? bounded : Math.min(wanted, bounded);
}
