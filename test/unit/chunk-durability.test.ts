/**
 * Durable-but-batched chunk writes on a local repository: a chunk file is written and synced under a temp name,
 * renamed without a directory sync, and every directory a chunk was renamed into is synced once before the index
 * that names those chunks is written. The invariant a user relies on after a power loss: an index never names a
 * chunk that is not durable. Instrumented through the file-tree port (LocalFileTree), on a real directory.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CHUNKS_PREFIX, ChunkStore, initRepository } from '../../src/repository/chunks';
import type { OpenRepository } from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { LocalFileTree } from '../../src/storage/local/tree';
import { openTarget } from '../../src/storage/registry';

const CHUNK = 64 * 1024;

type Call =
  | { op: 'writeNew'; dir: string; name: string; synced: boolean }
  | { op: 'rename'; dir: string; to: string; syncDir: boolean }
  | { op: 'syncDir'; dir: string };

describe('chunk writes: durable before any index names them, one directory sync per directory', () => {
  let dir: string;
  let target: StorageTarget;
  let repo: OpenRepository;
  let calls: Call[];
  let spies: jest.SpyInstance[];

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-durable-'));
    target = openTarget(`file://${dir}`, { env: {} });
    repo = await initRepository(target, { encryption: 'none', compression: 'none', chunkSize: CHUNK });
    calls = [];
    const proto = LocalFileTree.prototype;
    const writeNew = proto.writeNew;
    const rename = proto.rename;
    const syncDir = proto.syncDir;
    spies = [
      jest.spyOn(proto, 'writeNew').mockImplementation(async function (this: LocalFileTree, d, name, body) {
        // writeNew's contract: the file is durable when it returns (written and fsynced)
        await writeNew.call(this, d, name, body);
        calls.push({ op: 'writeNew', dir: d, name, synced: true });
      }),
      jest.spyOn(proto, 'rename').mockImplementation(async function (this: LocalFileTree, d, from, to, opts) {
        await rename.call(this, d, from, to, opts);
        calls.push({ op: 'rename', dir: d, to, syncDir: opts?.syncDir ?? true });
      }),
      jest.spyOn(proto, 'syncDir').mockImplementation(async function (this: LocalFileTree, d) {
        await syncDir.call(this, d);
        calls.push({ op: 'syncDir', dir: d });
      }),
    ];
  });
  afterEach(async () => {
    for (const s of spies) s.mockRestore();
    await target.close();
    await rm(dir, { recursive: true, force: true });
  });

  test('storeDisk + putIndex: every chunk directory is synced after its last rename and before the index is written', async () => {
    const store = new ChunkStore(repo);
    const disk = randomBytes(CHUNK * 24); // 24 distinct chunks, spread over up to 24 of chunks/<2 hex>/
    const { index, stats } = await store.storeDisk(
      (async function* () {
        yield disk;
      })(),
      disk.length,
    );
    expect(stats.uploadedChunks).toBe(24);
    const indexId = await store.putIndex(index);

    const chunkDirs = new Set<string>();
    const chunkRenames = calls.filter(
      (c): c is Extract<Call, { op: 'rename' }> => c.op === 'rename' && c.dir.startsWith(CHUNKS_PREFIX),
    );
    expect(chunkRenames).toHaveLength(24);
    for (const r of chunkRenames) chunkDirs.add(r.dir);
    // every chunk's bytes were synced under its temp name before the rename that made it visible
    for (const r of chunkRenames) {
      const at = calls.indexOf(r);
      expect(calls.slice(0, at).some((c) => c.op === 'writeNew' && c.dir === r.dir)).toBe(true);
      expect(r.syncDir).toBe(false); // batched: no directory sync per chunk
    }
    // the index's own write (its temp, in indexes/) comes after a sync of every chunk directory
    const indexWrite = calls.findIndex((c) => c.op === 'writeNew' && c.name.includes(indexId));
    expect(indexWrite).toBeGreaterThan(0);
    for (const d of chunkDirs) {
      const lastRename = calls
        .map((c, i) => (c.op === 'rename' && c.dir === d ? i : -1))
        .reduce((a, b) => Math.max(a, b));
      const synced = calls.findIndex((c, i) => i > lastRename && c.op === 'syncDir' && c.dir === d);
      expect({ dir: d, synced: synced >= 0 && synced < indexWrite }).toEqual({ dir: d, synced: true });
    }
    // once per directory, not once per chunk
    const syncs = calls.filter((c) => c.op === 'syncDir' && c.dir.startsWith(CHUNKS_PREFIX));
    expect(syncs).toHaveLength(chunkDirs.size);
    // and what the index names is there and reads back
    const back = Buffer.alloc(disk.length);
    await store.readDisk(await store.getIndex(indexId), async (offset, data) => void data.copy(back, offset));
    expect(back.equals(disk)).toBe(true);
  });

  test('a second flush with nothing new syncs nothing; a chunk put after a flush is synced by the next one', async () => {
    const store = new ChunkStore(repo);
    await store.put(randomBytes(CHUNK));
    await target.flush();
    const after = calls.length;
    await target.flush();
    expect(calls.slice(after).filter((c) => c.op === 'syncDir')).toEqual([]);
    const put = await store.put(randomBytes(CHUNK));
    await target.flush();
    const dirOf = `${CHUNKS_PREFIX}${(put.id as string).slice(0, 2)}`;
    expect(calls.slice(after)).toContainEqual({ op: 'syncDir', dir: dirOf });
  });

  test('a directory removed since its chunk was put (its last object deleted) leaves flush nothing to do', async () => {
    const store = new ChunkStore(repo);
    const put = await store.put(randomBytes(CHUNK));
    await target.delete(`${CHUNKS_PREFIX}${(put.id as string).slice(0, 2)}/${put.id as string}`);
    await expect(target.flush()).resolves.toBeUndefined();
  });
});
