/**
 * A worker's cap of concurrent uploads per target (`vmbackup worker --max-concurrent-uploads N`): shipImage takes
 * one of its target's N places before it sends a byte and gives it back when the put ends. It caps this worker's
 * uploads only (each host's worker has its own places); the backups themselves are capped by the host's backup
 * slots, which Temporal hands out (src/worker/slots.ts). The wait runs inside the activity, which heartbeats it,
 * so `vmbackup status` says the backup waits for an upload place.
 */

export interface UploadSlots {
  /**
   * Resolves with the function that gives the place back once `target` has a free one (`onWait` is called first
   * when there is none now); rejects when `signal` aborts.
   */
  acquire(target: string, signal?: AbortSignal, onWait?: () => void): Promise<() => void>;
  /** uploads to `target` that hold a place now */
  active(target: string): number;
}

interface Waiter {
  grant: () => void;
}

/** `max` places per target; undefined: no cap (every acquire resolves at once). */
export function uploadSlots(max: number | undefined): UploadSlots {
  const active = new Map<string, number>();
  const waiting = new Map<string, Waiter[]>();
  const release = (target: string) => {
    const next = waiting.get(target)?.shift();
    if (next) return next.grant(); // the place passes to the next waiter: the count stays
    const n = (active.get(target) ?? 1) - 1;
    if (n > 0) active.set(target, n);
    else active.delete(target);
  };
  const releaser = (target: string) => {
    let done = false;
    return () => {
      if (!done) release(target);
      done = true;
    };
  };
  return {
    active: (target) => active.get(target) ?? 0,
    acquire(target, signal, onWait) {
      if (signal?.aborted) return Promise.reject(signal.reason ?? new Error('cancelled'));
      if (max === undefined || (active.get(target) ?? 0) < max) {
        active.set(target, (active.get(target) ?? 0) + 1);
        return Promise.resolve(releaser(target));
      }
      return new Promise((resolve, reject) => {
        const queue = waiting.get(target) ?? [];
        waiting.set(target, queue);
        const onAbort = () => {
          const i = queue.indexOf(waiter);
          if (i >= 0) queue.splice(i, 1);
          reject(signal?.reason ?? new Error('cancelled'));
        };
        const waiter: Waiter = {
          grant: () => {
            signal?.removeEventListener('abort', onAbort);
            resolve(releaser(target));
          },
        };
        queue.push(waiter);
        signal?.addEventListener('abort', onAbort, { once: true });
        onWait?.();
      });
    },
  };
}

/**
 * Runs `fn` holding one of this worker's places on `target` (`fn` at once when there is no cap). When the place is
 * not free now, `waiting(true)` is called, and `waiting(false)` once it is granted: the step heartbeats it, so
 * `vmbackup status` says the step waits for an upload place. A cancel while waiting rejects and takes no place.
 */
export async function withUploadPlace<T>(
  slots: UploadSlots | undefined,
  target: string,
  signal: AbortSignal | undefined,
  waiting: (waits: boolean) => void,
  fn: () => Promise<T>,
): Promise<T> {
  if (!slots) return fn();
  let waited = false;
  const release = await slots.acquire(target, signal, () => {
    waited = true;
    waiting(true);
  });
  try {
    if (waited) waiting(false);
    return await fn();
  } finally {
    release();
  }
}
