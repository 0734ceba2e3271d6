/**
 * The test fixtures clean up after a dead run (kill -9 of a jest worker, a CI timeout): cleanupStaleFixtures removes
 * the domains and directories of fixtures whose creating process is gone, also those made with `parentDir` outside
 * fixtureRoot() (the instant-restore test under libvirt-qemu makes them), and never one whose process still runs.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execTool } from '../../src/hypervisor/exec';
import { cleanupStaleFixtures } from '../fixtures/domains';
import { requireLibvirt, stackEnv } from '../helpers/stack';

const ROOT = join(__dirname, '..', '..');

function startChild(prefix: string, parentDir: string): Promise<{ pid: number; name: string; dir: string }> {
  const child = spawn(
    process.execPath,
    ['-r', join(ROOT, 'test/storage/ts-register.js'), join(ROOT, 'test/helpers/fixture-child.ts'), prefix, parentDir],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      const line = out.split('\n')[0];
      if (out.includes('\n') && line) {
        const [name, dir] = line.split(' ') as [string, string];
        resolve({ pid: child.pid as number, name, dir });
      }
    });
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    child.on('exit', (code) => reject(new Error(`fixture child exited with ${String(code)}: ${err}`)));
  });
}

async function defined(name: string): Promise<boolean> {
  const r = await execTool('virsh', ['-c', stackEnv().libvirt.uri, 'domstate', name], { timeoutMs: 60_000 });
  return r.code === 0;
}

const exists = (p: string) =>
  stat(p).then(
    () => true,
    () => false,
  );

test('a parentDir fixture of a killed process is removed, domain and directory; a live one is kept', async () => {
  await requireLibvirt();
  const parent = await mkdtemp(join(tmpdir(), 'vmbackup-fxc-'));
  try {
    const dead = await startChild('fxc', parent);
    const alive = await startChild('fxc', parent);
    expect(dead.dir.startsWith(parent)).toBe(true);
    process.kill(dead.pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 500));

    const removed = await cleanupStaleFixtures('fxc');
    expect(removed).toEqual([dead.name]);
    expect(await defined(dead.name)).toBe(false);
    expect(await exists(dead.dir)).toBe(false);
    expect(await defined(alive.name)).toBe(true);
    expect(await exists(alive.dir)).toBe(true);

    process.kill(alive.pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 500));
    expect(await cleanupStaleFixtures('fxc')).toEqual([alive.name]);
    expect(await exists(alive.dir)).toBe(false);
  } finally {
    await rm(parent, { recursive: true, force: true });
  }
});
