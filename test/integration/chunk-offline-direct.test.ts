/**
 * The offline method into a chunk repository reads the shut-off domain's own disks in place (storeOfflineDisks): no
 * copy of a disk ever appears in the backup's staging directory, what was stored restores exactly, and a start of the
 * domain while its disk is read is refused (QEMU cannot take the disk's write lock from under the read-only export)
 * or discards the backup with the offline method's sentence; either way no manifest names a mixed disk.
 */
import { open, readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { startBackup } from '../../src/client/backups';
import { ChunkStore } from '../../src/repository/chunks';
import type { OpenRepository } from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { initTestRepository, localRepoTarget, useChunkRepoWorker } from '../helpers/chunk-repo';
import { identical } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';

jest.setTimeout(15 * 60_000);

const PASSWORD = 'offline direct password';
const MiB = 1 << 20;

interface StagingSeen {
  /** staging directories of the backup that were seen while it ran */
  dirs: Set<string>;
  /** the largest regular file seen in one of them */
  largest: { name: string; size: number };
  /** names of every entry seen */
  names: Set<string>;
}

describe('offline method into a chunk repository: the disks are read in place (real stack)', () => {
  const newDomain = useFixtureDomains();
  const ctx = useChunkRepoWorker({
    name: 'chunk-offline-direct',
    hostPrefix: 'cs',
    password: PASSWORD,
    require: [requireTemporal, requireLibvirt],
  });

  async function repository(): Promise<{ dir: string; url: string; target: StorageTarget; repo: OpenRepository }> {
    const { url, dir, target } = await localRepoTarget(ctx.work, 'repo');
    return { dir, url, target, repo: await initTestRepository(target, PASSWORD) };
  }

  /** Every place the backup's staging directory can be (a local target's .staging, the state dir, QEMU's dir). */
  function stagingCandidates(repoDir: string, backupId: string): string[] {
    return [
      join(repoDir, '.staging', backupId),
      join(stackEnv().stateDir, 'staging', backupId),
      join('/var/lib/vmbackup/staging', backupId),
    ];
  }

  /** Polls the backup's staging directories until `done` settles; records what was in them. */
  function watchStaging(repoDir: string, backupId: string): { seen: StagingSeen; stop: () => Promise<void> } {
    const seen: StagingSeen = { dirs: new Set(), largest: { name: '', size: 0 }, names: new Set() };
    let running = true;
    const loop = (async () => {
      while (running) {
        for (const dir of stagingCandidates(repoDir, backupId)) {
          const names = await readdir(dir).catch(() => undefined);
          if (!names) continue;
          seen.dirs.add(dir);
          for (const name of names) {
            seen.names.add(name);
            const s = await stat(join(dir, name)).catch(() => undefined);
            if (s?.isFile() && s.size > seen.largest.size) seen.largest = { name, size: s.size };
          }
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    return {
      seen,
      stop: async () => {
        running = false;
        await loop;
      },
    };
  }

  /** Whether a qemu-nbd process is exporting `path` now (its command line names it). */
  async function exportsFile(path: string): Promise<boolean> {
    for (const pid of await readdir('/proc')) {
      if (!/^\d+$/.test(pid)) continue;
      const cmd = await readFile(`/proc/${pid}/cmdline`).catch(() => undefined);
      if (!cmd) continue;
      const args = cmd.toString().split('\0');
      if (args[0]?.endsWith('qemu-nbd') && args.includes(path)) return true;
    }
    return false;
  }

  async function restoreDisk(repo: OpenRepository, indexId: string, path: string): Promise<void> {
    const store = new ChunkStore(repo);
    const index = await store.getIndex(indexId);
    const fh = await open(path, 'w');
    try {
      await fh.truncate(index.virtualSize);
      await store.readDisk(index, async (offset, data) => {
        await fh.write(data, 0, data.length, offset);
      });
    } finally {
      await fh.close();
    }
  }

  test('a shut-off domain is stored with no staging copy of its disks, and restores exactly', async () => {
    const { dir, url, target, repo } = await repository();
    try {
      const dom = await newDomain({
        prefix: 'cs',
        start: false,
        disks: [
          { format: 'qcow2', sizeMiB: 160, randomMiB: 96, patterns: [{ byte: 0x5a, offsetMiB: 120, lengthMiB: 3 }] },
          { format: 'raw', sizeMiB: 40, randomMiB: 24 },
        ],
      });
      const { backupId, handle } = await startBackup(ctx.client, {
        domain: dom.name,
        host: ctx.host,
        method: 'auto',
        targets: [url],
        options: { heartbeatTimeoutSeconds: 5 },
      });
      const watch = watchStaging(dir, backupId);
      const result = await handle.result().finally(() => watch.stop());
      expect(result.status).toBe('completed');
      expect(result.method).toBe('offline');
      // the staging directory existed (the whole-VM files and the NBD socket live there) and never held a disk copy:
      // no image file, nothing larger than the domain's XML and NVRAM
      expect(watch.seen.dirs.size).toBeGreaterThan(0);
      expect([...watch.seen.names].filter((n) => /\.(qcow2|raw)$/.test(n))).toEqual([]);
      expect(watch.seen.largest.size).toBeLessThan(MiB);
      const manifest = JSON.parse((await target.getBuffer(`${dom.name}/${backupId}/manifest.json`)).toString()) as {
        disks: Array<{ name: string; sha256: string; format: string }>;
      };
      expect(manifest.disks.map((d) => d.format)).toEqual(['chunks', 'chunks']);
      for (const disk of dom.disks) {
        const d = manifest.disks.find((x) => x.name === disk.dev)!;
        const out = join(ctx.work, `${backupId}-${disk.dev}.raw`);
        await restoreDisk(repo, d.sha256, out);
        expect(await identical(out, disk.path)).toBe(true);
      }
    } finally {
      await target.close();
    }
  });

  test('a start of the domain while its disk is read is refused, or discards the backup with one sentence', async () => {
    const { url, target, repo } = await repository();
    let dom: FixtureDomain | undefined;
    try {
      dom = await newDomain({
        prefix: 'cs',
        start: false,
        disks: [{ format: 'qcow2', sizeMiB: 768, randomMiB: 640 }],
      });
      const d = dom;
      const { backupId, handle } = await startBackup(ctx.client, {
        domain: d.name,
        host: ctx.host,
        method: 'auto',
        targets: [url],
        options: { heartbeatTimeoutSeconds: 5 },
      });
      // a qemu-nbd exporting the domain's own disk means the read has begun: start the domain then
      let started: Promise<'started' | 'refused'> | undefined;
      let polling = true;
      const poll = (async () => {
        while (polling && !started) {
          if (await exportsFile(d.disks[0]!.path))
            started = d.start().then(
              () => 'started' as const,
              () => 'refused' as const,
            );
          else await new Promise((r) => setTimeout(r, 20));
        }
      })();
      const outcome = await handle.result().then(
        (r) => ({ ok: true as const, r }),
        (err: unknown) => ({ ok: false as const, err }),
      );
      polling = false;
      await poll;
      expect(started).toBeDefined();
      const start = await started!;
      const manifestKeys: string[] = [];
      for await (const o of target.list(`${d.name}/`)) if (o.key.endsWith('manifest.json')) manifestKeys.push(o.key);
      if (start === 'refused') {
        // QEMU could not lock the disk the read-only export holds: the domain stayed off, the backup is whole
        expect(await d.state()).toBe('shut off');
        expect(outcome.ok).toBe(true);
        const out = join(ctx.work, `${backupId}-vda.raw`);
        const manifest = JSON.parse((await target.getBuffer(manifestKeys[0]!)).toString()) as {
          disks: Array<{ sha256: string }>;
        };
        await restoreDisk(repo, manifest.disks[0]!.sha256, out);
        expect(await identical(out, d.disks[0]!.path)).toBe(true);
      } else {
        // the domain ran during the read: the backup failed with the offline method's sentence, no manifest
        expect(outcome.ok).toBe(false);
        const text = JSON.stringify(
          outcome.ok ? '' : String((outcome.err as { cause?: unknown }).cause ?? outcome.err),
        );
        expect(text).toContain('was started during the offline copy');
        expect(manifestKeys).toEqual([]);
      }
      process.stderr.write(`chunk-offline-direct: the start during the read was ${start}\n`);
    } finally {
      await dom?.destroy().catch(() => undefined);
      await target.close();
    }
  });
});
