import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { PutCheckpoint } from '../../src/storage/contract';
import { describeConformance } from './conformance';
import { localTarget } from './fixtures';

// the local driver fsyncs and checkpoints every 64 MiB
describeConformance('local', localTarget, { checkpointBytes: 64 << 20 });

describe('local target specifics', () => {
  test('allowMove renames a staged image into place: no copy, source gone, staging never listed', async () => {
    const t = await localTarget();
    try {
      // where a push backup writes when the target is local (same filesystem)
      const staging = join(t.dir, '.staging', 'web-1');
      await mkdir(staging, { recursive: true });
      const bytes = randomBytes(5 << 20);
      const src = join(staging, 'vda.qcow2');
      await writeFile(src, bytes);
      const ino = (await stat(src)).ino;
      const r = await t.target.putImage('web/web-1/vda.qcow2', src, { allowMove: true });
      expect(r.bytesSent).toBe(0);
      expect(r.sha256).toBe(createHash('sha256').update(bytes).digest('hex'));
      expect((await stat(join(t.dir, 'web/web-1/vda.qcow2'))).ino).toBe(ino); // the same file, renamed
      await expect(stat(src)).rejects.toThrow();
      const keys: string[] = [];
      for await (const o of t.target.list('')) keys.push(o.key);
      expect(keys).toEqual(['web/web-1/vda.qcow2']);
      expect((await t.target.stat('web/web-1/vda.qcow2'))?.metadata?.sha256).toBe(r.sha256);
    } finally {
      await t.cleanup();
    }
  });

  test('a temp file whose durable prefix no longer hashes as checkpointed is not trusted: the copy starts over', async () => {
    const t = await localTarget();
    try {
      const bytes = randomBytes((64 << 20) + (3 << 20));
      const src = join(t.dir, '..', `${t.dir.split('/').pop()}-src.raw`);
      await writeFile(src, bytes);
      let checkpoint: PutCheckpoint | undefined;
      await t.target
        .putImage('d/b/vda.raw', src, {
          onCheckpoint: (cp) => {
            checkpoint = cp;
            throw Object.assign(new Error('simulated crash'), { code: 'ECONNRESET' });
          },
        })
        .catch(() => undefined);
      expect(checkpoint).toBeDefined();
      const temp = join(t.dir, 'd/b', String(checkpoint!.temp));
      const partial = await readFile(temp);
      partial[4096] = (partial[4096] ?? 0) ^ 0xff; // bit rot in the part already written
      await writeFile(temp, partial);
      const r = await t.target.putImage('d/b/vda.raw', src, { resume: checkpoint });
      expect(r.bytesSent).toBe(bytes.length);
      expect((await readFile(join(t.dir, 'd/b/vda.raw'))).equals(bytes)).toBe(true);
      expect((await readdir(join(t.dir, 'd/b'))).filter((n) => n.includes('.tmp-'))).toEqual([]);
      await writeFile(src, '');
    } finally {
      await t.cleanup();
    }
  });
});
