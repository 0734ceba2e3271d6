import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { SIDECAR_MAX_BYTES, sidecarName } from '../../src/storage/sidecar';
import { join } from 'node:path';
import { StorageError } from '../../src/storage/errors';
import { requireNfs } from '../helpers/stack';
import { collect, describeConformance } from './conformance';
import { nfsTarget } from './fixtures';

beforeAll(requireNfs);

// the NFS driver COMMITs and checkpoints every 64 MiB
describeConformance('nfs', nfsTarget, { checkpointBytes: 64 << 20 });

const MiB = 1 << 20;

describe('nfs target specifics', () => {
  test('get of an object larger than the READ pipeline (16 x 1 MiB) returns the same bytes, whole and in ranges', async () => {
    const t = await nfsTarget();
    try {
      // written behind the driver's back, so only its read path is under test
      const bytes = randomBytes(40 * MiB + 12345);
      await mkdir(join(t.dir, 'd/b'), { recursive: true });
      await writeFile(join(t.dir, 'd/b/vda.raw'), bytes);
      expect((await collect(await t.target.get('d/b/vda.raw'))).equals(bytes)).toBe(true);
      for (const [start, end] of [
        [MiB - 3, 33 * MiB + 5],
        [17, 18],
        [40 * MiB, bytes.length],
        [bytes.length - 1, bytes.length + 100],
      ] as const) {
        const part = await collect(await t.target.get('d/b/vda.raw', { start, end }));
        expect(part.equals(bytes.subarray(start, end))).toBe(true);
      }
    } finally {
      await t.cleanup();
      await t.target.close();
    }
  });

  test('an object that shrinks while it is read: the stream fails with one sentence instead of ending short', async () => {
    const t = await nfsTarget();
    try {
      const bytes = randomBytes(20 * MiB);
      await mkdir(join(t.dir, 'd/b'), { recursive: true });
      await writeFile(join(t.dir, 'd/b/vda.raw'), bytes);
      const stream = await t.target.get('d/b/vda.raw'); // the size is known from here on
      // cut in the middle of a READ: the server answers it short (EOF) and the driver asks for the rest
      await truncate(join(t.dir, 'd/b/vda.raw'), 5 * MiB + 4321);
      const received: Buffer[] = [];
      const err = await (async () => {
        for await (const c of stream) received.push(c as Buffer);
      })().then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(StorageError);
      expect((err as StorageError).kind).toBe('failed');
      expect((err as StorageError).message).toMatch(/ended d\/b\/vda\.raw at byte \d+ of 20971520 .*shrank/);
      expect((err as StorageError).message).not.toMatch(/\n/);
      const got = Buffer.concat(received);
      expect(got.length).toBeLessThanOrEqual(5 * MiB + 4321);
      expect(got.equals(bytes.subarray(0, got.length))).toBe(true);
    } finally {
      await t.cleanup();
      await t.target.close();
    }
  });
});

describe('nfs target: a sidecar someone else wrote', () => {
  test('one padded past the cap is ignored (no metadata), never read whole', async () => {
    await requireNfs();
    const t = await nfsTarget();
    const src = `${t.dir}-src`;
    try {
      await writeFile(src, randomBytes(4096));
      const r = await t.target.putImage('web/b1/vda.raw', src);
      expect((await t.target.stat('web/b1/vda.raw'))?.metadata?.sha256).toBe(r.sha256);
      const side = join(t.dir, 'web/b1', sidecarName('vda.raw'));
      const good = await readFile(side);
      await writeFile(side, Buffer.concat([good, Buffer.alloc(SIDECAR_MAX_BYTES, 0x20)]));
      expect((await t.target.stat('web/b1/vda.raw'))?.metadata).toBeUndefined();
      await writeFile(side, good);
      expect((await t.target.stat('web/b1/vda.raw'))?.metadata?.sha256).toBe(r.sha256);
    } finally {
      await rm(src, { force: true });
      await t.cleanup();
      await t.target.close();
    }
  });
});
