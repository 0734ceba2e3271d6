/**
 * A guest controls every byte of a raw disk, so a snapshot-method copy of it starts with whatever the guest wrote,
 * for instance a qcow2 header whose backing file is an NBD server. The host must never parse the copy as anything
 * but raw, nor open what such a header names: the backup completes, the NBD listener sees no connection, restore
 * gives the raw bytes back exactly, and verify passes without touching the listener. And when qemu-img cannot read
 * an image in the format we wrote, the failure is permanent (ImageCorrupt, non-retryable), not retried forever.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { HostPaths } from '../../src/activities/host-paths';
import { createImageActivities } from '../../src/activities/images';
import type { Hypervisor } from '../../src/hypervisor/port';
import { ErrorType } from '../../src/shared/errors';
import { useFixtureDomains } from '../fixtures/domains';
import { sha256Of } from '../storage/backups';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { runCli, startWorkerProcess, uniqueHost, waitFor, type WorkerProcess } from '../helpers/vmbackup';

const run = promisify(execFile);

/** A TCP listener standing in for the NBD server a guest-written header names; counts who connects. */
async function listener(): Promise<{ port: number; connections: () => number; close: () => Promise<void> }> {
  let n = 0;
  const server: Server = createServer((socket) => {
    n += 1;
    socket.destroy();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return { port, connections: () => n, close: () => new Promise((r) => server.close(() => r())) };
}

describe('a raw disk whose first bytes are a qcow2 header naming an NBD backing file', () => {
  const newDomain = useFixtureDomains();
  let work: string;
  let worker: WorkerProcess;
  const host = uniqueHost('e2hdr');

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-guest-header-'));
    worker = await startWorkerProcess(host);
  });
  afterAll(async () => {
    await worker?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('snapshot backup, restore and verify never parse it as qcow2 nor connect to the listener', async () => {
    const nbd = await listener();
    try {
      const dom = await newDomain({
        prefix: 'e2hdr',
        disks: [{ format: 'raw', sizeMiB: 64, patterns: [{ byte: 0x42, offsetMiB: 8, lengthMiB: 4 }] }],
        start: false,
      });
      const disk = dom.disks[0]!.path;
      // what a guest can write on its own disk: the first 64 KiB of a qcow2 image backed by an NBD export
      const header = join(work, 'header.qcow2');
      const backing = `json:{"driver":"nbd","host":"127.0.0.1","port":"${nbd.port}"}`;
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-F', 'nbd', '-b', backing, header, '64M']);
      await run('dd', [`if=${header}`, `of=${disk}`, 'bs=64K', 'count=1', 'conv=notrunc', 'status=none']);
      const { stdout: probed } = await run('qemu-img', ['info', '-U', '--output=json', disk]);
      expect(JSON.parse(probed)).toMatchObject({ format: 'qcow2', 'backing-filename': backing }); // a probe is fooled
      expect(nbd.connections()).toBe(0);
      await dom.start();

      const target = pathToFileURL(join(work, 'target')).href;
      const started = await runCli(['backup', dom.name, '--host', host, '--target', target, '--method', 'snapshot']);
      expect(started.code).toBe(0);
      const backupId = started.stdout.trim();
      // a probing qemu-img connects at once and then fails on every retry: stop at the first connection
      const outcome = await waitFor(
        'the backup to end',
        async () => {
          if (nbd.connections() > 0) return 'the host connected to the NBD server the guest named';
          const status = await runCli(['status', backupId, '--json']);
          const s = (JSON.parse(status.stdout) as { status: string }).status;
          return s === 'running' ? undefined : s;
        },
        { timeoutMs: 240_000, intervalMs: 500 },
      ).finally(async () => {
        if (nbd.connections() > 0) await runCli(['cancel', backupId, '--wait']);
      });
      expect(outcome).toBe('completed');

      const list = JSON.parse((await runCli(['list', '--target', target, '--json'])).stdout) as {
        backups: Array<{ disks: Array<{ name: string; format: string }> }>;
      };
      expect(list.backups[0]!.disks).toEqual([expect.objectContaining({ name: 'vda', format: 'raw' })]);

      await dom.destroy(); // the disk stays as it is now: the reference
      const restored = join(work, 'restored.raw');
      const res = await runCli(['restore', backupId, '--target', target, '--disk', 'vda', '--to', restored]);
      expect(res.code).toBe(0);
      expect(await sha256Of(restored)).toBe(await sha256Of(disk));

      const verify = await runCli(['verify', backupId, '--target', target]);
      expect(verify.code).toBe(0);
      expect(nbd.connections()).toBe(0);
    } finally {
      await nbd.close();
    }
  });
});

test('finalizeImages: an image qemu-img cannot read in the format we wrote fails permanently as ImageCorrupt', async () => {
  const work = await mkdtemp(join(stackEnv().stateDir, 'test-image-corrupt-'));
  try {
    // staged where a worker with state dir `work` stages this backup's images
    const path = join(work, 'staging', 'web-20261130T010000Z-0bad', 'vda.qcow2');
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, Buffer.alloc(1 << 20, 0x61)); // not a qcow2 image at all
    const activities = createImageActivities({
      hypervisor: {} as Hypervisor,
      paths: new HostPaths({ stateDir: work }),
    });
    const err = await new MockActivityEnvironment()
      .run(activities.finalizeImages, {
        backupId: 'web-20261130T010000Z-0bad',
        images: [{ name: 'vda', format: 'qcow2', path, virtualSize: 1 << 20 }],
      })
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect(err).toBeInstanceOf(ApplicationFailure);
    expect((err as ApplicationFailure).type).toBe(ErrorType.ImageCorrupt);
    expect((err as ApplicationFailure).nonRetryable).toBe(true);
    expect((err as ApplicationFailure).message).toMatch(
      new RegExp(
        `^the backup image of disk vda \\(${path}\\) cannot be read as qcow2: cannot check the image ${path}: Could not open '${path}': Image is not in qcow2 format$`,
      ),
    );
  } finally {
    await rm(work, { recursive: true, force: true });
  }
});
