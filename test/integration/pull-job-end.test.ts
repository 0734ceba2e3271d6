/**
 * endPullBackup on a real pull job whose end takes longer than its wait (issue #16 follow-up): the activity is called
 * directly (MockActivityEnvironment only supplies the activity Context), as the workflow's retries would call it.
 *
 * "The job outlives the wait" is made certain without timing: the domain's disk is in an IOThread of its own, and the
 * test stops that one thread (a ptrace stop, test/helpers/threads.ts). QEMU then cannot cancel the disk's block job,
 * so libvirt reports the aborted job as running for as long as the thread is stopped, while QEMU's monitor, libvirt
 * and virsh keep answering.
 */
import { lstat, mkdtemp, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createActivities } from '../../src/activities';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { BeginPullInput, PullJob, StagingArea } from '../../src/shared/activities';
import type { DomainInfo } from '../../src/shared/types';
import { openTarget } from '../../src/storage/registry';
import { useFixtureDomains } from '../fixtures/domains';
import { virsh } from '../helpers/images';
import { requireLibvirt, stackEnv } from '../helpers/stack';
import { iothreadIds, stopThread } from '../helpers/threads';
import type { StoppedThread } from '../helpers/threads';

jest.setTimeout(10 * 60_000);

const present = (p: string) =>
  lstat(p).then(
    () => true,
    () => false,
  );

describe('endPullBackup on a real pull job', () => {
  const newDomain = useFixtureDomains();
  let work: string;

  beforeAll(async () => {
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-pull-job-end-'));
  });
  afterAll(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  async function jobType(domain: string): Promise<string> {
    const out = await virsh('domjobinfo', domain);
    return /Job type:\s+(\S+)/.exec(out)?.[1] ?? out;
  }

  test('a job still running 10 s after domjobabort keeps its scratch file and socket and fails the attempt as retryable; the retry after it ended cleans up', async () => {
    const dom = await newDomain({
      prefix: 'ep',
      iothread: true,
      disks: [{ format: 'qcow2', sizeMiB: 32, randomMiB: 8 }],
    });
    const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri, sessions: false });
    const acts = createActivities({
      hypervisor: hv,
      stateDir: join(work, 'state'),
      openTarget: (u, o) => openTarget(u, { ...o, env: {} }),
    });
    // the short steps' start-to-close timeout (src/workflows/backup.ts): each attempt's deadline comes from it
    const env = new MockActivityEnvironment({ startToCloseTimeoutMs: 5 * 60_000 });
    const backupId = `${dom.name}-ep-1`;
    let stopped: StoppedThread | undefined;
    try {
      const info = (await env.run(acts.inspectDomain, { domain: dom.name })) as DomainInfo;
      const staging = (await env.run(acts.prepareStaging, {
        backupId,
        domain: dom.name,
        targets: [`s3://${stackEnv().s3.bucket}/never-written`],
        writtenByQemu: true,
      })) as StagingArea;
      const job: BeginPullInput = { backupId, domain: dom.name, disks: info.disks, stagingDir: staging.dir };
      const begun = (await env.run(acts.beginPullBackup, job)) as PullJob;
      expect(await jobType(dom.name)).toBe('Unbounded');
      const scratch = begun.scratch[0]!;
      expect(await present(scratch)).toBe(true);
      expect(await present(begun.socket)).toBe(true);

      const [tid] = await iothreadIds(dom.name);
      expect(tid).toBeGreaterThan(0);
      stopped = await stopThread(tid!);
      await expect(env.run(acts.endPullBackup, job)).rejects.toMatchObject({
        message: `the pull backup job of domain ${dom.name} did not end within 10 s of domjobabort; its scratch files are kept and the step is retried (if the backup fails, \`vmbackup recover --domain ${dom.name}\` ends the job and removes them)`,
        type: 'BackupJobFailed',
        nonRetryable: false,
      });
      // nothing of the running job was removed under QEMU
      expect(await jobType(dom.name)).toBe('Unbounded');
      expect(await present(scratch)).toBe(true);
      expect(await present(begun.socket)).toBe(true);

      await stopped.release();
      stopped = undefined;
      // the retry: the job ends (aborted again or already gone), then its files go
      await env.run(acts.endPullBackup, job);
      expect(await jobType(dom.name)).toBe('None');
      expect(await present(scratch)).toBe(false);
      expect(await present(dirname(begun.socket))).toBe(false);
      expect(await dom.state()).toBe('running');
      // and again: nothing left to do
      await env.run(acts.endPullBackup, job);
      await env.run(acts.cleanupStaging, { backupId, stagingDir: staging.dir });
      expect(await present(staging.dir)).toBe(false);
    } finally {
      await stopped?.release();
      hv.close();
    }
  });
});
