/**
 * A small pool of worker threads for the chunk codec (SHA-256/HMAC ids, zstd, AES-256-GCM): a backup or restore then
 * uses every core instead of one, while the main thread reads the disk and talks to the target. One pool per process
 * (`codecPool()`), as many threads as cores, started on first use and stopped after a while without work. Buffers
 * are moved to and from the threads, not copied, when the caller hands them over; a buffer over shared memory
 * (BufferPool's shared pools) is not moved but lent, and the caller gets back views of the very objects it gave
 * (the reply is rebound to them), so that a pool can know its buffers by identity. At most `maxQueued` jobs wait:
 * `run` waits for room beyond that. A thread that dies rejects the job it ran with one sentence (and the pool
 * starts another for the next job): nothing hangs.
 */
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { isAnyArrayBuffer, isSharedArrayBuffer } from 'node:util/types';
import { Worker } from 'node:worker_threads';
import { movable } from '../../shared/buffer-pool';
import type { ChunkCodec, DecodeOptions, ObjectType } from './codec';
import type { RepositoryConfig } from './config';
import { ChunkFormatError } from './errors';
import type { ChunkFormatErrorKind } from './errors';

/** What a thread needs of a repository's codec (the authentication key never leaves the main thread). */
export interface CodecParams {
  config: RepositoryConfig;
  keys?: { encKey: Uint8Array; idKey: Uint8Array };
  zstd: 'node' | 'wasm';
  where: string;
}

export type CodecJob = { seq: number; codec: CodecParams; data: Uint8Array; out?: Uint8Array } & JobBody;

export interface CodecReply {
  seq: number;
  id?: string;
  data?: Uint8Array;
  /** encodeInto's object, decodeInto's plaintext: a view of the job's `out` (moved back) */
  body?: Uint8Array;
  /** encodeInto with `bodySha256`: the hex SHA-256 of the object */
  bodySha256?: string;
  error?: { message: string; kind?: ChunkFormatErrorKind; objectId?: string | undefined };
}

type JobBody =
  | { op: 'id' }
  | { op: 'encode'; type: ObjectType; id: string; bodySha256?: boolean }
  | { op: 'decode'; type: ObjectType; id: string; checkId: boolean };

interface Pending {
  job: CodecJob;
  resolve: (r: CodecReply) => void;
  reject: (err: Error) => void;
}

interface Thread {
  worker: Worker;
  busy?: Pending;
}

/** Stop the threads after this long without a job (a worker process idles between backups). */
const IDLE_MS = 10_000;

/** Where the thread's script is: next to this file (dist/), from the bundled CLI (dist/cli), or the source (tests). */
function threadScript(): { file: string; eval: boolean } {
  for (const js of [
    join(__dirname, 'codec-worker.js'),
    join(__dirname, '..', 'repository', 'chunks', 'codec-worker.js'),
  ])
    if (existsSync(js)) return { file: js, eval: false };
  const ts = join(__dirname, 'codec-worker.ts');
  // running from the TypeScript sources (jest, from the checkout): compile the thread's modules as they are required
  const code = `
    const ts = require('typescript');
    const fs = require('node:fs');
    require.extensions['.ts'] = (m, f) => m._compile(ts.transpileModule(fs.readFileSync(f, 'utf8'), {
      compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true },
      fileName: f,
    }).outputText, f);
    require(${JSON.stringify(ts)});`;
  return { file: code, eval: true };
}

export class CodecPool {
  private readonly threads: Thread[] = [];
  private readonly queue: Pending[] = [];
  private readonly roomWaiters: Array<() => void> = [];
  private seq = 0;
  private idle: NodeJS.Timeout | undefined;
  private readonly script = threadScript();

  constructor(
    readonly size: number = Math.max(1, availableParallelism()),
    readonly maxQueued: number = 4 * Math.max(1, size),
  ) {}

  /** The chunk id of `data` (not all-zero: the caller checks that); `data` comes back with it. */
  async id(codec: ChunkCodec, data: Uint8Array, handOver = false): Promise<{ id: string; data: Buffer }> {
    const r = await this.run(codec, { op: 'id' }, data, handOver);
    return { id: r.id!, data: asBuffer(r.data!) };
  }

  /** The stored object for `plaintext` (encodeObject in a thread). */
  async encode(
    codec: ChunkCodec,
    type: ObjectType,
    id: string,
    plaintext: Uint8Array,
    handOver = false,
  ): Promise<Buffer> {
    return asBuffer((await this.run(codec, { op: 'encode', type, id }, plaintext, handOver)).data!);
  }

  /**
   * The stored object for `plaintext`, written into `out` (a buffer of at least maxObjectBytes): both buffers move to
   * the thread and come back, `body` a view of out's memory, `plaintext` the same bytes, so that the caller can reuse
   * both (BufferPool) instead of allocating per chunk. Both must be whole buffers (their own ArrayBuffer).
   */
  async encodeInto(
    codec: ChunkCodec,
    type: ObjectType,
    id: string,
    plaintext: Uint8Array,
    out: Uint8Array,
    opts: { sha256?: boolean } = {},
  ): Promise<{ body: Buffer; plaintext: Buffer; sha256?: string }> {
    const job = { op: 'encode' as const, type, id, ...(opts.sha256 ? { bodySha256: true } : {}) };
    const r = await this.run(codec, job, plaintext, true, out);
    return {
      body: asBuffer(r.body!),
      plaintext: asBuffer(r.data!),
      ...(r.bodySha256 !== undefined ? { sha256: r.bodySha256 } : {}),
    };
  }

  /** The verified plaintext of a stored object (decodeObject in a thread; `opts` as decodeObject's). */
  async decode(
    codec: ChunkCodec,
    type: ObjectType,
    id: string,
    body: Uint8Array,
    handOver = false,
    opts: DecodeOptions = {},
  ): Promise<Buffer> {
    const job = { op: 'decode', type, id, checkId: opts.checkId ?? true } as const;
    return asBuffer((await this.run(codec, job, body, handOver)).data!);
  }

  /**
   * decode into `out` (a whole buffer of at least the plaintext's size, e.g. from a BufferPool): the body moves to the
   * thread for good, `out` moves there and back; what resolves is a view of out's memory.
   */
  async decodeInto(
    codec: ChunkCodec,
    type: ObjectType,
    id: string,
    body: Uint8Array,
    out: Uint8Array,
    opts: DecodeOptions = {},
  ): Promise<Buffer> {
    const job = { op: 'decode', type, id, checkId: opts.checkId ?? true } as const;
    return asBuffer((await this.run(codec, job, body, true, out)).body!);
  }

  /** Threads running now (tests; diagnostics). */
  get running(): readonly Worker[] {
    return this.threads.map((t) => t.worker);
  }

  /** Stops every thread; jobs waiting or running are rejected. The pool starts threads again on the next job. */
  async close(): Promise<void> {
    clearTimeout(this.idle);
    const threads = this.threads.splice(0);
    await Promise.all(threads.map((t) => t.worker.terminate()));
  }

  private async run(
    codec: ChunkCodec,
    body: JobBody,
    data: Uint8Array,
    handOver: boolean,
    out?: Uint8Array,
  ): Promise<CodecReply> {
    while (this.queue.length >= this.maxQueued) await new Promise<void>((r) => this.roomWaiters.push(r));
    // a buffer handed over that is the whole of its memory moves to the thread; anything else is copied once
    const own = handOver && isWhole(data) ? data : new Uint8Array(data);
    if (out && (!isWhole(out) || out.buffer === own.buffer))
      throw new ChunkFormatError('invalid-argument', 'An object is encoded into a whole buffer of its own.');
    const job = { seq: ++this.seq, codec: params(codec), data: own, ...(out ? { out } : {}), ...body } as CodecJob;
    const reply = await new Promise<CodecReply>((resolve, reject) => {
      this.queue.push({ job, resolve, reject });
      this.dispatch();
    });
    // shared memory came back as the thread's own objects over it: hand out views of the caller's (reply.data derives
    // from the job's data, reply.body from its out: the thread checks that; it never makes shared memory of its own)
    if (reply.data) reply.data = rebind(reply.data, own);
    if (reply.body && out) reply.body = rebind(reply.body, out);
    if (reply.error) {
      const e = reply.error;
      if (e.kind)
        throw new ChunkFormatError(e.kind, e.message, e.objectId !== undefined ? { objectId: e.objectId } : {});
      throw new Error(e.message);
    }
    return reply;
  }

  private dispatch(): void {
    clearTimeout(this.idle);
    while (this.queue.length > 0) {
      let thread = this.threads.find((t) => !t.busy);
      if (!thread && this.threads.length < this.size) thread = this.start();
      if (!thread) break;
      const next = this.queue.shift()!;
      this.roomWaiters.shift()?.();
      thread.busy = next;
      thread.worker.ref();
      thread.worker.postMessage(next.job, movable([next.job.data, next.job.out]));
    }
    if (this.queue.length === 0 && this.threads.every((t) => !t.busy)) {
      this.idle = setTimeout(() => void this.close(), IDLE_MS);
      this.idle.unref();
    }
  }

  private start(): Thread {
    const worker = new Worker(this.script.file, { eval: this.script.eval });
    const thread: Thread = { worker };
    this.threads.push(thread);
    worker.unref();
    const gone = (why: string) => {
      const i = this.threads.indexOf(thread);
      if (i >= 0) this.threads.splice(i, 1);
      const job = thread.busy;
      thread.busy = undefined;
      job?.reject(new Error(`The chunk codec thread stopped (${why}) while it ${verb(job.job)}; the step is retried.`));
      this.dispatch();
    };
    worker.on('message', (reply: CodecReply) => {
      const job = thread.busy;
      if (!job || job.job.seq !== reply.seq) return;
      thread.busy = undefined;
      worker.unref();
      job.resolve(reply);
      this.dispatch();
    });
    worker.on('error', (err) => gone(err.message));
    worker.on('exit', (code) => gone(`exit code ${code}`));
    return thread;
  }
}

function verb(job: CodecJob): string {
  if (job.op === 'id') return 'hashed a chunk';
  return `${job.op === 'encode' ? 'encoded' : 'decoded'} the ${job.type} ${job.id}`;
}

function params(codec: ChunkCodec): CodecParams {
  return {
    config: codec.config,
    ...(codec.keys ? { keys: { encKey: codec.keys.encKey, idKey: codec.keys.idKey } } : {}),
    zstd: codec.zstd.implementation,
    where: codec.where,
  };
}

/** A view of the whole of its memory: what can be moved to a thread (or, over shared memory, lent). */
function isWhole(u: Uint8Array): boolean {
  return isAnyArrayBuffer(u.buffer) && u.byteOffset === 0 && u.byteLength === u.buffer.byteLength;
}

/** `view` (from a thread) as a view of `mine` when both are over shared memory of one size: the same memory. */
function rebind(view: Uint8Array, mine: Uint8Array): Uint8Array {
  const theirs = view.buffer;
  const ours = mine.buffer;
  if (!isSharedArrayBuffer(theirs) || !isSharedArrayBuffer(ours)) return view;
  if (theirs.byteLength !== ours.byteLength)
    throw new Error('The chunk codec thread answered with shared memory it was not given.');
  return new Uint8Array(ours, view.byteOffset, view.byteLength);
}

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

let shared: CodecPool | undefined;

/** This process's codec pool (as many threads as cores). */
export function codecPool(): CodecPool {
  shared ??= new CodecPool();
  return shared;
}
