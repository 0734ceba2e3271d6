/**
 * Bandwidth limit as a wrapper around any target: for images it only supplies `pace`, which every driver awaits
 * before reading the next chunk of the source, so the limit is not copied into drivers; a small object (a chunk of a
 * chunk repository, an index, a manifest) waits for its whole length before it is sent.
 */
import type { PutImageOptions, PutImageResult, StorageTarget } from './contract';

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** A pacer shared by all transfers through one wrapped target: the sum stays under `bytesPerSecond`. */
export function createPacer(bytesPerSecond: number): (bytes: number, signal?: AbortSignal) => Promise<void> {
  let nextFree = 0;
  return async (bytes, signal) => {
    const now = Date.now();
    const start = Math.max(now, nextFree);
    nextFree = start + (bytes / bytesPerSecond) * 1000;
    if (start > now) await sleep(start - now, signal);
  };
}

export function withBandwidthLimit(target: StorageTarget, bytesPerSecond: number): StorageTarget {
  if (!(bytesPerSecond > 0)) return target;
  const pace = createPacer(bytesPerSecond);
  return {
    get displayUrl() {
      return target.displayUrl;
    },
    get capabilities() {
      return target.capabilities;
    },
    putImage(key: string, sourcePath: string, opts: PutImageOptions = {}): Promise<PutImageResult> {
      const inner = opts.pace;
      return target.putImage(key, sourcePath, {
        ...opts,
        pace: async (bytes, signal) => {
          await pace(bytes, signal);
          if (inner) await inner(bytes, signal);
        },
      });
    },
    // chunks, indexes and manifests count too: a chunk repository sends all of its data through putBatched
    putManifest: async (key, body) => {
      await pace(body.length);
      return target.putManifest(key, body);
    },
    putBatched: async (key, body, opts) => {
      await pace(body.length);
      return target.putBatched(key, body, opts);
    },
    flush: () => target.flush(),
    get: (key, range) => target.get(key, range),
    getBuffer: (key, opts) => target.getBuffer(key, opts),
    checkLocation: () => target.checkLocation(),
    stat: (key) => target.stat(key),
    list: (prefix) => target.list(prefix),
    listTop: () => target.listTop(),
    touch: (key) => target.touch(key),
    delete: (key) => target.delete(key),
    removeUnfinished: (prefix) => target.removeUnfinished(prefix),
    close: () => target.close(),
    ...(target.objectLock ? { objectLock: target.objectLock } : {}),
  };
}
