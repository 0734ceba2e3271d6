/**
 * A crash in the middle of copying a 1 GiB base: rsync is killed with SIGKILL (as it would be with its
 * worker), and the next attempt of copyBaseImages, given the last heartbeat, continues from the
 * partial file instead of copying the whole disk again.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { MockActivityEnvironment } from '@temporalio/testing';
import { DefaultLogger } from '@temporalio/worker';
import { createSnapshotActivities } from '../../src/activities/snapshot';
import type { CopyHeartbeat } from '../../src/activities/snapshot';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, stackEnv } from '../helpers/stack';
import { identical } from '../helpers/images';

const run = promisify(execFile);
const MiB = 1 << 20;

/** kill -9 our own child process running `comm` (found through /proc by parent pid). */
async function killChildNamed(comm: string): Promise<void> {
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const line = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '');
    const m = /^(\d+) \((.*)\) \S+ (\d+)/.exec(line);
    if (m && m[2] === comm && Number(m[3]) === process.pid) {
      process.kill(Number(m[1]), 'SIGKILL');
      return;
    }
  }
  throw new Error(`no child process named ${comm}`);
}

describe('snapshot copy after a crash', () => {
  const newDomain = useFixtureDomains();
  const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri });
  let work: string;

  beforeAll(async () => {
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-snap-resume-'));
  });
  afterAll(async () => {
    hv.close(); // its virsh shells would outlive this file inside jest's process
    await rm(work, { recursive: true, force: true });
  });

  /** An activity Context of its own for each attempt, as Temporal gives one; heartbeats are collected. */
  function env(heartbeats: CopyHeartbeat[], heartbeatDetails?: unknown) {
    const e = new MockActivityEnvironment({ heartbeatDetails }, { logger: new DefaultLogger('WARN') });
    e.on('heartbeat', (d: CopyHeartbeat) => heartbeats.push(d));
    return { run: <I, O>(fn: (input: I) => Promise<O>, input: I): Promise<O> => e.run(fn, input) };
  }

  test('a killed copy of a 1 GiB disk resumes from its partial file and re-copies only the rest', async () => {
    const size = 1024 * MiB;
    const dom = await newDomain({ prefix: 'snap', disks: [{ format: 'raw', sizeMiB: 1024, randomMiB: 1024 }] });
    const a = createSnapshotActivities({
      hypervisor: hv,
      stateDir: join(work, 'state'),
      pollIntervalMs: 100,
      backupStates: async () => 'running', // recovery is not exercised here
    });
    const backupId = `snap-resume-${process.pid}`;
    const staging = join(work, 'state', 'staging', backupId);
    const dest = join(staging, 'vda.raw');
    const info = await hv.inspect(dom.name);
    const { overlays } = await env([]).run(a.createOverlays, {
      backupId,
      domain: dom.name,
      disks: info.disks,
      quiesce: false,
      requireQuiesce: false,
    });
    const input = { backupId, domain: dom.name, overlays, stagingDir: staging, copyTool: 'rsync' as const };

    // Attempt 1: SIGKILL to rsync once about a third of the disk is in the staging file.
    const first: CopyHeartbeat[] = [];
    let killed = false;
    const watch = setInterval(() => {
      void stat(dest)
        .then(async (s) => {
          if (!killed && s.size >= 320 * MiB) {
            killed = true;
            await killChildNamed('rsync');
          }
        })
        .catch(() => undefined);
    }, 10);
    const attempt1 = env(first).run(a.copyBaseImages, input);
    try {
      await expect(attempt1).rejects.toThrow(/rsync failed \(SIGKILL\)/);
    } finally {
      clearInterval(watch);
    }
    await expect(attempt1).rejects.not.toHaveProperty('nonRetryable', true); // Temporal retries it
    const partial = (await stat(dest)).size;
    const last = first.at(-1);
    expect(last).toMatchObject({ disk: 'vda', phase: 'copy' });
    expect(last!.bytesDone).toBeGreaterThan(0);

    // The guest keeps writing meanwhile: into the overlay, not the base being copied.
    await dom.writeThroughDevice('vda', 0x77, 100, 16);

    // Attempt 2, as Temporal runs it: with the last heartbeat of attempt 1.
    const second: CopyHeartbeat[] = [];
    const images = await env(second, last).run(a.copyBaseImages, input);
    const done = second.filter((h) => h.bytesCopied !== undefined).at(-1);
    console.log(
      `copy of ${size} B killed at ${partial} B (last heartbeat ${last?.bytesDone} B); the retry re-copied ${done?.bytesCopied} B`,
    );
    expect(done?.resumedFrom).toBe(partial);
    expect(done?.bytesCopied).toBe(size - partial);
    expect(done!.bytesCopied!).toBeLessThan(size);
    expect(images[0]?.path).toBe(dest);
    expect(await identical(dest, dom.disks[0]!.path)).toBe(true); // the base is quiet: still the backup point

    await env([]).run(a.commitAndPivot, { backupId, domain: dom.name, overlays });
    await env([]).run(a.removeOverlays, { backupId, domain: dom.name, overlays });
    const { stdout } = await run('qemu-io', [
      '-r',
      '-U',
      '-f',
      'raw',
      '-c',
      'read -P 0x77 100M 16M',
      dom.disks[0]!.path,
    ]);
    expect(stdout).not.toMatch(/Pattern verification failed/);
    expect(await identical(dest, dom.disks[0]!.path)).toBe(false);
  });
});
