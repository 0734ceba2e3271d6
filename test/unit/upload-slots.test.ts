/** A worker's upload places per target (`--max-concurrent-uploads`): the cap, the order, other targets, a cancel. */
import { uploadSlots } from '../../src/activities/upload-slots';

const tick = () => new Promise((r) => setImmediate(r));

describe('upload places per target', () => {
  test('at most N hold a place on one target; the next waiter gets a freed place, in the order they came', async () => {
    const slots = uploadSlots(2);
    const got: string[] = [];
    const take = (name: string, target = 's3://b/x') =>
      slots.acquire(target).then((release) => {
        got.push(name);
        return release;
      });
    const a = take('a');
    const b = take('b');
    const c = take('c');
    const d = take('d');
    await tick();
    expect(got).toEqual(['a', 'b']);
    expect(slots.active('s3://b/x')).toBe(2);
    // another target is not held up by this one's queue
    const other = await take('other', 'file:///backups');
    expect(got).toEqual(['a', 'b', 'other']);
    (await b)();
    await tick();
    expect(got).toEqual(['a', 'b', 'other', 'c']);
    expect(slots.active('s3://b/x')).toBe(2);
    // giving a place back twice frees one place only
    const releaseA = await a;
    releaseA();
    releaseA();
    await tick();
    expect(got).toEqual(['a', 'b', 'other', 'c', 'd']);
    expect(slots.active('s3://b/x')).toBe(2);
    (await c)();
    (await d)();
    other();
    expect(slots.active('s3://b/x')).toBe(0);
    expect(slots.active('file:///backups')).toBe(0);
  });

  test('a waiter that is cancelled leaves the queue: its place goes to the next one', async () => {
    const slots = uploadSlots(1);
    const first = await slots.acquire('t');
    const abort = new AbortController();
    const cancelled = slots.acquire('t', abort.signal);
    const next = slots.acquire('t');
    abort.abort(new Error('the backup was cancelled'));
    await expect(cancelled).rejects.toThrow('the backup was cancelled');
    first();
    const release = await next;
    expect(slots.active('t')).toBe(1);
    release();
    expect(slots.active('t')).toBe(0);
    // already cancelled: no place is taken
    await expect(slots.acquire('t', abort.signal)).rejects.toThrow('the backup was cancelled');
    expect(slots.active('t')).toBe(0);
  });

  test('without a cap every upload starts at once', async () => {
    const slots = uploadSlots(undefined);
    const all = await Promise.all(Array.from({ length: 50 }, () => slots.acquire('t')));
    expect(slots.active('t')).toBe(50);
    for (const r of all) r();
    expect(slots.active('t')).toBe(0);
  });
});

test('onWait is called only by an acquire that has to wait', async () => {
  const slots = uploadSlots(1);
  let waits = 0;
  const first = await slots.acquire('t', undefined, () => waits++);
  expect(waits).toBe(0);
  const second = slots.acquire('t', undefined, () => waits++);
  expect(waits).toBe(1);
  first();
  (await second)();
  expect(waits).toBe(1);
});
