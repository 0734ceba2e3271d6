/**
 * The embedded default's local Temporal dev server: it listens on loopback only (every TCP socket it listens on,
 * read from /proc), a server the CLI starts inherits none of the CLI's secrets, and a command that finds no server
 * says what it tried and what to do, for the embedded default and for a cluster.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join, resolve } from 'node:path';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { embeddedEnv, runCli, uniqueHost } from '../helpers/vmbackup';

const STACK_SCRIPT = resolve(__dirname, '..', '..', 'scripts', 'stack.sh');

interface Listener {
  address: string;
  port: number;
}

/** The TCP sockets process `pid` listens on: its socket inodes (/proc/pid/fd) matched in /proc/pid/net/tcp{,6}. */
async function listeningSockets(pid: number): Promise<Listener[]> {
  const inodes = new Set<string>();
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const link = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const m = /^socket:\[(\d+)\]$/.exec(link);
    if (m) inodes.add(m[1]!);
  }
  const out: Listener[] = [];
  for (const [file, v6] of [
    ['tcp', false],
    ['tcp6', true],
  ] as const) {
    const table = await readFile(`/proc/${pid}/net/${file}`, 'utf8').catch(() => '');
    for (const line of table.trim().split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      const [local, state, inode] = [f[1]!, f[3]!, f[9]!];
      if (state !== '0A' || !inodes.has(inode)) continue; // 0A: LISTEN
      const [hex, port] = local.split(':') as [string, string];
      out.push({ address: v6 ? ipv6(hex) : ipv4(hex), port: parseInt(port, 16) });
    }
  }
  return out;
}

/** /proc/net/tcp writes the address as one little-endian 32-bit word. */
function ipv4(hex: string): string {
  return [3, 2, 1, 0].map((i) => parseInt(hex.slice(i * 2, i * 2 + 2), 16)).join('.');
}

/** ...and IPv6 as four such words. */
function ipv6(hex: string): string {
  const bytes: number[] = [];
  for (let w = 0; w < 4; w++)
    for (const i of [3, 2, 1, 0]) bytes.push(parseInt(hex.slice(w * 8 + i * 2, w * 8 + i * 2 + 2), 16));
  const groups = [];
  for (let i = 0; i < 16; i += 2) groups.push(((bytes[i]! << 8) | bytes[i + 1]!).toString(16));
  const full = groups.join(':');
  if (full === '0:0:0:0:0:0:0:1') return '::1';
  if (full === '0:0:0:0:0:0:0:0') return '::';
  if (full.startsWith('0:0:0:0:0:ffff:')) return `::ffff:${bytes.slice(12).join('.')}`;
  return full;
}

const LOOPBACK = new Set(['127.0.0.1', '::1', '::ffff:127.0.0.1']);

async function serverPid(stateDir: string): Promise<number> {
  const pid = Number((await readFile(join(stateDir, 'stack', 'temporal', 'temporal.pid'), 'utf8')).trim());
  if (!Number.isInteger(pid) || pid <= 0) throw new Error(`no Temporal dev server pid under ${stateDir}`);
  return pid;
}

async function environOf(pid: number): Promise<Map<string, string>> {
  const raw = await readFile(`/proc/${pid}/environ`, 'utf8');
  return new Map(
    raw
      .split('\0')
      .filter(Boolean)
      .map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)] as [string, string]),
  );
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const { port } = srv.address() as { port: number };
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

function stackScript(env: NodeJS.ProcessEnv, ...args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((done, reject) => {
    const child = spawn('bash', [STACK_SCRIPT, ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => done({ code: code ?? -1, stderr }));
  });
}

describe('the local Temporal dev server of the embedded default', () => {
  const own: Array<{ env: NodeJS.ProcessEnv; dir: string }> = [];

  afterAll(async () => {
    for (const { env, dir } of own) {
      const down = await stackScript(env, 'down', 'temporal');
      if (down.code !== 0) throw new Error(`stopping the test's own dev server failed:\n${down.stderr}`);
      await rm(dir, { recursive: true, force: true });
    }
  });

  /** A state dir and port of its own, so the shared server is not touched; stopped after the suite. */
  async function ownServerEnv(canary: string): Promise<NodeJS.ProcessEnv> {
    const dir = await mkdtemp(join(stackEnv().stateDir, 'test-devserver-'));
    const keyFile = join(dir, 'payload.key');
    await writeFile(keyFile, randomBytes(32).toString('base64'), { mode: 0o600 });
    const env = embeddedEnv(uniqueHost('dev'), {
      VMBACKUP_STATE_DIR: dir,
      VMBACKUP_TEMPORAL_PORT: String(await freePort()),
      AWS_ACCESS_KEY_ID: `AKIA${canary}`,
      AWS_SECRET_ACCESS_KEY: canary,
      AWS_SESSION_TOKEN: canary,
      VMBACKUP_PAYLOAD_KEY_FILE: keyFile,
      VMBACKUP_TEST_CANARY: canary,
    });
    own.push({ env, dir });
    return env;
  }

  function expectNothingInherited(environ: Map<string, string>, canary: string, env: NodeJS.ProcessEnv): void {
    const names = [...environ.keys()];
    expect(names.filter((n) => /^AWS_|^TEMPORAL_|PAYLOAD_KEY|CANARY/.test(n))).toEqual([]);
    expect([...environ.values()].filter((v) => v.includes(canary))).toEqual([]);
    expect([...environ.values()].filter((v) => v.includes(String(env.VMBACKUP_PAYLOAD_KEY_FILE)))).toEqual([]);
    expect(environ.get('PATH')).toBeTruthy(); // it did get what it needs
  }

  test("the stack's dev server listens on 127.0.0.1 / ::1 only, on every port it opens", async () => {
    await requireTemporal();
    const pid = await serverPid(stackEnv().stateDir);
    const sockets = await listeningSockets(pid);
    const grpcPort = Number(stackEnv().temporal.address.split(':').pop());
    expect(sockets.map((s) => s.port)).toContain(grpcPort);
    expect(sockets.length).toBeGreaterThanOrEqual(2); // gRPC, and the server's internal and metrics ports
    expect(sockets.filter((s) => !LOOPBACK.has(s.address))).toEqual([]);
  });

  test('a dev server the CLI starts gets none of its secrets (AWS credentials, key files) and listens on loopback', async () => {
    await requireLibvirt();
    const canary = `canary${randomBytes(8).toString('hex')}`;
    const env = await ownServerEnv(canary);
    const res = await runCli(['backup', 'vmbt-dev-no-such-domain', '--target', `file://${env.VMBACKUP_STATE_DIR}/t`], {
      env,
      timeoutMs: 300_000,
    });
    // it started the server, ran the backup on it and the backup failed on the unknown domain
    expect(res.stderr).toMatch(/starting the local Temporal dev server on 127\.0\.0\.1:\d+/);
    expect(res.stderr).toMatch(/vmbt-dev-no-such-domain/);
    expect(res.code).not.toBe(0);
    const pid = await serverPid(env.VMBACKUP_STATE_DIR!);
    expectNothingInherited(await environOf(pid), canary, env);
    const sockets = await listeningSockets(pid);
    expect(sockets.map((s) => s.port)).toContain(Number(env.VMBACKUP_TEMPORAL_PORT));
    expect(sockets.filter((s) => !LOOPBACK.has(s.address))).toEqual([]);
  });

  test('scripts/stack.sh up temporal, run from a shell full of credentials, passes the server none of them', async () => {
    const canary = `canary${randomBytes(8).toString('hex')}`;
    const env = await ownServerEnv(canary);
    const up = await stackScript({ ...env, TEMPORAL_API_KEY: canary }, 'up', 'temporal');
    expect(up.stderr).toMatch(/temporal up/);
    expect(up.code).toBe(0);
    expectNothingInherited(await environOf(await serverPid(env.VMBACKUP_STATE_DIR!)), canary, env);
  });

  test('status and cancel with no server say what was tried and what to do, for the embedded default and a cluster', async () => {
    const port = await freePort();
    const embedded = embeddedEnv(uniqueHost('dev'), { VMBACKUP_TEMPORAL_PORT: String(port) });
    for (const command of [
      ['status', 'x'],
      ['cancel', 'x'],
    ]) {
      const res = await runCli(command, { env: embedded });
      expect(res.code).not.toBe(0);
      expect(res.stderr.trim().split('\n')).toEqual([
        `vmbackup: no Temporal server answers on 127.0.0.1:${port} (connection refused): without TEMPORAL_ADDRESS ` +
          'vmbackup uses its local dev server (port VMBACKUP_TEMPORAL_PORT, default 7233), which only ' +
          '`vmbackup backup` starts; to use a Temporal cluster instead, set TEMPORAL_ADDRESS',
      ]);
    }
    // a port some other program holds: said so, rather than "start the server"
    // (it reads what it gets and answers nothing; resume(): a paused socket would never see the client go)
    const squatter = createServer((socket) => socket.on('error', () => undefined).resume());
    await new Promise<void>((r) => squatter.listen(port, '127.0.0.1', () => r()));
    try {
      const res = await runCli(['status', 'x'], { env: embedded });
      expect(res.code).not.toBe(0);
      expect(res.stderr.trim().split('\n')).toEqual([
        expect.stringMatching(
          new RegExp(
            `^vmbackup: something answers on 127\\.0\\.0\\.1:${port}, but not as a Temporal server \\(.*\\): ` +
              `another program uses the port of vmbackup's local dev server; give the dev server another one with VMBACKUP_TEMPORAL_PORT$`,
          ),
        ),
      ]);
    } finally {
      await new Promise<void>((r) => squatter.close(() => r()));
    }
    const cluster = { ...embedded, TEMPORAL_ADDRESS: `127.0.0.1:${port}` };
    const res = await runCli(['status', 'x'], { env: cluster });
    expect(res.code).not.toBe(0);
    expect(res.stderr.trim().split('\n')).toEqual([
      `vmbackup: cannot reach the Temporal cluster at 127.0.0.1:${port} (TEMPORAL_ADDRESS): connection refused; ` +
        'check the address and that the server is up',
    ]);
  });
});
