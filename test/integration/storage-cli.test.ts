/**
 * The storage commands as a user runs them (registered on a commander program, real targets):
 * output, --json, exit codes, and one sentence on failure.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import { register as copy } from '../../src/cli/commands/copy';
import { register as list } from '../../src/cli/commands/list';
import { register as prune } from '../../src/cli/commands/prune';
import { register as restore } from '../../src/cli/commands/restore';
import { register as verify } from '../../src/cli/commands/verify';
import type { DiskImage } from '../../src/shared/types';
import { requireNfs } from '../helpers/stack';
import { backUp, makeImage } from '../storage/backups';
import { localTarget, nfsTarget } from '../storage/fixtures';

interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

async function vmbackup(...args: string[]): Promise<CliRun> {
  const program = new Command('vmbackup').exitOverride();
  for (const reg of [list, verify, restore, copy, prune]) reg(program);
  let stdout = '';
  let stderr = '';
  const out = jest.spyOn(process.stdout, 'write').mockImplementation((s) => ((stdout += String(s)), true));
  const err = jest.spyOn(process.stderr, 'write').mockImplementation((s) => ((stderr += String(s)), true));
  process.exitCode = undefined;
  try {
    await program.parseAsync(args, { from: 'user' });
  } catch (e) {
    stderr += `commander: ${(e as Error).message}\n`;
    process.exitCode = 1;
  } finally {
    out.mockRestore();
    err.mockRestore();
  }
  const code = Number(process.exitCode ?? 0);
  process.exitCode = undefined;
  return { code, stdout, stderr };
}

let work: string;
let vda: DiskImage;
let a: Awaited<ReturnType<typeof localTarget>>;
let b: Awaited<ReturnType<typeof nfsTarget>>;
const ids = ['web-20261120T010000Z-0001', 'web-20261121T010000Z-0002', 'web-20261122T010000Z-0003'];

beforeAll(async () => {
  await requireNfs();
  work = await mkdtemp(join(tmpdir(), 'vmbackup-cli-'));
  vda = await makeImage(work, 'vda', 'qcow2', 0x5a);
});

// Each test gets targets of its own: one damages an image, another prunes, and jest --randomize runs them in
// any order.
beforeEach(async () => {
  a = await localTarget();
  b = await nfsTarget();
  for (const [i, id] of ids.entries()) await backUp(a.url, 'web', id, `2026-11-2${i}T01:00:00.000Z`, [vda]);
});

afterEach(async () => {
  for (const t of [a, b]) {
    await t.cleanup();
    await t.target.close();
  }
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

test('list prints a table, --json one object; an empty target says so', async () => {
  const table = await vmbackup('list', '--target', a.url);
  expect(table.code).toBe(0);
  expect(table.stdout.split('\n')[0]).toMatch(
    /^BACKUP ID\s+DOMAIN\s+STARTED\s+LEVEL\s+PARENT\s+METHOD\s+DISKS\s+FORMAT\s+VM\s+SIZE$/,
  );
  for (const id of ids) expect(table.stdout).toContain(id);
  const json = await vmbackup('list', '--target', a.url, '--domain', 'web', '--json');
  const parsed = JSON.parse(json.stdout) as { backups: Array<{ backupId: string }> };
  expect(parsed.backups.map((x) => x.backupId)).toEqual(ids);
  await mkdir(b.dir, { recursive: true }); // an existing, empty directory (a missing one is an error)
  const empty = await vmbackup('list', '--target', b.url);
  expect([empty.code, empty.stdout, empty.stderr]).toEqual([0, '', `No backups on ${b.url}.\n`]);
});

test('verify: exit 0 when intact; exit 1 naming the bad disk after the image was damaged', async () => {
  expect((await vmbackup('verify', ids[0]!, '--target', a.url)).code).toBe(0);
  const file = join(a.dir, 'web', ids[0]!, 'vda.qcow2');
  const bytes = await readFile(file);
  bytes[70000] = (bytes[70000] ?? 0) ^ 1;
  await writeFile(file, bytes);
  const bad = await vmbackup('verify', ids[0]!, '--target', a.url);
  expect(bad.code).toBe(1);
  expect(bad.stderr).toMatch(
    new RegExp(`^vmbackup: Backup ${ids[0]} on ${a.url} failed verification: disk vda: .*\\.\\n$`),
  );
  const json = await vmbackup('verify', ids[0]!, '--target', a.url, '--json');
  expect(json.code).toBe(1);
  expect(JSON.parse(json.stdout)).toMatchObject({ ok: false, disks: [{ name: 'vda', ok: false }] });
});

test('restore, copy and prune from the command line', async () => {
  const to = join(work, 'restored.qcow2');
  const r = await vmbackup('restore', ids[2]!, '--target', a.url, '--disk', 'vda', '--to', to);
  expect(r.code).toBe(0);
  expect((await readFile(to)).equals(await readFile(vda.path))).toBe(true);
  const again = await vmbackup('restore', ids[2]!, '--target', a.url, '--disk', 'vda', '--to', to);
  expect([again.code, again.stderr]).toEqual([
    1,
    `vmbackup: ${to} already exists; remove it or pass --force to overwrite it.\n`,
  ]);

  const c = await vmbackup('copy', ids[2]!, '--from', a.url, '--to', b.url, '--json');
  expect(c.code).toBe(0);
  expect(JSON.parse(c.stdout)).toMatchObject({ copied: [`web/${ids[2]}/vda.qcow2`, `web/${ids[2]}/manifest.json`] });
  expect((await vmbackup('verify', ids[2]!, '--target', b.url)).code).toBe(0);

  const dry = await vmbackup('prune', '--target', a.url, '--keep-last', '1', '--dry-run', '--json');
  expect(JSON.parse(dry.stdout)).toMatchObject({ dryRun: true, remove: [{ backupId: ids[1] }, { backupId: ids[0] }] });
  const done = await vmbackup('prune', '--target', a.url, '--keep-last', '1');
  expect(done.code).toBe(0);
  expect(done.stderr).toBe(`Removed 2 backup(s), kept 1 on ${a.url}.\n`);
  const left = JSON.parse((await vmbackup('list', '--target', a.url, '--json')).stdout) as {
    backups: Array<{ backupId: string }>;
  };
  expect(left.backups.map((x) => x.backupId)).toEqual([ids[2]]);
});

test.each([
  [
    ['list', '--target', 'ftp://x'],
    /^vmbackup: "ftp:\/\/x" is not a supported target URL: use file:\/\/\/abs\/dir, nfs:\/\/host\/export\/path or s3:\/\/bucket\/prefix\.\n$/,
  ],
  [
    ['verify', 'web-20200101T000000Z-ffff', '--target', 'file:///nonexistent-dir'],
    /^vmbackup: Backup web-20200101T000000Z-ffff is not on file:\/\/\/nonexistent-dir \(no committed manifest\);/,
  ],
  [['prune', '--target', 'file:///tmp/x'], /^vmbackup: Prune needs a policy/],
  [['prune', '--target', 'file:///tmp/x', '--keep-last', 'two'], /^vmbackup: --keep-last must be a whole number/],
  [['list', '--s3-part-size', '1'], /^vmbackup: --s3-part-size must be at least 5 MiB/],
])('%j fails with one sentence and exit code 1', async (args, message) => {
  const res = await vmbackup(...args);
  expect(res.code).toBe(1);
  expect(res.stderr).toMatch(message);
  expect(res.stderr.trim().split('\n')).toHaveLength(1);
});
