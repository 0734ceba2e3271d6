/**
 * BufferPool (src/shared/buffer-pool.ts): buffers come back for reuse only once given, never twice to two takers, and
 * a buffer moved to a thread and back (another ArrayBuffer object over the same memory) is taken back too; a shared
 * pool takes back only the objects it made, each once.
 */
import { isArrayBuffer, isSharedArrayBuffer } from 'node:util/types';
import { MessageChannel } from 'node:worker_threads';
import { BufferPool } from '../../src/shared/buffer-pool';

test('a buffer given back is the next one taken; none is made while one waits', () => {
  const pool = new BufferPool(1024);
  const a = pool.take();
  const b = pool.take(100);
  expect(a.length).toBe(1024);
  expect(b.length).toBe(100);
  expect(a.buffer).not.toBe(b.buffer);
  expect(pool.allocated).toBe(2);
  pool.give(b);
  const c = pool.take();
  expect(c.buffer).toBe(b.buffer);
  expect(c.length).toBe(1024);
  expect(pool.allocated).toBe(2);
});

test('a buffer given twice is kept once: two takers never share one', () => {
  const pool = new BufferPool(64);
  const a = pool.take();
  pool.give(a);
  pool.give(a.subarray(8));
  expect(pool.idle).toBe(1);
  const x = pool.take();
  const y = pool.take();
  expect(x.buffer).not.toBe(y.buffer);
});

test('foreign sizes, shared memory, detached buffers and a full pool are not kept', () => {
  const pool = new BufferPool(64, 1);
  pool.give(Buffer.alloc(32));
  pool.give(new Uint8Array(new SharedArrayBuffer(64)));
  const moved = pool.take();
  structuredClone(moved.buffer, { transfer: [moved.buffer as ArrayBuffer] });
  pool.give(moved);
  expect(pool.idle).toBe(0);
  pool.give(pool.take());
  pool.give(Buffer.allocUnsafeSlow(64));
  expect(pool.idle).toBe(1);
  expect(() => pool.take(65)).toThrow(/does not fit/);
  expect(() => new BufferPool(0)).toThrow(/positive size/);
});

test('a buffer moved to another thread and back is taken back (same memory, new ArrayBuffer object)', async () => {
  const pool = new BufferPool(4096);
  const a = pool.take();
  a.fill(7);
  const { port1, port2 } = new MessageChannel();
  const back = new Promise<ArrayBuffer>((resolve) => port2.once('message', (m: ArrayBuffer) => resolve(m)));
  port1.postMessage(a.buffer, [a.buffer as ArrayBuffer]);
  const ab = await back;
  port1.close();
  expect(a.length).toBe(0); // detached here
  pool.give(Buffer.from(ab));
  const again = pool.take();
  expect(pool.allocated).toBe(1);
  expect(again[0]).toBe(7);
});

test('a shared pool makes shared memory and takes back only its own objects, each once', async () => {
  const pool = new BufferPool(4096, 8, { shared: true });
  const a = pool.take();
  expect(a.buffer).toBeInstanceOf(SharedArrayBuffer);
  // another thread's view of the same memory is another object: not taken (CodecPool hands back the caller's own)
  const { port1, port2 } = new MessageChannel();
  const echoed = new Promise<SharedArrayBuffer>((resolve) =>
    port2.once('message', (m: SharedArrayBuffer) => resolve(m)),
  );
  port1.postMessage(a.buffer);
  const theirs = await echoed;
  port1.close();
  expect(theirs).not.toBe(a.buffer);
  pool.give(Buffer.from(theirs));
  pool.give(new Uint8Array(new SharedArrayBuffer(4096)));
  pool.give(Buffer.allocUnsafeSlow(4096));
  expect(pool.idle).toBe(0);
  // its own, given twice (once as a sub-view): kept once, so two takers never share it
  pool.give(a);
  pool.give(a.subarray(16));
  expect(pool.idle).toBe(1);
  const x = pool.take();
  const y = pool.take();
  expect(x.buffer).toBe(a.buffer);
  expect(y.buffer).not.toBe(a.buffer);
  expect(pool.allocated).toBe(2);
});

test('an aligned pool makes whole 64 KiB pages (shared or not) and takes them back', () => {
  const shared = new BufferPool(4 * 1024 * 1024 + 40, 2, { shared: true, aligned: true });
  const a = shared.take();
  expect(isSharedArrayBuffer(a.buffer)).toBe(true);
  // the whole buffer without a length: at least `size`, in whole pages (what CodecPool's encodeInto needs)
  expect(a.length).toBe(4 * 1024 * 1024 + 64 * 1024);
  expect(a.buffer.byteLength % (64 * 1024)).toBe(0);
  expect(shared.take(100)).toHaveLength(100);
  shared.give(a);
  expect(shared.take().buffer).toBe(a.buffer);
  expect(shared.allocated).toBe(2);

  const plain = new BufferPool(100_000, 2, { aligned: true });
  const b = plain.take();
  expect(isArrayBuffer(b.buffer)).toBe(true);
  expect(b.length).toBe(128 * 1024);
  plain.give(b);
  plain.give(Buffer.allocUnsafeSlow(100_000)); // not of the pool's memory size
  expect(plain.idle).toBe(1);
  expect(plain.take().buffer).toBe(b.buffer);
});
