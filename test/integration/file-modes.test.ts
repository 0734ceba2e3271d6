/**
 * File modes under `umask 000`: every file and directory vmbackup creates (state dir, staging, overlays,
 * local and NFS targets) is private, whatever the umask: files 0600, directories 0700, and 0711 only where
 * QEMU must pass through (push staging, overlays). One backup per method (push, snapshot, offline) to a
 * local and an NFS target, run by a host worker in this process with its umask set to 000.
 */
import { randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { pathToFileURL } from 'node:url';
import { MockActivityEnvironment } from '@temporalio/testing';
import type { Client } from '@temporalio/client';
import { createActivities } from '../../src/activities';
import { startBackup } from '../../src/client/backups';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { StagingArea } from '../../src/shared/activities';
import type { RequestedMethod } from '../../src/shared/types';
import { openTarget } from '../../src/storage/registry';
import { loadConfig } from '../../src/worker/config';
import { createHostWorker, quietWorkerLogs } from '../../src/worker';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireNfs, requireTemporal, stackEnv } from '../helpers/stack';
import { temporalClient, uniqueHost } from '../helpers/vmbackup';

type Entry = { path: string; mode: string; kind: 'dir' | 'file' };

/** Every file and directory below `root` (root included), with its permission bits in octal. */
async function walk(root: string): Promise<Entry[]> {
  const out: Entry[] = [];
  const visit = async (path: string): Promise<void> => {
    const st = await lstat(path);
    const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
    out.push({ path, mode, kind: st.isDirectory() ? 'dir' : 'file' });
    if (st.isDirectory()) for (const name of await readdir(path)) await visit(join(path, name));
  };
  await visit(root);
  return out;
}

describe('file modes under umask 000', () => {
  const newDomain = useFixtureDomains();
  const tag = randomBytes(3).toString('hex');
  const host = uniqueHost('mode');
  let savedUmask: number | undefined;
  let work: string;
  let state: string;
  let local: string;
  let nfsUrl: string;
  let nfsDir: string;
  let client: Client;
  let closeClient: () => Promise<void>;
  let stopWorker: () => Promise<void>;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireNfs();
    savedUmask = process.umask(0o000);
    // a work dir QEMU can pass through, so push staging and overlays live under our state dir (and are walked)
    work = await mkdtemp(join(tmpdir(), 'vmbackup-modes-'));
    await chmod(work, 0o711);
    state = join(work, 'state');
    local = join(work, 'local');
    nfsUrl = `${stackEnv().nfs.url}/modes-${tag}`;
    nfsDir = join(stackEnv().nfs.exportDir, `modes-${tag}`);
    ({ client, close: closeClient } = await temporalClient());
    const config = loadConfig({ ...process.env, VMBACKUP_STATE_DIR: state, VMBACKUP_HOST: host });
    quietWorkerLogs();
    // every worker of the host: its queue and its backup slots (a backup waits for a slot first)
    const hostWorker = await createHostWorker({ config, address: stackEnv().temporal.address });
    const running = hostWorker.run();
    stopWorker = async () => {
      hostWorker.shutdown();
      await running;
      await hostWorker.close();
    };
  });
  afterAll(async () => {
    // first: a worker that fails to stop must not leave umask 000 to the files that run after this one
    if (savedUmask !== undefined) process.umask(savedUmask);
    await stopWorker?.();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
    await rm(nfsDir, { recursive: true, force: true });
  });

  async function backUp(domain: string, method: RequestedMethod): Promise<string> {
    const { backupId, handle } = await startBackup(client, {
      domain,
      host,
      method,
      targets: [pathToFileURL(local).href, nfsUrl],
      options: {},
    });
    const result = await handle.result();
    expect(result.status).toBe('completed');
    return backupId;
  }

  test('push, snapshot and offline backups to a local and an NFS target: 0600 files, 0700/0711 directories', async () => {
    const disks = [{ format: 'qcow2' as const, sizeMiB: 16, patterns: [{ byte: 0x4d, offsetMiB: 0, lengthMiB: 2 }] }];
    const [running, snap, off] = await Promise.all([
      newDomain({ prefix: 'mode', disks }),
      newDomain({ prefix: 'mode', disks: [{ format: 'raw', sizeMiB: 16 }] }),
      newDomain({ prefix: 'mode', disks, start: false }),
    ]);
    const ids = {
      push: await backUp(running.name, 'push'),
      snapshot: await backUp(snap.name, 'snapshot'),
      offline: await backUp(off.name, 'auto'),
    };

    const entries = [...(await walk(work)), ...(await walk(nfsDir))].filter((e) => e.path !== work);
    const show = (e: Entry) => `${e.mode} ${e.kind} ${relative(work, e.path)}`;
    // the images, sidecars and manifests of all three backups on both targets
    for (const [domain, id] of [
      [running.name, ids.push],
      [snap.name, ids.snapshot],
      [off.name, ids.offline],
    ] as const) {
      for (const root of [local, nfsDir]) {
        const files = entries.filter((e) => e.path.startsWith(join(root, domain, id) + '/')).map((e) => e.path);
        expect(files.length).toBeGreaterThanOrEqual(2); // an image and the manifest, at least
      }
    }
    const files = entries.filter((e) => e.kind === 'file');
    expect(files.filter((e) => e.mode !== '0600').map(show)).toEqual([]);
    const dirs = entries.filter((e) => e.kind === 'dir');
    expect(dirs.filter((e) => e.mode !== '0700' && e.mode !== '0711').map(show)).toEqual([]);
    // what holds backup data is closed to QEMU too: only the way to staging and overlays is 0711
    const dataDirs = dirs.filter((e) => [running.name, snap.name, off.name].some((d) => e.path.includes(`/${d}`)));
    expect(dataDirs.length).toBe(12); // <domain> and <domain>/<id>, 3 backups, 2 targets
    expect(dataDirs.filter((e) => e.mode !== '0700').map(show)).toEqual([]);
    expect((await lstat(nfsDir)).mode & 0o7777).toBe(0o700);
    expect((await lstat(state)).mode & 0o7777).toBe(0o711);
  });

  test('staging directories: 0711 where QEMU writes (push), 0700 otherwise; the staging root 0711; never in a target others can write to', async () => {
    const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri, sessions: false });
    const acts = createActivities({
      hypervisor: hv,
      stateDir: state,
      qemuStateDir: state,
      openTarget: (u, o) => openTarget(u, { ...o, env: {} }),
    });
    const env = new MockActivityEnvironment();
    const target = pathToFileURL(join(work, 'staged')).href;
    const mode = async (p: string) => ((await lstat(p)).mode & 0o7777).toString(8).padStart(4, '0');
    try {
      const pushed: StagingArea = await env.run(acts.prepareStaging, {
        backupId: `vmbt-mode-${tag}-push`,
        domain: 'vm',
        targets: [target],
        writtenByQemu: true,
      });
      expect(pushed.dir).toBe(join(work, 'staged', '.staging', `vmbt-mode-${tag}-push`));
      expect([
        await mode(join(work, 'staged')),
        await mode(join(work, 'staged', '.staging')),
        await mode(pushed.dir),
      ]).toEqual(['0711', '0711', '0711']);
      const copied: StagingArea = await env.run(acts.prepareStaging, {
        backupId: `vmbt-mode-${tag}-copy`,
        domain: 'vm',
        targets: ['s3://bucket/x'],
      });
      expect(copied.dir).toBe(join(state, 'staging', `vmbt-mode-${tag}-copy`));
      expect([await mode(join(state, 'staging')), await mode(copied.dir)]).toEqual(['0711', '0700']);
      await env.run(acts.cleanupStaging, { backupId: `vmbt-mode-${tag}-push`, stagingDir: pushed.dir });
      await env.run(acts.cleanupStaging, { backupId: `vmbt-mode-${tag}-copy`, stagingDir: copied.dir });

      // a target directory other users may write to could have its .staging swapped under us: not staged in
      const shared = join(work, 'shared-target');
      await mkdir(shared, { mode: 0o777 });
      await chmod(shared, 0o777);
      const elsewhere: StagingArea = await env.run(acts.prepareStaging, {
        backupId: `vmbt-mode-${tag}-shared`,
        domain: 'vm',
        targets: [pathToFileURL(shared).href],
      });
      expect(elsewhere.dir).toBe(join(state, 'staging', `vmbt-mode-${tag}-shared`));
      expect(await readdir(shared)).toEqual([]);
      await env.run(acts.cleanupStaging, { backupId: `vmbt-mode-${tag}-shared`, stagingDir: elsewhere.dir });
    } finally {
      hv.close();
    }
  });
});
