/**
 * A local target writes large objects (chunks) with O_DIRECT from page-aligned memory (BufferPool `aligned`), so a
 * chunk backup neither copies its data into the page cache nor evicts the VMs' cached data; anything else is written
 * the usual way. On a real directory (ext4 on the CI machine): the bytes, the size and the mode must be exactly what a
 * buffered write gives, whichever way an object went.
 */
import { randomBytes, randomFillSync } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ChunkStore, initRepository } from '../../src/repository/chunks';
import { ingestDisk } from '../../src/repository/chunks/ingest';
import type { DiskSource } from '../../src/repository/chunks/ingest';
import { BufferPool } from '../../src/shared/buffer-pool';
import { LocalFileTree } from '../../src/storage/local/tree';
import { openTarget } from '../../src/storage/registry';

const MiB = 1 << 20;

describe('LocalFileTree.writeNew with O_DIRECT', () => {
  let dir: string;
  let tree: LocalFileTree;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-direct-'));
    tree = new LocalFileTree(dir, `file://${dir}`, { bytes: MiB, ms: 1000 });
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const aligned = (length: number, offset = 0): Buffer => {
    const b = new BufferPool(length + offset, 1, { aligned: true }).take(length + offset).subarray(offset);
    randomFillSync(b);
    return b;
  };

  test('an aligned body of 4 MiB + 100 bytes goes direct: the same bytes, size and private mode', async () => {
    const body = aligned(4 * MiB + 100);
    await tree.writeNew('', 'obj', body);
    expect(tree.directWrites).toBe(1);
    expect((await readFile(join(dir, 'obj'))).equals(body)).toBe(true);
    const st = await stat(join(dir, 'obj'));
    expect(st.size).toBe(4 * MiB + 100);
    expect(st.mode & 0o777).toBe(0o600);
  });

  test('a body of whole blocks goes direct, with no tail', async () => {
    const body = aligned(MiB);
    await tree.writeNew('', 'obj', body);
    expect(tree.directWrites).toBe(1);
    expect((await readFile(join(dir, 'obj'))).equals(body)).toBe(true);
  });

  test('a body at an unaligned address, and a small one, are written the usual way and exactly', async () => {
    const odd = aligned(4 * MiB, 16);
    await tree.writeNew('', 'odd', odd);
    const small = randomBytes(100_000);
    await tree.writeNew('', 'small', small);
    expect(tree.directWrites).toBe(0);
    expect((await readFile(join(dir, 'odd'))).equals(odd)).toBe(true);
    expect((await readFile(join(dir, 'small'))).equals(small)).toBe(true);
    // the failed direct attempt left nothing behind
    expect((await readdir(dir)).sort()).toEqual(['odd', 'small']);
    // and did not turn O_DIRECT off for the target
    await tree.writeNew('', 'next', aligned(MiB));
    expect(tree.directWrites).toBe(1);
  });

  test('an existing name is refused and kept, as by a buffered exclusive create', async () => {
    await writeFile(join(dir, 'obj'), 'kept');
    await expect(tree.writeNew('', 'obj', aligned(MiB))).rejects.toMatchObject({ code: 'EEXIST' });
    expect(await readFile(join(dir, 'obj'), 'utf8')).toBe('kept');
  });

  test('a chunk store on a local target writes its encrypted chunks direct, and reads them back', async () => {
    const target = openTarget(`file://${dir}`, { env: {} });
    const repo = await initRepository(target, {
      encryption: 'aes-256-gcm',
      compression: 'none',
      password: 'direct-test',
      scrypt: { N: 1024, r: 8, p: 1 },
    });
    const direct = jest.spyOn(
      LocalFileTree.prototype as unknown as { writeNewDirect(): Promise<boolean> },
      'writeNewDirect',
    );
    try {
      const chunkSize = repo.config.chunkSize;
      const data = randomBytes(3 * chunkSize);
      const store = new ChunkStore(repo);
      const source: DiskSource = {
        size: data.length,
        dataRanges: async function* () {
          yield { offset: 0, length: data.length };
        },
        read: (ranges) =>
          (async function* () {
            for await (const r of ranges) {
              const piece = Buffer.allocUnsafeSlow(r.length);
              data.copy(piece, 0, r.offset, r.offset + r.length);
              yield { offset: r.offset, data: piece };
            }
          })(),
      };
      const { index, stats } = await ingestDisk(store, source);
      expect(stats.uploadedChunks).toBe(3);
      const results = await Promise.all(direct.mock.results.map((r) => r.value as Promise<boolean>));
      expect(results.filter((ok) => ok)).toHaveLength(3);
      for (let n = 0; n < 3; n++) {
        const back = await store.get(index.entries[n]!);
        expect(back.equals(data.subarray(n * chunkSize, (n + 1) * chunkSize))).toBe(true);
      }
    } finally {
      direct.mockRestore();
    }
  });
});
