/**
 * putImage's data path over NFSv3: pipelined UNSTABLE WRITEs, a COMMIT per checkpoint window (running while the
 * next window is sent), and the write verifier to detect a server restart that lost uncommitted data (then the
 * window since the last COMMIT is sent again).
 */
import type { Hash } from 'node:crypto';
import { stat as fsStat } from 'node:fs/promises';
import type { PutImageOptions } from '../contract';
import { prefixDigest, readChunks } from '../source';
import type { ImageUpload } from '../tree/port';
import { NfsStatusError, Stable, type NfsClient } from './client';
import type { NfsFileTree } from './tree';

/** COMMIT + checkpoint this often: the resume point, and what is re-sent if the server restarts */
const CHECKPOINT_EVERY = 64 << 20;
/** WRITEs in flight on the one TCP connection */
const WRITE_DEPTH = 8;

interface Window {
  commit: Promise<string>;
  verifiers: Set<string>;
  start: number;
  end: number;
  prefix: string;
}

export class NfsUpload implements ImageUpload {
  constructor(
    private readonly fs: NfsFileTree,
    private readonly c: NfsClient,
    private readonly fh: Buffer,
  ) {}

  async copy(
    sourcePath: string,
    start: number,
    size: number,
    hash: Hash,
    opts: PutImageOptions,
    checkpoint: (offset: number, prefixSha256: string) => void,
  ): Promise<void> {
    const { c, fh } = this;
    const wsize = this.fs.wsize(c);
    // COMMIT of one window runs while the next window is sent; its checkpoint is emitted once it is durable
    let pending: Window | undefined;
    const settle = async (w: Window): Promise<void> => {
      let committed = await w.commit;
      for (let attempt = 0; ![...w.verifiers].every((v) => v === committed); attempt++) {
        // the server restarted between WRITE and COMMIT and may have lost the window: send it again
        if (attempt >= 3) throw new NfsStatusError(5, 'NFS3ERR_IO', 'COMMIT verifier keeps changing');
        w.verifiers = await this.sendRange(sourcePath, w.start, w.end, wsize, {
          signal: opts.signal,
          pace: opts.pace,
        });
        committed = await c.commit(fh);
      }
      if (w.end < size) checkpoint(w.end, w.prefix);
    };
    let offset = start;
    while (offset < size) {
      const windowEnd = Math.min(size, offset + CHECKPOINT_EVERY);
      const verifiers = await this.sendRange(sourcePath, offset, windowEnd, wsize, opts, hash);
      if (pending) await settle(pending);
      const commit = c.commit(fh);
      commit.catch(() => undefined); // awaited in settle
      pending = { commit, verifiers, start: offset, end: windowEnd, prefix: prefixDigest(hash) };
      offset = windowEnd;
    }
    if (pending) await settle(pending);
  }

  /** Every window was COMMITted (and its verifier checked) by copy. */
  async finish(): Promise<void> {}

  async abandon(): Promise<void> {}

  /** Pipelined UNSTABLE WRITEs of [start, end) of the source; returns the write verifiers seen. */
  private async sendRange(
    sourcePath: string,
    start: number,
    end: number,
    wsize: number,
    opts: Pick<PutImageOptions, 'signal' | 'pace' | 'onProgress'>,
    hash?: Hash,
  ): Promise<Set<string>> {
    const verifiers = new Set<string>();
    const inFlight = new Set<Promise<void>>();
    let failure: unknown;
    let done = start;
    const total = (await fsStat(sourcePath)).size;
    for await (const chunk of readChunks(sourcePath, {
      start,
      end,
      chunkSize: wsize,
      signal: opts.signal,
      pace: opts.pace,
    })) {
      hash?.update(chunk);
      while (inFlight.size >= WRITE_DEPTH) await Promise.race(inFlight);
      if (failure) break;
      const at = done;
      done += chunk.length;
      const p: Promise<void> = this.fs
        .writeFully(this.c, this.fh, at, chunk, Stable.UNSTABLE)
        .then((v) => {
          verifiers.add(v);
          opts.onProgress?.(at + chunk.length, total);
        })
        .catch((err: unknown) => {
          failure ??= err;
        })
        .finally(() => inFlight.delete(p));
      inFlight.add(p);
    }
    await Promise.all(inFlight);
    if (failure) throw failure;
    return verifiers;
  }
}
