/**
 * Inner timeouts stay inside the activity's Temporal timeout (issue #11 item 7): a virsh or qemu-img child never
 * outlives the attempt that started it, so a retry cannot race it (a retry removing an overlay that the first
 * attempt's snapshot is still creating).
 */
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createActivities, withAttemptDeadlines } from '../../src/activities';
import { withDeadline } from '../../src/hypervisor/deadline';
import { execTool } from '../../src/hypervisor/exec';
import { VirshHypervisor } from '../../src/hypervisor/virsh';

let dir: string;
let slowVirsh: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-deadline-'));
  // a virsh whose every call hangs, like one stuck behind libvirtd's state-change lock
  slowVirsh = join(dir, 'virsh');
  await writeFile(slowVirsh, '#!/bin/sh\nexec sleep 60\n');
  await chmod(slowVirsh, 0o755);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('execTool gives a child no longer than the current deadline', async () => {
  const t0 = Date.now();
  const result = await withDeadline(Date.now() + 300, () => execTool('sleep', ['30'], { timeoutMs: 60_000 }));
  expect(result.timedOut).toBe(true);
  expect(Date.now() - t0).toBeLessThan(10_000);
});

test('a nested deadline never extends the outer one', async () => {
  const t0 = Date.now();
  const result = await withDeadline(Date.now() + 300, () =>
    withDeadline(Date.now() + 60_000, () => execTool('sleep', ['30'])),
  );
  expect(result.timedOut).toBe(true);
  expect(Date.now() - t0).toBeLessThan(10_000);
});

test('without a deadline the caller timeout applies unchanged', async () => {
  const result = await execTool('sh', ['-c', 'sleep 0.2; echo done'], { timeoutMs: 5_000 });
  expect(result.timedOut).toBe(false);
  expect(result.stdout.trim()).toBe('done');
});

test('createOverlays with a hanging virsh fails inside its 3 s start-to-close timeout, not after virsh 120 s', async () => {
  const hypervisor = new VirshHypervisor({ virsh: slowVirsh, uri: 'qemu:///system', sessions: false });
  const activities = createActivities({
    hypervisor,
    stateDir: dir,
    openTarget: () => {
      throw new Error('no target in this test');
    },
  });
  const env = new MockActivityEnvironment({ startToCloseTimeoutMs: 3_000 });
  const t0 = Date.now();
  const outcome = env.run(activities.createOverlays, {
    backupId: 'vm1-20261130T000000Z-abcd',
    domain: 'vm1',
    disks: [
      {
        name: 'vda',
        source: '/var/lib/libvirt/images/vm1.qcow2',
        format: 'qcow2',
        device: 'disk' as const,
        readonly: false,
        shareable: false,
        virtualSize: 1 << 30,
        allocation: 0,
        backingChain: [],
      },
    ],
    quiesce: false,
    requireQuiesce: false,
  });
  await expect(outcome).rejects.toThrow(/did not answer within/);
  // the attempt's margin is 10% of 3 s: the child is gone before Temporal would retry
  expect(Date.now() - t0).toBeLessThan(3_000);
  hypervisor.close();
});

test('every activity is wrapped, and each keeps its name', () => {
  const fake = { inspectDomain: async () => 'x' } as unknown as Parameters<typeof withAttemptDeadlines>[0];
  const wrapped = withAttemptDeadlines(fake);
  expect(Object.keys(wrapped)).toEqual(['inspectDomain']);
});
