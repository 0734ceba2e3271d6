/**
 * endPullBackup on a real pull job whose end takes longer than its wait (issue #16 follow-up), called directly
 * (MockActivityEnvironment only supplies the activity Context) as the workflow's retries call it; and what the backup
 * workflow does when that step fails on every attempt.
 *
 * "The job outlives the wait" is made certain without timing: the domain's disk is in an IOThread of its own, and the
 * test stops that one thread (a ptrace stop, test/helpers/threads.ts). QEMU then cannot cancel the disk's block job,
 * so libvirt reports the aborted job as running for as long as the thread is stopped, while QEMU's monitor, libvirt
 * and virsh keep answering. No NBD client may be connected then: QEMU 7.2 aborts ("nbd_blockdev_client_closed:
 * Assertion `qemu_in_main_thread() && nbd_server' failed") when a client of an IOThread disk's export disconnects.
 * So the workflow test runs a real pull backup of a domain without IOThread and replaces only endPullBackup by a step
 * that keeps failing (pure orchestration: the real job is left running, as a job that does not end would be).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Client } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { DefaultLogger, Runtime } from '@temporalio/worker';
import { createActivities } from '../../src/activities';
import { startBackup } from '../../src/client/backups';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { BeginPullInput, PullJob, StagingArea } from '../../src/shared/activities';
import type { DomainInfo } from '../../src/shared/types';
import { openTarget } from '../../src/storage/registry';
import { useFixtureDomains } from '../fixtures/domains';
import { initTestRepository, localRepoTarget } from '../helpers/chunk-repo';
import { startInProcessHostWorker } from '../helpers/host-worker';
import { checkpoints, jobType, present } from '../helpers/pull-jobs';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { iothreadIds, stopThread } from '../helpers/threads';
import type { StoppedThread } from '../helpers/threads';
import { temporalClient, uniqueHost } from '../helpers/vmbackup';

jest.setTimeout(10 * 60_000);

const PASSWORD = 'a pull job that outlives its end step';

describe('endPullBackup on a real pull job', () => {
  const newDomain = useFixtureDomains();
  let work: string;
  let closeClient: (() => Promise<void>) | undefined;
  let client: Client;

  beforeAll(async () => {
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-pull-job-end-'));
    Runtime.install({ logger: new DefaultLogger('WARN') });
  });
  afterAll(async () => {
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

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
      expect(await jobType(dom)).toBe('Unbounded');
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
      expect(await jobType(dom)).toBe('Unbounded');
      expect(await present(scratch)).toBe(true);
      expect(await present(begun.socket)).toBe(true);

      await stopped.release();
      stopped = undefined;
      // the retry: the job ends (aborted again or already gone), then its files go
      await env.run(acts.endPullBackup, job);
      expect(await jobType(dom)).toBe('None');
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

  test('a pull backup whose job end step fails on every attempt keeps its staging dir and checkpoint under the running job', async () => {
    await requireTemporal();
    ({ client, close: closeClient } = await temporalClient());
    const env = stackEnv();
    const dom = await newDomain({ prefix: 'ep', disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 8 }] });
    const repo = await localRepoTarget(work, 'repo');
    await initTestRepository(repo.target, PASSWORD);
    const host = uniqueHost('ep');
    const hypervisor = createVirshHypervisor({ uri: env.libvirt.uri });
    const real = createActivities({
      hypervisor,
      stateDir: env.stateDir,
      repositoryPassword: PASSWORD,
      openTarget: (url, options) => openTarget(url, { ...options, env: {} }),
    });
    // The orchestration under test: what the workflow does when endPullBackup keeps failing (a job that does not
    // end, as the first test makes real). The real job is left running, as it would be then.
    const ends: BeginPullInput[] = [];
    let stagingCleanups = 0;
    let checkpointDrops = 0;
    const activities = {
      ...real,
      endPullBackup: async (input: BeginPullInput) => {
        ends.push(input);
        throw ApplicationFailure.retryable('injected: the pull job did not end', 'BackupJobFailed');
      },
      cleanupStaging: async (input: Parameters<typeof real.cleanupStaging>[0]) => {
        stagingCleanups++;
        return real.cleanupStaging(input);
      },
      dropCheckpoint: async (input: Parameters<typeof real.dropCheckpoint>[0]) => {
        checkpointDrops++;
        return real.dropCheckpoint(input);
      },
    };
    const worker = await startInProcessHostWorker(host, activities);
    const mock = new MockActivityEnvironment({ startToCloseTimeoutMs: 5 * 60_000 });
    try {
      const { backupId, handle } = await startBackup(client, {
        domain: dom.name,
        host,
        method: 'pull',
        targets: [repo.url],
        options: { heartbeatTimeoutSeconds: 10, level: 'full' },
      });
      await expect(handle.result()).rejects.toThrow();
      // every attempt the short steps allow, then the backup failed with the step's sentence
      expect(ends).toHaveLength(6);
      const job = ends[0]!;
      const scratch = join(job.stagingDir, 'vda.scratch.qcow2');
      // QEMU's files under the running job are kept, and so is the checkpoint the job's bitmaps belong to
      expect(await jobType(dom)).toBe('Unbounded');
      expect(await present(scratch)).toBe(true);
      expect({ stagingCleanups, checkpointDrops }).toEqual({ stagingCleanups: 0, checkpointDrops: 0 });
      expect(await checkpoints(dom)).toEqual([`vmbackup.${backupId}`]);
      // no manifest: nothing was committed
      expect(await present(join(repo.dir, dom.name, backupId, 'manifest.json'))).toBe(false);

      // what the retried step (or recovery) does once it can: end the job, then staging goes
      await mock.run(real.endPullBackup, job);
      expect(await jobType(dom)).toBe('None');
      expect(await present(scratch)).toBe(false);
      await mock.run(real.cleanupStaging, { backupId, stagingDir: job.stagingDir });
      expect(await present(job.stagingDir)).toBe(false);
      expect(await dom.state()).toBe('running');
    } finally {
      await worker.stop();
      hypervisor.close();
      await repo.target.close();
    }
  });
});
