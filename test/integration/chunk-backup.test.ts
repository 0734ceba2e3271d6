/**
 * Backups INTO a chunk repository (issue #15, tests 1, 2, 3 and 5) on the real stack: a worker with the repository's
 * password stores each staged image as chunks (through a read-only qemu-nbd export), then the version-3 manifest.
 * Every disk is read back here through ChunkStore, the way a restore reads it, and compared with `qemu-img compare`.
 *
 * What is compared: an offline backup of a shut-off domain must equal its disk exactly. A push backup is of a running
 * domain whose QEMU has no OS to boot (nothing writes its disk while it runs), after a write through the device: the
 * backup point then has one known content, the disk's, and equality is exact rather than "about right".
 */
import { randomBytes } from 'node:crypto';
import { copyFile, open, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ListObjectsV2Command } from '@aws-sdk/client-s3';
import { startBackup } from '../../src/client/backups';
import { CHUNKS_PREFIX, ChunkStore } from '../../src/repository/chunks';
import { hasRepositorySignature } from '../../src/repository/manifest';
import type { StorageTarget } from '../../src/storage/contract';
import type { BackupResult, RequestedMethod } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import {
  chunkObjects,
  initTestRepository,
  localRepoTarget,
  manifestOf,
  readBack,
  useChunkRepoWorker,
} from '../helpers/chunk-repo';
import { identical } from '../helpers/images';
import { requireLibvirt, requireNfs, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, embeddedEnv, runCli, startWorkerProcess, uniqueHost } from '../helpers/vmbackup';
import { nfsTarget, s3Target } from '../storage/fixtures';

jest.setTimeout(20 * 60_000);

const PASSWORD = 'correct horse battery staple';
const MiB = 1 << 20;

describe('backups into a chunk repository (real stack)', () => {
  const newDomain = useFixtureDomains();
  const ctx = useChunkRepoWorker({
    name: 'chunk-backup',
    hostPrefix: 'cb',
    password: PASSWORD,
    require: [requireTemporal, requireLibvirt, requireS3, requireNfs],
  });

  const localRepo = (name: string) => localRepoTarget(ctx.work, name);
  const init = (target: StorageTarget) => initTestRepository(target, PASSWORD);

  async function backup(
    dom: FixtureDomain,
    method: RequestedMethod,
    targets: string[],
    opts: { host?: string; level?: 'auto' | 'full' | 'inc' } = {},
  ): Promise<BackupResult> {
    const { handle } = await startBackup(ctx.client, {
      domain: dom.name,
      host: opts.host ?? ctx.host,
      method,
      targets,
      options: { heartbeatTimeoutSeconds: 5, ...(opts.level ? { level: opts.level } : {}) },
    });
    return handle.result();
  }

  /** issue test 1 on one backend: offline and push backups equal their source; a second backup sends nothing */
  async function backupAndReadBack(kind: string, url: string, target: StorageTarget): Promise<void> {
    const repo = await init(target);
    const off = await newDomain({
      prefix: 'cb',
      start: false,
      disks: [
        { format: 'qcow2', sizeMiB: 48, randomMiB: 10, patterns: [{ byte: 0x5a, offsetMiB: 24, lengthMiB: 3 }] },
        { format: 'raw', sizeMiB: 9, patterns: [{ byte: 0x11, offsetMiB: 1, lengthMiB: 1 }] },
      ],
    });
    const first = await backup(off, 'auto', [url], { level: 'inc' });
    expect(first.status).toBe('completed');
    expect(first.method).toBe('offline');
    expect(first.chain?.level).toBe('full');
    expect(first.chain?.reason).toBe(
      'full: a chunk repository stores every backup whole; unchanged chunks are not uploaded again',
    );
    const { m, body } = await manifestOf(target, off.name, first.backupId);
    expect(m.version).toBe(3);
    expect(m.repository.id).toBe(repo.config.repositoryId);
    expect(m.disks.map((d) => d.format)).toEqual(['chunks', 'chunks']);
    expect(hasRepositorySignature(body, repo.keys!.authKey)).toBe(true);
    const restored = await readBack(repo, m, ctx.work);
    for (const disk of off.disks) expect(await identical(restored[disk.dev]!, disk.path)).toBe(true);
    // the qcow2 disk: 12 chunks of 4 MiB, 10 MiB random (3 chunks) + 3 MiB pattern (1 chunk), the rest holes
    expect(m.disks[0]!.chunks).toMatchObject({ count: 12, zeroChunks: 8 });
    const stats1 = first.targets[0]!.chunks!;
    expect(stats1.newChunks).toBeGreaterThan(0);
    expect(stats1.uploadedBytes).toBeGreaterThan(10 * MiB); // random data does not compress
    const afterFirst = await chunkObjects(target);
    expect(afterFirst.length).toBe(stats1.newChunks);

    // unchanged: nothing is uploaded again, and no chunk object appears
    const second = await backup(off, 'auto', [url]);
    expect(second.status).toBe('completed');
    const stats2 = second.targets[0]!.chunks!;
    expect(stats2).toMatchObject({ newChunks: 0, uploadedBytes: 0 });
    expect(stats2.knownChunks).toBe(stats1.newChunks);
    expect(await chunkObjects(target)).toEqual(afterFirst);
    const m2 = (await manifestOf(target, off.name, second.backupId)).m;
    expect(m2.disks.map((d) => d.sha256)).toEqual(m.disks.map((d) => d.sha256));

    // push: a running domain (no OS: nothing writes its disk but us) after a write through the device
    const live = await newDomain({
      prefix: 'cb',
      disks: [{ format: 'qcow2', sizeMiB: 32, randomMiB: 4 }],
    });
    await live.writeThroughDevice('vda', 0x77, 8, 2);
    const pushed = await backup(live, 'push', [url]);
    expect(pushed.status).toBe('completed');
    expect(pushed.method).toBe('push');
    expect(pushed.chain?.checkpoint).toBeUndefined(); // no checkpoint for a chunk repository
    const pm = (await manifestOf(target, live.name, pushed.backupId)).m;
    expect(pm.vm).toBeDefined();
    const livePaths = await readBack(repo, pm, ctx.work);
    // QEMU keeps qcow2 metadata of the write (new L2 entries) in memory until it flushes: the file on the host shows
    // what the guest sees once QEMU has closed it (destroy: SIGTERM, a clean exit that flushes)
    await live.destroy();
    expect(await identical(livePaths.vda!, live.disks[0]!.path)).toBe(true);
    process.stderr.write(`chunk-backup ${kind}: ${afterFirst.length} chunks after the first backup\n`);
  }

  test('issue test 1, local: offline and push backups read back exactly; a second backup uploads nothing', async () => {
    const { url, target } = await localRepo('local');
    try {
      await backupAndReadBack('local', url, target);
    } finally {
      await target.close();
    }
  });

  test('snapshot method, local: a running domain backed up into a chunk repository reads back exactly', async () => {
    const { url, target } = await localRepo('snapshot');
    try {
      const repo = await init(target);
      const live = await newDomain({ prefix: 'cb', disks: [{ format: 'qcow2', sizeMiB: 24, randomMiB: 6 }] });
      await live.writeThroughDevice('vda', 0x3c, 12, 1);
      const r = await backup(live, 'snapshot', [url]);
      expect(r.status).toBe('completed');
      expect(r.method).toBe('snapshot');
      const { m } = await manifestOf(target, live.name, r.backupId);
      // 6 chunks: the random 6 MiB in chunks 0-1, the write at 12 MiB in chunk 3, the rest never written
      expect(m.disks[0]!.chunks).toMatchObject({ count: 6, zeroChunks: 3 });
      const restored = await readBack(repo, m, ctx.work);
      // the overlay was committed back; compare once QEMU closed the disk (its qcow2 metadata flushed)
      await live.destroy();
      expect(await identical(restored.vda!, live.disks[0]!.path)).toBe(true);
    } finally {
      await target.close();
    }
  });

  test('issue test 1, NFS: offline and push backups read back exactly; a second backup uploads nothing', async () => {
    const nfs = await nfsTarget();
    try {
      await backupAndReadBack('nfs', nfs.url, nfs.target);
    } finally {
      await nfs.target.close();
      await nfs.cleanup();
    }
  });

  test('issue test 1, S3: offline and push backups read back exactly; a second backup uploads nothing', async () => {
    const s3 = await s3Target();
    try {
      await backupAndReadBack('s3', s3.url, s3.target);
    } finally {
      await s3.target.close();
      await s3.cleanup();
    }
  });

  test('issue test 1: 20 domains cloned from one template image store the template chunks once', async () => {
    const { url, target } = await localRepo('clones');
    try {
      const repo = await init(target);
      const template = join(ctx.work, 'template.raw');
      const tfh = await open(template, 'w');
      await tfh.truncate(16 * MiB);
      await tfh.write(randomBytes(12 * MiB), 0, 12 * MiB, 0);
      await tfh.close();
      const domains: FixtureDomain[] = [];
      for (let i = 0; i < 20; i++) {
        const dom = await newDomain({ prefix: 'cb', start: false, disks: [{ format: 'raw', sizeMiB: 16 }] });
        await copyFile(template, dom.disks[0]!.path);
        domains.push(dom);
      }
      const diskChunks = new Set<string>();
      let uploadedForDisks = 0;
      // the first alone, then the other 19 at once (the host's backup slots queue them)
      const first = await backup(domains[0]!, 'auto', [url]);
      const rest = await Promise.all(domains.slice(1).map((dom) => backup(dom, 'auto', [url])));
      for (const [i, r] of [first, ...rest].entries()) {
        expect(r.status).toBe('completed');
        const { m } = await manifestOf(target, domains[i]!.name, r.backupId);
        uploadedForDisks += m.disks[0]!.chunks.uploadedChunks;
        const index = await new ChunkStore(repo).getIndex(m.disks[0]!.sha256);
        for (const e of index.entries) if (e !== 'zero') diskChunks.add(e);
      }
      // the template is 3 chunks of random data and one zero chunk: every clone's index names those 3
      expect(diskChunks.size).toBe(3);
      expect(uploadedForDisks).toBe(3);
      // what is stored: the template's chunks plus one small chunk per domain definition (names and UUIDs differ)
      const stored = await chunkObjects(target);
      expect(stored.length).toBeLessThanOrEqual(3 + 20);
      const last = domains[19]!;
      const lastId = await lastBackup(target, last);
      const restored = await readBack(repo, (await manifestOf(target, last.name, lastId!)).m, ctx.work);
      expect(await identical(restored.vda!, template)).toBe(true);
    } finally {
      await target.close();
    }
  });

  async function lastBackup(target: StorageTarget, dom: FixtureDomain): Promise<string | undefined> {
    const ids: string[] = [];
    for await (const o of target.list(`${dom.name}/`)) {
      const m = /^[^/]+\/([^/]+)\/manifest\.json$/.exec(o.key);
      if (m) ids.push(m[1]!);
    }
    return ids.sort().pop();
  }

  test('issue test 2: an encrypted repository holds no marker from the guest data; a wrong password is one sentence', async () => {
    const { url, target } = await localRepo('marker');
    const dir = new URL(url).pathname;
    try {
      await init(target);
      const dom = await newDomain({ prefix: 'cb', start: false, disks: [{ format: 'raw', sizeMiB: 16 }] });
      const marker = `VMBACKUP-MARKER-${randomBytes(8).toString('hex')}`;
      // the marker as the guest would have written it: compressible text, and alone in a block
      const fh = await open(dom.disks[0]!.path, 'r+');
      await fh.write(Buffer.from(marker.repeat(4096)), 0, undefined, 0);
      await fh.write(Buffer.from(marker), 0, undefined, 9 * MiB + 12345);
      await fh.close();
      expect((await readFile(dom.disks[0]!.path)).includes(marker)).toBe(true);
      const r = await backup(dom, 'auto', [url]);
      expect(r.status).toBe('completed');
      const files = await allFiles(dir);
      expect(files.length).toBeGreaterThan(3);
      for (const f of files) {
        const body = await readFile(f);
        expect({ file: f, holdsMarker: body.includes(marker) }).toEqual({ file: f, holdsMarker: false });
      }

      // a worker of another host with a wrong password: the backup fails with one sentence naming what to set
      const wrongFile = join(ctx.work, 'wrong-password');
      await writeFile(wrongFile, 'not the password\n', { mode: 0o600 });
      const otherHost = uniqueHost('cb');
      const other = await startWorkerProcess(otherHost, { env: cliEnv({ VMBACKUP_PASSWORD_FILE: wrongFile }) });
      try {
        const failed = await backup(dom, 'auto', [url], { host: otherHost }).then(
          () => undefined,
          (err: unknown) => err as Error,
        );
        expect(failed).toBeDefined();
        const sentence = causeMessage(failed!);
        expect(sentence).toMatch(
          /reached no target: The password does not open any key of the chunk repository on file:\/\/[^ ]+: give this host's worker the repository's password/,
        );
        expect(sentence).toMatch(/VMBACKUP_PASSWORD or VMBACKUP_PASSWORD_FILE/);
        expect(sentence).not.toMatch(/\n/);
      } finally {
        await other.stop();
      }
    } finally {
      await target.close();
    }
  });

  test('one backup into a chunk repository and an image tree is refused with one sentence; nothing is stored', async () => {
    const repoTarget = await localRepo('mixed-repo');
    const tree = await localRepo('mixed-tree');
    try {
      await init(repoTarget.target);
      const dom = await newDomain({ prefix: 'cb', start: false, disks: [{ format: 'raw', sizeMiB: 4 }] });
      const failed = await backup(dom, 'auto', [repoTarget.url, tree.url]).then(
        () => undefined,
        (err: unknown) => err as Error,
      );
      expect(failed).toBeDefined();
      expect(causeMessage(failed!)).toBe(
        `${repoTarget.url} is a chunk repository and ${tree.url} is not: mixing an image tree and a chunk repository in one backup is not supported; give them separate backups (or schedules)`,
      );
      expect(await chunkObjects(repoTarget.target)).toEqual([]);
      expect(await allFiles(new URL(tree.url).pathname)).toEqual([]);
    } finally {
      await repoTarget.target.close();
      await tree.target.close();
    }
  });

  test('backup --password-file is refused with one sentence when a cluster worker runs the backup', async () => {
    const r = await runCli([
      'backup',
      'vmbt-cb-none',
      '--target',
      'file:///tmp/x',
      '--password-file',
      ctx.passwordFile,
    ]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/--password-file is read by this command's own worker only \(the embedded default\)/);
    expect(r.stderr).toMatch(/nothing was started/);
  });

  test('embedded default: backup --password-file gives the password to its own worker; --json has the chunk figures', async () => {
    const { url, target } = await localRepo('embedded');
    try {
      const repo = await init(target);
      const dom = await newDomain({
        prefix: 'cb',
        start: false,
        disks: [{ format: 'qcow2', sizeMiB: 16, randomMiB: 5 }],
      });
      const args = ['backup', dom.name, '--target', url, '--json', '--wait'];
      const without = await runCli(args, { env: embeddedEnv(uniqueHost('cb')) });
      expect(without.code).toBe(1);
      expect(without.stdout).toMatch(/this worker has no password: give this host's worker the repository's password/);
      const r = await runCli([...args, '--password-file', ctx.passwordFile], { env: embeddedEnv(uniqueHost('cb')) });
      expect(r.code).toBe(0);
      const out = JSON.parse(r.stdout) as BackupResult;
      expect(out.status).toBe('completed');
      // 5 MiB of random data: two chunks, two zero ones; and the definition's chunk
      expect(out.targets[0]!.chunks).toMatchObject({ newChunks: 3, knownChunks: 0, zeroChunks: 2 });
      expect(out.disks[0]!.format).toBe('chunks');
      const { m } = await manifestOf(target, dom.name, out.backupId);
      expect(out.disks[0]!.sha256).toBe(m.disks[0]!.sha256);
      const restored = await readBack(repo, m, ctx.work);
      expect(await identical(restored.vda!, dom.disks[0]!.path)).toBe(true);
    } finally {
      await target.close();
    }
  });

  test('issue test 3: kill -9 of the worker while chunks upload; the retried step sends only the missing chunks', async () => {
    const s3 = await s3Target();
    const { s3: stack } = stackEnv();
    const killHost = uniqueHost('cb');
    let w = await startWorkerProcess(killHost, { args: ['--password-file', ctx.passwordFile] });
    try {
      const repo = await init(s3.target);
      const dom = await newDomain({
        prefix: 'cb',
        start: false,
        disks: [{ format: 'raw', sizeMiB: 256, randomMiB: 256 }],
      });
      const { handle } = await startBackup(ctx.client, {
        domain: dom.name,
        host: killHost,
        method: 'auto',
        targets: [s3.url],
        options: { heartbeatTimeoutSeconds: 5 },
      });
      const etags = async (): Promise<Map<string, string>> => {
        const out = new Map<string, string>();
        let token: string | undefined;
        do {
          const page = await s3.client.send(
            new ListObjectsV2Command({
              Bucket: stack.bucket,
              Prefix: `${s3.prefix}/${CHUNKS_PREFIX}`,
              ContinuationToken: token,
            }),
          );
          for (const o of page.Contents ?? []) if (o.Key && o.ETag) out.set(o.Key, o.ETag);
          token = page.NextContinuationToken;
        } while (token);
        return out;
      };
      // a deadline for the upload to get going, not a measurement
      const deadline = Date.now() + 10 * 60_000;
      while ((await etags()).size < 8) {
        if (Date.now() > deadline) throw new Error('no chunk was uploaded within 10 minutes');
        await new Promise((r) => setTimeout(r, 50));
      }
      await w.kill9();
      const before = await etags();
      expect(before.size).toBeLessThan(64); // killed while uploading, not after
      w = await startWorkerProcess(killHost, { args: ['--password-file', ctx.passwordFile] });
      const result = await handle.result();
      expect(result.status).toBe('completed');
      const stats = result.targets[0]!.chunks!;
      // the final attempt found what the killed one stored and sent only the rest (the disk's 64 chunks are random,
      // none zero; the domain definition, stored after the disk, is one more chunk)
      const { m } = await manifestOf(s3.target, dom.name, result.backupId);
      expect(m.disks[0]!.chunks).toMatchObject({ count: 64, zeroChunks: 0, uploadedChunks: 64 - before.size });
      expect(stats.knownChunks).toBe(before.size);
      expect(stats.newChunks).toBe(64 - before.size + 1);
      const after = await etags();
      expect(after.size).toBe(65);
      // each chunk object was written once: an encrypted chunk written again would have a new nonce, a new ETag
      for (const [key, etag] of before) expect(after.get(key)).toBe(etag);
      const restored = await readBack(repo, m, ctx.work);
      expect(await identical(restored.vda!, dom.disks[0]!.path)).toBe(true);
      await rm(restored.vda!, { force: true });
    } finally {
      await w.stop();
      await s3.target.close();
      await s3.cleanup();
    }
  });

  test('issue test 5: two workers of two hosts back up two domains into one repository at once', async () => {
    const { url, target } = await localRepo('two-hosts');
    const hostB = uniqueHost('cb');
    const workerB = await startWorkerProcess(hostB, { env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }) });
    try {
      const repo = await init(target);
      const spec = { format: 'qcow2' as const, sizeMiB: 64, randomMiB: 24 };
      const [a, b] = await Promise.all([
        newDomain({ prefix: 'cb', start: false, disks: [spec] }),
        newDomain({ prefix: 'cb', start: false, disks: [spec] }),
      ]);
      // the same data at the start of both disks: both backups store (or find) the same chunks at the same time
      const shared = randomBytes(8 * MiB);
      for (const dom of [a!, b!]) {
        await rm(dom.disks[0]!.path);
        const raw = join(ctx.work, `${dom.name}.raw`);
        const fh = await open(raw, 'w');
        await fh.truncate(64 * MiB);
        await fh.write(shared, 0, shared.length, 0);
        await fh.write(randomBytes(16 * MiB), 0, 16 * MiB, 8 * MiB);
        await fh.close();
        const { execFile } = await import('node:child_process');
        await new Promise<void>((res, rej) =>
          execFile('qemu-img', ['convert', '-O', 'qcow2', raw, dom.disks[0]!.path], (err) => (err ? rej(err) : res())),
        );
        await rm(raw);
      }
      const [ra, rb] = await Promise.all([backup(a!, 'auto', [url]), backup(b!, 'auto', [url], { host: hostB })]);
      expect([ra.status, rb.status]).toEqual(['completed', 'completed']);
      expect(rb.host).toBe(hostB);
      for (const [dom, r] of [
        [a!, ra],
        [b!, rb],
      ] as const) {
        const { m } = await manifestOf(target, dom.name, r.backupId);
        const restored = await readBack(repo, m, ctx.work);
        expect(await identical(restored.vda!, dom.disks[0]!.path)).toBe(true);
      }
      // the shared 8 MiB are two chunks stored once; each disk's own 16 MiB four chunks
      expect((await chunkObjects(target)).length).toBeLessThanOrEqual(2 + 4 + 4 + 2);
    } finally {
      await workerB.stop();
      await target.close();
    }
  });
});

function causeMessage(err: Error): string {
  let e: unknown = err;
  let last = err.message;
  while (e && typeof e === 'object' && 'cause' in e && (e as { cause?: unknown }).cause) {
    e = (e as { cause: unknown }).cause;
    if (e instanceof Error) last = e.message;
  }
  return last;
}

async function allFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await allFiles(p)));
    else if ((await stat(p)).isFile()) out.push(p);
  }
  return out;
}
