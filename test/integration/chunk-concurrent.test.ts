/**
 * A chunk repository while a backup runs, on the real stack (issue #15 test 4 with a real backup, and live progress).
 *
 * Test 4: A is backed up twice (its first backup then has chunks of its own), every object of the repository is set
 * 48 h back (utimes on the local target: the storage's own time, which no fake clock moves), B's backup starts with a
 * disk that begins with A's first data. Once B has reused those chunks (`has()` touched them: their mtime is now),
 * B's worker is stopped (SIGSTOP) mid-store, deterministically, while `vmbackup prune` drops A's first backup and
 * `vmbackup gc --grace 1d` runs with the default freshness window (1 h): without the touch, gc would delete the chunks
 * B relies on (unreferenced: B has no index or manifest yet, and older than the grace). Then B goes on and must
 * restore exactly.
 */
import { randomBytes } from 'node:crypto';
import { open, readFile, readdir, stat, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { startBackup } from '../../src/client/backups';
import { CHUNKS_PREFIX, ChunkStore, REPOSITORY_ROOT, chunkKey, indexKey } from '../../src/repository/chunks';
import type { OpenRepository } from '../../src/repository/chunks';
import { progressQuery, storeProgressSignal } from '../../src/shared/queries';
import type { StoreProgress } from '../../src/shared/queries';
import type { BackupProgress, BackupResult } from '../../src/shared/types';
import type { StorageTarget } from '../../src/storage/contract';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { initTestRepository, keysUnder, localRepoTarget, useChunkRepoWorker } from '../helpers/chunk-repo';
import { identical } from '../helpers/images';
import { requireLibvirt, requireTemporal } from '../helpers/stack';
import { cliEnv, embeddedEnv, runCli, uniqueHost, waitFor } from '../helpers/vmbackup';

jest.setTimeout(20 * 60_000);

const PASSWORD = 'concurrent chunk backups';
const MiB = 1 << 20;
const HOUR = 3600_000;

interface ManifestJson {
  backupId: string;
  disks: Array<{ name: string; sha256: string; key: string }>;
  vm?: { xml: { key: string; sha256: string }; nvram?: { key: string }; tpm?: { files: Array<{ key: string }> } };
}

describe('a chunk repository while a backup runs (real stack)', () => {
  const newDomain = useFixtureDomains();
  const ctx = useChunkRepoWorker({
    name: 'chunk-concurrent',
    hostPrefix: 'cq',
    password: PASSWORD,
    require: [requireTemporal, requireLibvirt],
  });

  async function repository(
    name: string,
  ): Promise<{ url: string; dir: string; target: StorageTarget; repo: OpenRepository }> {
    const { url, dir, target } = await localRepoTarget(ctx.work, name);
    return { url, dir, target, repo: await initTestRepository(target, PASSWORD) };
  }

  function start(dom: FixtureDomain, url: string) {
    return startBackup(ctx.client, {
      domain: dom.name,
      host: ctx.host,
      method: 'auto',
      targets: [url],
      // B's worker is stopped for a while on purpose: its steps must not be declared dead meanwhile
      options: { heartbeatTimeoutSeconds: 300 },
    });
  }

  async function backup(dom: FixtureDomain, url: string): Promise<BackupResult> {
    const r = await (await start(dom, url)).handle.result();
    expect(r.status).toBe('completed');
    return r;
  }

  async function manifests(target: StorageTarget): Promise<ManifestJson[]> {
    const out: ManifestJson[] = [];
    for await (const o of target.list('')) {
      if (o.key.startsWith(`${REPOSITORY_ROOT}/`) || !o.key.endsWith('/manifest.json')) continue;
      out.push(JSON.parse((await target.getBuffer(o.key)).toString('utf8')) as ManifestJson);
    }
    return out;
  }

  /** Every chunk and index key some manifest references (through its indexes). */
  async function referenced(repo: OpenRepository, target: StorageTarget): Promise<Set<string>> {
    const store = new ChunkStore(repo);
    const keys = new Set<string>();
    for (const m of await manifests(target)) {
      const ids = [
        ...m.disks.map((d) => d.sha256),
        ...(m.vm ? [m.vm.xml, ...(m.vm.nvram ? [m.vm.nvram] : []), ...(m.vm.tpm?.files ?? [])] : []).map((f) =>
          f.key.slice(f.key.lastIndexOf('/') + 1),
        ),
      ];
      for (const id of ids) {
        keys.add(indexKey(id));
        for (const e of (await store.getIndex(id)).entries) if (e !== 'zero') keys.add(chunkKey(e));
      }
    }
    return keys;
  }

  test('issue test 4: prune and gc while a backup reuses chunks only a pruned backup had; the backup restores exactly and gc leaves nothing unreferenced older than the grace', async () => {
    const { url, dir, target, repo } = await repository('t4');
    const chunk = repo.config.chunkSize;
    const store = new ChunkStore(repo);
    try {
      // A: 4 chunks of random data; its first backup, then 2 chunks change and it is backed up again
      const a = await newDomain({ prefix: 'cq', start: false, disks: [{ format: 'raw', sizeMiB: 16, randomMiB: 16 }] });
      const a1Data = await readFile(a.disks[0]!.path);
      const a1 = await backup(a, url);
      const fh = await open(a.disks[0]!.path, 'r+');
      await fh.write(randomBytes(2 * chunk), 0, 2 * chunk, 0);
      await fh.close();
      const a2 = await backup(a, url);
      const onlyA1 = [0, 1].map((i) => chunkKey(store.idOf(a1Data.subarray(i * chunk, (i + 1) * chunk)) as string));
      const present = await keysUnder(target, `${REPOSITORY_ROOT}/`);
      for (const k of onlyA1) expect(present).toContain(k);

      // everything stored so far is two days old (older than the 1 d grace and the 1 h freshness window)
      const old = new Date(Date.now() - 48 * HOUR);
      for (const k of present) await utimes(join(dir, k), old, old);

      // B: A's first data, then 160 MiB of new data it must upload
      const b = await newDomain({ prefix: 'cq', start: false, disks: [{ format: 'raw', sizeMiB: 176 }] });
      const bfh = await open(b.disks[0]!.path, 'r+');
      await bfh.write(a1Data, 0, a1Data.length, 0);
      for (let off = 16 * MiB; off < 176 * MiB; off += 16 * MiB)
        await bfh.write(randomBytes(16 * MiB), 0, 16 * MiB, off);
      await bfh.close();
      const { handle, backupId: bId } = await start(b, url);

      // B has reused A's first chunks once has() touched them (or, were there no touch, once its store is past them:
      // the progress query); it still has most of its data to store
      const mtime = async (k: string) => (await stat(join(dir, k))).mtimeMs;
      let probes = 0;
      await waitFor(
        "B's backup reusing the chunks only A's first backup had",
        async () =>
          (await Promise.all(onlyA1.map(mtime))).every((t) => t > Date.now() - HOUR) ||
          (++probes % 10 === 0 && ((await handle.query(progressQuery)).targets[url]?.bytesDone ?? 0) >= a1Data.length),
        { timeoutMs: 600_000, intervalMs: 20 },
      );
      const pid = ctx.worker!.child.pid!;
      process.kill(pid, 'SIGSTOP');
      try {
        expect(await keysUnder(target, `${b.name}/`)).toEqual([]); // B is not committed

        const pruned = await runCli(['prune', '--target', url, '--domain', a.name, '--keep-last', '1', '--json'], {
          env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }),
        });
        expect([pruned.code, pruned.stderr]).toEqual([0, '']);
        expect(await keysUnder(target, `${a.name}/`)).toEqual([`${a.name}/${a2.backupId}/manifest.json`]);

        const gc = await runCli(['gc', '--target', url, '--grace', '1d', '--json'], {
          env: embeddedEnv(uniqueHost('cq'), { VMBACKUP_PASSWORD: PASSWORD }),
        });
        expect([gc.code, gc.stderr]).toEqual([0, '']);
        const removed = (JSON.parse(gc.stdout) as { chunkRepository: { removedKeys: string[] } }).chunkRepository
          .removedKeys;
        // gc did remove what only A's first backup had and nobody reuses: its disk index
        const a1Manifest = a1.targets[0]!.chunks!.indexes;
        expect(removed).toContain(indexKey(a1Manifest.vda!));
        // ... and kept the chunks B reuses: unreferenced, stored two days ago, but touched by B
        for (const k of onlyA1) expect(removed).not.toContain(k);
        const left = await keysUnder(target, `${REPOSITORY_ROOT}/`);
        for (const k of onlyA1) expect(left).toContain(k);
        expect(await keysUnder(target, `${b.name}/`)).toEqual([]); // gc ran while B was still storing
      } finally {
        process.kill(pid, 'SIGCONT');
      }

      const bResult = await handle.result();
      expect(bResult.status).toBe('completed');
      expect(bResult.backupId).toBe(bId);
      const to = join(ctx.work, `restored-${bId}`);
      const restored = await runCli(['restore', bId, '--target', url, '--to', to, '--format', 'raw'], {
        env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }),
      });
      expect([restored.code, restored.stderr]).toEqual([0, '']);
      expect(await identical(join(to, 'vda.raw'), b.disks[0]!.path)).toBe(true);

      // no object that no manifest references and that is older than the grace is left
      const refs = await referenced(repo, target);
      const graceAgo = Date.now() - 24 * HOUR;
      const stale: string[] = [];
      for (const k of await keysUnder(target, `${REPOSITORY_ROOT}/`)) {
        if (!k.startsWith(CHUNKS_PREFIX) && !k.startsWith(`${REPOSITORY_ROOT}/indexes/`)) continue;
        if (!refs.has(k) && (await mtime(k)) < graceAgo) stale.push(k);
      }
      expect(stale).toEqual([]);
      // and A's second backup still restores
      const toA = join(ctx.work, `restored-${a2.backupId}`);
      const restoredA = await runCli(['restore', a2.backupId, '--target', url, '--to', toA, '--format', 'raw'], {
        env: cliEnv({ VMBACKUP_PASSWORD: PASSWORD }),
      });
      expect([restoredA.code, restoredA.stderr]).toEqual([0, '']);
      expect(await identical(join(toA, 'vda.raw'), a.disks[0]!.path)).toBe(true);
    } finally {
      await target.close();
    }
  });

  test('live progress: the progress query shows a chunk target storing, between 0 and its total, before it is done', async () => {
    const { url, dir, target } = await repository('progress');
    try {
      const dom = await newDomain({
        prefix: 'cq',
        start: false,
        disks: [{ format: 'raw', sizeMiB: 512, randomMiB: 512 }],
      });
      const { handle } = await start(dom, url);
      // The store reports at most every 2 s (REPORT_MIN_MS): on a quiet machine it can store a disk faster than
      // that. So once its first chunk is on disk, the worker is stopped for a little over 2 s: the next chunk it
      // stores after SIGCONT is reported, with most of the disk still to go.
      const chunkDir = join(dir, CHUNKS_PREFIX);
      const stored = async (): Promise<number> => {
        let n = 0;
        for (const sub of await readdir(chunkDir).catch(() => [] as string[]))
          n += (await readdir(join(chunkDir, sub)).catch(() => [] as string[])).filter((f) =>
            /^[0-9a-f]{64}$/.test(f),
          ).length;
        return n;
      };
      await waitFor('the first chunk of the backup on disk', async () => (await stored()) > 0, {
        timeoutMs: 600_000,
        intervalMs: 20,
      });
      const pid = ctx.worker!.child.pid!;
      process.kill(pid, 'SIGSTOP');
      try {
        await new Promise((r) => setTimeout(r, 2_200));
      } finally {
        process.kill(pid, 'SIGCONT');
      }
      const seen: Array<BackupProgress['targets'][string]> = [];
      let finished = false;
      const result = handle.result().finally(() => (finished = true));
      let forged = false;
      while (!finished) {
        const p = await handle.query(progressQuery).catch(() => undefined);
        const t = p?.targets[url];
        if (t) seen.push({ ...t });
        if (t?.state === 'uploading' && !forged) {
          // anyone on the cluster can signal: what is not a storing target's count forward is dropped
          forged = true;
          const bad: unknown[] = [
            { target: 'file:///elsewhere', bytesDone: 1 },
            { target: '__proto__', bytesDone: 1 },
            { target: url, bytesDone: -5 },
            { target: url, bytesDone: '7' },
            'not an object',
          ];
          for (const b of bad) await handle.signal(storeProgressSignal, b as StoreProgress).catch(() => undefined);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
      expect((await result).status).toBe('completed');
      const storing = seen.filter((t) => t.state === 'uploading');
      expect(storing.length).toBeGreaterThan(0);
      const total = 512 * MiB;
      expect(storing.every((t) => t.bytesTotal === total)).toBe(true);
      // seen between 0 and the total while the target was storing
      expect(storing.some((t) => t.bytesDone > 0 && t.bytesDone < total)).toBe(true);
      // never backwards
      for (let i = 1; i < seen.length; i++) expect(seen[i]!.bytesDone).toBeGreaterThanOrEqual(seen[i - 1]!.bytesDone);
      const p = await handle.query(progressQuery);
      expect(p.targets[url]).toEqual({ bytesDone: total, bytesTotal: total, state: 'done' });
      expect(forged).toBe(true);
      expect(Object.keys(p.targets)).toEqual([url]);
      expect(Object.getPrototypeOf(p.targets)).toBe(Object.prototype);
    } finally {
      await target.close();
    }
  });
});
