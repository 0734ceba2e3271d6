/**
 * A Temporal dev server of the bench's own (the pinned CLI that scripts/stack.sh installs, `server start-dev`), so a
 * run of thousands of workflows neither fills the shared stack's SQLite nor slows the other users of its server, and
 * every figure is this run's alone. Configured like the stack's: SQLite in a file with WAL, the search attributes,
 * eager activity dispatch.
 */
import { execFile, spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Connection } from '@temporalio/client';

const SEARCH_ATTRIBUTES = ['VmbackupDomain', 'VmbackupHost', 'VmbackupState', 'VmbackupBackupId', 'VmbackupMethod'];
const DYNAMIC_CONFIG = ['system.enableActivityEagerExecution=true'];

export interface DevServer {
  address: string;
  pid: number;
  /** resident set size (MiB) and CPU time (ms, user + system) of the server process now */
  usage(): Promise<{ rssMiB: number; cpuMs: number; writeBytes: number }>;
  stop(): Promise<void>;
}

function temporalBin(repo: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('bash', [join(repo, 'scripts', 'stack.sh'), 'temporal-bin'], (err, stdout, stderr) =>
      err ? reject(new Error(`scripts/stack.sh temporal-bin: ${stderr || err.message}`)) : resolve(stdout.trim()),
    );
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** RSS now, and CPU time so far (user + system, with the children it reaped: qemu-img, virsh). */
export async function processUsage(pid: number): Promise<{ rssMiB: number; cpuMs: number; writeBytes: number }> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const rssKiB = Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? 0);
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // utime stime cutime cstime: fields 14..17 counted from 1, f[0] is field 3; USER_HZ = 100
  const ticks = [11, 12, 13, 14].reduce((n, i) => n + Number(f[i] ?? 0), 0);
  // bytes this process caused to be written to storage (its SQLite database and WAL, for the dev server)
  const io = await readFile(`/proc/${pid}/io`, 'utf8').catch(() => '');
  const writeBytes = Number(/^write_bytes:\s+(\d+)/m.exec(io)?.[1] ?? NaN);
  return { rssMiB: rssKiB / 1024, cpuMs: ticks * 10, writeBytes };
}

export async function startDevServer(repo: string, dbFile: string, log: (line: string) => void): Promise<DevServer> {
  const bin = await temporalBin(repo);
  // the gRPC port and the HTTP port (start-dev picks port + 1000 for the UI, which --headless turns off)
  const port = await freePort();
  const args = [
    'server',
    'start-dev',
    '--ip',
    '127.0.0.1',
    '--port',
    String(port),
    '--headless',
    '--log-level',
    'error',
  ];
  args.push('--db-filename', dbFile, '--sqlite-pragma', 'journal_mode=WAL');
  for (const a of SEARCH_ATTRIBUTES) args.push('--search-attribute', `${a}=Keyword`);
  for (const d of DYNAMIC_CONFIG) args.push('--dynamic-config-value', d);
  const child: ChildProcess = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const address = `127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`temporal server start-dev exited ${child.exitCode}: ${err}`);
    try {
      const c = await Connection.connect({ address, connectTimeout: 2000 });
      const sa = await c.operatorService.listSearchAttributes({ namespace: 'default' });
      await c.close();
      if (SEARCH_ATTRIBUTES.every((a) => a in (sa.customAttributes ?? {}))) break;
    } catch {
      /* not up yet */
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`temporal server start-dev did not answer on ${address} within 60 s: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  log(`temporal dev server of this run on ${address} (pid ${child.pid}, SQLite ${dbFile})`);
  return {
    address,
    pid: child.pid as number,
    usage: () => processUsage(child.pid as number),
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 30_000);
      await exited;
      clearTimeout(t);
    },
  };
}
