/**
 * nfs-ganesha restarted in the middle of a copy: the NFS driver reconnects and retransmits (like a
 * hard mount), re-sends a window the server lost before COMMIT, and the image arrives whole. The same
 * for a read: the READs outstanding when the server went away are sent again and every byte arrives.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createPacer } from '../../src/storage/bandwidth';
import type { PutCheckpoint, PutImageResult } from '../../src/storage/contract';
import { StorageError } from '../../src/storage/errors';
import { requireNfs, stackScript } from '../helpers/stack';
import { nfsTarget } from '../storage/fixtures';

const MiB = 1 << 20;

test('ganesha restarted mid-copy: the copy completes and the stored image is byte-identical', async () => {
  await requireNfs();
  const work = await mkdtemp(join(tmpdir(), 'vmbackup-nfsrestart-'));
  const t = await nfsTarget();
  const image = join(work, 'vda.raw');
  const bytes = randomBytes(160 * MiB);
  await writeFile(image, bytes);
  const sha = createHash('sha256').update(bytes).digest('hex');
  // about 40 MiB/s, so the restart lands in the middle of the copy
  const pace = createPacer(40 * MiB);
  let restart: Promise<unknown> | undefined;
  let checkpoint: PutCheckpoint | undefined;
  const outcomes: string[] = [];
  let restartedAt = 0;
  try {
    let result: PutImageResult | undefined;
    // a transient failure would be retried by Temporal from the last checkpoint: do the same
    for (let attempt = 0; attempt < 4 && !result; attempt++) {
      try {
        result = await t.target.putImage('web/web-20261128T010000Z-0001/vda.raw', image, {
          pace,
          ...(checkpoint ? { resume: checkpoint } : {}),
          onCheckpoint: (cp) => {
            checkpoint = cp;
            restart ??= stackScript('restart', 'nfs').then(() => (restartedAt = Date.now()));
          },
        });
        outcomes.push(`completed, ${result.bytesSent} bytes sent`);
        // the server really went away and came back while this copy was running
        expect(restartedAt).toBeGreaterThan(0);
      } catch (err) {
        expect(err).toBeInstanceOf(StorageError);
        expect((err as StorageError).permanent).toBe(false);
        outcomes.push(`${(err as StorageError).kind}: ${(err as Error).message}`);
        await restart;
      }
    }
    await restart;
    process.stderr.write(`ganesha restart test: ${outcomes.join(' -> ')}\n`);
    expect(restart).toBeDefined();
    expect(result?.sha256).toBe(sha);
    const stored = await readFile(join(t.dir, 'web/web-20261128T010000Z-0001/vda.raw'));
    expect(stored.length).toBe(bytes.length);
    expect(createHash('sha256').update(stored).digest('hex')).toBe(sha);
    expect((await t.leftovers()).filter((n) => n.includes('.tmp-'))).toEqual([]);
  } finally {
    await restart?.catch(() => undefined);
    await requireNfs();
    await t.cleanup();
    await t.target.close();
    await rm(work, { recursive: true, force: true });
  }
});

test('ganesha restarted while a get streams: the READs are sent again and the bytes are identical', async () => {
  await requireNfs();
  const t = await nfsTarget();
  const bytes = randomBytes(160 * MiB);
  await mkdir(join(t.dir, 'web/b'), { recursive: true });
  await writeFile(join(t.dir, 'web/b/vda.raw'), bytes);
  let restart: Promise<unknown> | undefined;
  let restartedAt = 0;
  try {
    const hash = createHash('sha256');
    let received = 0;
    for await (const chunk of await t.target.get('web/b/vda.raw')) {
      hash.update(chunk as Buffer);
      received += (chunk as Buffer).length;
      if (received >= 16 * MiB) restart ??= stackScript('restart', 'nfs').then(() => (restartedAt = Date.now()));
      // about 40 MiB/s, so READs are outstanding while the server is down
      await new Promise((r) => setTimeout(r, 25));
    }
    const finishedAt = Date.now();
    await restart;
    expect(restartedAt).toBeGreaterThan(0);
    expect(restartedAt).toBeLessThan(finishedAt);
    expect(received).toBe(bytes.length);
    expect(hash.digest('hex')).toBe(createHash('sha256').update(bytes).digest('hex'));
  } finally {
    await restart?.catch(() => undefined);
    await requireNfs();
    await t.cleanup();
    await t.target.close();
  }
});
