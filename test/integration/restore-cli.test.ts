/**
 * `vmbackup list` and `vmbackup restore` as an operator runs them (the built bin/vmbackup) on a local target holding
 * a chain: LEVEL/PARENT columns and `chain` in --json; restore of an increment; Ctrl-C and SIGTERM during a restore
 * leave nothing behind; a failed multi-disk restore removes the disks it had done; holes stay holes; usage mistakes
 * and impossible destinations get one sentence each.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { buildManifest, encodeManifest, type Manifest } from '../../src/repository/manifest';
import { sha256Of } from '../storage/backups';
import { buildChain, type BuiltChain } from '../storage/chains';
import { stackEnv } from '../helpers/stack';
import { cliEnv, REPO_ROOT, runCli, waitFor } from '../helpers/vmbackup';

const run = promisify(execFile);
const MiB = 1 << 20;

let work: string;
let chain: BuiltChain;
let chainUrl: string;

beforeAll(async () => {
  work = await mkdtemp(join(stackEnv().stateDir, 'test-restore-cli-'));
  chain = await buildChain(join(work, 'chain'));
  // the chain's layout is a local target as it is: images and manifests at their keys
  for (const m of Object.values(chain.manifests)) {
    await writeFile(join(chain.layout, m.domain, m.backupId, 'manifest.json'), encodeManifest(m));
  }
  chainUrl = pathToFileURL(chain.layout).href;
});

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

/** A local target with one full backup of the given images (written in place, manifest last). */
async function fullBackup(
  name: string,
  images: Array<{ disk: string; format: 'qcow2' | 'raw'; path: string; virtualSize: number }>,
): Promise<{ url: string; dir: string; id: string; manifest: Manifest }> {
  const dir = join(work, name);
  const id = `big-20261125T010000Z-${createHash('sha256').update(name).digest('hex').slice(0, 4)}`;
  await mkdir(join(dir, 'big', id), { recursive: true });
  const disks = [];
  for (const img of images) {
    const key = `big/${id}/${img.disk}.${img.format}`;
    await run('mv', [img.path, join(dir, key)]);
    disks.push({
      name: img.disk,
      format: img.format,
      virtualSize: img.virtualSize,
      size: (await stat(join(dir, key))).size,
      sha256: await sha256Of(join(dir, key)),
      key,
    });
  }
  const manifest = buildManifest({
    backupId: id,
    domain: 'big',
    host: 'hv1',
    method: 'push',
    startedAt: '2026-11-25T01:00:00.000Z',
    finishedAt: '2026-11-25T01:00:00.000Z',
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    disks,
  });
  await writeFile(join(dir, 'big', id, 'manifest.json'), encodeManifest(manifest));
  return { url: pathToFileURL(dir).href, dir, id, manifest };
}

async function rawImage(path: string, mib: number, writes: string[]): Promise<string> {
  await run('qemu-img', ['create', '-q', '-f', 'raw', path, `${mib}M`]);
  if (writes.length > 0) await run('qemu-io', ['-f', 'raw', ...writes.flatMap((w) => ['-c', w]), path]);
  return path;
}

/** Every entry of a directory, hidden ones included. */
const entries = (dir: string): Promise<string[]> => readdir(dir).catch(() => ['<missing>']);

test('list shows each backup with its level and parent; --json carries chain per backup', async () => {
  const table = await runCli(['list', '--target', chainUrl]);
  expect(table.code).toBe(0);
  const lines = table.stdout.trim().split('\n');
  expect(lines[0]).toMatch(/^BACKUP ID\s+DOMAIN\s+STARTED\s+LEVEL\s+PARENT\s+METHOD\s+DISKS\s+FORMAT\s+VM\s+SIZE$/);
  const row = (id: string): string[] => (lines.find((l) => l.startsWith(id)) ?? '').split(/\s{2,}/);
  expect(row(chain.ids.full).slice(3, 5)).toEqual(['full', '-']);
  expect(row(chain.ids.inc1).slice(3, 5)).toEqual(['inc', chain.ids.full]);
  expect(row(chain.ids.inc2).slice(3, 5)).toEqual(['inc', chain.ids.inc1]);
  expect(row(chain.ids.diff).slice(3, 5)).toEqual(['diff', chain.ids.full]);
  const json = JSON.parse((await runCli(['list', '--target', chainUrl, '--json'])).stdout) as {
    backups: Array<{ backupId: string; chain: unknown }>;
  };
  expect(json.backups.map((b) => [b.backupId, b.chain])).toEqual([
    [chain.ids.full, { level: 'full', parent: null, base: chain.ids.full, checkpoint: null }],
    [chain.ids.inc1, { level: 'inc', parent: chain.ids.full, base: chain.ids.full, checkpoint: null }],
    [chain.ids.inc2, { level: 'inc', parent: chain.ids.inc1, base: chain.ids.full, checkpoint: null }],
    [chain.ids.diff, { level: 'diff', parent: chain.ids.full, base: chain.ids.full, checkpoint: null }],
  ]);
});

test('restore of an increment writes standalone images; verify lists the chain; --format is checked', async () => {
  const to = join(work, 'inc2-raw');
  const res = await runCli(['restore', chain.ids.inc2, '--target', chainUrl, '--to', to, '--format', 'raw']);
  expect(res.stderr).toBe('');
  expect(res.code).toBe(0);
  expect(res.stdout).toMatch(
    new RegExp(`^vda -> ${to}/vda.raw \\(raw, 64\\.0 MiB, from 3 backups of its chain\\)$`, 'm'),
  );
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', join(to, 'vda.raw'), chain.refs.inc2.vda!]);
  await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', join(to, 'vdb.raw'), chain.refs.inc2.vdb!]);
  const verify = await runCli(['verify', chain.ids.inc2, '--target', chainUrl]);
  expect(verify.code).toBe(0);
  expect(verify.stdout.split('\n').filter((l) => /^(ok|BAD)\s+\S+\s+(full|inc|diff|missing)$/.test(l))).toEqual([
    `ok   ${chain.ids.full}  full`,
    `ok   ${chain.ids.inc1}  inc`,
    `ok   ${chain.ids.inc2}  inc`,
  ]);
  expect(verify.stderr).toBe(
    `Backup ${chain.ids.inc2} on ${chainUrl} is intact (2 disks and the 2 backup(s) of its chain it depends on).\n`,
  );
  const bad = await runCli(['restore', chain.ids.inc2, '--target', chainUrl, '--to', to, '--format', 'vmdk']);
  expect([bad.code, bad.stderr]).toEqual([1, 'vmbackup: --format must be qcow2 or raw, not "vmdk".\n']);
});

describe('interrupting a restore', () => {
  /** Starts a restore, waits for its hidden temp file in `out`, sends `signal`, and returns how it ended. */
  async function interrupt(
    args: string[],
    out: string,
    signal: NodeJS.Signals,
  ): Promise<{ code: number | null; stderr: string }> {
    const child = spawn(join(REPO_ROOT, 'bin', 'vmbackup'), args, { env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
    await waitFor(
      'the restore to start writing',
      async () => (await readdir(out)).some((f) => /^\.vda\.\w+\.restore-[0-9a-f]+$/.test(f)),
      { timeoutMs: 60_000, intervalMs: 10 },
    );
    child.kill(signal);
    return { code: await exited, stderr };
  }

  test('Ctrl-C while a full image streams: exit 130, one sentence, no partial file left', async () => {
    const img = await rawImage(join(work, 'sigint-vda.raw'), 1024, ['write -P 0x5a 0 1024M']);
    const b = await fullBackup('sigint', [{ disk: 'vda', format: 'raw', path: img, virtualSize: 1024 * MiB }]);
    const out = join(work, 'sigint-out');
    await mkdir(out);
    const res = await interrupt(['restore', b.id, '--target', b.url, '--to', out], out, 'SIGINT');
    expect(res.stderr).toBe(
      `vmbackup: The restore of backup ${b.id} was interrupted (SIGINT); the files it had written were removed.\n`,
    );
    expect(res.code).toBe(130);
    expect(await entries(out)).toEqual([]);
    await rm(b.dir, { recursive: true, force: true });
  });

  test('SIGTERM while qemu-img builds an image from a chain: exit 143, nothing left, no qemu-img left running', async () => {
    const base = join(work, 'sigterm-base.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1024M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x6b 0 1024M', base]);
    const b = await fullBackup('sigterm', [{ disk: 'vda', format: 'qcow2', path: base, virtualSize: 1024 * MiB }]);
    const out = join(work, 'sigterm-out');
    await mkdir(out);
    // a full in another format goes through qemu-img convert, as every chain does
    const res = await interrupt(['restore', b.id, '--target', b.url, '--to', out, '--format', 'raw'], out, 'SIGTERM');
    expect(res.stderr).toBe(
      `vmbackup: The restore of backup ${b.id} was interrupted (SIGTERM); the files it had written were removed.\n`,
    );
    expect(res.code).toBe(143);
    expect(await entries(out)).toEqual([]);
    const { stdout } = await run('ps', ['-eo', 'args']);
    expect(stdout.split('\n').filter((l) => l.includes('qemu-img convert') && l.includes(b.dir))).toEqual([]);
    await rm(b.dir, { recursive: true, force: true });
  });
});

test('a multi-disk restore that fails on a later disk removes the disks it had written, and its directory', async () => {
  const vda = await rawImage(join(work, 'multi-vda.raw'), 16, ['write -P 0x01 0 4M']);
  const vdb = await rawImage(join(work, 'multi-vdb.raw'), 16, ['write -P 0x02 0 4M']);
  const b = await fullBackup('multi', [
    { disk: 'vda', format: 'raw', path: vda, virtualSize: 16 * MiB },
    { disk: 'vdb', format: 'raw', path: vdb, virtualSize: 16 * MiB },
  ]);
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x03 1M 4k', join(b.dir, 'big', b.id, 'vdb.raw')]);
  const existing = join(work, 'multi-existing');
  await mkdir(existing);
  const res = await runCli(['restore', b.id, '--target', b.url, '--to', existing]);
  expect(res.code).toBe(1);
  expect(res.stderr).toMatch(new RegExp(`^vmbackup: Disk vdb of backup ${b.id} on .* is corrupt .*\\.\\n$`));
  expect(await entries(existing)).toEqual([]);
  const fresh = join(work, 'multi-fresh', 'a', 'b');
  expect((await runCli(['restore', b.id, '--target', b.url, '--to', fresh])).code).toBe(1);
  expect(await entries(join(work, 'multi-fresh'))).toEqual(['<missing>']);
});

test('holes stay holes: a sparse raw disk restores sparse', async () => {
  const img = await rawImage(join(work, 'sparse-vda.raw'), 256, ['write -P 0x77 100M 1M']);
  const b = await fullBackup('sparse', [{ disk: 'vda', format: 'raw', path: img, virtualSize: 256 * MiB }]);
  const out = join(work, 'sparse-out');
  const res = await runCli(['restore', b.id, '--target', b.url, '--to', out]);
  expect(res.code).toBe(0);
  const s = await stat(join(out, 'vda.raw'));
  expect(s.size).toBe(256 * MiB);
  expect(s.blocks * 512).toBeLessThanOrEqual(2 * MiB);
  expect(await sha256Of(join(out, 'vda.raw'))).toBe(b.manifest.disks[0]!.sha256);
  const { stdout } = await run('du', ['-k', join(out, 'vda.raw')]);
  expect(Number(stdout.split('\t')[0])).toBeLessThanOrEqual(2048);
});

describe('usage mistakes and impossible destinations: one sentence each', () => {
  const id = (): string => chain.ids.full;
  test.each([
    [[], /^vmbackup: restore needs the id of the backup to restore and where to write it: /],
    [
      ['--to', '/tmp/x'],
      /^vmbackup: restore needs the id of the backup to restore: vmbackup restore <backupId> --to PATH/,
    ],
    [['@ID'], /^vmbackup: restore needs --to PATH: a directory for all disks, or a file with --disk: /],
  ])('restore %j', async (args, message) => {
    const res = await runCli(['restore', ...args.map((a) => (a === '@ID' ? id() : a)), '--target', chainUrl]);
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(message);
    expect(res.stderr.trim().split('\n')).toHaveLength(1);
  });

  test('--to under a file', async () => {
    const file = join(work, 'a-file');
    await writeFile(file, 'x');
    const res = await runCli(['restore', id(), '--target', chainUrl, '--to', join(file, 'sub', 'dir')]);
    expect([res.code, res.stderr]).toEqual([
      1,
      `vmbackup: Cannot restore to ${join(file, 'sub', 'dir')}: ${file} is a file, not a directory.\n`,
    ]);
  });

  test.each([['/proc/vmbackup-test/restored'], ['/proc/vmbackup-test.qcow2']])(
    '--to %s (a filesystem that takes no new files)',
    async (to) => {
      // Node's own recursive mkdir spins forever there: the deadline is part of what is tested
      const res = await runCli(['restore', id(), '--target', chainUrl, '--to', to, '--disk', 'vda'], {
        timeoutMs: 60_000,
      });
      expect(res.code).toBe(1);
      expect(res.stderr).toMatch(
        /^vmbackup: Cannot restore to \/proc\/vmbackup-test.*\(ENOENT\); restore to a directory on a writable filesystem\.\n$/,
      );
    },
  );
});
