/**
 * Chains on real targets (local, NFS, S3): restore of any link gives one standalone image equal to the disk at
 * that point, built from the manifests (never from a qcow2 header), each link's SHA-256 checked before use; verify
 * checks the whole chain; copy brings missing parents first; prune keeps what a kept backup depends on; a broken
 * chain gives one sentence naming the missing link.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { copyBackup, deleteBackup, listBackups, pruneBackups, restoreBackup, verifyBackup } from '../../src/repository';
import { buildManifest, signManifest, type Manifest } from '../../src/repository/manifest';
import type { StorageTarget } from '../../src/storage/contract';
import { sha256Of } from '../storage/backups';
import { buildChain, putChain, putPoint, POINTS, type BuiltChain, type PointName } from '../storage/chains';
import type { ConformanceTarget } from '../storage/conformance';
import { localTarget, nfsTarget, s3Target } from '../storage/fixtures';
import { requireNfs, requireS3 } from '../helpers/stack';

const run = promisify(execFile);

type Made = ConformanceTarget & { url: string };
const kinds: Array<[string, () => Promise<Made>]> = [
  ['local', localTarget],
  ['nfs', nfsTarget],
  ['s3', () => s3Target()],
];

let work: string;
let chain: BuiltChain;

beforeAll(async () => {
  await requireS3();
  await requireNfs();
  work = await mkdtemp(join(tmpdir(), 'vmbackup-chains-'));
  chain = await buildChain(join(work, 'chain'));
});

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

/** The error a promise rejects with (the test fails when it resolves). */
async function failure(p: Promise<unknown>): Promise<Error> {
  return p.then(
    () => {
      throw new Error('expected a failure');
    },
    (e: unknown) => e as Error,
  );
}

/** `qemu-img compare` of a restored image with the raw reference of that point (exit 0: identical). */
async function sameAs(restored: string, format: string, reference: string): Promise<boolean> {
  try {
    await run('qemu-img', ['compare', '-f', format, '-F', 'raw', restored, reference]);
    return true;
  } catch (err) {
    if ((err as { code?: number }).code === 1) return false;
    throw err;
  }
}

async function backingOf(path: string): Promise<string | undefined> {
  const { stdout } = await run('qemu-img', ['info', '-f', 'qcow2', '-U', '--output=json', path]);
  return (JSON.parse(stdout) as { 'backing-filename'?: string })['backing-filename'];
}

/** A TCP listener standing in for an NBD server a forged header names; counts who connects. */
async function listener(): Promise<{ port: number; connections: () => number; close: () => Promise<void> }> {
  let n = 0;
  const server: Server = createServer((socket) => {
    n += 1;
    socket.destroy();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return { port, connections: () => n, close: () => new Promise((r) => server.close(() => r())) };
}

/**
 * A copy of link `p` of the chain whose vda header names `backing` instead of its parent, with its manifest's
 * SHA-256 fixed up to the new bytes (what a writer of the target can do), stored in a layout of its own.
 */
async function withForgedHeader(
  p: PointName,
  backing: string,
  format: string,
): Promise<{ layout: string; m: Manifest }> {
  const layout = join(work, `forged-${Math.random().toString(16).slice(2)}`);
  const m = chain.manifests[p];
  const vda = m.disks.find((d) => d.name === 'vda')!;
  const dir = join(layout, m.domain, m.backupId);
  await run('mkdir', ['-p', dir]);
  for (const d of m.disks) await run('cp', [join(chain.layout, d.key), join(layout, d.key)]);
  await run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-F', format, '-b', backing, join(layout, vda.key)]);
  const sha256 = await sha256Of(join(layout, vda.key));
  const size = (await stat(join(layout, vda.key))).size;
  const { version: _v, ...rest } = m;
  const forged = buildManifest({ ...rest, disks: m.disks.map((d) => (d.name === 'vda' ? { ...d, sha256, size } : d)) });
  return { layout, m: forged };
}

describe.each(kinds)('chains on a %s target', (kind, make) => {
  let made: Made;
  let t: StorageTarget;
  let out: string;

  beforeEach(async () => {
    made = await make();
    t = made.target;
    out = await mkdtemp(join(work, `restore-${kind}-`));
  });
  afterEach(async () => {
    await made.cleanup();
    await t.close();
    await rm(out, { recursive: true, force: true });
  });

  test('restore of every link is one standalone image equal to the disk at that point', async () => {
    await putChain(t, chain);
    for (const p of POINTS) {
      const restored = await restoreBackup(t, chain.ids[p], { to: join(out, p) });
      const refs = chain.refs[p];
      expect(restored.map((r) => r.name)).toEqual(Object.keys(refs));
      for (const r of restored) {
        expect(r.format).toBe('qcow2');
        expect(await backingOf(r.path)).toBeUndefined();
        expect(await sameAs(r.path, 'qcow2', refs[r.name]!)).toBe(true);
      }
    }
    // the restored links read what they hold: inc1 zeroed 20M..20.5M, where the full still has data
    expect(await sameAs(join(out, 'inc1', 'vda.qcow2'), 'qcow2', chain.refs.full.vda!)).toBe(false);
    const inc2 = await restoreBackup(t, chain.ids.inc2, { to: join(out, 'inc2-links') });
    expect(inc2.find((r) => r.name === 'vda')?.links).toEqual([chain.ids.inc2, chain.ids.inc1, chain.ids.full]);
    expect(inc2.find((r) => r.name === 'vdb')?.links).toEqual([chain.ids.inc2]);
  });

  test('--format raw writes a sparse raw image; a full in its own format streams byte for byte', async () => {
    await putChain(t, chain, ['full', 'inc1']);
    const [raw] = await restoreBackup(t, chain.ids.inc1, { to: join(out, 'vda.raw'), disk: 'vda', format: 'raw' });
    expect(raw!.format).toBe('raw');
    expect(await sameAs(join(out, 'vda.raw'), 'raw', chain.refs.inc1.vda!)).toBe(true);
    const s = await stat(join(out, 'vda.raw'));
    expect(s.size).toBe(64 << 20);
    expect(s.blocks * 512).toBeLessThan(16 << 20); // ~9.5 MiB of data in 64 MiB
    const [full] = await restoreBackup(t, chain.ids.full, { to: join(out, 'full.qcow2'), disk: 'vda' });
    expect(full!.sha256).toBe(chain.manifests.full.disks[0]!.sha256);
    expect(await sha256Of(join(out, 'full.qcow2'))).toBe(chain.manifests.full.disks[0]!.sha256);
  });

  test('verify checks every link the backup depends on and lists each', async () => {
    await putChain(t, chain);
    const report = await verifyBackup(t, chain.ids.inc2);
    expect(report.ok).toBe(true);
    expect(report.links.map((l) => [l.backupId, l.level, l.ok])).toEqual([
      [chain.ids.full, 'full', true],
      [chain.ids.inc1, 'inc', true],
      [chain.ids.inc2, 'inc', true],
    ]);
    expect(report.links.flatMap((l) => l.disks.map((d) => d.imageCheck))).toEqual(['ok', 'ok', 'ok', 'ok']);
    expect(report.disks.map((d) => d.name)).toEqual(['vda', 'vdb']);
    const diff = await verifyBackup(t, chain.ids.diff);
    expect(diff.links.map((l) => l.backupId)).toEqual([chain.ids.full, chain.ids.diff]);
  });

  test('a missing parent: restore and verify name it in one sentence, copy refuses, nothing is written', async () => {
    await putChain(t, chain, ['full', 'inc1', 'inc2']);
    await deleteBackup(t, chain.domain, chain.ids.inc1);
    const err = await failure(restoreBackup(t, chain.ids.inc2, { to: join(out, 'x') }));
    expect(err.message).toBe(
      `Cannot restore backup ${chain.ids.inc2} from ${made.url}: it depends on backup ${chain.ids.inc1} (the parent of ${chain.ids.inc2}), which is not on ${made.url} (no committed manifest); copy backup ${chain.ids.inc1} to ${made.url} or use a target that holds the whole chain.`,
    );
    expect(await readdir(out)).toEqual([]);
    const report = await verifyBackup(t, chain.ids.inc2);
    expect(report.ok).toBe(false);
    expect(report.links[0]).toMatchObject({ backupId: chain.ids.inc1, ok: false });
    expect(report.links[0]!.problem).toMatch(new RegExp(`which is not on ${made.url}`));
    const dest = await localTarget();
    try {
      const refused = await failure(copyBackup(t, dest.target, chain.ids.inc2));
      expect(refused.message).toMatch(
        new RegExp(`^Cannot copy backup ${chain.ids.inc2} from .*: it depends on backup ${chain.ids.inc1}`),
      );
      expect(await dest.leftovers()).toEqual([]);
    } finally {
      await dest.cleanup();
      await dest.target.close();
    }
  });

  test("a parent's image that is not what its manifest says is refused before use; verify names that link", async () => {
    await putChain(t, chain, ['full', 'inc2']);
    // inc1's manifest is right, its image is another one (inc2's bytes): same key, wrong SHA-256
    const m = chain.manifests.inc1;
    await t.putImage(m.disks[0]!.key, join(chain.layout, chain.manifests.inc2.disks[0]!.key));
    await t.putManifest(`${m.domain}/${m.backupId}/manifest.json`, Buffer.from(JSON.stringify(m)));
    const err = await failure(restoreBackup(t, chain.ids.inc2, { to: join(out, 'x') }));
    expect(err.message).toMatch(new RegExp(`^Disk vda of backup ${chain.ids.inc1} on .* is corrupt \\(SHA-256 `));
    expect(await readdir(out)).toEqual([]);
    const report = await verifyBackup(t, chain.ids.inc2);
    expect(report.links.map((l) => [l.backupId, l.ok])).toEqual([
      [chain.ids.full, true],
      [chain.ids.inc1, false],
      [chain.ids.inc2, true],
    ]);
  });

  test('a header naming another file or an NBD server is ignored: the chain comes from the manifests', async () => {
    const nbd = await listener();
    try {
      // a raw file full of 0xee: restoring through it instead of inc1 and the full would differ from the reference
      const decoy = join(work, `decoy-${kind}.raw`);
      await run('qemu-img', ['create', '-q', '-f', 'raw', decoy, '64M']);
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xee 0 64M', decoy]);
      const nbdSpec = `json:{"driver":"nbd","host":"127.0.0.1","port":"${nbd.port}"}`;
      for (const [backing, format] of [
        [decoy, 'raw'],
        [nbdSpec, 'nbd'],
      ] as const) {
        const forged = await withForgedHeader('inc2', backing, format);
        expect(await backingOf(join(forged.layout, forged.m.disks[0]!.key))).toBe(backing);
        await putChain(t, chain, ['full', 'inc1']);
        await putPoint(t, forged.layout, forged.m);
        const file = join(out, `forged-${backing === decoy ? 'file' : 'nbd'}.qcow2`);
        await restoreBackup(t, chain.ids.inc2, { to: file, disk: 'vda' });
        expect(await sameAs(file, 'qcow2', chain.refs.inc2.vda!)).toBe(true);
        expect((await verifyBackup(t, chain.ids.inc2)).ok).toBe(true);
        await rm(forged.layout, { recursive: true, force: true });
      }
      expect(nbd.connections()).toBe(0);
    } finally {
      await nbd.close();
    }
  });

  test('copy brings the missing parents first, oldest first, and skips links already there', async () => {
    await putChain(t, chain);
    const dest = await localTarget();
    try {
      const first = await copyBackup(t, dest.target, chain.ids.inc1, { tempDir: work });
      expect(first.links).toEqual([
        { backupId: chain.ids.full, level: 'full', action: 'copied' },
        { backupId: chain.ids.inc1, level: 'inc', action: 'copied' },
      ]);
      const second = await copyBackup(t, dest.target, chain.ids.inc2, { tempDir: work });
      expect(second.links.map((l) => [l.backupId, l.action])).toEqual([
        [chain.ids.full, 'skipped'],
        [chain.ids.inc1, 'skipped'],
        [chain.ids.inc2, 'copied'],
      ]);
      expect(second.copied).toEqual([
        `web/${chain.ids.inc2}/vda.qcow2`,
        `web/${chain.ids.inc2}/vdb.qcow2`,
        `web/${chain.ids.inc2}/manifest.json`,
      ]);
      expect((await verifyBackup(dest.target, chain.ids.inc2)).ok).toBe(true);
      const restored = await restoreBackup(dest.target, chain.ids.inc2, { to: join(out, 'copied') });
      for (const r of restored) expect(await sameAs(r.path, 'qcow2', chain.refs.inc2[r.name]!)).toBe(true);
    } finally {
      await dest.cleanup();
      await dest.target.close();
    }
  });

  test('prune keeps what a kept backup depends on and removes dependents before their parents', async () => {
    await putChain(t, chain);
    // newest point: the diff; keep-last 2 keeps it and inc2, which need the full and inc1
    const dry = await pruneBackups(t, { keepLast: 2, dryRun: true });
    expect(dry.keep.map((k) => [k.backupId, k.reasons])).toEqual([
      [chain.ids.diff, ['last']],
      [chain.ids.inc2, ['last']],
      [chain.ids.inc1, [`parent of ${chain.ids.inc2}`]],
      [chain.ids.full, [`parent of ${chain.ids.diff}`, `parent of ${chain.ids.inc1}`]],
    ]);
    expect(dry.remove).toEqual([]);
    const done = await pruneBackups(t, { keepLast: 1 });
    expect(done.keep.map((k) => k.backupId)).toEqual([chain.ids.diff, chain.ids.full]);
    expect(done.remove.map((r) => r.backupId)).toEqual([chain.ids.inc2, chain.ids.inc1]);
    expect((await listBackups(t)).map((b) => b.manifest.backupId)).toEqual([chain.ids.full, chain.ids.diff]);
    const [vda] = await restoreBackup(t, chain.ids.diff, { to: join(out, 'after-prune') });
    expect(await sameAs(vda!.path, 'qcow2', chain.refs.diff.vda!)).toBe(true);
  });
});

describe('a chain signed with the manifest key', () => {
  test('a link whose manifest is not signed with the key breaks the chain: restore, verify and copy name it; prune leaves it', async () => {
    const key = randomBytes(32);
    const made = await localTarget();
    const out = await mkdtemp(join(work, 'signed-'));
    try {
      for (const p of ['full', 'inc1', 'inc2'] as const) {
        await putPoint(made.target, chain.layout, signManifest(chain.manifests[p], key));
      }
      const ok = await restoreBackup(made.target, chain.ids.inc2, { to: join(out, 'ok'), manifestKey: key });
      expect(await sameAs(ok[0]!.path, 'qcow2', chain.refs.inc2.vda!)).toBe(true);
      // someone who can write the target replaces inc1's manifest (same content, no signature of ours)
      await putPoint(made.target, chain.layout, chain.manifests.inc1);
      const err = await failure(restoreBackup(made.target, chain.ids.inc2, { to: join(out, 'x'), manifestKey: key }));
      expect(err.message).toMatch(
        new RegExp(
          `^Cannot restore backup ${chain.ids.inc2} from .*: it depends on backup ${chain.ids.inc1} \\(the parent of ${chain.ids.inc2}\\), whose manifest cannot be used: The manifest of ${chain.ids.inc1} on .* is not signed with your key`,
        ),
      );
      const report = await verifyBackup(made.target, chain.ids.inc2, { manifestKey: key });
      expect(report.ok).toBe(false);
      expect(report.links[0]).toMatchObject({ backupId: chain.ids.inc1, ok: false });
      const dest = await localTarget();
      try {
        await expect(copyBackup(made.target, dest.target, chain.ids.inc2, { manifestKey: key })).rejects.toThrow(
          new RegExp(`^Cannot copy backup ${chain.ids.inc2} .*not signed with your key`),
        );
      } finally {
        await dest.cleanup();
        await dest.target.close();
      }
      // without the key nothing is checked, as before signing existed
      expect((await verifyBackup(made.target, chain.ids.inc2)).ok).toBe(true);
      const pruned = await pruneBackups(made.target, { keepLast: 1, manifestKey: key, dryRun: true });
      expect(pruned.keep.find((k) => k.backupId === chain.ids.inc1)?.reasons).toEqual([
        'not signed with your key: not counted',
      ]);
      expect(pruned.remove).toEqual([]);
    } finally {
      await made.cleanup();
      await made.target.close();
      await rm(out, { recursive: true, force: true });
    }
  });
});
