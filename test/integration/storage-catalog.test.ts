/**
 * The catalog end to end on all three real targets, with real qcow2/raw images written by
 * qemu-io: ship with the storage activities, commit with the manifest, then list, verify,
 * restore (qemu-img compare), copy between targets, prune, and catch a corrupted object.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { GetObjectCommand, PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { MockActivityEnvironment } from '@temporalio/testing';
import type { ShippedImage } from '../../src/shared/activities';
import type { DiskImage } from '../../src/shared/types';
import {
  buildManifest,
  collectGarbage,
  encodeManifest,
  copyBackup,
  findBackup,
  listBackups,
  pruneBackups,
  restoreBackup,
  verifyBackup,
} from '../../src/repository';
import type { StorageTarget } from '../../src/storage/contract';
import { StorageError } from '../../src/storage/errors';
import { backUp, makeImage, stageImage, storageActivities } from '../storage/backups';
import { localTarget, nfsTarget, s3Target } from '../storage/fixtures';
import type { ConformanceTarget } from '../storage/conformance';
import { requireNfs, requireS3, stackEnv } from '../helpers/stack';

const run = promisify(execFile);
const MiB = 1 << 20;
const activities = storageActivities();

type Made = ConformanceTarget & { url: string };
const kinds: Array<[string, () => Promise<Made>]> = [
  ['local', localTarget],
  ['nfs', nfsTarget],
  ['s3', () => s3Target()],
];

let work: string;
let vda: DiskImage;
let vdb: DiskImage;

beforeAll(async () => {
  await requireS3();
  await requireNfs();
  work = await mkdtemp(join(tmpdir(), 'vmbackup-catalog-'));
  vda = await makeImage(work, 'vda', 'qcow2', 0xab);
  vdb = await makeImage(work, 'vdb', 'raw', 0x3c);
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

describe.each(kinds)('catalog on a %s target', (kind, make) => {
  let made: Made;
  let t: StorageTarget;
  const id = (n: number): string => `web-2026112${n}T010000Z-00a${n}`;

  beforeEach(async () => {
    made = await make();
    t = made.target;
  });
  afterEach(async () => {
    await made.cleanup();
    await t.close();
  });

  test('ship + manifest, then list, find, verify and restore byte-identical images', async () => {
    await backUp(made.url, 'web', id(1), '2026-11-21T01:00:00.000Z', [vda, vdb]);
    // a second ship of the same disk finds it there and sends nothing
    const again: ShippedImage = await new MockActivityEnvironment().run(activities.shipImage, {
      backupId: id(1),
      domain: 'web',
      target: made.url,
      disk: await stageImage(id(1), vda),
    });
    expect(again.bytesSent).toBe(0);

    const listed = await listBackups(t);
    expect(listed.map((b) => b.manifest.backupId)).toEqual([id(1)]);
    expect(listed[0]!.manifest.disks.map((d) => [d.name, d.sha256])).toEqual([
      ['vda', vda.sha256],
      ['vdb', vdb.sha256],
    ]);
    expect((await findBackup(t, id(1))).manifest.domain).toBe('web');

    const report = await verifyBackup(t, id(1));
    expect(report.ok).toBe(true);
    expect(report.disks.map((d) => [d.name, d.imageCheck])).toEqual([
      ['vda', 'ok'],
      ['vdb', 'skipped'],
    ]);

    const out = join(work, `restore-${kind}`);
    const restored = await restoreBackup(t, id(1), { to: out });
    expect(restored.map((r) => r.name)).toEqual(['vda', 'vdb']);
    await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', vda.path, join(out, 'vda.qcow2')]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', vdb.path, join(out, 'vdb.raw')]);

    // one disk to a file; an existing file is never overwritten without force
    const one = join(out, 'single.qcow2');
    await restoreBackup(t, id(1), { disk: 'vda', to: one });
    await run('qemu-img', ['compare', vda.path, one]);
    await writeFile(one, 'precious');
    await expect(restoreBackup(t, id(1), { disk: 'vda', to: one })).rejects.toThrow(
      /already exists; remove it or pass --force/,
    );
    expect(await readFile(one, 'utf8')).toBe('precious');
    await restoreBackup(t, id(1), { disk: 'vda', to: one, force: true });
    await run('qemu-img', ['compare', vda.path, one]);
    await expect(restoreBackup(t, id(1), { disk: 'vdz', to: one })).rejects.toThrow(
      /has no disk vdz \(it has vda, vdb\)/,
    );
    await rm(out, { recursive: true, force: true });
  });

  test('list, find and gc never walk a chunk repository beside the tree (@chunk-repo/ may hold millions of chunks)', async () => {
    await backUp(made.url, 'web', id(1), '2026-11-21T01:00:00.000Z', [vda]);
    await t.putManifest('@chunk-repo/chunks/ab/ab01', Buffer.from('a chunk'));
    await t.putManifest('@chunk-repo/x/manifest.json', Buffer.from('not a backup'));
    const prefixes: string[] = [];
    const watched: StorageTarget = {
      ...t,
      displayUrl: t.displayUrl,
      capabilities: t.capabilities,
      list: (prefix) => {
        prefixes.push(prefix);
        return t.list(prefix);
      },
      listTop: () => t.listTop(),
      stat: (key) => t.stat(key),
      getBuffer: (key, o) => t.getBuffer(key, o),
      delete: (key) => t.delete(key),
      removeUnfinished: (p) => t.removeUnfinished(p),
      checkLocation: () => t.checkLocation(),
    };
    expect((await listBackups(watched, { mustExist: true })).map((b) => b.manifest.backupId)).toEqual([id(1)]);
    await expect(findBackup(watched, 'not-a-guessable-id')).rejects.toThrow(/is not on/);
    const gc = await collectGarbage(watched, { olderThanMs: 0, dryRun: true }, async () => false);
    expect(gc.entries).toEqual([]);
    expect(prefixes.length).toBeGreaterThan(0);
    expect(prefixes.filter((p) => p === '' || p.startsWith('@'))).toEqual([]);
    await t.delete('@chunk-repo/chunks/ab/ab01');
    await t.delete('@chunk-repo/x/manifest.json');
  });

  test('copy refuses a backup from a chunk repository with one sentence and writes nothing', async () => {
    const idx = 'c'.repeat(64);
    const m = buildManifest({
      backupId: id(5),
      domain: 'web',
      host: 'hv1',
      method: 'offline',
      startedAt: '2026-11-25T01:00:00.000Z',
      finishedAt: '2026-11-25T01:01:00.000Z',
      quiesced: false,
      libvirtVersion: '9.0.0',
      qemuVersion: '7.2.0',
      repository: { id: 'd'.repeat(64), chunkSize: 4 * MiB, encryption: 'none', compression: 'zstd' },
      disks: [
        {
          name: 'vda',
          format: 'chunks',
          virtualSize: 8 * MiB,
          size: 0,
          sha256: idx,
          key: `@chunk-repo/indexes/${idx}`,
          chunks: { chunkSize: 4 * MiB, count: 2, zeroChunks: 2, uploadedChunks: 0 },
        },
      ],
    });
    await t.putManifest(`web/${id(5)}/manifest.json`, encodeManifest(m));
    const dest = await localTarget();
    try {
      await expect(copyBackup(t, dest.target, id(5))).rejects.toThrow(
        /^Backup .* is stored in a chunk repository, but the target holds none \(no @chunk-repo\/config\); restore it from another copy\.$/,
      );
      const left: string[] = [];
      for await (const o of dest.target.list('')) left.push(o.key);
      expect(left).toEqual([]);
    } finally {
      await dest.target.close();
      await dest.cleanup();
    }
  });

  test('a backup without a manifest is not listed, and deleteBackupObjects removes its images only', async () => {
    await backUp(made.url, 'web', id(1), '2026-11-21T01:00:00.000Z', [vda]);
    const env = new MockActivityEnvironment();
    await env.run(activities.shipImage, {
      backupId: id(2),
      domain: 'web',
      target: made.url,
      disk: await stageImage(id(2), vda),
    });
    expect((await listBackups(t)).map((b) => b.manifest.backupId)).toEqual([id(1)]);
    await expect(findBackup(t, id(2))).rejects.toThrow(/is not on .* \(no committed manifest\)/);

    await env.run(activities.deleteBackupObjects, { target: made.url, domain: 'web', backupId: id(2) });
    await env.run(activities.deleteBackupObjects, { target: made.url, domain: 'web', backupId: id(1) }); // committed: untouched
    const keys: string[] = [];
    for await (const o of t.list('')) keys.push(o.key);
    expect(keys.sort()).toEqual([`web/${id(1)}/manifest.json`, `web/${id(1)}/vda.qcow2`]);
  });

  test('prune keeps by policy, deletes manifests first, never touches unfinished backups', async () => {
    for (const n of [1, 2, 3]) await backUp(made.url, 'web', id(n), `2026-11-2${n}T01:00:00.000Z`, [vdb]);
    await backUp(made.url, 'db', id(4).replace('web', 'db'), '2026-11-01T01:00:00.000Z', [vdb]);
    await new MockActivityEnvironment().run(activities.shipImage, {
      backupId: id(5),
      domain: 'web',
      target: made.url,
      disk: await stageImage(id(5), vdb),
    });

    const dry = await pruneBackups(t, { keepLast: 1, dryRun: true });
    expect(dry.remove.map((r) => r.backupId).sort()).toEqual([id(1), id(2)]);
    expect(dry.keep.map((k) => k.backupId).sort()).toEqual([id(4).replace('web', 'db'), id(3)].sort());
    expect(await listBackups(t)).toHaveLength(4);

    const done = await pruneBackups(t, { keepLast: 1 });
    expect(done.remove).toHaveLength(2);
    expect((await listBackups(t)).map((b) => b.manifest.backupId).sort()).toEqual(
      [id(4).replace('web', 'db'), id(3)].sort(),
    );
    const keys: string[] = [];
    for await (const o of t.list('web/')) keys.push(o.key);
    expect(keys.sort()).toEqual([`web/${id(3)}/manifest.json`, `web/${id(3)}/vdb.raw`, `web/${id(5)}/vdb.raw`]);
    await expect(pruneBackups(t, {})).rejects.toThrow(/Prune needs a policy/);
  });

  test('verify names the disk whose stored bytes were changed', async () => {
    await backUp(made.url, 'web', id(1), '2026-11-21T01:00:00.000Z', [vda, vdb]);
    const key = `web/${id(1)}/vda.qcow2`;
    const flip = (b: Buffer): Buffer => {
      const c = Buffer.from(b);
      for (let i = 0; i < 16; i++) c[MiB + i] = (c[MiB + i] ?? 0) ^ 0xff;
      return c;
    };
    if (kind === 's3') {
      // overwrite the object with modified bytes, keeping its metadata (what bit rot or tampering looks like)
      const { s3 } = stackEnv();
      const full = `${(made as Made & { prefix: string }).prefix}/${key}`;
      const client = (made as Made & { client: S3Client }).client;
      const got = await client.send(new GetObjectCommand({ Bucket: s3.bucket, Key: full }));
      const body = Buffer.from(await got.Body!.transformToByteArray());
      await client.send(
        new PutObjectCommand({ Bucket: s3.bucket, Key: full, Body: flip(body), Metadata: got.Metadata }),
      );
    } else {
      const file = join((made as Made & { dir: string }).dir, key);
      await writeFile(file, flip(await readFile(file)));
    }
    const report = await verifyBackup(t, id(1));
    expect(report.ok).toBe(false);
    const bad = report.disks.filter((d) => !d.ok);
    expect(bad.map((d) => d.name)).toEqual(['vda']);
    expect(bad[0]!.problem).toMatch(/^disk vda: .* has SHA-256 [0-9a-f]{64}, the manifest says/);
    // restore refuses to hand out the damaged image and leaves no file behind
    const out = join(work, `corrupt-${kind}`);
    const err = await restoreBackup(t, id(1), { disk: 'vda', to: join(out, 'vda.qcow2') }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).message).toMatch(/^Disk vda of backup .* is corrupt/);
    await expect(stat(join(out, 'vda.qcow2'))).rejects.toThrow();
    await rm(out, { recursive: true, force: true });
  });
});

describe('copy between targets', () => {
  test('local -> s3 -> nfs, resumable (images already there are skipped), manifest last', async () => {
    const a = await localTarget();
    const b = await s3Target();
    const c = await nfsTarget();
    try {
      const backupId = 'web-20261121T010000Z-0c0c';
      await backUp(a.url, 'web', backupId, '2026-11-21T01:00:00.000Z', [vda, vdb]);
      const first = await copyBackup(a.target, b.target, backupId);
      expect(first.copied).toEqual([
        `web/${backupId}/vda.qcow2`,
        `web/${backupId}/vdb.raw`,
        `web/${backupId}/manifest.json`,
      ]);
      const second = await copyBackup(a.target, b.target, backupId);
      expect(second.copied).toEqual([]);
      expect(second.skipped).toHaveLength(3);

      // an interrupted copy: one image already on the destination, no manifest yet
      await c.target.putImage(`web/${backupId}/vda.qcow2`, vda.path, { metadata: { sha256: vda.sha256 } });
      expect(await listBackups(c.target)).toEqual([]);
      const resumed = await copyBackup(b.target, c.target, backupId, { tempDir: work });
      expect(resumed.skipped).toEqual([`web/${backupId}/vda.qcow2`]);
      expect(resumed.copied).toEqual([`web/${backupId}/vdb.raw`, `web/${backupId}/manifest.json`]);
      expect((await verifyBackup(c.target, backupId)).ok).toBe(true);
      expect((await verifyBackup(b.target, backupId)).ok).toBe(true);
    } finally {
      for (const x of [a, b, c]) {
        await x.cleanup();
        await x.target.close();
      }
    }
  });
});
