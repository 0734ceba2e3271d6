/**
 * `vmbackup restore <id> --instant` of a VM whose QEMU runs as libvirt-qemu (the Debian default), not root, on the
 * real stack (libvirt/QEMU, the Temporal dev server, a `vmbackup worker` process):
 * 1. a BIOS-only domain without a static DAC label, backed up to a local target whose directories are 0700:
 *    --instant starts it (its QEMU process runs as libvirt-qemu), the target's directories down to the images are
 *    0711 while it runs, --finish completes, and afterwards they are 0700 again, the backup's files root's 0600,
 *    and `verify` passes;
 * 2. a start that fails once the directories are open (--to where QEMU cannot reach): all put back, nothing left;
 * 3. a target below a directory libvirt-qemu cannot pass through: refused with one sentence naming that directory,
 *    nothing defined, written or changed.
 * Everything lives under a fresh 0711 directory in /var/lib/libvirt/images (the state dir is under /root, which
 * libvirt-qemu cannot reach). Domains are `vmbt-in2-...`, removed even when a test fails.
 */
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { randomBytes } from 'node:crypto';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { run, virsh } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import { finishInstantWorkflowId } from '../../src/shared/names';
import type { WorkerProcess } from '../helpers/vmbackup';

/** a directory libvirt-qemu may pass through (root 0711 on Debian) */
const QEMU_REACHABLE_ROOT = '/var/lib/libvirt/images';

interface InstantJson {
  domain: string;
  disks: Array<{ name: string; overlay: string; backing: string }>;
}

const restored: Array<{ name: string; dir: string }> = [];
let base: string;

function restoredName(tag: string): { name: string; dir: string } {
  const r = { name: `vmbt-in2-${tag}-${randomBytes(3).toString('hex')}`, dir: join(base, `instant-${tag}`) };
  restored.push(r);
  return r;
}

async function removeRestored(name: string, dir: string): Promise<void> {
  await virsh('destroy', name).catch(() => undefined);
  await virsh('undefine', name, '--nvram').catch(() => undefined);
  await rm(dir, { recursive: true, force: true });
  await rm(join(stackEnv().stateDir, 'instant', `${name}.json`), { force: true });
}

async function modeOf(path: string): Promise<string> {
  return ((await stat(path)).mode & 0o7777).toString(8).padStart(4, '0');
}

/** The target's directories from its root down to the backup's: path -> mode. */
async function targetModes(root: string, domain: string, backupId: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const d of [root, join(root, domain), join(root, domain, backupId)]) out[d] = await modeOf(d);
  return out;
}

/** Every file of the backup's directory: owner uid and mode. */
async function backupFiles(dir: string): Promise<Record<string, { uid: number; mode: string }>> {
  const out: Record<string, { uid: number; mode: string }> = {};
  for (const f of (await readdir(dir)).sort()) {
    const st = await stat(join(dir, f));
    out[f] = { uid: st.uid, mode: (st.mode & 0o777).toString(8) };
  }
  return out;
}

beforeAll(async () => {
  await requireLibvirt();
  await stat(QEMU_REACHABLE_ROOT); // libvirt's images directory: fails loudly when libvirt is not installed
  base = await mkdtemp(join(QEMU_REACHABLE_ROOT, 'vmbt-in2-'));
  await chmod(base, 0o711);
});

afterAll(async () => {
  for (const r of restored) await removeRestored(r.name, r.dir);
  if (base) await rm(base, { recursive: true, force: true });
}, 120_000);

describe('restore --instant of a VM whose QEMU runs as libvirt-qemu (real stack)', () => {
  const newDomain = useFixtureDomains();
  let host: string;
  let worker: WorkerProcess | undefined;
  let source: FixtureDomain;
  let targetDir: string;
  let lockedDir: string;
  let lockedTarget: string;
  let backupId: string;
  let lockedBackupId: string;

  async function backup(to: string): Promise<string> {
    const b = await runCli(
      ['backup', source.name, '--host', host, '--target', pathToFileURL(to).href, '--wait', '--json'],
      {
        env: cliEnv(),
      },
    );
    if (b.code !== 0) throw new Error(`the backup of ${source.name} to ${to} failed: ${b.stderr}`);
    return (JSON.parse(b.stdout) as { backupId: string }).backupId;
  }

  beforeAll(async () => {
    await requireTemporal();
    host = uniqueHost('in2');
    worker = await startWorkerProcess(host);
    const domains = join(base, 'domains');
    await mkdir(domains, { mode: 0o711 });
    source = await newDomain({
      prefix: 'in2',
      runAsRoot: false,
      parentDir: domains,
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x33, offsetMiB: 8, lengthMiB: 4 }] }],
    });
    targetDir = join(base, 'target');
    await mkdir(targetDir, { mode: 0o700 });
    backupId = await backup(targetDir);
    lockedDir = join(base, 'locked');
    await mkdir(lockedDir, { mode: 0o700 });
    lockedTarget = join(lockedDir, 'target');
    await mkdir(lockedTarget, { mode: 0o700 });
    lockedBackupId = await backup(lockedTarget);
  }, 600_000);

  afterAll(async () => {
    const { client, close } = await temporalClient();
    try {
      for (const r of restored) {
        await client.workflow
          .getHandle(finishInstantWorkflowId(host, r.name))
          .terminate('test cleanup')
          .catch(() => undefined);
      }
    } finally {
      await close();
    }
    await worker?.stop();
  }, 120_000);

  test('--instant starts it as libvirt-qemu on a 0700 target, opened 0711 while it runs and 0700 again after --finish', async () => {
    const backupDir = join(targetDir, source.name, backupId);
    const closed = await targetModes(targetDir, source.name, backupId);
    expect(Object.values(closed)).toEqual(['0700', '0700', '0700']);
    const filesBefore = await backupFiles(backupDir);
    expect(filesBefore['vda.qcow2']).toEqual({ uid: 0, mode: '600' });

    const r = restoredName('one');
    const res = await runCli(
      ['restore', backupId, '--target', pathToFileURL(targetDir).href, '--instant', r.name, '--to', r.dir, '--json'],
      { env: cliEnv() },
    );
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const started = JSON.parse(res.stdout) as InstantJson;
    expect(started.disks.map((d) => d.backing)).toEqual([join(backupDir, 'vda.qcow2')]);
    expect((await virsh('domstate', r.name)).trim()).toBe('running');
    const pid = (await readFile(`/run/libvirt/qemu/${r.name}.pid`, 'utf8')).trim();
    expect((await run('ps', ['-o', 'user=', '-p', pid])).stdout.trim()).toBe('libvirt-qemu');
    // searchable by QEMU's user, never listable
    expect(Object.values(await targetModes(targetDir, source.name, backupId))).toEqual(['0711', '0711', '0711']);

    const fin = await runCli(['restore', '--finish', r.name, '--host', host, '--json'], { env: cliEnv() });
    expect(fin.stderr).toBe('');
    expect(fin.code).toBe(0);
    expect(JSON.parse(fin.stdout)).toEqual({
      domain: r.name,
      alreadyStandalone: false,
      disks: [{ name: 'vda', path: started.disks[0]!.overlay }],
    });
    expect((await virsh('domstate', r.name)).trim()).toBe('running');
    expect(await targetModes(targetDir, source.name, backupId)).toEqual(closed);
    // libvirt handed the image to libvirt-qemu and does not give it back once the pull dropped it: --finish does
    expect(await backupFiles(backupDir)).toEqual(filesBefore);
    const verify = await runCli(['verify', backupId, '--target', pathToFileURL(targetDir).href], { env: cliEnv() });
    expect(verify.code).toBe(0);
    expect(verify.stderr).toContain(`Backup ${backupId} on ${pathToFileURL(targetDir).href} is intact`);
  }, 600_000);

  test('a start that fails after the directories were opened (--to where QEMU cannot reach) puts the modes and owners back', async () => {
    const backupDir = join(targetDir, source.name, backupId);
    const closed = await targetModes(targetDir, source.name, backupId);
    const filesBefore = await backupFiles(backupDir);
    const r = { name: `vmbt-in2-fail-${randomBytes(3).toString('hex')}`, dir: join(lockedDir, 'instant-fail') };
    restored.push(r);
    const res = await runCli(
      ['restore', backupId, '--target', pathToFileURL(targetDir).href, '--instant', r.name, '--to', r.dir],
      { env: cliEnv() },
    );
    expect(res.code).toBe(1);
    const lines = res.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/Permission denied.*nothing was left defined\.$/);
    expect(
      await virsh('dominfo', r.name).then(
        () => true,
        () => false,
      ),
    ).toBe(false);
    await expect(stat(join(stackEnv().stateDir, 'instant', `${r.name}.json`))).rejects.toMatchObject({
      code: 'ENOENT',
    });
    expect(await targetModes(targetDir, source.name, backupId)).toEqual(closed);
    expect(await backupFiles(backupDir)).toEqual(filesBefore);
  }, 300_000);

  test('a target below a directory libvirt-qemu cannot pass through is refused with one sentence, nothing changed', async () => {
    const before = {
      locked: await modeOf(lockedDir),
      target: await targetModes(lockedTarget, source.name, lockedBackupId),
    };
    expect(before.locked).toBe('0700');
    const r = restoredName('locked');
    const res = await runCli(
      ['restore', lockedBackupId, '--target', pathToFileURL(lockedTarget).href, '--instant', r.name, '--to', r.dir],
      { env: cliEnv() },
    );
    expect(res.code).toBe(1);
    const lines = res.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toContain(`cannot pass through ${lockedDir} `);
    expect(lines[0]).toMatch(/nothing was changed\.$/);
    expect(
      await virsh('dominfo', r.name).then(
        () => true,
        () => false,
      ),
    ).toBe(false);
    await expect(stat(r.dir)).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(stat(join(stackEnv().stateDir, 'instant', `${r.name}.json`))).rejects.toMatchObject({
      code: 'ENOENT',
    });
    expect({
      locked: await modeOf(lockedDir),
      target: await targetModes(lockedTarget, source.name, lockedBackupId),
    }).toEqual(before);
  }, 300_000);
});
