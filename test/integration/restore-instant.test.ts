/**
 * `vmbackup restore <id> --instant NEWNAME` and `vmbackup restore --finish NEWNAME` on the real stack (libvirt/QEMU,
 * the Temporal dev server, radosgw), as an operator runs them (the built bin/vmbackup, a `vmbackup worker` process for
 * the host):
 * 1. a 4 GiB guest disk backed up, started instantly on an overlay (the guest boots from it), written to, finished:
 *    standalone disks equal to the backup plus the writes; the backup verifies and its images never changed;
 * 2. the worker killed (kill -9) mid-pull, a new one: the finish completes;
 * 3. a target whose image header names another backing file than the manifests: refused, nothing left;
 * 4. an S3 target: refused with one sentence, nothing written.
 * Every domain is `vmbt-ins...` and removed (destroy, undefine --nvram --tpm, files) even when a test fails.
 */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { randomBytes } from 'node:crypto';
import { ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { buildManifest, encodeManifest } from '../../src/repository/manifest';
import { useFixtureDomains, waitForGuestMarker } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { guestDir, type GuestMarker } from '../fixtures/guest';
import { run, virsh } from '../helpers/images';
import { requireLibvirt, requireS3, requireTemporal, s3ClientConfig, stackEnv } from '../helpers/stack';
import {
  cliEnv,
  embeddedEnv,
  runCli,
  spawnCli,
  startWorkerProcess,
  temporalClient,
  uniqueHost,
  waitFor,
} from '../helpers/vmbackup';
import { finishInstantWorkflowId } from '../../src/shared/names';
import type { WorkerProcess } from '../helpers/vmbackup';
import { slowToNoticeDeadWorker } from '../helpers/history';

const MiB = 1 << 20;
const DISK_MIB = 4096;
/** where the test writes into the instant domain's disk (far from the guest's own MiB 8..55 and its marker) */
const WRITE = { byte: 0x5a, offsetMiB: 3000, lengthMiB: 16 } as const;

interface InstantJson {
  domain: string;
  uuid: string;
  backupId: string;
  startSeconds: number;
  disks: Array<{ name: string; overlay: string; backing: string }>;
}

async function sha256Of(path: string): Promise<string> {
  return createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
}

async function domainExists(name: string): Promise<boolean> {
  return virsh('dominfo', name).then(
    () => true,
    () => false,
  );
}

async function backingFile(path: string): Promise<string | undefined> {
  const { stdout } = await run('qemu-img', ['info', '-U', '--output=json', '-f', 'qcow2', path]);
  return (JSON.parse(stdout) as { 'backing-filename'?: string })['backing-filename'];
}

async function blockJob(domain: string, disk: string): Promise<{ type?: string; cur: number; end: number }> {
  const out = await virsh('blockjob', domain, disk, '--raw');
  const type = /type=(.+)/.exec(out)?.[1]?.trim();
  return { type, cur: Number(/cur=(\d+)/.exec(out)?.[1] ?? 0), end: Number(/end=(\d+)/.exec(out)?.[1] ?? 0) };
}

/** Removes a domain this test restored, its overlays and its record, whatever state it is in. */
async function removeRestored(name: string, dir?: string): Promise<void> {
  const record = join(stackEnv().stateDir, 'instant', `${name}.json`);
  const tpmDir = await readFile(record, 'utf8')
    .then((t) => (JSON.parse(t) as { tpmDir?: string }).tpmDir)
    .catch(() => undefined);
  await virsh('destroy', name).catch(() => undefined);
  await virsh('undefine', name, '--nvram', '--tpm').catch(() => undefined);
  if (dir) await rm(dir, { recursive: true, force: true });
  // undefine --tpm leaves files it does not expect there
  if (tpmDir?.startsWith('/var/lib/libvirt/swtpm/')) await rm(tpmDir, { recursive: true, force: true });
  await rm(record, { force: true });
}

/** The live device alias of a disk (for HMP qemu-io writes through the guest's device). */
async function writeThroughDevice(domain: string, dev: string, w: typeof WRITE): Promise<void> {
  const xml = await virsh('dumpxml', domain);
  const disk = [...xml.matchAll(/<disk[\s\S]*?<\/disk>/g)].map((m) => m[0]).find((d) => d.includes(`dev='${dev}'`));
  const alias = disk && /<alias name='([^']+)'/.exec(disk)?.[1];
  if (!alias) throw new Error(`${domain} has no live alias for ${dev}`);
  const cmd = `qemu-io -d /machine/peripheral/${alias}/virtio-backend "write -P 0x${w.byte.toString(16)} ${w.offsetMiB * MiB} ${w.lengthMiB * MiB}"`;
  const out = (await virsh('qemu-monitor-command', domain, '--hmp', cmd)).trim();
  if (out) throw new Error(`HMP ${cmd}: ${out}`);
}

const restored: Array<{ name: string; dir: string }> = [];
let work: string;

/** A new restored name, cleaned up after the file even when a test fails. */
function restoredName(tag: string): { name: string; dir: string } {
  const r = { name: `vmbt-ins-${tag}-${randomBytes(3).toString('hex')}`, dir: join(work, `instant-${tag}`) };
  restored.push(r);
  return r;
}

const cluster = (): NodeJS.ProcessEnv => cliEnv();

beforeAll(async () => {
  await requireLibvirt();
  work = await mkdtemp(join(stackEnv().stateDir, 'test-restore-instant-'));
});

afterAll(async () => {
  for (const r of restored) await removeRestored(r.name, r.dir);
  if (work) await rm(work, { recursive: true, force: true });
}, 120_000);

describe('restore --instant / --finish of a running guest (real stack)', () => {
  const newDomain = useFixtureDomains();
  let host: string;
  let worker: WorkerProcess | undefined;
  let source: FixtureDomain;
  let targetDir: string;
  let targetUrl: string;
  let backupId: string;
  let imagesBefore: Record<string, string>;
  /** the boot marker the source guest wrote at MiB 4 of vda before the backup */
  let sourceMarker: GuestMarker;

  /** Every file of the backup's directory and its SHA-256. */
  async function backupImages(): Promise<Record<string, string>> {
    const dir = join(targetDir, source.name, backupId);
    const out: Record<string, string> = {};
    for (const f of (await readdir(dir)).sort()) out[f] = await sha256Of(join(dir, f));
    return out;
  }

  beforeAll(async () => {
    await requireTemporal();
    targetDir = join(work, 'target');
    await mkdir(targetDir);
    targetUrl = pathToFileURL(targetDir).href;
    host = uniqueHost('ins');
    worker = await startWorkerProcess(host);
    // the guest on a 4 GiB sparse qcow2 with 64 MiB of random data far from its own writes (a pull has work to do)
    source = await newDomain({
      prefix: 'ins',
      guest: true,
      disks: [
        {
          format: 'qcow2',
          sizeMiB: DISK_MIB,
          patterns: [
            { byte: 0x11, offsetMiB: 100, lengthMiB: 32 },
            { byte: 0x22, offsetMiB: 2048, lengthMiB: 32 },
          ],
        },
      ],
    });
    sourceMarker = await source.waitForMarker();
    expect(sourceMarker.kind).toBe('written');
    await source.waitForGuestWrites(2);
    const b = await runCli(['backup', source.name, '--host', host, '--target', targetUrl, '--wait', '--json'], {
      env: cluster(),
    });
    if (b.code !== 0) throw new Error(`the backup of ${source.name} failed: ${b.stderr}`);
    backupId = (JSON.parse(b.stdout) as { backupId: string }).backupId;
    const manifest = JSON.parse(await readFile(join(targetDir, source.name, backupId, 'manifest.json'), 'utf8')) as {
      vm?: unknown;
    };
    if (!manifest.vm) {
      throw new Error(`backup ${backupId} stores no domain definition (manifest.vm): whole-VM backups are missing`);
    }
    imagesBefore = await backupImages();
  }, 600_000);

  afterAll(async () => {
    // a failed test may leave its finish running on a queue nobody serves any more
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

  async function instant(r: { name: string; dir: string }): Promise<InstantJson> {
    const res = await runCli(
      [
        'restore',
        backupId,
        '--target',
        targetUrl,
        '--instant',
        r.name,
        '--to',
        r.dir,
        '--boot-dir',
        guestDir(),
        '--json',
      ],
      { env: cluster() },
    );
    if (res.code !== 0) throw new Error(`restore --instant ${r.name} failed (${res.code}): ${res.stderr}`);
    return JSON.parse(res.stdout) as InstantJson;
  }

  test('a 4 GiB disk runs at once on an overlay, and --finish leaves it on standalone disks equal to the backup plus the writes', async () => {
    const r = restoredName('one');
    const started = await instant(r);
    // reported, not asserted (timing belongs in bench/)
    console.log(
      `instant recovery of a ${DISK_MIB} MiB disk: running ${started.startSeconds} s after the command started`,
    );
    expect((await virsh('domstate', r.name)).trim()).toBe('running');
    const [vda] = started.disks;
    expect(vda?.name).toBe('vda');
    expect(vda?.backing).toBe(join(targetDir, source.name, backupId, 'vda.qcow2'));
    expect(await backingFile(vda!.overlay)).toBe(vda!.backing);

    // the guest boots from the backup's bytes (it finds the marker the source wrote) and writes into the overlay
    const serial = /<serial type='file'>\s*<source path='([^']+)'/.exec(await virsh('dumpxml', r.name))?.[1];
    expect(serial?.startsWith(`${r.dir}/`)).toBe(true); // the rewriter moved the serial log into --to DIR
    const readLog = () => readFile(serial!, 'utf8').catch(() => '');
    const state = async () => (await virsh('domstate', r.name)).trim();
    expect(await waitForGuestMarker(r.name, readLog, { state })).toEqual({ kind: 'found', id: sourceMarker.id });
    await waitFor('the restored guest to write', async () => /WRITE \d+/.test(await readLog()), { timeoutMs: 180_000 });
    await writeThroughDevice(r.name, 'vda', WRITE);

    // a second --instant of that name is refused
    const again = await runCli(['restore', backupId, '--target', targetUrl, '--instant', r.name, '--to', r.dir], {
      env: cluster(),
    });
    expect(again.code).toBe(1);
    expect(again.stderr.trim()).toMatch(new RegExp(`^vmbackup: A domain named ${r.name} already exists`));
    expect(again.stderr.trim().split('\n')).toHaveLength(1);

    // the backup is intact while the VM runs on it
    expect(await backupImages()).toEqual(imagesBefore);

    const finishStart = Date.now();
    const fin = await runCli(['restore', '--finish', r.name, '--host', host, '--json'], { env: cluster() });
    console.log(`restore --finish of the ${DISK_MIB} MiB disk took ${(Date.now() - finishStart) / 1000} s`);
    expect(fin.stderr).toBe('');
    expect(fin.code).toBe(0);
    expect(JSON.parse(fin.stdout)).toEqual({
      domain: r.name,
      alreadyStandalone: false,
      disks: [{ name: 'vda', path: vda!.overlay }],
    });
    expect(await backingFile(vda!.overlay)).toBeUndefined();
    expect((await virsh('domstate', r.name)).trim()).toBe('running');
    expect(await virsh('domblklist', r.name)).toContain(vda!.overlay);

    // finishing again: already standalone, exit 0 (on the embedded default: the command runs the host's worker)
    const twice = await runCli(['restore', '--finish', r.name], { env: embeddedEnv(host) });
    expect(twice.code).toBe(0);
    expect(twice.stdout).toContain(`${r.name} is already standalone`);

    // content: the backup, the test's write, the guest's own chunks (MiB 8..55, copied over from the disk)
    await virsh('destroy', r.name);
    const finished = join(work, 'finished.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', vda!.overlay, finished]);
    const expected = join(work, 'expected');
    const res = await runCli(['restore', backupId, '--target', targetUrl, '--to', expected, '--format', 'raw'], {
      env: cluster(),
    });
    expect(res.code).toBe(0);
    const exp = join(expected, 'vda.raw');
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      `write -P 0x${WRITE.byte.toString(16)} ${WRITE.offsetMiB * MiB} ${WRITE.lengthMiB * MiB}`,
      exp,
    ]);
    await run('dd', [
      `if=${finished}`,
      `of=${exp}`,
      'bs=1M',
      'skip=8',
      'seek=8',
      'count=48',
      'conv=notrunc',
      'status=none',
    ]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', finished, exp]);
    // and the write really is there (the compare above would pass with neither holding it)
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      `read -P 0x${WRITE.byte.toString(16)} ${WRITE.offsetMiB * MiB} ${MiB}`,
      finished,
    ]);

    // the backup still verifies and its images never changed
    const verify = await runCli(['verify', backupId, '--target', targetUrl], { env: cluster() });
    expect(verify.code).toBe(0);
    expect(await backupImages()).toEqual(imagesBefore);
  }, 900_000);

  test('a worker killed mid-pull: a new worker finishes it', async () => {
    const r = restoredName('kill');
    await instant(r);
    // the backup image's zero clusters count as allocated: 4 GiB to stream at 100 MiB/s, ~40 s in which the worker dies
    const finish = spawnCli(
      ['restore', '--finish', r.name, '--host', host, '--bandwidth', '100', '--heartbeat-timeout', '10', '--json'],
      { env: cluster() },
    );
    try {
      await waitFor('the pull to copy something', async () => (await blockJob(r.name, 'vda')).cur > 0, {
        timeoutMs: 120_000,
      });
      await worker!.kill9();
      const after = await blockJob(r.name, 'vda');
      expect(after.type).toBe('Block Pull'); // the job goes on in QEMU without a worker
      worker = await startWorkerProcess(host);
      const exit = await finish.exited(300_000);
      expect(finish.stderr()).toBe('');
      expect(exit.code).toBe(0);
      expect(JSON.parse(finish.stdout())).toMatchObject({ domain: r.name, alreadyStandalone: false });
    } finally {
      finish.signal('SIGKILL');
    }
    const overlay = join(r.dir, 'vda.qcow2');
    expect(await backingFile(overlay)).toBeUndefined();
    expect((await virsh('domstate', r.name)).trim()).toBe('running');
    expect(await backupImages()).toEqual(imagesBefore);
    // each of the finish's steps notices a dead worker within its heartbeat timeout or a minute
    const { client, close } = await temporalClient();
    try {
      const history = await client.workflow.getHandle(finishInstantWorkflowId(host, r.name)).fetchHistory();
      expect(slowToNoticeDeadWorker(history.events ?? [], 60_000)).toEqual([]);
    } finally {
      await close();
    }
  }, 600_000);
});

describe('restore --instant refusals (real stack)', () => {
  test('a target whose image header names another backing file than the manifests: refused, nothing defined, no overlay left', async () => {
    // a hand-made target: an increment whose header was pointed at another image (someone else wrote the bucket)
    const dir = join(work, 'forged');
    const domain = 'web';
    const fullId = `${domain}-20261120T010000Z-f001`;
    const incId = `${domain}-20261121T010000Z-a002`;
    await mkdir(join(dir, domain, fullId), { recursive: true });
    await mkdir(join(dir, domain, incId), { recursive: true });
    const full = join(dir, domain, fullId, 'vda.qcow2');
    const inc = join(dir, domain, incId, 'vda.qcow2');
    const other = join(dir, 'other.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', full, '64M']);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', other, '64M']);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', `../${fullId}/vda.qcow2`, inc, '64M']);
    await run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-F', 'qcow2', '-b', other, inc]);
    const xml = `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk></devices><seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>\n`;
    const vmFor = async (id: string) => {
      const key = `${domain}/${id}/domain.xml`;
      await writeFile(join(dir, key), xml);
      return { xml: { key, size: Buffer.byteLength(xml), sha256: createHash('sha256').update(xml).digest('hex') } };
    };
    const diskOf = async (id: string, path: string) => ({
      name: 'vda',
      format: 'qcow2',
      virtualSize: 64 * MiB,
      size: (await stat(path)).size,
      sha256: await sha256Of(path),
      key: `${domain}/${id}/vda.qcow2`,
    });
    const base = {
      domain,
      host: 'hv1',
      method: 'push' as const,
      startedAt: '2026-11-20T01:00:00.000Z',
      finishedAt: '2026-11-20T01:00:00.000Z',
      quiesced: false,
      libvirtVersion: '9.0.0',
      qemuVersion: '7.2.0',
    };
    const fullDisk = await diskOf(fullId, full);
    const fullManifest = buildManifest({ ...base, backupId: fullId, disks: [fullDisk], vm: await vmFor(fullId) });
    const incManifest = buildManifest({
      ...base,
      backupId: incId,
      disks: [
        { ...(await diskOf(incId, inc)), backing: { backupId: fullId, key: fullDisk.key, sha256: fullDisk.sha256 } },
      ],
      vm: await vmFor(incId),
      chain: { level: 'inc', parent: fullId, base: fullId },
    });
    await writeFile(join(dir, domain, fullId, 'manifest.json'), encodeManifest(fullManifest));
    await writeFile(join(dir, domain, incId, 'manifest.json'), encodeManifest(incManifest));

    const r = restoredName('forged');
    const res = await runCli(
      ['restore', incId, '--target', pathToFileURL(dir).href, '--instant', r.name, '--to', r.dir],
      { env: cluster() },
    );
    expect(res.code).toBe(1);
    const lines = res.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toContain(`names the backing file ${other}`);
    expect(lines[0]).toContain('nothing was defined');
    expect(await domainExists(r.name)).toBe(false);
    expect(await stat(r.dir).catch(() => undefined)).toBeUndefined();
    expect(await stat(join(stackEnv().stateDir, 'instant', `${r.name}.json`)).catch(() => undefined)).toBeUndefined();
  }, 120_000);

  test('an S3 target: one sentence, nothing written', async () => {
    await requireS3();
    const env = stackEnv();
    const prefix = `instant-${randomBytes(4).toString('hex')}`;
    const r = restoredName('s3');
    const res = await runCli(
      [
        'restore',
        'web-20261120T010000Z-f001',
        '--target',
        `s3://${env.s3.bucket}/${prefix}`,
        '--instant',
        r.name,
        '--to',
        r.dir,
      ],
      { env: cluster() },
    );
    expect(res.code).toBe(1);
    // on Node 20 the AWS SDK prints its notice first (README); our own output is one sentence
    const lines = res.stderr.split('\n').filter((l) => l.startsWith('vmbackup:'));
    expect(res.stderr.slice(res.stderr.indexOf('vmbackup:')).trim()).toBe(lines[0]);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^vmbackup: --instant .* needs a file:\/\/ target.*restore it with --define, or mount/);
    const s3 = new S3Client(s3ClientConfig(env));
    try {
      const listed = await s3.send(new ListObjectsV2Command({ Bucket: env.s3.bucket, Prefix: `${prefix}/` }));
      expect(listed.KeyCount ?? 0).toBe(0);
    } finally {
      s3.destroy();
    }
    expect(await domainExists(r.name)).toBe(false);
    expect(await stat(r.dir).catch(() => undefined)).toBeUndefined();
  }, 120_000);
});

describe('restore --instant of a UEFI + TPM guest (real stack)', () => {
  const newDomain = useFixtureDomains();

  test('the NVRAM and the TPM state are restored as copies and given to the instant domain', async () => {
    await requireTemporal();
    const source = await newDomain({
      prefix: 'insuefi',
      guest: true,
      uefi: true,
      tpm: true,
      disks: [{ format: 'qcow2', sizeMiB: 64 }],
    });
    const marker = await source.waitForMarker();
    const targetDir = join(work, 'uefi-target');
    await mkdir(targetDir);
    const url = pathToFileURL(targetDir).href;
    const b = await runCli(['backup', source.name, '--target', url, '--wait', '--json'], {
      env: embeddedEnv(uniqueHost('insu')),
    });
    if (b.code !== 0) throw new Error(`the backup of ${source.name} failed: ${b.stderr}`);
    const id = (JSON.parse(b.stdout) as { backupId: string }).backupId;
    const manifest = JSON.parse(await readFile(join(targetDir, source.name, id, 'manifest.json'), 'utf8')) as {
      vm: { nvram?: { sha256: string }; tpm?: { files: Array<{ path: string; sha256: string }> } };
    };
    expect(manifest.vm.nvram).toBeDefined();
    expect(manifest.vm.tpm?.files.length).toBeGreaterThan(0);

    const r = restoredName('uefi');
    const res = await runCli(
      ['restore', id, '--target', url, '--instant', r.name, '--to', r.dir, '--boot-dir', guestDir(), '--json'],
      { env: cluster() },
    );
    if (res.code !== 0) throw new Error(`restore --instant failed (${res.code}): ${res.stderr}`);
    const started = JSON.parse(res.stdout) as InstantJson & { nvram: string; tpmDir: string; uuid: string };
    expect(started.nvram.startsWith(`${r.dir}/`)).toBe(true);
    expect(started.tpmDir).toBe(`/var/lib/libvirt/swtpm/${started.uuid}`);
    const live = await virsh('dumpxml', r.name);
    expect(live).toContain(`>${started.nvram}</nvram>`);
    expect(live).toMatch(/<tpm model='tpm-crb'>\s*<backend type='emulator' version='2.0'/);
    for (const f of manifest.vm.tpm!.files) expect((await stat(join(started.tpmDir, f.path))).size).toBeGreaterThan(0);
    // the source's own files are untouched and not the ones the instant domain uses
    expect(started.nvram).not.toBe(source.nvramPath);
    expect(started.tpmDir).not.toBe(source.tpmStateDir);

    // OVMF boots the guest from the overlay with the restored variable store; it finds the source's marker
    const serial = /<serial type='file'>\s*<source path='([^']+)'/.exec(live)?.[1];
    const readLog = () => readFile(serial!, 'utf8').catch(() => '');
    const state = async () => (await virsh('domstate', r.name)).trim();
    expect(await waitForGuestMarker(r.name, readLog, { state })).toEqual({ kind: 'found', id: marker.id });
  }, 600_000);
});
