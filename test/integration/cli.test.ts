/**
 * The vmbackup CLI as an operator runs it (built bin/vmbackup), against the real stack:
 * JSON output, status, one backup per VM at a time, clear one-sentence errors, and the
 * embedded default (no TEMPORAL_ADDRESS: the CLI starts a dev server and a worker itself).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { hostWorkerSeen } from '../../src/client/workers';
import {
  cliEnv,
  REPO_ROOT,
  runCli,
  startWorkerProcess,
  temporalClient,
  uniqueHost,
  waitFor,
} from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';

const run = promisify(execFile);

interface BackupJson {
  backupId: string;
  domain: string;
  host: string;
  method: string;
  status: string;
  startedAt: string;
  finishedAt: string;
  disks: Array<{ name: string; format: string; virtualSize: number; sha256: string; location: string }>;
}

describe('vmbackup CLI', () => {
  const newDomain = useFixtureDomains();
  let work: string;
  let worker: WorkerProcess;
  const host = uniqueHost('cli');

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-cli-'));
    worker = await startWorkerProcess(host);
  });
  afterAll(async () => {
    await worker?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('backup --wait --json prints one JSON object; status and list find the backup', async () => {
    const dom = await newDomain({
      prefix: 'cli',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x42, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const target = pathToFileURL(join(work, 'json')).href;
    const res = await runCli(['backup', dom.name, '--host', host, '--target', target, '--wait', '--json']);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const out = JSON.parse(res.stdout) as BackupJson;
    expect(out).toMatchObject({ domain: dom.name, host, method: 'push', status: 'completed' });
    expect(out.backupId).toMatch(new RegExp(`^${dom.name}-\\d{8}T\\d{6}Z-[0-9a-f]{4}$`));
    expect(Date.parse(out.finishedAt)).toBeGreaterThanOrEqual(Date.parse(out.startedAt));
    expect(out.disks).toHaveLength(1);
    const disk = out.disks[0]!;
    expect(disk).toMatchObject({ name: 'vda', format: 'qcow2', virtualSize: 64 * 1024 * 1024 });
    const { stdout: sum } = await run('sha256sum', [fileURLToPath(disk.location)]);
    expect(sum.split(' ')[0]).toBe(disk.sha256);
    await run('qemu-img', ['compare', '-U', fileURLToPath(disk.location), dom.disks[0]!.path]);

    const status = await runCli(['status', out.backupId, '--json']);
    expect(status.code).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({ backupId: out.backupId, status: 'completed' });

    const list = await runCli(['list', '--target', target, '--json']);
    expect(list.code).toBe(0);
    expect(list.stdout).toContain(out.backupId);
  });

  test('a second backup of a VM while one runs is refused with the running id, and changes nothing', async () => {
    const dom = await newDomain({ prefix: 'cli', disks: [{ format: 'qcow2', sizeMiB: 2048, randomMiB: 1024 }] });
    const target = pathToFileURL(join(work, 'twice')).href;
    const first = await runCli(['backup', dom.name, '--host', host, '--target', target]);
    expect(first.code).toBe(0);
    const firstId = first.stdout.trim();
    const second = await runCli(['backup', dom.name, '--host', host, '--target', target]);
    expect(second.code).not.toBe(0);
    expect(second.stderr.trim()).toBe(`vmbackup: a backup of ${dom.name} is already running: ${firstId}`);
    const done = await runCli(['status', firstId, '--wait', '--json']);
    expect(done.code).toBe(0);
    // Exactly one backup landed on the target.
    expect(await readdir(join(fileURLToPath(target), dom.name))).toEqual([firstId]);
  });

  test.each([
    [['backup', 'no-such-vm-x1'], /no-such-vm-x1/, 'unknown domain'],
    [['backup', 'vm;rm -rf /'], /"vm;rm -rf \/" is not a valid domain name/, 'shell metacharacters'],
    [
      ['backup', 'vm1', '--target', 'ftp://host/dir'],
      /"ftp:\/\/host\/dir" is not a supported target URL/,
      'bad target URL',
    ],
    [['backup', 'vm1', '--target', 'file://relative/dir'], /file:/, 'relative file URL'],
  ])('%j fails with one clear sentence (%s)', async (args, pattern, _what) => {
    const res = await runCli([...args, '--host', host, '--wait']);
    expect(res.code).not.toBe(0);
    const lines = res.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(pattern);
    expect(res.stderr).not.toMatch(/\n\s+at /); // no stack trace
  });

  test('a backup for a host whose worker is not connected says so on stderr, stays queued, and runs once a worker for that host starts', async () => {
    const later = uniqueHost('cliq');
    const dom = await newDomain({
      prefix: 'cli',
      disks: [{ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x44, offsetMiB: 0, lengthMiB: 1 }] }],
    });
    const target = pathToFileURL(join(work, 'queued')).href;
    const res = await runCli(['backup', dom.name, '--host', later, '--target', target, '--json']);
    expect(res.code).toBe(0);
    expect(res.stderr.trim()).toMatch(
      new RegExp(
        `^vmbackup: no vmbackup worker for host ${later} is connected to Temporal at \\S+ \\(nothing polls task queue vmbackup-host-${later}\\): the backup waits in that queue until \`vmbackup worker --host ${later}\` runs \\(\`vmbackup cancel\` removes it\\)$`,
      ),
    );
    const { backupId, status } = JSON.parse(res.stdout) as { backupId: string; status: string };
    expect(status).toBe('running');
    const w = await startWorkerProcess(later);
    try {
      const done = await runCli(['status', backupId, '--wait', '--json']);
      expect([done.code, (JSON.parse(done.stdout) as { status: string }).status]).toEqual([0, 'completed']);
    } finally {
      await w.stop();
    }
    // with the worker connected, nothing is said
    const again = await startWorkerProcess(later);
    const { client, close } = await temporalClient();
    try {
      // a worker that has started but not polled yet is not seen: wait for its first poll
      await waitFor(`the worker of ${later} to poll`, async () => (await hostWorkerSeen(client, later)) || undefined);
      const second = await runCli(['backup', dom.name, '--host', later, '--target', target, '--wait', '--json']);
      expect([second.code, second.stderr]).toEqual([0, '']);
    } finally {
      await close();
      await again.stop();
    }
  });

  test('libvirt unreachable on the host: the backup fails with one sentence naming libvirt, not a hang', async () => {
    const deadHost = uniqueHost('cli');
    const dead = await startWorkerProcess(deadHost, {
      env: cliEnv({ LIBVIRT_DEFAULT_URI: 'qemu:///system?socket=/nonexistent/libvirt-sock' }),
    });
    try {
      const res = await runCli(['backup', 'vm1', '--host', deadHost, '--wait']);
      expect(res.code).not.toBe(0);
      const lines = res.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/vm1.*(connect|libvirt)/i);
    } finally {
      await dead.stop();
    }
  });

  test('embedded default: with no TEMPORAL_ADDRESS the CLI starts a dev server and a worker itself', async () => {
    const state = await mkdtemp(join(stackEnv().stateDir, 'test-embedded-'));
    const env = { ...cliEnv({ VMBACKUP_STATE_DIR: state, VMBACKUP_TEMPORAL_PORT: '7299' }) };
    delete env.TEMPORAL_ADDRESS;
    const dom = await newDomain({
      prefix: 'cli',
      disks: [{ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x33, offsetMiB: 0, lengthMiB: 4 }] }],
    });
    try {
      const res = await runCli(['backup', dom.name, '--json'], { env });
      expect(res.code).toBe(0);
      const out = JSON.parse(res.stdout) as BackupJson;
      expect(out.status).toBe('completed');
      // The default target is a directory under the state dir.
      expect(fileURLToPath(out.disks[0]!.location)).toBe(join(state, 'backups', dom.name, out.backupId, 'vda.qcow2'));
    } finally {
      await run('bash', [join(REPO_ROOT, 'scripts', 'stack.sh'), 'down', 'temporal'], { env });
      await rm(state, { recursive: true, force: true });
    }
  });
});
