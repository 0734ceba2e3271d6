import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { spawnSync } from 'node:child_process';
import { SIDECAR_MAX_BYTES, sidecarName } from '../../src/storage/sidecar';
import { basename, join } from 'node:path';
import type { PutCheckpoint } from '../../src/storage/contract';
import { LocalTarget } from '../../src/storage/local/driver';
import type { TempFileCheckpoint } from '../../src/storage/source';
import { describeConformance } from './conformance';
import { localTarget } from './fixtures';

const MiB = 1 << 20;
// The driver fsyncs and checkpoints every 512 MiB or 10 s; a 16 MiB window (sixteen copy chunks) runs
// the same code with a resume image of 35 MiB instead of 1 GiB.
const WINDOW = 16 * MiB;
describeConformance('local', () => localTarget({ checkpointBytes: WINDOW }), { checkpointBytes: WINDOW });

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

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
    const t = await localTarget({ checkpointBytes: WINDOW });
    try {
      const bytes = randomBytes(WINDOW + 3 * MiB);
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

  test('a checkpoint is also taken when the time window ends first; each one names a durable, correctly hashed prefix', async () => {
    const t = await localTarget();
    const target = new LocalTarget(t.dir, t.url, { checkpointBytes: 1 << 40, checkpointMs: 0 });
    const src = `${t.dir}-src.raw`;
    try {
      const bytes = randomBytes(5 * MiB + 4321); // several copy chunks, the last one short
      await writeFile(src, bytes);
      const checkpoints: TempFileCheckpoint[] = [];
      const r = await target.putImage('d/b/vda.raw', src, {
        onCheckpoint: (cp) => checkpoints.push(cp as unknown as TempFileCheckpoint),
      });
      expect(r.sha256).toBe(sha(bytes));
      // a window ends after every chunk but the last (the end of the copy is made durable by fsync + rename)
      const offsets = checkpoints.map((c) => c.offset);
      const chunk = offsets[0] ?? 0;
      expect(offsets.length).toBeGreaterThan(1);
      expect(offsets).toEqual(offsets.map((_, i) => (i + 1) * chunk));
      expect(bytes.length - (offsets.at(-1) ?? 0)).toBeGreaterThan(0);
      expect(bytes.length - (offsets.at(-1) ?? 0)).toBeLessThanOrEqual(chunk);
      for (const c of checkpoints) expect(c.prefixSha256).toBe(sha(bytes.subarray(0, c.offset)));
      expect((await readFile(join(t.dir, 'd/b/vda.raw'))).equals(bytes)).toBe(true);
    } finally {
      await rm(src, { force: true });
      await t.cleanup();
    }
  });
});

describe('local target: links inside the target are never followed', () => {
  // Someone else who can write the target directory makes a domain directory (or an object) a link to a place
  // only root may touch; the worker runs as root.
  async function withOutside<T>(fn: (t: Awaited<ReturnType<typeof localTarget>>, outside: string) => Promise<T>) {
    const t = await localTarget();
    const outside = await mkdtemp(join(tmpdir(), 'vmbackup-outside-'));
    try {
      return await fn(t, outside);
    } finally {
      await rm(outside, { recursive: true, force: true });
      await t.cleanup();
    }
  }

  test('a domain directory that is a link: no read, stat, write or delete goes through it', async () => {
    await withOutside(async (t, outside) => {
      await mkdir(join(outside, 'b1'));
      await writeFile(join(outside, 'b1', 'vda.qcow2'), 'secret');
      await writeFile(join(outside, 'b1', 'manifest.json'), '{}');
      await symlink(outside, join(t.dir, 'web'));
      const src = join(t.dir, '..', `${basename(t.dir)}-src`);
      await writeFile(src, 'new bytes');
      try {
        await expect(t.target.get('web/b1/vda.qcow2')).rejects.toThrow(/lies behind a symbolic link/);
        await expect(t.target.getBuffer('web/b1/manifest.json', { maxBytes: 100 })).rejects.toThrow(
          /lies behind a symbolic link/,
        );
        await expect(t.target.getBuffer('web/b1/manifest.json')).rejects.toThrow(/lies behind a symbolic link/);
        await expect(t.target.stat('web/b1/vda.qcow2')).rejects.toThrow(/lies behind a symbolic link/);
        await expect(t.target.delete('web/b1/vda.qcow2')).rejects.toThrow(/lies behind a symbolic link/);
        await expect(t.target.touch('web/b1/vda.qcow2')).rejects.toThrow(/lies behind a symbolic link/);
        await expect(t.target.putImage('web/b2/vda.qcow2', src)).rejects.toThrow(/lies behind a symbolic link/);
        await expect(t.target.putManifest('web/b2/manifest.json', Buffer.from('{}'))).rejects.toThrow(
          /lies behind a symbolic link/,
        );
        const keys: string[] = [];
        for await (const o of t.target.list('')) keys.push(o.key);
        expect(keys).toEqual([]);
        // nothing outside was read into the target, changed, removed or created
        expect((await readdir(outside)).sort()).toEqual(['b1']);
        expect((await readdir(join(outside, 'b1'))).sort()).toEqual(['manifest.json', 'vda.qcow2']);
        expect(await readFile(join(outside, 'b1', 'vda.qcow2'), 'utf8')).toBe('secret');
      } finally {
        await rm(src, { force: true });
      }
    });
  });

  test('an object that is a link is refused, not followed', async () => {
    await withOutside(async (t, outside) => {
      await writeFile(join(outside, 'shadow'), 'secret');
      await mkdir(join(t.dir, 'web', 'b1'), { recursive: true });
      await symlink(join(outside, 'shadow'), join(t.dir, 'web', 'b1', 'vda.qcow2'));
      await expect(t.target.get('web/b1/vda.qcow2')).rejects.toThrow(/is a symbolic link/);
      await expect(t.target.getBuffer('web/b1/vda.qcow2')).rejects.toThrow(/is a symbolic link/);
      expect(await t.target.stat('web/b1/vda.qcow2')).toBeUndefined();
      // touch (gc freshness) never sets the time of what a link points at
      const was = (await stat(join(outside, 'shadow'))).mtimeMs;
      await new Promise((resolve) => setTimeout(resolve, 20));
      await expect(t.target.touch('web/b1/vda.qcow2')).rejects.toThrow(/is a symbolic link/);
      expect((await stat(join(outside, 'shadow'))).mtimeMs).toBe(was);
    });
  });

  test('the target directory itself may be a link (a mount named elsewhere)', async () => {
    await withOutside(async (t, outside) => {
      const via = join(outside, 'via');
      await symlink(t.dir, via);
      const linked = new LocalTarget(via, `file://${via}`);
      await linked.putManifest('web/b1/manifest.json', Buffer.from('{"ok":1}'));
      expect((await linked.getBuffer('web/b1/manifest.json')).toString()).toBe('{"ok":1}');
      expect(await readFile(join(t.dir, 'web/b1/manifest.json'), 'utf8')).toBe('{"ok":1}');
    });
  });
});

describe('local target: a sidecar someone else wrote', () => {
  test('one padded past the cap is ignored (no metadata), a FIFO is never waited on', async () => {
    const t = await localTarget();
    const src = `${t.dir}-src`;
    try {
      await writeFile(src, randomBytes(4096));
      const r = await t.target.putImage('web/b1/vda.raw', src);
      expect((await t.target.stat('web/b1/vda.raw'))?.metadata?.sha256).toBe(r.sha256);
      const side = join(t.dir, 'web/b1', sidecarName('vda.raw'));
      const good = await readFile(side);
      // still valid JSON with the right size and hash, only too big to be ours
      await writeFile(side, Buffer.concat([good, Buffer.alloc(SIDECAR_MAX_BYTES, 0x20)]));
      expect((await t.target.stat('web/b1/vda.raw'))?.metadata).toBeUndefined();
      await writeFile(side, good);
      expect((await t.target.stat('web/b1/vda.raw'))?.metadata?.sha256).toBe(r.sha256);
      await rm(side);
      const mk = spawnSync('mkfifo', [side]);
      expect(mk.status).toBe(0);
      const keys: string[] = [];
      for await (const o of t.target.list('')) keys.push(`${o.key} ${o.metadata?.sha256 ?? '-'}`);
      expect(keys).toEqual(['web/b1/vda.raw -']);
    } finally {
      await rm(src, { force: true });
      await t.cleanup();
    }
  });
});
