/**
 * The environment of the tools vmbackup starts, read back from the kernel: a long-lived virsh session
 * shell started by a hypervisor holds none of the worker's secrets (AWS_SECRET_ACCESS_KEY), only what
 * virsh needs.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import { useFixtureDomains } from '../fixtures/domains';
import { stackEnv } from '../helpers/stack';

const exec = promisify(execFile);

/** pids of this process's virsh shells (`virsh -c URI` with no command) */
async function sessionPids(uri: string): Promise<number[]> {
  const { stdout } = await exec('ps', ['-o', 'pid=,args=', '--ppid', String(process.pid)]);
  return stdout
    .split('\n')
    .map((l) => /^\s*(\d+)\s+(.*)$/.exec(l))
    .filter((m): m is RegExpExecArray => m?.[2] === `virsh -c ${uri}`)
    .map((m) => Number(m[1]));
}

describe('tool environment', () => {
  const newDomain = useFixtureDomains();

  test('a live virsh session shell has none of our secrets in /proc/<pid>/environ', async () => {
    const uri = stackEnv().libvirt.uri;
    const dom = await newDomain({ prefix: 'env', disks: [{ format: 'qcow2', sizeMiB: 8 }], start: false });
    const canary = `canary-${randomBytes(8).toString('hex')}`;
    const saved = { secret: process.env.AWS_SECRET_ACCESS_KEY, other: process.env.VMBACKUP_TEST_CANARY };
    process.env.AWS_SECRET_ACCESS_KEY = canary;
    process.env.VMBACKUP_TEST_CANARY = canary;
    const before = new Set(await sessionPids(uri));
    const hv = createVirshHypervisor({ uri, sessions: true });
    try {
      expect(await hv.state(dom.name)).toBe('shut off');
      const mine = (await sessionPids(uri)).filter((p) => !before.has(p));
      expect(mine.length).toBeGreaterThanOrEqual(1); // the query was answered by a session shell
      for (const pid of mine) {
        const environ = (await readFile(`/proc/${pid}/environ`, 'utf8')).split('\0').filter(Boolean);
        expect(environ.join('\n')).not.toContain(canary);
        const names = environ.map((kv) => kv.split('=')[0]);
        expect(names).toEqual(expect.arrayContaining(['PATH', 'LC_ALL', 'LANG']));
        expect(names.filter((n) => n?.startsWith('AWS_') || n?.startsWith('TEMPORAL_'))).toEqual([]);
      }
    } finally {
      hv.close();
      if (saved.secret === undefined) delete process.env.AWS_SECRET_ACCESS_KEY;
      else process.env.AWS_SECRET_ACCESS_KEY = saved.secret;
      if (saved.other === undefined) delete process.env.VMBACKUP_TEST_CANARY;
      else process.env.VMBACKUP_TEST_CANARY = saved.other;
    }
  });
});
