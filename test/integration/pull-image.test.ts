/**
 * The local image-tree writer of pull mode (src/repository/pull-image.ts) against real qemu-nbd exports standing in
 * for libvirt's pull export: a qcow2 with a persistent dirty bitmap exported read-only with `-B b0` (its context is
 * `qemu:dirty-bitmap:b0` where libvirt's is `qemu:dirty-bitmap:backup-vda`). Needs qemu-img, qemu-nbd and qemu-io
 * only; a missing one fails the file.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { copyBackup, restoreBackup, verifyBackup } from '../../src/repository';
import { buildManifest, encodeManifest } from '../../src/repository/manifest';
import { imageContentDigest, pullImageTreeSupport, writePulledImage } from '../../src/repository/pull-image';
import type { PulledImage, PullImageProgress } from '../../src/repository/pull-image';
import { openTarget } from '../../src/storage/registry';
import { manifestKey } from '../../src/storage/keys';
import { startQemuNbd } from '../helpers/nbd';
import { requireS3 } from '../helpers/stack';
import { s3Target } from '../storage/fixtures';
import type { NbdServer } from '../helpers/nbd';

const run = promisify(execFile);
const MiB = 1 << 20;
const KiB = 1024;
const SIZE = 48 * MiB;
const BITMAP_CONTEXT = 'qemu:dirty-bitmap:b0';
/** the source's writes after the full, each a range the dirty bitmap must report (64 KiB aligned) */
const CHANGES = [
  { offset: 1 * MiB, length: 128 * KiB, io: `write -P 0x5a ${1 * MiB} ${128 * KiB}` }, // over data
  { offset: 2 * MiB, length: 192 * KiB, io: `write -P 0 ${2 * MiB} ${192 * KiB}` }, // data that became zeros
  { offset: 30 * MiB, length: 64 * KiB, io: `write -P 0x33 ${30 * MiB} ${64 * KiB}` }, // in a hole
];

let dir: string;
let source: string;
let server: NbdServer | undefined;

async function qemuIo(image: string, ...cmds: string[]): Promise<string> {
  const { stdout } = await run('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), image]);
  return stdout;
}

async function compare(a: string, b: string): Promise<string> {
  return run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', a, b]).then(
    () => 'identical',
    (err: { code?: number; stdout?: string; stderr?: string }) => `exit ${err.code}: ${err.stdout} ${err.stderr}`,
  );
}

/**
 * The ranges of IMAGE's own clusters (depth 0 of `qemu-img map`), adjacent ones joined; with dataOnly, those that hold
 * data (not zero clusters, which take no room).
 */
async function ownRanges(image: string, dataOnly = false): Promise<Array<{ offset: number; length: number }>> {
  const { stdout } = await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', image]);
  const out: Array<{ offset: number; length: number }> = [];
  for (const e of JSON.parse(stdout) as Array<{
    start: number;
    length: number;
    depth: number;
    present?: boolean;
    data: boolean;
    zero: boolean;
  }>) {
    if (e.depth !== 0 || e.present === false || (!e.data && !e.zero) || (dataOnly && !e.data)) continue;
    const last = out.at(-1);
    if (last && last.offset + last.length === e.start) last.length += e.length;
    else out.push({ offset: e.start, length: e.length });
  }
  return out;
}

async function exportSource(bitmap?: string): Promise<NbdServer> {
  server = await startQemuNbd(source, join(dir, `src-${Date.now()}.sock`), {
    readOnly: true,
    exportName: 'vda',
    bitmap,
  });
  return server;
}

async function stopSource(): Promise<void> {
  await server?.stop();
  server = undefined;
}

/**
 * writePulledImage of the source's export into `dest` with `script` as the first `qemu-nbd` on PATH (a shim in
 * `<dir>/<name>/`, which may log there and run the real one), PATH restored and the source stopped after.
 */
async function pullThroughShim(name: string, script: string, dest: string): Promise<PulledImage> {
  const shim = join(dir, name);
  await mkdir(shim, { recursive: true });
  await writeFile(join(shim, 'qemu-nbd'), script, { mode: 0o755 });
  const s = await exportSource();
  const path = process.env.PATH;
  process.env.PATH = `${shim}:${path}`;
  try {
    return await writePulledImage({
      source: { socketPath: s.socket, exportName: 'vda' },
      context: 'base:allocation',
      virtualSize: SIZE,
      dest,
    });
  } finally {
    process.env.PATH = path;
    await stopSource();
  }
}

beforeAll(async () => {
  for (const tool of ['qemu-img', 'qemu-nbd', 'qemu-io']) {
    await run('sh', ['-c', `command -v ${tool}`]).catch(() => {
      throw new Error(`${tool} is missing: run \`bash scripts/stack.sh up\` (or apt-get install qemu-utils)`);
    });
  }
  dir = await mkdtemp(join(tmpdir(), 'vmbt-pi-'));
  // random data, holes, a range of allocated zeros, and data ending mid-cluster
  const raw = join(dir, 'src.raw');
  await run('truncate', ['-s', String(SIZE), raw]);
  for (const [offMiB, lenKiB] of [
    [0, 8 * 1024],
    [20, 4 * 1024 + 100],
    [40, 2 * 1024],
  ] as const) {
    await run('dd', [
      'if=/dev/urandom',
      `of=${raw}`,
      'bs=1K',
      `seek=${offMiB * 1024}`,
      `count=${lenKiB}`,
      'conv=notrunc',
      'status=none',
    ]);
  }
  source = join(dir, 'src.qcow2');
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, source]);
  await rm(raw);
  await qemuIo(source, `write -P 0 ${12 * MiB} ${2 * MiB}`); // zeros written as data: allocated
  await run('qemu-img', ['bitmap', '--add', '--enable', '-f', 'qcow2', source, 'b0']);
});

afterAll(async () => {
  await stopSource();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('writePulledImage into a local image tree', () => {
  const root = () => join(dir, 'tree');
  const fullPath = () => join(root(), 'vm1', 'full1', 'vda.qcow2');
  const incPath = () => join(root(), 'vm1', 'inc1', 'vda.qcow2');
  let full: PulledImage;
  let inc: PulledImage;

  test('a full equals the source, and neither holes nor zeros are allocated', async () => {
    await mkdir(join(root(), 'vm1', 'full1'), { recursive: true, mode: 0o700 });
    const s = await exportSource();
    full = await writePulledImage({
      source: { socketPath: s.socket, exportName: 'vda' },
      context: 'base:allocation',
      virtualSize: SIZE,
      dest: fullPath(),
    });
    await stopSource();
    expect(await compare(source, fullPath())).toBe('identical');
    // only the random data is stored: not the zero range at 12 MiB (at most zero clusters), not the holes
    expect(await ownRanges(fullPath(), true)).toEqual([
      { offset: 0, length: 8 * MiB },
      { offset: 20 * MiB, length: 4 * MiB + 128 * KiB }, // 4 MiB + 100 KiB of data, whole clusters
      { offset: 40 * MiB, length: 2 * MiB },
    ]);
    expect(full.copiedBytes).toBe(14 * MiB + 128 * KiB);
    expect((await stat(fullPath())).mode & 0o777).toBe(0o600);
    // the digest recorded at write time is the one a reader of the stored image computes
    expect((await imageContentDigest(fullPath(), SIZE)).sha256).toBe(full.content.sha256);
    expect(full.content.zeroChunks).toBe(12 - 5); // 48 MiB in 12 chunks; data in 0-8, 20-24(+), 40-42 MiB
  });

  test('an increment with the full as backing: the chain equals the changed source, only the dirty ranges stored', async () => {
    await qemuIo(source, ...CHANGES.map((c) => c.io));
    await mkdir(join(root(), 'vm1', 'inc1'), { recursive: true, mode: 0o700 });
    const s = await exportSource('b0');
    inc = await writePulledImage({
      source: { socketPath: s.socket, exportName: 'vda' },
      context: BITMAP_CONTEXT,
      virtualSize: SIZE,
      dest: incPath(),
      backing: { name: '../full1/vda.qcow2', path: fullPath(), format: 'qcow2' },
    });
    await stopSource();
    const { stdout } = await run('qemu-img', ['info', '--output=json', incPath()]);
    expect((JSON.parse(stdout) as { 'backing-filename': string })['backing-filename']).toBe('../full1/vda.qcow2');
    expect(await compare(incPath(), source)).toBe('identical');
    expect(await ownRanges(incPath())).toEqual(CHANGES.map(({ offset, length }) => ({ offset, length })));
    // the range that became zeros reads zero through the chain (the full below holds random data there)
    expect(await qemuIo(incPath(), `read -P 0 ${2 * MiB} ${192 * KiB}`)).not.toMatch(/verification failed/i);
    expect(inc.zeroedBytes).toBe(192 * KiB);
    expect(inc.copiedBytes).toBe(192 * KiB);
    expect((await imageContentDigest(incPath(), SIZE)).sha256).toBe(inc.content.sha256);
  });

  test('aborted mid-copy, then resumed from the last progress offset: the same image, reopened, not recreated', async () => {
    const dest = join(dir, 'resumed.qcow2');
    const s = await exportSource();
    const abort = new AbortController();
    const reports: PullImageProgress[] = [];
    await expect(
      writePulledImage({
        source: { socketPath: s.socket, exportName: 'vda' },
        context: 'base:allocation',
        virtualSize: SIZE,
        dest,
        window: 8 * MiB,
        signal: abort.signal,
        onProgress: (p) => {
          reports.push(p);
          abort.abort(new Error('stopped by the test'));
        },
      }),
    ).rejects.toThrow('stopped by the test');
    expect(reports).toHaveLength(1);
    const from = reports[0]!.resumeFrom;
    expect(from).toBe(8 * MiB);
    const inode = (await stat(dest)).ino;
    const resumed = await writePulledImage({
      source: { socketPath: s.socket, exportName: 'vda' },
      context: 'base:allocation',
      virtualSize: SIZE,
      dest,
      window: 8 * MiB,
      from,
    });
    await stopSource();
    expect((await stat(dest)).ino).toBe(inode);
    expect(resumed.copiedBytes).toBe(4 * MiB + 128 * KiB + 2 * MiB + 64 * KiB); // nothing before 8 MiB again
    expect(await compare(source, dest)).toBe('identical');
    expect(resumed.content.sha256).toBe((await imageContentDigest(dest, SIZE)).sha256);
  });

  test('verify and restore of the pulled chain check the content digest and name the disk of a flipped byte', async () => {
    const target = openTarget(`file://${root()}`);
    const disk = (id: string, img: PulledImage, backing?: { backupId: string; key: string; sha256: string }) => ({
      name: 'vda',
      format: 'qcow2',
      virtualSize: SIZE,
      size: img.size,
      sha256: img.content.sha256,
      key: `vm1/${id}/vda.qcow2`,
      content: {
        scheme: 'content-v1' as const,
        chunkSize: img.content.chunkSize,
        chunks: img.content.chunks,
        zeroChunks: img.content.zeroChunks,
      },
      ...(backing ? { backing } : {}),
    });
    const common = {
      domain: 'vm1',
      host: 'h',
      method: 'push' as const,
      startedAt: new Date().toISOString(),
      finishedAt: new Date().toISOString(),
      quiesced: false,
      libvirtVersion: '9',
      qemuVersion: '7',
    };
    const m1 = buildManifest({ ...common, backupId: 'full1', disks: [disk('full1', full)] });
    const m2 = buildManifest({
      ...common,
      backupId: 'inc1',
      chain: { level: 'inc', parent: 'full1', base: 'full1' },
      disks: [disk('inc1', inc, { backupId: 'full1', key: 'vm1/full1/vda.qcow2', sha256: full.content.sha256 })],
    });
    expect(m1.version).toBe(4);
    await target.putManifest(manifestKey('vm1', 'full1'), encodeManifest(m1));
    await target.putManifest(manifestKey('vm1', 'inc1'), encodeManifest(m2));
    const good = await verifyBackup(target, 'inc1');
    expect(good.ok).toBe(true);
    const restored = join(dir, 'restored.qcow2');
    await restoreBackup(target, 'inc1', { disk: 'vda', to: restored });
    expect(await compare(restored, source)).toBe('identical');

    // copy of the pulled chain: to another directory and to S3; each copy verifies there, a second copy sends nothing
    await requireS3();
    const s3 = await s3Target();
    const elsewhere = openTarget(`file://${join(dir, 'copy-dest')}`);
    try {
      for (const dest of [elsewhere, s3.target]) {
        const first = await copyBackup(target, dest, 'inc1');
        expect(first.copied).toEqual(expect.arrayContaining(['vm1/full1/vda.qcow2', 'vm1/inc1/vda.qcow2']));
        expect((await verifyBackup(dest, 'inc1', { readData: true })).ok).toBe(true);
        const again = await copyBackup(target, dest, 'inc1');
        expect(again.copied).toEqual([]);
        expect(again.skipped).toEqual(expect.arrayContaining(['vm1/full1/vda.qcow2', 'vm1/inc1/vda.qcow2']));
      }
    } finally {
      await elsewhere.close();
      await s3.target.close();
      await s3.cleanup();
    }

    // flip one byte of guest data in the full's stored image (the first data cluster: random bytes)
    const { stdout } = await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', fullPath()]);
    const first = (JSON.parse(stdout) as Array<{ data: boolean; offset?: number }>).find(
      (e) => e.data && e.offset !== undefined,
    )!;
    const fh = await open(fullPath(), 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, first.offset! + 4096);
    b[0] = b[0]! ^ 0xff;
    await fh.write(b, 0, 1, first.offset! + 4096);
    await fh.close();
    const bad = await verifyBackup(target, 'inc1');
    expect(bad.ok).toBe(false);
    const problem = bad.links.find((l) => l.backupId === 'full1')!.disks[0]!.problem;
    expect(problem).toMatch(
      /^disk vda: the guest data of vm1\/full1\/vda\.qcow2 has content digest [0-9a-f]{64}, the manifest says/,
    );
    await expect(restoreBackup(target, 'inc1', { disk: 'vda', to: join(dir, 'restored2.qcow2') })).rejects.toThrow(
      /Disk vda of backup full1 .* is corrupt/,
    );
    // a damaged pulled image is never copied: the copy names the disk and writes no image
    const third = openTarget(`file://${join(dir, 'copy-dest-2')}`);
    try {
      await expect(copyBackup(target, third, 'inc1')).rejects.toThrow(
        /^Cannot copy disk vda \(vm1\/full1\/vda\.qcow2\): its guest data has content digest [0-9a-f]{64}, the manifest says/,
      );
      expect(await third.stat('vm1/full1/vda.qcow2')).toBeUndefined();
    } finally {
      await third.close();
    }
    await target.close();
  });

  test('a file system that refuses O_DIRECT: the writer reopens the image with the page cache, and the image is whole', async () => {
    // No file system on this host refuses O_DIRECT (tmpfs and FUSE take it on Linux 6.6+), so a qemu-nbd first on
    // PATH answers --cache=none as qemu-nbd does on such a file system (EINVAL from open) and runs the real one
    // otherwise; every call is logged.
    const real = (await run('sh', ['-c', 'command -v qemu-nbd'])).stdout.trim();
    const log = join(dir, 'odirect-shim', 'calls.log');
    const dest = join(dir, 'odirect.qcow2');
    const pulled = await pullThroughShim(
      'odirect-shim',
      [
        '#!/bin/sh',
        `echo "$*" >> '${log}'`,
        'for a in "$@"; do',
        '  if [ "$a" = "--cache=none" ]; then',
        '    eval "img=\\${$#}"',
        `    echo "qemu-nbd: Failed to blk_new_open '$img': Could not open '$img': Invalid argument" >&2`,
        '    exit 1',
        '  fi',
        'done',
        `exec '${real}' "$@"`,
        '',
      ].join('\n'),
      dest,
    );
    const calls = (await readFile(log, 'utf8')).trim().split('\n');
    expect(calls).toHaveLength(2);
    expect(calls[0]).toContain('--cache=none');
    expect(calls[1]).toContain('--cache=writeback');
    expect(await compare(source, dest)).toBe('identical');
    expect((await imageContentDigest(dest, SIZE)).sha256).toBe(pulled.content.sha256);
  });

  test('any other failure to open the image is not retried with the page cache', async () => {
    const log = join(dir, 'eacces-shim', 'calls.log');
    await expect(
      pullThroughShim(
        'eacces-shim',
        `#!/bin/sh\necho "$*" >> '${log}'\necho "qemu-nbd: Failed to blk_new_open: Could not open: Permission denied" >&2\nexit 1\n`,
        join(dir, 'eacces.qcow2'),
      ),
    ).rejects.toThrow(/Permission denied/);
    expect((await readFile(log, 'utf8')).trim().split('\n')).toHaveLength(1);
  });

  test("qemu-nbd runs with glibc's malloc keeping its request buffers (no fresh pages per 4 MiB write)", async () => {
    const log = join(dir, 'env-shim', 'env.log');
    const real = (await run('sh', ['-c', 'command -v qemu-nbd'])).stdout.trim();
    const dest = join(dir, 'env.qcow2');
    await pullThroughShim(
      'env-shim',
      `#!/bin/sh\nenv | grep '^MALLOC_' | sort >> '${log}'\nexec '${real}' "$@"\n`,
      dest,
    );
    expect((await readFile(log, 'utf8')).trim().split('\n')).toEqual([
      `MALLOC_MMAP_THRESHOLD_=${32 * MiB}`,
      `MALLOC_TRIM_THRESHOLD_=${512 * MiB}`,
    ]);
    expect(await compare(source, dest)).toBe('identical');
  });

  test('image trees on nfs:// and s3:// are refused with one sentence; file:// is written in place', () => {
    expect(pullImageTreeSupport({ displayUrl: 'file:///backups', capabilities: { localPath: '/backups' } })).toEqual({
      supported: true,
      localPath: '/backups',
    });
    const s3 = pullImageTreeSupport({ displayUrl: 's3://bucket/p', capabilities: {} });
    expect(s3).toEqual({
      supported: false,
      reason: expect.stringMatching(/^A pull backup cannot write an image tree on s3:\/\/bucket\/p: .*\.$/),
    });
  });
});
