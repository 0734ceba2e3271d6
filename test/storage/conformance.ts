/**
 * One conformance suite for every storage driver (restic's backend/test.Suite): each driver's
 * test file supplies a factory for a fresh, empty target on the REAL server and a way to look
 * behind the driver's back for leftovers (temp files, unfinished multipart uploads).
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import type { PutCheckpoint, StorageTarget } from '../../src/storage/contract';
import { deleteObjectsUnder } from '../../src/repository';
import { StorageError } from '../../src/storage/errors';

export interface ConformanceTarget {
  target: StorageTarget;
  /** every name the server holds under this target, including temp files and unfinished uploads */
  leftovers(): Promise<string[]>;
  cleanup(): Promise<void>;
}

export interface ConformanceOptions {
  /** a checkpoint is emitted after at most this many bytes (size of the resume test image is derived from it) */
  checkpointBytes: number;
}

const MiB = 1 << 20;

export async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

async function keys(t: StorageTarget, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for await (const o of t.list(prefix)) out.push(o.key);
  return out.sort();
}

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

async function expectKind(p: Promise<unknown>, kind: StorageError['kind']): Promise<StorageError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(StorageError);
  expect((err as StorageError).kind).toBe(kind);
  // one sentence: no newline, no stack
  expect((err as StorageError).message).not.toMatch(/\n/);
  return err as StorageError;
}

/** A transient failure injected mid-transfer: what a network drop or worker crash looks like to the driver. */
function simulatedCrash(): Error {
  return Object.assign(new Error('simulated connection reset'), { code: 'ECONNRESET' });
}

export function describeConformance(
  name: string,
  open: () => Promise<ConformanceTarget>,
  opts: ConformanceOptions,
): void {
  describe(`${name} storage target (conformance)`, () => {
    let ct: ConformanceTarget;
    let t: StorageTarget;
    let work: string;
    let small: string;
    let smallBytes: Buffer;
    let big: string;
    let bigBytes: Buffer;

    beforeAll(async () => {
      work = await mkdtemp(join(tmpdir(), `vmbackup-conf-${name}-`));
      smallBytes = randomBytes(3 * MiB + 12345);
      small = join(work, 'small.img');
      await writeFile(small, smallBytes);
      // big enough for at least two checkpoints
      bigBytes = randomBytes(2 * opts.checkpointBytes + 3 * MiB + 7);
      big = join(work, 'big.img');
      await writeFile(big, bigBytes);
    });

    beforeEach(async () => {
      ct = await open();
      t = ct.target;
    });

    afterEach(async () => {
      await ct.cleanup();
      await t.close();
    });

    afterAll(async () => {
      await rm(work, { recursive: true, force: true });
    });

    test('put, stat, get (whole and range), list, delete', async () => {
      const r = await t.putImage('dom/b1/vda.qcow2', small, { metadata: { disk: 'vda' } });
      expect(r).toEqual({
        key: 'dom/b1/vda.qcow2',
        size: smallBytes.length,
        sha256: sha(smallBytes),
        bytesSent: smallBytes.length,
      });
      const info = await t.stat('dom/b1/vda.qcow2');
      expect(info?.size).toBe(smallBytes.length);
      expect(info?.metadata?.sha256).toBe(sha(smallBytes));
      expect(Number.isFinite(info?.modified.getTime())).toBe(true);
      expect((await collect(await t.get('dom/b1/vda.qcow2'))).equals(smallBytes)).toBe(true);
      const range = await collect(await t.get('dom/b1/vda.qcow2', { start: 1000, end: 2 * MiB + 5 }));
      expect(range.equals(smallBytes.subarray(1000, 2 * MiB + 5))).toBe(true);
      expect((await collect(await t.get('dom/b1/vda.qcow2', { start: 5, end: 5 }))).length).toBe(0);

      await t.putManifest('dom/b1/manifest.json', Buffer.from('{"v":1}'));
      await t.putManifest('dom/b2/manifest.json', Buffer.from('{"v":2}'));
      await t.putManifest('other/b3/manifest.json', Buffer.from('{"v":3}'));
      expect(await keys(t)).toEqual([
        'dom/b1/manifest.json',
        'dom/b1/vda.qcow2',
        'dom/b2/manifest.json',
        'other/b3/manifest.json',
      ]);
      expect(await keys(t, 'dom/')).toEqual(['dom/b1/manifest.json', 'dom/b1/vda.qcow2', 'dom/b2/manifest.json']);
      expect(await keys(t, 'dom/b1/')).toEqual(['dom/b1/manifest.json', 'dom/b1/vda.qcow2']);
      expect(await keys(t, 'do')).toEqual(['dom/b1/manifest.json', 'dom/b1/vda.qcow2', 'dom/b2/manifest.json']);
      expect(await keys(t, 'nothing/')).toEqual([]);

      await t.delete('dom/b1/vda.qcow2');
      expect(await t.stat('dom/b1/vda.qcow2')).toBeUndefined();
      await t.delete('dom/b1/vda.qcow2'); // idempotent
      for (const k of ['dom/b1/manifest.json', 'dom/b2/manifest.json', 'other/b3/manifest.json']) await t.delete(k);
      expect(await keys(t)).toEqual([]);
      expect(await ct.leftovers()).toEqual([]);
    });

    test('listTop: the first segments of the keys, each once, sorted, without what is below them', async () => {
      const top = async () => {
        const out: string[] = [];
        for await (const name of t.listTop()) out.push(name);
        return out;
      };
      expect(await top()).toEqual([]);
      await t.putManifest('web/b1/manifest.json', Buffer.from('{}'));
      await t.putManifest('web/b2/manifest.json', Buffer.from('{}'));
      await t.putManifest('@chunk-repo/chunks/ab/abcd', Buffer.from('x'));
      await t.putManifest('db/b3/manifest.json', Buffer.from('{}'));
      await t.putManifest('loose-object', Buffer.from('x'));
      expect(await top()).toEqual(['@chunk-repo', 'db', 'loose-object', 'web']);
      for (const k of await keys(t)) await t.delete(k);
      expect(await top()).toEqual([]);
    });

    test('a missing object: get fails with not-found, stat is undefined, delete is fine', async () => {
      await expectKind(t.get('dom/nope/vda.qcow2'), 'not-found');
      await expectKind(t.getBuffer('dom/nope/manifest.json'), 'not-found');
      expect(await t.stat('dom/nope/vda.qcow2')).toBeUndefined();
      await t.delete('dom/nope/vda.qcow2');
      expect(await keys(t)).toEqual([]);
    });

    test("touch moves an object's modification time forward, keeping its bytes and metadata; a missing one is not-found", async () => {
      await t.putImage('@chunk-repo/chunks/ab/abcd', small, { metadata: { disk: 'vda' } });
      await t.putManifest('@chunk-repo/indexes/ef01', Buffer.from('an index'));
      const before = await t.stat('@chunk-repo/chunks/ab/abcd');
      const beforeIndex = await t.stat('@chunk-repo/indexes/ef01');
      const namesBefore = await ct.leftovers();
      // S3 and NFS servers report whole seconds: wait until the clock is in a later second than the puts
      await new Promise((resolve) => setTimeout(resolve, 1200));
      await t.touch('@chunk-repo/chunks/ab/abcd');
      await t.touch('@chunk-repo/indexes/ef01');
      const after = await t.stat('@chunk-repo/chunks/ab/abcd');
      const afterIndex = await t.stat('@chunk-repo/indexes/ef01');
      expect(after?.modified.getTime()).toBeGreaterThan(before?.modified.getTime() ?? Infinity);
      expect(afterIndex?.modified.getTime()).toBeGreaterThan(beforeIndex?.modified.getTime() ?? Infinity);
      // list reports the same new time (gc reads ages from the listing; S3's HEAD gives whole seconds, its list ms)
      const listed = new Map<string, number>();
      for await (const o of t.list('@chunk-repo/')) listed.set(o.key, Math.floor(o.modified.getTime() / 1000));
      expect(listed.get('@chunk-repo/chunks/ab/abcd')).toBe(Math.floor((after?.modified.getTime() ?? 0) / 1000));
      expect(after?.size).toBe(smallBytes.length);
      expect(after?.metadata).toEqual(before?.metadata);
      expect(after?.metadata?.sha256).toBe(sha(smallBytes));
      expect((await collect(await t.get('@chunk-repo/chunks/ab/abcd'))).equals(smallBytes)).toBe(true);
      expect((await t.getBuffer('@chunk-repo/indexes/ef01')).toString()).toBe('an index');
      await t.touch('@chunk-repo/indexes/ef01'); // idempotent
      await expectKind(t.touch('@chunk-repo/chunks/ab/nope'), 'not-found');
      await expectKind(t.touch('nodir/nope'), 'not-found');
      await expectKind(t.touch('../x'), 'invalid-key');
      expect(await keys(t)).toEqual(['@chunk-repo/chunks/ab/abcd', '@chunk-repo/indexes/ef01']);
      expect(await ct.leftovers()).toEqual(namesBefore); // no copy, temp file or upload left beside them
    });

    test('a manifest is replaced atomically and read back whole', async () => {
      await t.putManifest('d/b/manifest.json', Buffer.from('first'));
      await t.putManifest('d/b/manifest.json', Buffer.from('second, longer'));
      expect((await t.getBuffer('d/b/manifest.json')).toString()).toBe('second, longer');
      expect((await t.stat('d/b/manifest.json'))?.size).toBe('second, longer'.length);
      expect(await keys(t)).toEqual(['d/b/manifest.json']);
    });

    test('putBatched: readable and listed at once, idempotent, no temp left; flush (twice) keeps every object as put', async () => {
      const a = randomBytes(70_000);
      const b = randomBytes(10);
      await t.putBatched('c/ab/ab01', a);
      await t.putBatched('c/cd/cd02', b);
      await t.putBatched('c/ab/ab01', a);
      expect((await t.getBuffer('c/ab/ab01')).equals(a)).toBe(true);
      expect(await keys(t)).toEqual(['c/ab/ab01', 'c/cd/cd02']);
      await t.flush();
      await t.flush();
      expect((await t.getBuffer('c/cd/cd02')).equals(b)).toBe(true);
      expect(await t.removeUnfinished('c/')).toBe(0);
      await t.delete('c/cd/cd02');
      await t.flush(); // a directory emptied since is no error
    });

    test("putBatched with the body's SHA-256: stored as put; a target that signs its payload's hash refuses a body the hash does not match", async () => {
      const body = randomBytes(50_000);
      const sha256 = createHash('sha256').update(body).digest('hex');
      await t.putBatched('c/ef/ef03', body, { sha256 });
      expect((await t.getBuffer('c/ef/ef03')).equals(body)).toBe(true);
      if (t.capabilities.signsPayloadHash) {
        // S3: the hash is what SigV4 signs, and the server hashes what it receives
        await expect(t.putBatched('c/ef/ef04', randomBytes(50_000), { sha256 })).rejects.toThrow();
        expect(await t.stat('c/ef/ef04')).toBeUndefined();
        await expect(t.putBatched('c/ef/ef05', body, { sha256: 'not a hash' })).rejects.toThrow();
      }
    });

    test('getBuffer with maxBytes reads an object up to the limit and refuses a larger one as permanent', async () => {
      const body = randomBytes(100_000);
      await t.putManifest('d/b/manifest.json', body);
      expect((await t.getBuffer('d/b/manifest.json', { maxBytes: body.length })).equals(body)).toBe(true);
      const err = await expectKind(t.getBuffer('d/b/manifest.json', { maxBytes: body.length - 1 }), 'checksum');
      expect(err.permanent).toBe(true);
      expect(err.message).toMatch(/^Object d\/b\/manifest.json on .* is larger than the 99999 bytes a reader accepts/);
      await expectKind(t.getBuffer('d/nope/manifest.json', { maxBytes: 10 }), 'not-found');
      await t.putManifest('d/e/manifest.json', Buffer.alloc(0));
      expect((await t.getBuffer('d/e/manifest.json', { maxBytes: 0 })).length).toBe(0);
    });

    test('checkLocation passes on a target that holds objects', async () => {
      await t.putManifest('d/b/manifest.json', Buffer.from('{}'));
      await expect(t.checkLocation()).resolves.toBeUndefined();
    });

    test('no partial object is visible while a put runs', async () => {
      const seen: Array<number | undefined> = [];
      let listed = 0;
      const r = await t.putImage('d/b/vda.raw', big, {
        pace: async () => {
          seen.push((await t.stat('d/b/vda.raw'))?.size);
          listed += (await keys(t)).length;
        },
      });
      expect(seen.length).toBeGreaterThan(0);
      expect(seen.every((s) => s === undefined)).toBe(true);
      expect(listed).toBe(0);
      expect(r.sha256).toBe(sha(bigBytes));
      expect((await t.stat('d/b/vda.raw'))?.size).toBe(bigBytes.length);
    });

    test('aborting a put through its signal leaves nothing behind', async () => {
      const ac = new AbortController();
      const err = await t
        .putImage('d/b/vda.raw', big, {
          signal: ac.signal,
          onProgress: (done) => {
            if (done > 0) ac.abort(new Error('cancelled by test'));
          },
        })
        .catch((e: unknown) => e);
      expect((err as Error).message).toBe('cancelled by test');
      expect(await t.stat('d/b/vda.raw')).toBeUndefined();
      expect(await keys(t)).toEqual([]);
      expect(await ct.leftovers()).toEqual([]);
    });

    test('putting the same image twice leaves one object', async () => {
      const a = await t.putImage('d/b/vda.raw', small);
      const b = await t.putImage('d/b/vda.raw', small);
      expect(b.sha256).toBe(a.sha256);
      expect(await keys(t)).toEqual(['d/b/vda.raw']);
      expect((await collect(await t.get('d/b/vda.raw'))).equals(smallBytes)).toBe(true);
      // only the object and its own metadata remain: no temp files
      expect((await ct.leftovers()).filter((n) => /tmp|upload/.test(n))).toEqual([]);
    });

    test('an expected SHA-256 that does not match fails with checksum and stores nothing', async () => {
      await expectKind(t.putImage('d/b/vda.raw', small, { metadata: { sha256: '0'.repeat(64) } }), 'checksum');
      await expectKind(t.putImage('d/b/vdb.raw', big, { metadata: { sha256: 'f'.repeat(64) } }), 'checksum');
      expect(await keys(t)).toEqual([]);
      expect(await ct.leftovers()).toEqual([]);
    });

    test('keys with "..", absolute paths, empty segments, NUL or backslash are rejected before any I/O', async () => {
      for (const bad of ['../x', 'a/../b', '/abs/key', 'a//b', 'a/b/', 'a\\b', 'a/\0b', '', '.hidden', 'a/./b']) {
        await expectKind(t.putImage(bad, small), 'invalid-key');
        await expectKind(t.putManifest(bad, Buffer.from('x')), 'invalid-key');
        await expectKind(t.get(bad), 'invalid-key');
        await expectKind(t.stat(bad), 'invalid-key');
        await expectKind(t.delete(bad), 'invalid-key');
      }
      expect(await ct.leftovers()).toEqual([]);
    });

    test('after a failure mid-transfer, resuming from the checkpoint sends only the rest', async () => {
      let checkpoint: PutCheckpoint | undefined;
      let progress = 0;
      let crashed = false;
      const first = await t
        .putImage('d/b/vda.raw', big, {
          onProgress: (done) => {
            progress = done;
          },
          // the "crash" comes right after the driver reported durable progress
          onCheckpoint: (cp) => {
            checkpoint = cp;
            if (!crashed && progress >= opts.checkpointBytes) {
              crashed = true;
              throw simulatedCrash();
            }
          },
        })
        .catch((e: unknown) => e);
      expect(crashed).toBe(true);
      expect(first).toBeInstanceOf(StorageError);
      expect((first as StorageError).permanent).toBe(false);
      expect(checkpoint).toBeDefined();
      expect(await t.stat('d/b/vda.raw')).toBeUndefined();

      const resumed = await t.putImage('d/b/vda.raw', big, { resume: checkpoint });
      expect(resumed.sha256).toBe(sha(bigBytes));
      expect(resumed.size).toBe(bigBytes.length);
      expect(resumed.bytesSent).toBeGreaterThan(0);
      expect(resumed.bytesSent).toBeLessThanOrEqual(bigBytes.length - opts.checkpointBytes);
      expect((await collect(await t.get('d/b/vda.raw'))).equals(bigBytes)).toBe(true);
      expect((await ct.leftovers()).filter((n) => /tmp|upload/.test(n))).toEqual([]);
    });

    test('removeUnfinished removes what crashed puts left under the prefix, and nothing else', async () => {
      const crashedPut = async (key: string) => {
        let crashed = false;
        let progress = 0;
        const err = await t
          .putImage(key, big, {
            onProgress: (done) => {
              progress = done;
            },
            // as in the resume test: the crash comes after durable progress
            onCheckpoint: () => {
              if (!crashed && progress >= opts.checkpointBytes) {
                crashed = true;
                throw simulatedCrash();
              }
            },
          })
          .catch((e: unknown) => e);
        expect(crashed).toBe(true);
        expect((err as StorageError).permanent).toBe(false);
      };
      const unfinished = async () => (await ct.leftovers()).filter((n) => /tmp|upload/.test(n));
      await t.putImage('d/b/vdb.raw', small);
      await t.putImage('d/keep/vda.raw', small);
      await crashedPut('d/b/vda.raw');
      await crashedPut('d/keep/vdc.raw');
      await crashedPut('d/bb/vda.raw'); // shares the text "d/b", not the prefix "d/b/"
      expect(await unfinished()).toHaveLength(3);

      expect(await t.removeUnfinished('d/b/')).toBe(1);
      const left = await unfinished();
      expect(left).toHaveLength(2);
      expect(left.every((n) => n.includes('d/keep/') || n.includes('d/bb/'))).toBe(true);
      expect(await keys(t)).toEqual(['d/b/vdb.raw', 'd/keep/vda.raw']);
      expect((await collect(await t.get('d/b/vdb.raw'))).equals(smallBytes)).toBe(true);
      expect(await t.removeUnfinished('d/b/')).toBe(0);
      expect(await t.removeUnfinished('nothing/here/')).toBe(0);

      // what the cleanup of a failed target (and prune) runs for one backup: its objects and its unfinished puts
      expect(await deleteObjectsUnder(t, 'd', 'keep')).toEqual(['d/keep/vda.raw']);
      expect(await unfinished()).toEqual([expect.stringContaining('d/bb/')]);
      expect(await t.removeUnfinished('d/')).toBe(1);
      await t.delete('d/b/vdb.raw');
      expect(await ct.leftovers()).toEqual([]);
    });

    test('a stale or foreign checkpoint is ignored: the put starts over and is correct', async () => {
      const r = await t.putImage('d/b/vda.raw', small, {
        resume: { temp: '.nope', offset: 5, prefixSha256: 'x', uploadId: 'nope' },
      });
      expect(r.sha256).toBe(sha(smallBytes));
      expect(r.bytesSent).toBe(smallBytes.length);
    });
  });
}
