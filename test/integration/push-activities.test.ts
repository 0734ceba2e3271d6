/**
 * The push-mode activities against a real libvirt/QEMU (TCG) domain, called directly (MockActivityEnvironment only
 * supplies the activity Context): what beginPushBackup asks libvirt on a first attempt, and a retry after a dead
 * attempt whose job already created the backup's checkpoint.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createPushActivities } from '../../src/activities/push';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { BackupJobStats, PushBackupInput } from '../../src/shared/activities';
import { checkpointName } from '../../src/shared/names';
import { useFixtureDomains } from '../fixtures/domains';
import { exists } from '../helpers/images';
import { requireLibvirt, stackEnv } from '../helpers/stack';

describe('push activities on a real domain', () => {
  const newDomain = useFixtureDomains();
  let work: string;

  beforeAll(async () => {
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-push-activities-'));
  });
  afterAll(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  test("a first beginPushBackup runs backup-begin alone; a retry after a dead attempt's job made the checkpoint deletes it and backs up", async () => {
    const dom = await newDomain({
      prefix: 'pushact',
      disks: [{ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x5c, offsetMiB: 0, lengthMiB: 4 }] }],
    });
    // a virsh that logs how it was started (a session is `-c URI` alone; a one-shot run names its command)
    const log = join(work, 'virsh.log');
    const virsh = join(work, 'virsh');
    await writeFile(virsh, `#!/bin/sh\necho "$*" >>"${log}"\nexec virsh "$@"\n`, { mode: 0o755 });
    const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri, virsh });
    const acts = createPushActivities({ hypervisor: hv, stateDir: join(work, 'state'), pollIntervalMs: 50 });
    const env = new MockActivityEnvironment();
    const backupId = `${dom.name}-pushact-1`;
    const checkpoint = { name: checkpointName(backupId), disks: ['vda'] };
    try {
      const info = await acts.inspectDomain({ domain: dom.name });
      // the backup's target: staging goes under the state dir (a target outside it would stage in its own .staging)
      const target = `s3://${stackEnv().s3.bucket}/never-written`;
      const staging = await acts.prepareStaging({ backupId, domain: dom.name, targets: [target], writtenByQemu: true });
      const input: PushBackupInput = {
        backupId,
        domain: dom.name,
        disks: info.disks,
        stagingDir: staging.dir,
        checkpoint,
      };
      const oneShots = async () =>
        (await readFile(log, 'utf8'))
          .split('\n')
          .map((l) => l.split(' ')[2])
          .filter((c): c is string => !!c);

      await writeFile(log, '');
      const first = await acts.beginPushBackup(input);
      expect(first.attached).toBe(false);
      expect(await oneShots()).toEqual(['backup-begin']);
      await env.run(acts.awaitBackupJob, { backupId, domain: dom.name, images: first.images });
      const made = (await hv.listCheckpoints(dom.name)).find((c) => c.name === checkpoint.name);
      expect(made).toBeDefined();

      // the worker died after that job: the retry finds no job, the staging file and the job's checkpoint
      await writeFile(log, '');
      const retry = await acts.beginPushBackup(input);
      expect(retry.attached).toBe(false);
      expect(await oneShots()).toEqual(['backup-begin', 'checkpoint-delete', 'backup-begin']);
      const stats = (await env.run(acts.awaitBackupJob, {
        backupId,
        domain: dom.name,
        images: retry.images,
      })) as BackupJobStats;
      expect(stats.bytes).toBeGreaterThan(0);
      expect(await exists(retry.images[0]!.path)).toBe(true);
      expect((await hv.listCheckpoints(dom.name)).map((c) => c.name)).toEqual([checkpoint.name]);
      await acts.cleanupStaging({ backupId, stagingDir: staging.dir });
    } finally {
      hv.close();
    }
  });
});
