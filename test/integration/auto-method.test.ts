/**
 * `--method auto` on a running domain whose host has libvirt's backup API (issue #16's decision, from the pull bench:
 * docs/benchmarks.md "Pull mode"): into a chunk repository the backup is taken in pull mode, with its checkpoint chain
 * (the next auto backup reads only the changed chunks); into an image tree it stays push mode. A domain with a disk
 * in an IOThread never gets pull mode (QEMU 7.2 aborts such a VM when a pull export's reader disconnects).
 */
import { mkdtemp, readFile } from 'node:fs/promises';
import { ApplicationFailure, WorkflowFailedError } from '@temporalio/client';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { startBackup } from '../../src/client/backups';
import type { BackupResult } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { initTestRepository, localRepoTarget, useChunkRepoWorker } from '../helpers/chunk-repo';
import { requireLibvirt, requireTemporal } from '../helpers/stack';

jest.setTimeout(10 * 60_000);

const PASSWORD = 'auto picks pull for chunk repositories';

describe('--method auto on a running domain with the backup API (real stack)', () => {
  const newDomain = useFixtureDomains();
  const ctx = useChunkRepoWorker({
    name: 'auto-method',
    hostPrefix: 'pb',
    password: PASSWORD,
    require: [requireTemporal, requireLibvirt],
  });

  async function backup(dom: FixtureDomain, url: string): Promise<BackupResult> {
    const { handle } = await startBackup(ctx.client, {
      domain: dom.name,
      host: ctx.host,
      method: 'auto',
      targets: [url],
      options: { level: 'auto' },
    });
    return handle.result();
  }

  async function manifestMethod(dir: string, dom: FixtureDomain, id: string): Promise<string> {
    const m = JSON.parse(await readFile(join(dir, dom.name, id, 'manifest.json'), 'utf8')) as { method: string };
    return m.method;
  }

  it('into a chunk repository auto takes pull mode, and the next auto backup reads only the changed chunks', async () => {
    const dom = await newDomain({ prefix: 'pb', disks: [{ format: 'qcow2', sizeMiB: 64, randomMiB: 32 }] });
    const { url, dir, target } = await localRepoTarget(ctx.work, 'repo');
    try {
      await initTestRepository(target, PASSWORD);
    } finally {
      await target.close();
    }
    const first = await backup(dom, url);
    expect(first.status).toBe('completed');
    expect(first.method).toBe('pull');
    expect(first.chain?.level).toBe('full');
    expect(await manifestMethod(dir, dom, first.backupId)).toBe('pull');

    await dom.writeThroughDevice('vda', 0x5c, 40, 1);
    const second = await backup(dom, url);
    expect(second.method).toBe('pull');
    expect(second.chain).toMatchObject({ level: 'inc', parent: first.backupId });
    // one 1 MiB write: one 4 MiB chunk read, the other 15 carried from the first backup's index
    expect(second.pull?.disks.vda).toMatchObject({ readChunks: 1, carriedChunks: 15 });
  });

  it('a disk in an IOThread: --method pull is refused in one sentence before any job, auto keeps push, the VM lives', async () => {
    // QEMU 7.2 aborts the VM when a reader disconnects from the pull export of such a disk (src/workflows/backup.ts)
    const dom = await newDomain({
      prefix: 'pb',
      iothread: true,
      disks: [{ format: 'qcow2', sizeMiB: 32, randomMiB: 16 }],
    });
    const { url, target } = await localRepoTarget(ctx.work, 'repo-iothread');
    try {
      await initTestRepository(target, PASSWORD);
    } finally {
      await target.close();
    }
    const { handle } = await startBackup(ctx.client, {
      domain: dom.name,
      host: ctx.host,
      method: 'pull',
      targets: [url],
      options: { level: 'full' },
    });
    const refused = await handle.result().catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(WorkflowFailedError);
    const cause = (refused as WorkflowFailedError).cause;
    expect(cause).toBeInstanceOf(ApplicationFailure);
    expect((cause as ApplicationFailure).type).toBe('UnsupportedDisk');
    expect((cause as ApplicationFailure).message).toMatch(
      new RegExp(
        `^pull mode would crash ${dom.name}: disk vda runs in an IOThread, and QEMU \\S+ aborts the whole VM when a reader disconnects from such a disk's NBD export \\(a QEMU bug\\): use --method push$`,
      ),
    );
    const auto = await backup(dom, url);
    expect(auto.status).toBe('completed');
    expect(auto.method).toBe('push');
    expect(auto.pull).toBeUndefined();
    expect((await dom.state()).trim()).toBe('running');
  });

  it('into an image tree auto stays push mode', async () => {
    const dom = await newDomain({ prefix: 'pb', disks: [{ format: 'qcow2', sizeMiB: 32, randomMiB: 16 }] });
    const dir = await mkdtemp(join(ctx.work, 'tree-'));
    const result = await backup(dom, pathToFileURL(dir).href);
    expect(result.status).toBe('completed');
    expect(result.method).toBe('push');
    expect(result.pull).toBeUndefined();
    expect(await manifestMethod(dir, dom, result.backupId)).toBe('push');
  });
});
