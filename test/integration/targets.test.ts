/**
 * One backup shipped to a local directory, NFS (ganesha, no mount) and S3 (radosgw) at once,
 * through the real worker and CLI; each target is self-describing (list/verify/restore work
 * from it alone), and a target that fails does not sink the others.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireNfs, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { emptyS3Prefix } from '../storage/fixtures';
import { runCli, startWorkerProcess, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';

const run = promisify(execFile);

interface BackupJson {
  backupId: string;
  status: string;
  disks: Array<{ name: string; sha256: string; location: string }>;
  targets: Array<{ target: string; ok: boolean; error?: string }>;
}

describe('backups to several targets', () => {
  const newDomain = useFixtureDomains();
  let work: string;
  let worker: WorkerProcess;
  const host = uniqueHost('tgt');
  const tag = randomBytes(3).toString('hex');

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    await requireNfs();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-targets-'));
    worker = await startWorkerProcess(host);
  });
  afterAll(async () => {
    await worker?.stop();
    if (work) await rm(work, { recursive: true, force: true });
    // the NFS and S3 copies too: radosgw's OSD is 10 GiB, and every run would leave ~100 MiB in it
    await rm(join(stackEnv().nfs.exportDir, `targets-${tag}`), { recursive: true, force: true });
    await emptyS3Prefix(`targets-${tag}`);
  });

  test('file + nfs + s3 in one backup: every target lists, verifies and restores it', async () => {
    const env = stackEnv();
    const dom = await newDomain({
      prefix: 'tgt',
      disks: [
        { format: 'qcow2', sizeMiB: 256, randomMiB: 80 },
        { format: 'raw', sizeMiB: 64, patterns: [{ byte: 0x3c, offsetMiB: 4, lengthMiB: 16 }] },
      ],
    });
    const targets = [
      pathToFileURL(join(work, 'local')).href,
      `${env.nfs.url}/targets-${tag}`,
      `s3://${env.s3.bucket}/targets-${tag}`,
    ];
    const res = await runCli([
      'backup',
      dom.name,
      '--host',
      host,
      ...targets.flatMap((t) => ['--target', t]),
      '--s3-part-size',
      '16',
      '--wait',
      '--json',
    ]);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const out = JSON.parse(res.stdout) as BackupJson;
    expect(out.status).toBe('completed');
    expect(out.targets.map((t) => [t.target, t.ok])).toEqual(targets.map((t) => [t, true]));

    for (const target of targets) {
      const list = await runCli(['list', '--target', target, '--domain', dom.name, '--json']);
      expect(list.code).toBe(0);
      expect(list.stdout).toContain(out.backupId);
      const verify = await runCli(['verify', out.backupId, '--target', target]);
      expect({ target, code: verify.code }).toEqual({ target, code: 0 });
      expect(verify.stderr).toMatch(/is intact \(2 disks, domain\.xml\)/);
    }

    // Restored from S3 (offsite) and NFS, each disk equals the live disk (nothing wrote to it since);
    // push mode writes every image as qcow2, whatever the source format.
    for (const [i, target] of [targets[2]!, targets[1]!].entries()) {
      const to = join(work, `restored-${i}`);
      const restore = await runCli(['restore', out.backupId, '--target', target, '--to', to]);
      expect({ target, code: restore.code }).toEqual({ target, code: 0 });
      for (const d of dom.disks) await run('qemu-img', ['compare', '-U', join(to, `${d.dev}.qcow2`), d.path]);
    }
  });

  test('one target failing (unknown bucket) does not sink the others: status partial, exit 1, one clear error', async () => {
    const dom = await newDomain({
      prefix: 'tgt',
      disks: [{ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x21, offsetMiB: 0, lengthMiB: 4 }] }],
    });
    const good = pathToFileURL(join(work, 'partial')).href;
    const bad = `s3://vmbackup-no-such-bucket-${tag}/x`;
    const res = await runCli([
      'backup',
      dom.name,
      '--host',
      host,
      '--target',
      good,
      '--target',
      bad,
      '--wait',
      '--json',
    ]);
    expect(res.code).toBe(1);
    const out = JSON.parse(res.stdout) as BackupJson;
    expect(out.status).toBe('partial');
    const [okTarget, badTarget] = out.targets;
    expect(okTarget).toMatchObject({ target: good, ok: true });
    expect(badTarget).toMatchObject({ target: bad, ok: false });
    expect(badTarget?.error).toMatch(/vmbackup-no-such-bucket/);
    expect(badTarget?.error).not.toContain(stackEnv().s3.secretAccessKey);
    const list = await runCli(['list', '--target', good, '--json']);
    expect(list.stdout).toContain(out.backupId);
  });
});
