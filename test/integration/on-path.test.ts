/**
 * `vmbackup` and `temporal` on PATH (scripts/install.sh, run by the demo): after the README's set-up a newcomer's
 * fresh shell finds both, `vmbackup` runs this checkout's build, and the demo ends with commands that work as printed.
 *
 * Each test installs into a bin dir of its own instead of /usr/local/bin: several checkouts of vmbackup share this
 * machine, and install.sh rightly refuses to point /usr/local/bin/vmbackup at another one.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { lstat, mkdtemp, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { REPO_ROOT } from '../helpers/vmbackup';

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 600_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { cwd: REPO_ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** A newcomer's new login shell: nothing but the standard directories on PATH (BIN standing for /usr/local/bin). */
function freshShell(bin: string, command: string, extra: Record<string, string> = {}): Promise<Run> {
  return run(
    '/usr/bin/env',
    ['-i', `PATH=${bin}:/usr/bin:/bin`, 'HOME=/root', ...envPairs(extra), 'sh', '-c', command],
    {},
  );
}

const envPairs = (vars: Record<string, string>) => Object.entries(vars).map(([k, v]) => `${k}=${v}`);

const installEnv = (bin: string): NodeJS.ProcessEnv => ({ ...process.env, VMBACKUP_BIN_DIR: bin });

describe('vmbackup and temporal on PATH (scripts/install.sh)', () => {
  let bin: string;

  beforeAll(async () => {
    await requireTemporal(); // stack.sh temporal-bin: the pinned CLI the stack installed
  });

  beforeEach(async () => {
    bin = await mkdtemp(join(tmpdir(), 'vmbt-onpath-bin-'));
  });

  afterEach(async () => {
    await rm(bin, { recursive: true, force: true });
  });

  test('a fresh shell runs `vmbackup --version` and `temporal --version` after install.sh', async () => {
    const install = await run('bash', ['scripts/install.sh'], installEnv(bin));
    expect(install).toMatchObject({ code: 0 });

    const version = JSON.parse(await readFile(join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };
    const vmbackup = await freshShell(bin, 'vmbackup --version');
    expect(vmbackup).toEqual({ code: 0, stdout: `${version.version}\n`, stderr: '' });
    const temporal = await freshShell(bin, 'temporal --version');
    expect(temporal.code).toBe(0);
    const pinned = /^TEMPORAL_VERSION=(.+)$/m.exec(await readFile(join(REPO_ROOT, 'scripts', 'stack.sh'), 'utf8'))?.[1];
    expect(temporal.stdout).toContain(`temporal version ${pinned} `);

    // this checkout's command itself (node on dist/), not a copy and not npx
    expect(await readlink(join(bin, 'vmbackup'))).toBe(join(REPO_ROOT, 'bin', 'vmbackup'));
    const help = await freshShell(bin, 'vmbackup --help');
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/^\s+backup \[options\] <domain>/m);
  });

  test('install.sh again changes nothing and succeeds', async () => {
    expect((await run('bash', ['scripts/install.sh'], installEnv(bin))).code).toBe(0);
    const before = await Promise.all(['vmbackup', 'temporal'].map((n) => lstat(join(bin, n))));
    const again = await run('bash', ['scripts/install.sh'], installEnv(bin));
    expect(again.code).toBe(0);
    expect(again.stderr).toContain(
      `${join(bin, 'vmbackup')} -> ${join(REPO_ROOT, 'bin', 'vmbackup')} (already installed)`,
    );
    const after = await Promise.all(['vmbackup', 'temporal'].map((n) => lstat(join(bin, n))));
    expect(after.map((s) => [s.ino, s.mtimeMs])).toEqual(before.map((s) => [s.ino, s.mtimeMs]));
  });

  test('another program named vmbackup is never overwritten: one sentence, exit 1, the file as it was', async () => {
    const other = '#!/bin/sh\necho "some other vmbackup"\n';
    await writeFile(join(bin, 'vmbackup'), other, { mode: 0o755 });
    const r = await run('bash', ['scripts/install.sh'], installEnv(bin));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`${join(bin, 'vmbackup')} already exists and is another program`);
    expect(await readFile(join(bin, 'vmbackup'), 'utf8')).toBe(other);
  });

  test("a link to another checkout's vmbackup is not replaced either", async () => {
    const { symlink } = await import('node:fs/promises');
    await symlink('/opt/elsewhere/bin/vmbackup', join(bin, 'vmbackup'));
    const r = await run('bash', ['scripts/install.sh'], installEnv(bin));
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('points to /opt/elsewhere/bin/vmbackup');
    expect(await readlink(join(bin, 'vmbackup'))).toBe('/opt/elsewhere/bin/vmbackup');
  });
});

describe('the demo (npm run demo)', () => {
  const domain = `vmbt-s3demo-${randomBytes(3).toString('hex')}`;
  let bin: string;
  let state: string;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    bin = await mkdtemp(join(tmpdir(), 'vmbt-demo-bin-'));
    // under the stack's state dir: the demo's QEMU (running as root) and the tests' cleanup find it there
    state = await mkdtemp(join(stackEnv().stateDir, 'vmbt-demo-state-'));
  });

  afterAll(async () => {
    const uri = stackEnv().libvirt.uri;
    await run('virsh', ['-c', uri, 'destroy', domain], process.env);
    await run('virsh', ['-c', uri, 'undefine', domain, '--checkpoints-metadata'], process.env);
    await rm(bin, { recursive: true, force: true });
    await rm(state, { recursive: true, force: true });
  });

  test('ends with the next commands to try, and each works as printed from a fresh shell', async () => {
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      VMBACKUP_BIN_DIR: bin,
      VMBACKUP_STATE_DIR: state,
      VMBACKUP_DEMO_DOMAIN: domain,
      // its in-process worker serves a task queue no other test's worker polls
      VMBACKUP_HOST: `ts3demo-${randomBytes(3).toString('hex')}`,
    };
    delete env.TEMPORAL_ADDRESS; // the embedded default, as on a fresh machine
    const demo = await run('bash', ['scripts/demo.sh'], env, 900_000);
    expect(demo.code).toBe(0);

    const next = demo.stderr.slice(demo.stderr.indexOf('Next, try:'));
    const commands = next
      .split('\n')
      .slice(1)
      .map((l) => l.replace(/#.*$/, '').trim())
      .filter((l) => l.startsWith('vmbackup '));
    const verbs = commands.map((c) => c.split(' ')[1]);
    expect(verbs).toEqual(expect.arrayContaining(['status', 'list', 'restore', 'schedule', 'report']));
    const id = /^vmbackup status (\S+)$/m.exec(commands.join('\n'))?.[1];
    expect(id).toMatch(new RegExp(`^${domain}-\\d{8}T\\d{6}Z-[0-9a-f]{4}$`));

    // What a newcomer types next: the printed lines, in a new shell, nothing but the state dir of this test added.
    const shell = (line: string) =>
      freshShell(bin, line, { VMBACKUP_STATE_DIR: state, VMBACKUP_HOST: env.VMBACKUP_HOST as string });
    const status = await shell(`vmbackup status ${id}`);
    expect(status.code).toBe(0);
    expect(status.stdout + status.stderr).toContain('completed');
    const list = await shell(`vmbackup list --domain ${domain}`);
    expect(list.code).toBe(0);
    expect(list.stdout).toContain(id);
    const restoreLine = commands.find((c) => c.startsWith('vmbackup restore '));
    expect(restoreLine).toBeDefined();
    const restoreDir = join(state, 'restored');
    const restore = await shell(`${restoreLine!.replace(/--to \S+/, `--to ${restoreDir}`)}`);
    expect(restore.code).toBe(0);
    await expect(lstat(join(restoreDir, 'vda.qcow2'))).resolves.toBeDefined();

    // the schedule line as printed makes a schedule (on the embedded server), which describe then shows
    const scheduleLine = commands.find((c) => c.startsWith('vmbackup schedule create '));
    const name = /^vmbackup schedule create (\S+)/.exec(scheduleLine ?? '')?.[1];
    expect(name).toBeDefined();
    const created = await shell(scheduleLine!);
    try {
      expect(created.code).toBe(0);
      expect(created.stderr).toContain(`schedule ${name}: every 1d at 02:00`);
      const described = await shell(`vmbackup schedule describe ${name} --json`);
      expect(described.code).toBe(0);
      expect(described.stdout).toContain(domain);
    } finally {
      await shell(`vmbackup schedule delete ${name}`);
    }
  });
});
