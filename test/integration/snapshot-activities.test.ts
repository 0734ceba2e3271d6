/**
 * The snapshot-method activities against real libvirt/QEMU (TCG) domains: overlay, copy, active
 * commit, pivot. MockActivityEnvironment only supplies the activity Context (heartbeats, cancel);
 * the hypervisor, the disks and the copy tools are real.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, rm, stat, truncate, utimes, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { MockActivityEnvironment } from '@temporalio/testing';
import { DefaultLogger } from '@temporalio/worker';
import type { LogEntry } from '@temporalio/worker';
import { createSnapshotActivities } from '../../src/activities/snapshot';
import type { CopyHeartbeat } from '../../src/activities/snapshot';
import { HypervisorError } from '../../src/hypervisor/errors';
import type { Hypervisor } from '../../src/hypervisor/port';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import { sha256File } from '../../src/shared/sha256-file';
import type { OverlayRecovery } from '../../src/shared/activities';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireLibvirt, stackEnv } from '../helpers/stack';
import { domblklist, exists, holds, identical, reference, virsh } from '../helpers/images';

const run = promisify(execFile);

function sources(dom: FixtureDomain): Record<string, string> {
  return Object.fromEntries(dom.disks.map((d) => [d.dev, d.path]));
}

async function noBlockJob(domain: string, dev: string): Promise<boolean> {
  return /No current block job/.test(await virsh('blockjob', domain, dev, '--info'));
}

describe('snapshot activities on real domains', () => {
  const newDomain = useFixtureDomains();
  const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri });
  let work: string;
  let stateDir: string;
  let logs: LogEntry[];
  let n = 0;
  const backupId = (tag: string) => `snap-${tag}-${process.pid}-${++n}`;

  /** Runs an activity with a real activity Context; heartbeats are collected. */
  async function act<I, O>(
    fn: (input: I) => Promise<O>,
    input: I,
    opts: { heartbeats?: unknown[]; heartbeatDetails?: unknown } = {},
  ): Promise<O> {
    const env = new MockActivityEnvironment(
      { heartbeatDetails: opts.heartbeatDetails },
      { logger: new DefaultLogger('WARN', (entry) => logs.push(entry)) },
    );
    env.on('heartbeat', (d: unknown) => opts.heartbeats?.push(d));
    return env.run(fn, input);
  }

  function activities(over: Partial<Parameters<typeof createSnapshotActivities>[0]> = {}) {
    // Only the recovery test asks about backups; for the rest every backup runs.
    const backupStates = async () => 'running' as const;
    return createSnapshotActivities({ hypervisor: hv, stateDir, pollIntervalMs: 100, backupStates, ...over });
  }

  beforeAll(async () => {
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-snap-'));
    stateDir = join(work, 'state');
  });
  beforeEach(() => {
    logs = [];
  });
  afterAll(async () => {
    hv.close(); // its virsh shells would outlive this file inside jest's process
    await rm(work, { recursive: true, force: true });
  });

  test('backs up a running domain: copies equal the bases at snapshot time, writes made meanwhile reach the bases', async () => {
    const dom = await newDomain({
      prefix: 'snap',
      disks: [
        { format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0xa1, offsetMiB: 0, lengthMiB: 16 }] },
        { format: 'raw', sizeMiB: 64, patterns: [{ byte: 0xb1, offsetMiB: 8, lengthMiB: 16 }] },
      ],
    });
    const a = activities();
    const id = backupId('full');
    const staging = join(stateDir, 'staging', id);
    const info = await hv.inspect(dom.name);
    // Nothing writes to a domain without a guest OS: the images now are the backup point.
    const refs = await Promise.all(dom.disks.map((d) => reference(d.path, join(work, `${id}-${d.dev}.ref.raw`))));

    const created = await act(a.createOverlays, {
      backupId: id,
      domain: dom.name,
      disks: info.disks,
      quiesce: false,
      requireQuiesce: false,
    });
    expect(created.quiesced).toBe(false);
    expect(created.overlays.map((o) => o.overlay)).toEqual([
      join(stateDir, 'overlays', id, `${dom.name}.vda.qcow2`),
      join(stateDir, 'overlays', id, `${dom.name}.vdb.qcow2`),
    ]);
    expect(await domblklist(dom.name)).toEqual({
      vda: created.overlays[0]!.overlay,
      vdb: created.overlays[1]!.overlay,
    });

    await dom.writeThroughDevice('vda', 0xc1, 32, 8);
    const heartbeats: unknown[] = [];
    const copying = act(
      a.copyBaseImages,
      { backupId: id, domain: dom.name, overlays: created.overlays, stagingDir: staging, copyTool: 'rsync' },
      { heartbeats },
    );
    await dom.writeThroughDevice('vdb', 0xc2, 40, 8);
    const images = await copying;
    expect(images).toEqual([
      {
        name: 'vda',
        format: 'qcow2',
        path: join(staging, 'vda.qcow2'),
        virtualSize: 64 << 20,
        sha256: expect.stringMatching(/^[0-9a-f]{64}$/),
      },
      {
        name: 'vdb',
        format: 'raw',
        path: join(staging, 'vdb.raw'),
        virtualSize: 64 << 20,
        sha256: expect.stringMatching(/^[0-9a-f]{64}$/),
      },
    ]);
    // The hash the copy step reports is the copy's own (finalizeImages trusts it).
    for (const img of images) expect(img.sha256).toBe(await sha256File(img.path));
    expect(await identical(images[0]!.path, refs[0]!)).toBe(true);
    expect(await identical(images[1]!.path, refs[1]!)).toBe(true);
    expect(heartbeats).toContainEqual(expect.objectContaining({ disk: 'vdb', phase: 'verify', bytesDone: 64 << 20 }));

    await dom.writeThroughDevice('vda', 0xc3, 48, 4);
    await act(a.commitAndPivot, { backupId: id, domain: dom.name, overlays: created.overlays });
    expect(await domblklist(dom.name)).toEqual(sources(dom));
    expect(await noBlockJob(dom.name, 'vda')).toBe(true);
    expect(await noBlockJob(dom.name, 'vdb')).toBe(true);
    const [vda, vdb] = dom.disks.map((d) => d.path) as [string, string];
    expect(await holds(vda, 0xa1, 0, 16)).toBe(true);
    expect(await holds(vda, 0xc1, 32, 8)).toBe(true);
    expect(await holds(vda, 0xc3, 48, 4)).toBe(true);
    expect(await holds(vdb, 0xb1, 8, 16)).toBe(true);
    expect(await holds(vdb, 0xc2, 40, 8)).toBe(true);

    await act(a.removeOverlays, { backupId: id, domain: dom.name, overlays: created.overlays });
    expect(await exists(join(stateDir, 'overlays', id))).toBe(false);
    expect(await dom.state()).toBe('running');
  });

  test("the own single-pass copy (auto): copies equal the bases, the hash is the copy's, a retry keeps a partial copy", async () => {
    const dom = await newDomain({
      prefix: 'snapcp',
      disks: [
        { format: 'qcow2', sizeMiB: 64, randomMiB: 24, patterns: [{ byte: 0xa7, offsetMiB: 40, lengthMiB: 8 }] },
        { format: 'raw', sizeMiB: 64, randomMiB: 16, patterns: [{ byte: 0xb7, offsetMiB: 32, lengthMiB: 8 }] },
      ],
    });
    const a = activities();
    const id = backupId('auto');
    const staging = join(stateDir, 'staging', id);
    const info = await hv.inspect(dom.name);
    const refs = await Promise.all(dom.disks.map((d) => reference(d.path, join(work, `${id}-${d.dev}.ref.raw`))));
    const created = await act(a.createOverlays, {
      backupId: id,
      domain: dom.name,
      disks: info.disks,
      quiesce: false,
      requireQuiesce: false,
    });
    const input = {
      backupId: id,
      domain: dom.name,
      overlays: created.overlays,
      stagingDir: staging,
      copyTool: 'auto' as const,
    };

    const heartbeats: CopyHeartbeat[] = [];
    const copying = act(a.copyBaseImages, input, { heartbeats });
    await dom.writeThroughDevice('vdb', 0xc7, 48, 8); // into the overlay, not the base being copied
    const images = await copying;
    for (const [i, img] of images.entries()) {
      expect(img.sha256).toBe(await sha256File(img.path));
      expect(await identical(img.path, refs[i]!)).toBe(true);
    }
    const vdbSize = (await stat(dom.disks[1]!.path)).size;
    expect(heartbeats.at(-1)).toMatchObject({
      disk: 'vdb',
      phase: 'copy',
      bytesDone: vdbSize,
      bytesTotal: vdbSize,
      resumedFrom: 0,
      bytesCopied: vdbSize,
      disksDone: ['vda', 'vdb'],
    });
    expect(heartbeats.some((h) => h.phase === 'verify')).toBe(false); // one pass: nothing is read back

    // A retry after a crash mid-copy of vdb: the first 24 MiB of its copy are kept after a check.
    const vdbCopy = images[1]!.path;
    await truncate(vdbCopy, 24 << 20);
    const retry: CopyHeartbeat[] = [];
    const again = await act(a.copyBaseImages, input, { heartbeats: retry, heartbeatDetails: heartbeats.at(-1) });
    expect(again).toEqual(images);
    expect(retry.at(-1)).toMatchObject({ disk: 'vdb', resumedFrom: 24 << 20, bytesCopied: vdbSize - (24 << 20) });
    expect(retry).toContainEqual(expect.objectContaining({ disk: 'vdb', phase: 'verify' }));
    expect(await identical(vdbCopy, refs[1]!)).toBe(true);

    await act(a.commitAndPivot, { backupId: id, domain: dom.name, overlays: created.overlays });
    await act(a.removeOverlays, { backupId: id, domain: dom.name, overlays: created.overlays });
    expect(await domblklist(dom.name)).toEqual(sources(dom));
    expect(await holds(dom.disks[1]!.path, 0xc7, 48, 8)).toBe(true);
  });

  test('every step is idempotent: a retry never stacks a second overlay, re-commits or fails on a missing file', async () => {
    const dom = await newDomain({
      prefix: 'snap',
      disks: [{ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x5a, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const a = activities();
    const id = backupId('idem');
    const info = await hv.inspect(dom.name);
    const input = { backupId: id, domain: dom.name, disks: info.disks, quiesce: false, requireQuiesce: false };
    // A crash between libvirt creating the overlay file and the disk switching to it leaves the file.
    const overlay = join(stateDir, 'overlays', id, `${dom.name}.vda.qcow2`);
    await mkdir(join(stateDir, 'overlays', id), { recursive: true });
    await writeFile(overlay, 'left by a crashed attempt');

    const first = await act(a.createOverlays, input);
    const second = await act(a.createOverlays, input);
    expect(second).toEqual(first);
    expect(await domblklist(dom.name)).toEqual({ vda: overlay });
    const [disk] = await hv.disks(dom.name);
    expect(disk?.backingChain).toEqual([dom.disks[0]!.path]); // one overlay on the base, not two
    expect((await readdir(join(stateDir, 'overlays', id))).filter((f) => f.endsWith('.qcow2'))).toEqual([
      `${dom.name}.vda.qcow2`,
    ]);

    await dom.writeThroughDevice('vda', 0x6b, 16, 4);
    const images = await act(a.copyBaseImages, {
      backupId: id,
      domain: dom.name,
      overlays: first.overlays,
      stagingDir: join(stateDir, 'staging', id),
      copyTool: 'cp',
    });
    expect(await holds(images[0]!.path, 0x5a, 0, 8)).toBe(true);
    expect(await holds(images[0]!.path, 0, 16, 4)).toBe(true);

    const undo = { backupId: id, domain: dom.name, overlays: first.overlays };
    await act(a.commitAndPivot, undo);
    await act(a.commitAndPivot, undo); // already on its base: nothing to do
    expect(await domblklist(dom.name)).toEqual(sources(dom));
    await act(a.removeOverlays, undo);
    await act(a.removeOverlays, undo); // already gone
    expect(await holds(dom.disks[0]!.path, 0x6b, 16, 4)).toBe(true);

    // An undo step called before createOverlays returned knows no overlay: it finds them by backup id.
    const id2 = backupId('undo');
    await act(a.createOverlays, { ...input, backupId: id2 });
    await dom.writeThroughDevice('vda', 0x7c, 20, 2);
    await act(a.commitAndPivot, { backupId: id2, domain: dom.name, overlays: [] });
    await act(a.removeOverlays, { backupId: id2, domain: dom.name, overlays: [] });
    expect(await domblklist(dom.name)).toEqual(sources(dom));
    expect(await holds(dom.disks[0]!.path, 0x7c, 20, 2)).toBe(true);
    expect(await exists(join(stateDir, 'overlays', id2))).toBe(false);
  });

  test('recoverOverlays commits the overlays of closed backups and leaves running ones and foreign files alone', async () => {
    const [domA, domB] = await Promise.all([
      newDomain({
        prefix: 'snap',
        disks: [{ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x11, offsetMiB: 0, lengthMiB: 4 }] }],
      }),
      newDomain({ prefix: 'snap', disks: [{ format: 'raw', sizeMiB: 32 }] }),
    ]);
    const dead = backupId('dead');
    const dead2 = backupId('dead2');
    const dead3 = backupId('dead3');
    const alive = backupId('alive');
    const unknownOld = backupId('unknown-old');
    const unknownNew = backupId('unknown-new');
    // What Temporal says of each backup when recovery asks (the worker asks visibility: recover.test.ts)
    const asked: string[] = [];
    const a = activities({
      backupStates: async (id) => {
        asked.push(id);
        return id === alive ? 'running' : id.includes('unknown') ? 'unknown' : 'closed';
      },
    });
    const overlaysRoot = join(stateDir, 'overlays');
    const infoA = await hv.inspect(domA.name);
    const infoB = await hv.inspect(domB.name);
    const createdA = await act(a.createOverlays, {
      backupId: dead,
      domain: domA.name,
      disks: infoA.disks,
      quiesce: false,
      requireQuiesce: false,
    });
    const createdB = await act(a.createOverlays, {
      backupId: alive,
      domain: domB.name,
      disks: infoB.disks,
      quiesce: false,
      requireQuiesce: false,
    });
    await domA.writeThroughDevice('vda', 0xd1, 8, 4);
    // an overlay file of a dead backup that no disk took, and files that are not ours
    const unused = join(overlaysRoot, dead2, `${domA.name}.vdb.qcow2`);
    await mkdir(join(overlaysRoot, dead2), { recursive: true });
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', unused, '32M']);
    // unused overlays: one changed just now (a terminated backup's snapshot may still be creating it), and
    // backups Temporal does not know, one quiet for two hours and one recent (visibility can lag a start)
    const fresh = join(overlaysRoot, dead3, `${domA.name}.vda.qcow2`);
    const lostOld = join(overlaysRoot, unknownOld, `${domA.name}.vda.qcow2`);
    const lostNew = join(overlaysRoot, unknownNew, `${domA.name}.vda.qcow2`);
    for (const f of [fresh, lostOld, lostNew]) {
      await mkdir(dirname(f), { recursive: true });
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', f, '32M']);
    }
    const hoursAgo = (h: number) => new Date(Date.now() - h * 3600_000);
    for (const f of [unused, lostOld, dirname(lostOld)]) await utimes(f, hoursAgo(2), hoursAgo(2));
    const notes = join(overlaysRoot, dead2, 'notes.txt');
    const stray = join(overlaysRoot, `${domA.name}.vda.qcow2`);
    const elsewhere = join(stateDir, 'elsewhere', `${domA.name}.vda.qcow2`);
    await mkdir(join(stateDir, 'elsewhere'), { recursive: true });
    await Promise.all([notes, stray, elsewhere].map((f) => writeFile(f, 'not vmbackup’s')));

    // an earlier version's list of running backups (stale: it names the dead one) no longer decides
    const actions = await act(a.recoverOverlays, { activeBackupIds: [dead] });
    const ours = actions.filter((x: OverlayRecovery) => x.overlay.startsWith(overlaysRoot));
    expect(ours).toEqual(
      expect.arrayContaining([
        { domain: domA.name, disk: 'vda', overlay: createdA.overlays[0]!.overlay, backupId: dead, action: 'committed' },
        { domain: domA.name, disk: 'vdb', overlay: unused, backupId: dead2, action: 'removed-unused-overlay' },
        { domain: domA.name, disk: 'vda', overlay: lostOld, backupId: unknownOld, action: 'removed-unused-overlay' },
        {
          domain: domA.name,
          disk: 'vda',
          overlay: fresh,
          backupId: dead3,
          action: 'kept',
          detail: expect.stringMatching(/changed less than 5 min ago.*run `vmbackup recover` again later/),
        },
      ]),
    );
    expect(ours).toHaveLength(4);
    expect(asked).toEqual(expect.arrayContaining([dead, dead2, dead3, alive, unknownOld, unknownNew]));
    for (const f of [fresh, lostNew]) expect(await exists(f)).toBe(true);
    expect(await exists(dirname(lostOld))).toBe(false);

    expect(await domblklist(domA.name)).toEqual(sources(domA));
    expect(await holds(domA.disks[0]!.path, 0x11, 0, 4)).toBe(true);
    expect(await holds(domA.disks[0]!.path, 0xd1, 8, 4)).toBe(true);
    expect(await exists(join(overlaysRoot, dead))).toBe(false);
    expect(await exists(unused)).toBe(false);
    // the active backup and everything that is not an overlay of ours is untouched
    expect(await domblklist(domB.name)).toEqual({ vda: createdB.overlays[0]!.overlay });
    for (const f of [notes, stray, elsewhere]) expect(await exists(f)).toBe(true);

    // the active backup ends normally
    const undoB = { backupId: alive, domain: domB.name, overlays: createdB.overlays };
    await act(a.commitAndPivot, undoB);
    await act(a.removeOverlays, undoB);
    expect(await domblklist(domB.name)).toEqual(sources(domB));
  });

  test.each([
    ['a guest agent channel but no agent', true],
    ['no guest agent channel', false],
  ])(
    'quiesce with %s: falls back to crash-consistent, or fails cleanly with --require-quiesce',
    async (_what, channel) => {
      const dom = await newDomain({
        prefix: 'snap',
        disks: [{ format: 'qcow2', sizeMiB: 16 }],
        guestAgentChannel: channel,
      });
      const a = activities();
      const info = await hv.inspect(dom.name);
      const strict = backupId('strict');
      const failure = act(a.createOverlays, {
        backupId: strict,
        domain: dom.name,
        disks: info.disks,
        quiesce: true,
        requireQuiesce: true,
      });
      await expect(failure).rejects.toMatchObject({
        type: 'QuiesceFailed',
        nonRetryable: true,
        message: expect.stringContaining(
          channel ? 'QEMU guest agent is not connected' : 'QEMU guest agent is not configured',
        ),
      });
      await expect(failure).rejects.toThrow(new RegExp(`^cannot quiesce ${dom.name}: .*no overlay was created`));
      expect(await domblklist(dom.name)).toEqual(sources(dom));
      expect(await exists(join(stateDir, 'overlays', strict))).toBe(false);

      const lenient = backupId('lenient');
      const input = { backupId: lenient, domain: dom.name, disks: info.disks, quiesce: true, requireQuiesce: false };
      const created = await act(a.createOverlays, input);
      expect(created.quiesced).toBe(false);
      expect(logs.map((l) => l.message)).toContain(
        'guest agent unavailable: falling back to a crash-consistent snapshot',
      );
      expect((await act(a.createOverlays, input)).quiesced).toBe(false); // the retry reports what was done
      const undo = { backupId: lenient, domain: dom.name, overlays: created.overlays };
      await act(a.commitAndPivot, undo);
      await act(a.removeOverlays, undo);
      expect(await domblklist(dom.name)).toEqual(sources(dom));
    },
  );

  test('pivot trouble: a foreign block job is aborted, "not ready for pivot yet" is polled through, an aborted commit is retried', async () => {
    const dom = await newDomain({
      prefix: 'snap',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x21, offsetMiB: 0, lengthMiB: 32 }] }],
    });
    const info = await hv.inspect(dom.name);
    const vda = dom.disks[0]!.path;
    const snapshot = async (a: ReturnType<typeof activities>, id: string) =>
      (
        await act(a.createOverlays, {
          backupId: id,
          domain: dom.name,
          disks: info.disks,
          quiesce: false,
          requireQuiesce: false,
        })
      ).overlays;

    // 1. Someone starts a slow block pull on our overlay: a finished pull would drop the overlay's
    //    backing file, so the rule is to abort it.
    const plain = activities();
    const id1 = backupId('pull');
    const ov1 = await snapshot(plain, id1);
    await dom.writeThroughDevice('vda', 0xe1, 40, 4);
    await virsh('blockpull', dom.name, 'vda', '--bandwidth', '100000', '--bytes');
    expect(await virsh('blockjob', dom.name, 'vda', '--raw')).toMatch(/type=Block Pull/);
    await act(plain.commitAndPivot, { backupId: id1, domain: dom.name, overlays: ov1 });
    expect(logs.map((l) => l.message)).toContain('aborting a foreign block job on a disk that runs on our overlay');
    expect(await domblklist(dom.name)).toEqual(sources(dom));
    expect(await holds(vda, 0xe1, 40, 4)).toBe(true);
    await act(plain.removeOverlays, { backupId: id1, domain: dom.name, overlays: ov1 });

    // 2. A commit already runs (slowly: 1 MiB/s) and the port claims it ready before it is: libvirt
    //    refuses the pivot ("not ready for pivot yet") and the activity keeps polling until it takes.
    const pivotErrors: string[] = [];
    const eager: Hypervisor = Object.create(hv) as Hypervisor;
    eager.blockJobInfo = async (d, disk) => ({ ...(await hv.blockJobInfo(d, disk)), ready: true });
    eager.pivot = async (d, disk) => {
      try {
        await hv.pivot(d, disk);
      } catch (err) {
        pivotErrors.push(err instanceof HypervisorError ? `${err.kind}: ${err.message}` : String(err));
        throw err;
      }
    };
    const id2 = backupId('early');
    const ov2 = await snapshot(plain, id2);
    await dom.writeThroughDevice('vda', 0xe2, 44, 3);
    await virsh('blockcommit', dom.name, 'vda', '--active', '--shallow', '--bandwidth', '1');
    await act(activities({ hypervisor: eager }).commitAndPivot, { backupId: id2, domain: dom.name, overlays: ov2 });
    expect(pivotErrors.length).toBeGreaterThan(0);
    expect(pivotErrors[0]).toMatch(/^not-ready: .*not ready for pivot yet/);
    expect(await domblklist(dom.name)).toEqual(sources(dom));
    expect(await holds(vda, 0xe2, 44, 3)).toBe(true);
    await act(plain.removeOverlays, { backupId: id2, domain: dom.name, overlays: ov2 });

    // 3. The commit job is aborted under us: the attempt fails retryably with the VM still on
    //    overlay + base (no data lost), and the retry commits and pivots.
    const id3 = backupId('abort');
    const ov3 = await snapshot(plain, id3);
    await dom.writeThroughDevice('vda', 0xe3, 48, 6);
    await virsh('blockcommit', dom.name, 'vda', '--active', '--shallow', '--bandwidth', '1');
    const attempt = act(plain.commitAndPivot, { backupId: id3, domain: dom.name, overlays: ov3 });
    await new Promise((r) => setTimeout(r, 1500));
    await virsh('blockjob', dom.name, 'vda', '--abort');
    await expect(attempt).rejects.toThrow(/ended without a pivot/);
    await expect(attempt).rejects.not.toHaveProperty('nonRetryable', true);
    expect(await domblklist(dom.name)).toEqual({ vda: ov3[0]!.overlay });
    await act(plain.commitAndPivot, { backupId: id3, domain: dom.name, overlays: ov3 });
    await act(plain.removeOverlays, { backupId: id3, domain: dom.name, overlays: ov3 });
    expect(await domblklist(dom.name)).toEqual(sources(dom));
    expect(await holds(vda, 0xe3, 48, 6)).toBe(true);
    expect(await holds(vda, 0x21, 0, 32)).toBe(true);
    expect(await noBlockJob(dom.name, 'vda')).toBe(true);
  });
});
