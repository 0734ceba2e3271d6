/**
 * An attacker on the Temporal cluster against a real `vmbackup worker` that runs as root with an
 * allow-list: workflows and activities started directly with a Temporal client, with inputs of the
 * attacker's choosing. Every activity checks its inputs itself: paths outside this host's staging and
 * overlay roots are refused, a source disk must be one libvirt reports, a target must be allowed.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { ActivityFailure, ApplicationFailure, WorkflowFailedError } from '@temporalio/client';
import { DefaultLogger, NativeConnection, Runtime, Worker } from '@temporalio/worker';
import { startBackup } from '../../src/client/backups';
import { ErrorType } from '../../src/shared/errors';
import { hostTaskQueue } from '../../src/shared/names';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';

const MiB = 1 << 20;
const run = promisify(execFile);

describe('activities check their own inputs (an attacker on the cluster, a worker with an allow-list)', () => {
  const newDomain = useFixtureDomains();
  const host = uniqueHost('inp');
  const attackerQueue = `attacker-${randomBytes(4).toString('hex')}`;
  let work: string;
  let state: string;
  let allowed: string;
  let worker: WorkerProcess;
  let attacker: Worker;
  let attackerRun: Promise<void>;
  let attackerConnection: NativeConnection;
  let client: Awaited<ReturnType<typeof temporalClient>>;
  let n = 0;
  const backupId = () => `vmbt-inp-20261130T000000Z-${(++n).toString(16).padStart(4, '0')}`;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-inputs-'));
    state = join(work, 'state');
    allowed = pathToFileURL(join(work, 'allowed')).href;
    worker = await startWorkerProcess(host, {
      env: cliEnv({ VMBACKUP_STATE_DIR: state, VMBACKUP_ALLOW_TARGETS: allowed }),
    });
    Runtime.install({ logger: new DefaultLogger('ERROR') });
    attackerConnection = await NativeConnection.connect({ address: stackEnv().temporal.address });
    attacker = await Worker.create({
      connection: attackerConnection,
      namespace: stackEnv().temporal.namespace,
      taskQueue: attackerQueue,
      workflowsPath: require.resolve('./attacker/workflows'),
    });
    attackerRun = attacker.run();
    client = await temporalClient();
  });
  afterAll(async () => {
    attacker?.shutdown();
    await attackerRun;
    await attackerConnection?.close();
    await client?.close();
    await worker?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** Runs `activity` on the host's queue with `input`; resolves with its failure (or throws if it succeeded). */
  async function refused(activity: string, input: unknown): Promise<ApplicationFailure> {
    const outcome = await client.client.workflow
      .execute('callHostActivity', {
        taskQueue: attackerQueue,
        workflowId: `attack-${activity}-${randomBytes(4).toString('hex')}`,
        args: [hostTaskQueue(host), activity, input],
      })
      .then(
        (result: unknown) => ({ result }),
        (err: unknown) => ({ err }),
      );
    if (!('err' in outcome)) throw new Error(`${activity} was not refused: ${JSON.stringify(outcome.result)}`);
    expect(outcome.err).toBeInstanceOf(WorkflowFailedError);
    const activityFailure = (outcome.err as WorkflowFailedError).cause;
    expect(activityFailure).toBeInstanceOf(ActivityFailure);
    const failure = (activityFailure as ActivityFailure).cause;
    expect(failure).toBeInstanceOf(ApplicationFailure);
    expect((failure as ApplicationFailure).nonRetryable).toBe(true);
    expect((failure as ApplicationFailure).message).not.toMatch(/\n/);
    return failure as ApplicationFailure;
  }

  async function canaryDir(name: string): Promise<{ dir: string; file: string }> {
    const dir = join(work, name);
    await mkdir(dir, { recursive: true });
    const file = join(dir, 'precious.txt');
    await writeFile(file, 'precious');
    return { dir, file };
  }

  test('cleanupStaging of a directory outside the roots is refused and the directory stays', async () => {
    const id = backupId();
    const canary = await canaryDir(join('canary', id));
    const failure = await refused('cleanupStaging', { backupId: id, stagingDir: canary.dir });
    expect(failure.type).toBe(ErrorType.InvalidInput);
    expect(failure.message).toBe(
      `cleanupStaging: ${canary.dir} is not the staging directory of backup ${id} on this host (not under a staging directory of this host); refused`,
    );
    // shaped like a local target's staging dir, but that target is not allowed
    const lookalike = await canaryDir(join('canary', '.staging', id));
    expect((await refused('cleanupStaging', { backupId: id, stagingDir: lookalike.dir })).type).toBe(
      ErrorType.InvalidInput,
    );
    expect(await readFile(canary.file, 'utf8')).toBe('precious');
    expect(await readFile(lookalike.file, 'utf8')).toBe('precious');
  });

  test('cleanupStaging through a symlink inside the staging root that points out is refused', async () => {
    const id = backupId();
    const canary = await canaryDir('canary-linked');
    await mkdir(join(state, 'staging'), { recursive: true });
    await symlink(canary.dir, join(state, 'staging', id));
    const byLink = await refused('cleanupStaging', { backupId: id, stagingDir: join(state, 'staging', id) });
    expect(byLink.message).toMatch(new RegExp(`\\(it resolves to ${canary.dir}\\); refused$`));
    await refused('cleanupStaging', { backupId: id, stagingDir: join(state, 'staging', id, 'sub') });
    // the victim one level below the link
    const victim = join(canary.dir, 'victim');
    await mkdir(victim);
    await writeFile(join(victim, 'precious.txt'), 'precious');
    await refused('cleanupStaging', { backupId: 'victim', stagingDir: join(state, 'staging', id, 'victim') });
    expect(await readFile(canary.file, 'utf8')).toBe('precious');
    expect(await readFile(join(victim, 'precious.txt'), 'utf8')).toBe('precious');
    await rm(join(state, 'staging', id));
  });

  test('abortPushBackup never removes a file outside the staging dir', async () => {
    const dom = await newDomain({ prefix: 'inp', disks: [{ format: 'qcow2', sizeMiB: 16 }] });
    const id = backupId();
    const canary = await canaryDir('canary-abort');
    const failure = await refused('abortPushBackup', {
      backupId: id,
      domain: dom.name,
      images: [{ name: 'vda', format: 'qcow2', path: canary.file, virtualSize: 16 * MiB }],
    });
    expect(failure.type).toBe(ErrorType.InvalidInput);
    expect(failure.message).toMatch(/^abortPushBackup: .*precious\.txt is not the staging image of disk vda/);
    expect(await readFile(canary.file, 'utf8')).toBe('precious');
  });

  test('the pull steps put no socket or scratch file, and remove nothing, outside the staging dir', async () => {
    const id = backupId();
    const canary = await canaryDir(join('canary-pull', id));
    await writeFile(join(canary.dir, 'vda.scratch.qcow2'), 'precious');
    const job = {
      backupId: id,
      domain: 'vmbt-inp-nosuch',
      disks: [{ name: 'vda', format: 'qcow2', virtualSize: 16 * MiB }],
      stagingDir: canary.dir,
    };
    for (const [activity, input] of [
      ['beginPullBackup', job],
      ['endPullBackup', job],
      ['pullIntoRepositories', { job, targets: [allowed] }],
    ] as const) {
      const failure = await refused(activity, input);
      expect(failure.type).toBe(ErrorType.InvalidInput);
      expect(failure.message).toBe(
        `${activity}: ${canary.dir} is not the staging directory of backup ${id} on this host (not under a staging directory of this host); refused`,
      );
    }
    expect(await readFile(join(canary.dir, 'vda.scratch.qcow2'), 'utf8')).toBe('precious');
    expect((await readdir(canary.dir)).sort()).toEqual(['precious.txt', 'vda.scratch.qcow2']);
  });

  test('prepareChainImages rewrites no image header outside the staging dir, and no backing file but a parent image', async () => {
    // a qcow2 image that is not ours (a VM's disk, say): its header must not get a backing file
    const canary = join(work, 'canary-disk.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', canary, '16M']);
    const outside = await refused('prepareChainImages', {
      domain: 'web',
      images: [{ name: 'vda', format: 'qcow2', path: canary, virtualSize: 16 * MiB }],
      backing: { vda: '/etc/hostname' },
    });
    expect(outside.type).toBe(ErrorType.InvalidInput);
    expect(outside.message).toMatch(/^prepareChainImages: .*canary-disk\.qcow2 is not the staging image of disk vda/);
    // a staged image of ours, with a backing file that is not a parent backup's image
    const id = backupId();
    const staged = join(state, 'staging', id, 'vda.qcow2');
    await mkdir(join(state, 'staging', id), { recursive: true });
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', staged, '16M']);
    for (const backing of ['/etc/hostname', '../../../etc/hostname', `../${id}/vdb.qcow2`, 'json:{"driver":"nbd"}']) {
      const failure = await refused('prepareChainImages', {
        backupId: id,
        domain: 'web',
        images: [{ name: 'vda', format: 'qcow2', path: staged, virtualSize: 16 * MiB }],
        backing: { vda: backing },
      });
      expect(failure.message).toBe(
        `prepareChainImages: ${JSON.stringify(backing)} is not the parent image of disk vda (../<backupId>/vda.qcow2); refused`,
      );
    }
    for (const image of [canary, staged]) {
      const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', image])).stdout) as {
        'backing-filename'?: string;
      };
      expect(info['backing-filename']).toBeUndefined();
    }
  });

  test('a backup to a target outside the allow-list fails with one sentence and writes nothing', async () => {
    const dom = await newDomain({ prefix: 'inp', disks: [{ format: 'qcow2', sizeMiB: 16 }] });
    const evil = `${allowed}-evil`; // same prefix, not the same directory
    const { backupId: id, handle } = await startBackup(client.client, {
      domain: dom.name,
      host,
      method: 'auto',
      targets: [evil],
      options: {},
    });
    const err = await handle.result().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(WorkflowFailedError);
    // the first step that names the targets refuses them (planBackup, or prepareStaging in older workflows)
    const failure = innermost(err);
    expect(failure.message).toMatch(
      new RegExp(
        `^(planBackup|prepareStaging): this worker does not write to ${escape(evil)}: it is outside the targets it allows \\(vmbackup worker --allow-target, VMBACKUP_ALLOW_TARGETS\\)$`,
      ),
    );
    expect(failure.nonRetryable).toBe(true);
    expect(failure.type).toBe(ErrorType.InvalidTarget);
    expect(await exists(join(work, 'allowed-evil'))).toBe(false);
    expect(await exists(join(state, 'staging', id))).toBe(false);
    expect(await exists(join('/var/lib/vmbackup/staging', id))).toBe(false);
    // and the storage steps refuse it on their own
    const manifest = await refused('deleteBackupObjects', { target: evil, domain: dom.name, backupId: id });
    expect(manifest.type).toBe(ErrorType.InvalidTarget);
  });

  test("applyRetention (a scheduled run's prune) removes nothing on a target outside the allow-list, nor with a policy that keeps nothing", async () => {
    const outside = await canaryDir(join('retention-outside', 'vm1', backupId()));
    await writeFile(join(outside.dir, 'manifest.json'), '{}');
    const target = pathToFileURL(join(work, 'retention-outside')).href;
    const notAllowed = await refused('applyRetention', {
      target,
      domain: 'vm1',
      policy: { keepLast: 1 },
      newBackupId: backupId(),
    });
    expect(notAllowed.type).toBe(ErrorType.InvalidTarget);
    expect(notAllowed.message).toBe(
      `applyRetention: this worker does not write to ${target}: it is outside the targets it allows (vmbackup worker --allow-target, VMBACKUP_ALLOW_TARGETS)`,
    );
    const keepsNothing = await refused('applyRetention', {
      target: allowed,
      domain: 'vm1',
      policy: { keepLast: 0 },
      newBackupId: backupId(),
    });
    expect(keepsNothing.message).toBe('applyRetention: the retention policy keeps nothing: give a keep rule above 0');
    const otherDomains = await refused('applyRetention', {
      target: allowed,
      domain: '../vm1',
      policy: { keepLast: 1 },
      newBackupId: backupId(),
    });
    expect(otherDomains.type).toBe(ErrorType.InvalidInput);
    expect(await readFile(outside.file, 'utf8')).toBe('precious');
    expect(await exists(join(outside.dir, 'manifest.json'))).toBe(true);
  });

  test('shipImage of a file outside the staging dir is refused, nothing reaches the target', async () => {
    const secret = join(work, 'secret.raw');
    const bytes = Buffer.alloc(MiB, 0x5e);
    await writeFile(secret, bytes);
    const id = backupId();
    const failure = await refused('shipImage', {
      backupId: id,
      domain: 'web',
      target: allowed,
      disk: {
        name: 'vda',
        format: 'raw',
        path: secret,
        virtualSize: bytes.length,
        size: bytes.length,
        sha256: createHash('sha256').update(bytes).digest('hex'),
      },
    });
    expect(failure.type).toBe(ErrorType.InvalidInput);
    expect(failure.message).toBe(`shipImage: ${secret} is not the staging image of disk vda (vda.raw)`);
    // the right name in the wrong place
    const elsewhere = join(work, 'elsewhere', id, 'vda.raw');
    await mkdir(join(work, 'elsewhere', id), { recursive: true });
    await writeFile(elsewhere, bytes);
    await refused('shipImage', {
      backupId: id,
      domain: 'web',
      target: allowed,
      disk: { name: 'vda', format: 'raw', path: elsewhere, virtualSize: MiB, size: MiB, sha256: 'a'.repeat(64) },
    });
    expect(await exists(join(work, 'allowed'))).toBe(false);
  });

  test('shipVmFiles ships no file but a staged whole-VM file; captureVmState writes into no directory but staging', async () => {
    const secret = join(work, 'vm-secret', 'domain.xml');
    await mkdir(join(work, 'vm-secret'), { recursive: true });
    await writeFile(secret, 'root:x:0:0');
    const id = backupId();
    const file = { name: 'domain.xml', path: secret, size: 10, sha256: 'a'.repeat(64) };
    const outside = await refused('shipVmFiles', { backupId: id, domain: 'web', target: allowed, files: [file] });
    expect(outside.type).toBe(ErrorType.InvalidInput);
    expect(outside.message).toMatch(/^shipVmFiles: .*domain\.xml is not the staged file domain\.xml of backup /);
    // a staged file of this backup, under a name that is no whole-VM file
    const stagingDir = join(state, 'staging', id);
    await mkdir(stagingDir, { recursive: true });
    await writeFile(join(stagingDir, 'vda.raw'), 'x');
    const notVm = await refused('shipVmFiles', {
      backupId: id,
      domain: 'web',
      target: allowed,
      files: [{ ...file, name: 'vda.raw', path: join(stagingDir, 'vda.raw') }],
    });
    expect(notVm.message).toBe('shipVmFiles: vda.raw is not the name of a whole-VM file');
    expect(await exists(join(work, 'allowed'))).toBe(false);

    const { dir } = await canaryDir('vm-capture-canary');
    const capture = await refused('captureVmState', { backupId: id, domain: 'web', stagingDir: dir });
    expect(capture.type).toBe(ErrorType.InvalidInput);
    expect(await readdir(dir)).toEqual(['precious.txt']);
  });

  test('copyOfflineDisks of a source libvirt does not report for the domain is refused', async () => {
    const dom = await newDomain({ prefix: 'inp', disks: [{ format: 'qcow2', sizeMiB: 16 }], start: false });
    const secret = join(work, 'forged-source.raw');
    await writeFile(secret, Buffer.alloc(MiB, 0x5f));
    const id = backupId();
    const stagingDir = join(state, 'staging', id);
    await mkdir(stagingDir, { recursive: true });
    const disk = {
      name: 'vda',
      source: secret,
      format: 'raw',
      device: 'disk',
      readonly: false,
      shareable: false,
      virtualSize: MiB,
      allocation: MiB,
      backingChain: [],
    };
    const failure = await refused('copyOfflineDisks', { backupId: id, domain: dom.name, disks: [disk], stagingDir });
    expect(failure.type).toBe(ErrorType.InvalidInput);
    expect(failure.message).toBe(
      `copyOfflineDisks: ${dom.name} has no disk vda on ${secret} (raw) according to libvirt, it uses ${dom.disks[0]!.path} (qcow2); refused`,
    );
    // a disk name the domain does not have, and a staging dir outside the roots
    await refused('copyOfflineDisks', {
      backupId: id,
      domain: dom.name,
      disks: [{ ...disk, name: 'vdz' }],
      stagingDir,
    });
    await refused('copyOfflineDisks', {
      backupId: id,
      domain: dom.name,
      disks: [{ ...disk, source: dom.disks[0]!.path, format: 'qcow2' }],
      stagingDir: join(work, id),
    });
    expect(await readdir(stagingDir)).toEqual([]);
    expect(await exists(join(work, id))).toBe(false);
  });

  test('storeOfflineDisks (the offline method read in place) of a source libvirt does not report is refused', async () => {
    const dom = await newDomain({ prefix: 'inp', disks: [{ format: 'qcow2', sizeMiB: 16 }], start: false });
    const secret = join(work, 'forged-offline-source.raw');
    await writeFile(secret, Buffer.alloc(MiB, 0x5f));
    const id = backupId();
    const stagingDir = join(state, 'staging', id);
    await mkdir(stagingDir, { recursive: true });
    const disk = {
      name: 'vda',
      source: secret,
      format: 'raw',
      device: 'disk',
      readonly: false,
      shareable: false,
      virtualSize: MiB,
      allocation: MiB,
      backingChain: [],
    };
    const input = { backupId: id, domain: dom.name, target: allowed, disks: [disk], stagingDir };
    const failure = await refused('storeOfflineDisks', input);
    expect(failure.type).toBe(ErrorType.InvalidInput);
    expect(failure.message).toBe(
      `storeOfflineDisks: ${dom.name} has no disk vda on ${secret} (raw) according to libvirt, it uses ${dom.disks[0]!.path} (qcow2); refused`,
    );
    // a staging dir outside the roots, and a target outside the allow-list
    const real = { ...disk, source: dom.disks[0]!.path, format: 'qcow2' };
    await refused('storeOfflineDisks', { ...input, disks: [real], stagingDir: join(work, id) });
    await refused('storeOfflineDisks', {
      ...input,
      disks: [real],
      target: pathToFileURL(join(work, 'not-allowed')).href,
    });
    expect(await readdir(stagingDir)).toEqual([]);
    expect(await exists(join(work, 'allowed'))).toBe(false);
  });
});

/** The failure at the bottom of a chain of causes (a workflow failed by an activity failed by ...). */
function innermost(err: unknown): ApplicationFailure {
  let cur = err as { cause?: unknown };
  while (cur.cause) cur = cur.cause as { cause?: unknown };
  expect(cur).toBeInstanceOf(ApplicationFailure);
  return cur as ApplicationFailure;
}

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}
