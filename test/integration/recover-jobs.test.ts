/**
 * Recovery ends the libvirt backup jobs of dead backups (worker kill -9, workflow terminated), pull and push, on the
 * real stack: the job is gone afterwards (domjobinfo: None), its scratch files, socket directory and staging
 * directory are removed, and the checkpoint the dead backup was creating is deleted (it was never committed). A job
 * of a backup that is still open, and a job vmbackup did not start (files outside its staging roots), are left
 * running; the latter is reported.
 *
 * "While the job runs" is made certain without timing: a pull read waits on chunk uploads the S3 proxy holds back
 * (as in pull.test.ts), and a push job is slowed to 1 byte/s through QEMU's own block-job-set-speed once it runs
 * (libvirt has no speed for backup jobs).
 */
import { chmod, lstat, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { startBackup } from '../../src/client/backups';
import { initRepository } from '../../src/repository/chunks';
import type { RecoveryAction } from '../../src/shared/activities';
import { temporalBackupStates } from '../../src/worker/backup-states';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { virsh } from '../helpers/images';
import { startS3FaultProxy } from '../helpers/s3-fault-proxy';
import type { S3FaultProxy } from '../helpers/s3-fault-proxy';
import { requireLibvirt, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { s3Target } from '../storage/fixtures';

jest.setTimeout(20 * 60_000);

const PASSWORD = 'recovery ends the jobs of dead backups';
const SCRYPT = { N: 1 << 12, r: 8, p: 1 };

/** a chunk object's upload (not an index's, not a HEAD) */
const chunkPut = (method: string, url: string) => method === 'PUT' && /chunk-repo\/chunks\//.test(decodeURI(url));

const present = (p: string) =>
  lstat(p).then(
    () => true,
    () => false,
  );

describe('recovery ends the backup jobs of dead backups (real stack)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let proxy: S3FaultProxy;
  let work: string;
  /** this file's state dir, QEMU-reachable, and long enough that a pull socket goes under /run/vmbackup-nbd */
  let state: string;
  let passwordFile: string;
  const workers: WorkerProcess[] = [];
  const cleanups: Array<() => Promise<void>> = [];
  const started: WorkflowHandle[] = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(tmpdir(), 'vmbt-rj-'));
    await chmod(work, 0o755);
    state = join(work, 'a-state-directory-whose-name-pushes-the-pull-socket-path-past-what-sockaddr-un-holds');
    await mkdir(state, { mode: 0o755 });
    passwordFile = join(work, 'password');
    await writeFile(passwordFile, `${PASSWORD}\n`, { mode: 0o600 });
    proxy = await startS3FaultProxy(stackEnv().s3.endpoint);
  });
  afterAll(async () => {
    for (const h of started) await h.terminate('test over').catch(() => undefined);
    for (const w of workers) await w.stop();
    for (const c of cleanups) await c().catch(() => undefined);
    await proxy?.close();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  const env = () => cliEnv({ VMBACKUP_STATE_DIR: state, AWS_ENDPOINT_URL: proxy.url });

  async function worker(host: string): Promise<WorkerProcess> {
    const w = await startWorkerProcess(host, { env: env(), args: ['--password-file', passwordFile] });
    workers.push(w);
    return w;
  }

  async function repository(): Promise<string> {
    const s3 = await s3Target();
    cleanups.push(() => s3.cleanup());
    await initRepository(s3.target, {
      encryption: 'aes-256-gcm',
      compression: 'zstd',
      password: PASSWORD,
      scrypt: SCRYPT,
    });
    return s3.url;
  }

  async function recover(host: string, dom: FixtureDomain): Promise<RecoveryAction[]> {
    // --domain: other test runs share this libvirt; their leftovers are theirs to recover
    const res = await runCli(['recover', '--host', host, '--domain', dom.name, '--json'], { env: env() });
    expect({ code: res.code, stderr: res.stderr }).toEqual({ code: 0, stderr: '' });
    return JSON.parse(res.stdout) as RecoveryAction[];
  }

  async function jobType(dom: FixtureDomain): Promise<string> {
    const out = await virsh('domjobinfo', dom.name);
    return /Job type:\s+(\S+)/.exec(out)?.[1] ?? out;
  }

  async function checkpoints(dom: FixtureDomain): Promise<string[]> {
    return (await virsh('checkpoint-list', dom.name, '--name'))
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean);
  }

  /** The files the running backup job names (backup-dumpxml): targets or scratch files, and a pull socket. */
  async function jobFiles(dom: FixtureDomain): Promise<{ files: string[]; socket?: string }> {
    const xml = await virsh('backup-dumpxml', dom.name);
    const files = [...xml.matchAll(/<(?:target|scratch) file='([^']+)'/g)].map((m) => m[1]!);
    const socket = /socket='([^']+)'/.exec(xml)?.[1];
    return { files, ...(socket ? { socket } : {}) };
  }

  /** Kills the backup's worker for good and terminates its workflow: what recovery is for. */
  async function abandon(w: WorkerProcess, handle: WorkflowHandle, backupId: string): Promise<void> {
    await w.kill9();
    await handle.terminate('test: the backup is abandoned for good');
    const states = temporalBackupStates(client);
    await waitFor('Temporal to show the dead backup closed', async () => (await states(backupId)) === 'closed');
  }

  it('a pull backup whose worker was killed and whose workflow was terminated: recover ends its job, removes scratch, socket dir and staging, and deletes its checkpoint', async () => {
    const url = await repository();
    const host = uniqueHost('rj');
    const w = await worker(host);
    const dom = await newDomain({ prefix: 'rj', disks: [{ format: 'qcow2', sizeMiB: 32, randomMiB: 24 }] });
    const before = await checkpoints(dom);
    const hold = proxy.hold(chunkPut);
    const { backupId, handle } = await startBackup(client, {
      domain: dom.name,
      host,
      method: 'pull',
      targets: [url],
      options: { heartbeatTimeoutSeconds: 5, level: 'full' },
    });
    started.push(handle);
    await waitFor('the pull read to wait on a chunk upload', async () => hold.held() > 0);
    const staging = join(state, 'staging', backupId);
    const job = await jobFiles(dom);
    expect(job.files).toEqual([join(staging, 'vda.scratch.qcow2')]);
    // the staging path is too long for a Unix socket: the socket went under /run/vmbackup-nbd
    expect(job.socket).toMatch(/^\/run\/vmbackup-nbd\/[0-9a-f]{16}\/backup\.sock$/);
    const socketDir = job.socket!.slice(0, -'/backup.sock'.length);
    expect(await checkpoints(dom)).toContain(`vmbackup.${backupId}`);

    await abandon(w, handle, backupId);
    hold.release();
    // what the dead backup left: a job that never ends on its own
    await dom.writeThroughDevice('vda', 0x5e, 2, 2); // QEMU copies the old blocks into the scratch file
    expect(await jobType(dom)).toBe('Unbounded');
    expect(await present(join(staging, 'vda.scratch.qcow2'))).toBe(true);
    expect(await present(socketDir)).toBe(true);

    await worker(host); // the host's worker does the recovery (started with --no-recover: the command does it)
    const actions = await recover(host, dom);
    expect(actions).toContainEqual(
      expect.objectContaining({
        domain: dom.name,
        backupId,
        action: 'job-ended',
        job: { mode: 'pull', files: [join(staging, 'vda.scratch.qcow2'), job.socket] },
        checkpoint: `vmbackup.${backupId}`,
        socketDir,
      }),
    );
    expect(actions).toContainEqual({ domain: dom.name, backupId, staging, action: 'removed-staging' });
    expect(await jobType(dom)).toBe('None');
    expect(await present(staging)).toBe(false);
    expect(await present(socketDir)).toBe(false);
    expect(await checkpoints(dom)).toEqual(before);
    expect(await dom.state()).toBe('running');

    // nothing left: a second run has nothing to do
    expect(await recover(host, dom)).toEqual([]);
  });

  it('a push backup killed mid-copy: recover ends its job, removes the partial image and staging, and deletes its checkpoint', async () => {
    const host = uniqueHost('rj');
    const w = await worker(host);
    const dom = await newDomain({ prefix: 'rj', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const before = await checkpoints(dom);
    const target = pathToFileURL(join(state, 'backups')).href; // the default target: its .staging is scanned
    const { backupId, handle } = await startBackup(client, {
      domain: dom.name,
      host,
      method: 'push',
      targets: [target],
      options: { heartbeatTimeoutSeconds: 5, level: 'full' },
    });
    started.push(handle);
    // libvirt has no speed for a backup job; QEMU's block job has: 1 byte/s, so the job is mid-copy for good
    await waitFor(
      'the push job to run, and to be slowed',
      async () => {
        const reply = JSON.parse(await virsh('qemu-monitor-command', dom.name, '{"execute":"query-block-jobs"}')) as {
          return: Array<{ device: string; type: string }>;
        };
        const jobs = reply.return.filter((j) => j.type === 'backup');
        for (const j of jobs) {
          const set = { execute: 'block-job-set-speed', arguments: { device: j.device, speed: 1 } };
          await virsh('qemu-monitor-command', dom.name, JSON.stringify(set));
        }
        return jobs.length > 0;
      },
      { intervalMs: 5 },
    );
    const staging = join(state, 'backups', '.staging', backupId);
    const image = join(staging, 'vda.qcow2');
    expect(await jobFiles(dom)).toEqual({ files: [image] });
    expect(await checkpoints(dom)).toContain(`vmbackup.${backupId}`);

    await abandon(w, handle, backupId);
    expect(await jobType(dom)).toBe('Unbounded'); // still copying: the dead backup's job outlives it
    expect(await present(image)).toBe(true);

    await worker(host);
    const actions = await recover(host, dom);
    expect(actions).toContainEqual(
      expect.objectContaining({
        domain: dom.name,
        backupId,
        action: 'job-ended',
        job: { mode: 'push', files: [image] },
        checkpoint: `vmbackup.${backupId}`,
      }),
    );
    expect(actions).toContainEqual({ domain: dom.name, backupId, staging, action: 'removed-staging' });
    expect(await jobType(dom)).toBe('None');
    expect(await present(staging)).toBe(false);
    expect(await checkpoints(dom)).toEqual(before);
    expect(await dom.state()).toBe('running');
  });

  it('the job of a backup that is still open is left alone, and the backup completes', async () => {
    const url = await repository();
    const host = uniqueHost('rj');
    await worker(host);
    const dom = await newDomain({ prefix: 'rj', disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 8 }] });
    const hold = proxy.hold(chunkPut);
    const { backupId, handle } = await startBackup(client, {
      domain: dom.name,
      host,
      method: 'pull',
      targets: [url],
      options: { heartbeatTimeoutSeconds: 5, level: 'full' },
    });
    started.push(handle);
    try {
      await waitFor('the pull read to wait on a chunk upload', async () => hold.held() > 0);
      const staging = join(state, 'staging', backupId);
      const job = await jobFiles(dom);

      expect(await recover(host, dom)).toEqual([]);
      expect(await jobType(dom)).toBe('Unbounded');
      expect(await jobFiles(dom)).toEqual(job);
      expect(await present(join(staging, 'vda.scratch.qcow2'))).toBe(true);
    } finally {
      hold.release();
    }
    const result = await handle.result();
    expect(result.status).toBe('completed');
    expect(await jobType(dom)).toBe('None');
  });

  it('a backup job started by hand, with files outside the staging roots, is left running and reported', async () => {
    const host = uniqueHost('rj');
    await worker(host);
    const dom = await newDomain({ prefix: 'rj', disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 8 }] });
    const mine = await mkdtemp(join(work, 'by-hand-'));
    const scratch = join(mine, 'vda.scratch.qcow2');
    const socket = join(mine, 'nbd.sock');
    const xml = join(mine, 'backup.xml');
    await writeFile(
      xml,
      `<domainbackup mode='pull'><server transport='unix' socket='${socket}'/>` +
        `<disks><disk name='vda' backup='yes' type='file'><scratch file='${scratch}'/><driver type='qcow2'/></disk></disks></domainbackup>`,
    );
    await virsh('backup-begin', dom.name, xml);
    cleanups.push(() => virsh('domjobabort', dom.name).then(() => undefined));

    const actions = await recover(host, dom);
    expect(actions).toEqual([
      {
        domain: dom.name,
        job: { mode: 'pull', files: [scratch, socket] },
        action: 'job-not-ours',
        detail: `a pull backup job vmbackup did not start (${mine} is outside vmbackup's staging directories): left alone`,
      },
    ]);
    expect(await jobType(dom)).toBe('Unbounded');
    expect(await present(scratch)).toBe(true);
    await virsh('domjobabort', dom.name);
  });
});
