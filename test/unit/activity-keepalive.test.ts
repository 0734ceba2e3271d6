/**
 * The worker heartbeats for the workflow's short steps while they run, so a worker that dies in one is noticed within
 * the heartbeat timeout (a CI run once waited the whole 5-minute start-to-close of shipVmFiles after a kill -9).
 */
import { MockActivityEnvironment } from '@temporalio/testing';
import { KEEPALIVE_STEPS, createActivities, keptAlive, withAttemptDeadlines } from '../../src/activities';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function counting(info: ConstructorParameters<typeof MockActivityEnvironment>[0]) {
  const env = new MockActivityEnvironment(info);
  const beats: unknown[] = [];
  env.on('heartbeat', (d: unknown) => beats.push(d));
  return { env, beats };
}

test('keptAlive heartbeats about three times per heartbeat timeout while the step runs, and stops after it', async () => {
  const { env, beats } = counting({ heartbeatTimeoutMs: 600 });
  const result = await env.run(() => keptAlive(() => sleep(1_000).then(() => 'done')));
  expect(result).toBe('done');
  // one beat every 200 ms for 1 s: about 5 (timers under load may fire late, never early)
  expect(beats.length).toBeGreaterThanOrEqual(3);
  expect(beats.length).toBeLessThanOrEqual(5);
  expect(beats.every((d) => d === undefined)).toBe(true);
  const after = beats.length;
  await sleep(500);
  expect(beats.length).toBe(after);
});

test('keptAlive stops beating when the step fails, and passes the failure on', async () => {
  const { env, beats } = counting({ heartbeatTimeoutMs: 600 });
  await expect(
    env.run(() =>
      keptAlive(async () => {
        await sleep(450);
        throw new Error('libvirt said no');
      }),
    ),
  ).rejects.toThrow('libvirt said no');
  const after = beats.length;
  expect(after).toBeGreaterThanOrEqual(1);
  await sleep(500);
  expect(beats.length).toBe(after);
});

test('keptAlive sends nothing without a heartbeat timeout, and nothing from a local activity', async () => {
  for (const info of [{}, { heartbeatTimeoutMs: 300, isLocal: true }]) {
    const { env, beats } = counting(info);
    await env.run(() => keptAlive(() => sleep(700)));
    expect(beats).toEqual([]);
  }
});

test('the worker keeps alive exactly the short steps, each of which it runs', async () => {
  const activities = createActivities({
    hypervisor: {} as never,
    stateDir: '/nonexistent',
    openTarget: () => {
      throw new Error('no target in this test');
    },
  });
  for (const name of KEEPALIVE_STEPS)
    expect(typeof (activities as unknown as Record<string, unknown>)[name]).toBe('function');
  // through the worker's wrapper: a kept-alive step beats, another step does not
  const { env, beats } = counting({ heartbeatTimeoutMs: 300 });
  const wrapped = withAttemptDeadlines({
    shipVmFiles: () => sleep(500),
    copyBaseImages: () => sleep(500),
  });
  await env.run(wrapped.shipVmFiles, undefined);
  expect(beats.length).toBeGreaterThanOrEqual(2);
  beats.length = 0;
  await env.run(wrapped.copyBaseImages, undefined);
  expect(beats).toEqual([]);
});
