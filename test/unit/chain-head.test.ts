/** Which backup a new incremental or differential builds on, decided from the targets' manifests alone. */
import type { BackupEntry } from '../../src/repository/catalog';
import { chainOf, findChainHead } from '../../src/repository/chain-head';
import { buildManifest } from '../../src/repository/manifest';
import type { Manifest } from '../../src/repository/manifest';

const SHA = 'a'.repeat(64);
let clock = Date.parse('2026-11-01T00:00:00Z');

function link(id: string, level: 'full' | 'inc' | 'diff', parent?: string, base?: string, host = 'h1'): Manifest {
  clock += 3_600_000;
  const at = new Date(clock).toISOString();
  return buildManifest({
    backupId: id,
    domain: 'vm1',
    host,
    method: 'push',
    startedAt: at,
    finishedAt: at,
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    chain: {
      level,
      checkpoint: `vmbackup.${id}`,
      ...(parent ? { parent } : {}),
      base: base ?? id,
    },
    disks: [
      {
        name: 'vda',
        format: 'qcow2',
        virtualSize: 1 << 30,
        size: 1 << 20,
        sha256: SHA,
        key: `vm1/${id}/vda.qcow2`,
        ...(parent ? { backing: { backupId: parent, key: `vm1/${parent}/vda.qcow2`, sha256: SHA } } : {}),
      },
    ],
  });
}

const entries = (...ms: Manifest[]): BackupEntry[] =>
  ms.map((m) => ({ manifest: m, key: `vm1/${m.backupId}/manifest.json`, size: 1, body: Buffer.from('{}') }));

const full = link('b0', 'full');
const inc1 = link('b1', 'inc', 'b0', 'b0');
const inc2 = link('b2', 'inc', 'b1', 'b0');

test('an incremental builds on the newest backup; a differential on its chain full', async () => {
  const cat = [{ target: 't1', entries: entries(full, inc1, inc2) }];
  const inc = await findChainHead(cat, { domain: 'vm1', host: 'h1', level: 'inc', maxChain: 14 });
  expect(inc).toMatchObject({ ok: true, depth: 3 });
  if (inc.ok) expect([inc.parent.backupId, inc.base.backupId]).toEqual(['b2', 'b0']);
  const diff = await findChainHead(cat, { domain: 'vm1', host: 'h1', level: 'diff', maxChain: 14 });
  expect(diff).toMatchObject({ ok: true, depth: 1 });
  if (diff.ok) expect([diff.parent.backupId, diff.base.backupId]).toEqual(['b0', 'b0']);
});

test('targets that disagree on the newest backup, or a target without one, mean a full with the reason', async () => {
  const a = { target: 'file:///a', entries: entries(full, inc1, inc2) };
  const b = { target: 's3://b/p', entries: entries(full, inc1) };
  expect(await findChainHead([a, b], { domain: 'vm1', host: 'h1', level: 'inc', maxChain: 14 })).toEqual({
    ok: false,
    reason: 'the targets disagree on the newest backup (file:///a has b2, s3://b/p has b1): a target missed a backup',
  });
  const c = { target: 'nfs://x/e', entries: [] };
  expect(await findChainHead([a, c], { domain: 'vm1', host: 'h1', level: 'inc', maxChain: 14 })).toEqual({
    ok: false,
    reason: 'nfs://x/e holds no earlier backup of vm1 from h1',
  });
});

test('backups of other hosts do not count, and a missing link breaks the chain', async () => {
  const other = link('b3', 'full', undefined, undefined, 'h2');
  const cat = [{ target: 't', entries: entries(full, inc1, inc2, other) }];
  const r = await findChainHead(cat, { domain: 'vm1', host: 'h1', level: 'inc', maxChain: 14 });
  expect(r.ok && r.parent.backupId).toBe('b2');
  const broken = [{ target: 't', entries: entries(full, inc2) }];
  expect(await findChainHead(broken, { domain: 'vm1', host: 'h1', level: 'inc', maxChain: 14 })).toEqual({
    ok: false,
    reason:
      'the chain of b2 on t is broken: it depends on backup b1 (the parent of b2), which is not on t (no committed manifest)',
  });
  const walk = await chainOf(inc2, entries(full, inc1, inc2), 't');
  expect(walk.links.map((m) => m.backupId)).toEqual(['b0', 'b1', 'b2']);
});

test('--max-chain and --full-every start a new chain', async () => {
  const cat = [{ target: 't', entries: entries(full, inc1, inc2) }];
  expect(await findChainHead(cat, { domain: 'vm1', host: 'h1', level: 'inc', maxChain: 2 })).toEqual({
    ok: false,
    reason: 'the chain since b0 already has 2 increments (--max-chain 2)',
  });
  expect((await findChainHead(cat, { domain: 'vm1', host: 'h1', level: 'inc', maxChain: 3 })).ok).toBe(true);
  const r = await findChainHead(cat, {
    domain: 'vm1',
    host: 'h1',
    level: 'inc',
    maxChain: 14,
    fullNotBefore: new Date(Date.parse(full.startedAt) + 1).toISOString(),
  });
  expect(r.ok).toBe(false);
  if (!r.ok) expect(r.reason).toMatch(/the chain's full backup b0 is from .* older than --full-every allows/);
});

test('a newest backup without a checkpoint (snapshot method) cannot be built on', async () => {
  clock += 3_600_000;
  const at = new Date(clock).toISOString();
  const snap = buildManifest({
    backupId: 'b9',
    domain: 'vm1',
    host: 'h1',
    method: 'snapshot',
    startedAt: at,
    finishedAt: at,
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    disks: [{ name: 'vda', format: 'raw', virtualSize: 1, size: 1, sha256: SHA, key: 'vm1/b9/vda.raw' }],
  });
  const r = await findChainHead([{ target: 't', entries: entries(full, snap) }], {
    domain: 'vm1',
    host: 'h1',
    level: 'inc',
    maxChain: 14,
  });
  expect(r).toEqual({ ok: false, reason: 'the newest backup b9 (snapshot) left no checkpoint to build on' });
});

describe('in a chunk repository (every backup whole; pull increments name their checkpoint chain)', () => {
  const IDX = 'c'.repeat(64);
  function chunkLink(
    id: string,
    parent?: Manifest,
    recorded: { depth?: number; baseStartedAt?: string } = {},
  ): Manifest {
    clock += 3_600_000;
    const at = new Date(clock).toISOString();
    const base = parent ? (parent.chain.level === 'full' ? parent.backupId : parent.chain.base) : id;
    return buildManifest({
      backupId: id,
      domain: 'vm1',
      host: 'h1',
      method: 'pull',
      startedAt: at,
      finishedAt: at,
      quiesced: false,
      libvirtVersion: '9.0.0',
      qemuVersion: '7.2.0',
      repository: { id: 'd'.repeat(64), chunkSize: 4 << 20, encryption: 'aes-256-gcm', compression: 'none' },
      chain: parent
        ? { level: 'inc', checkpoint: `vmbackup.${id}`, parent: parent.backupId, base, ...recorded }
        : { level: 'full', checkpoint: `vmbackup.${id}`, base: id },
      disks: [
        {
          name: 'vda',
          format: 'chunks',
          virtualSize: 1 << 30,
          size: 4096,
          sha256: IDX,
          key: `@chunk-repo/indexes/${IDX}`,
          chunks: { chunkSize: 4 << 20, count: 256, zeroChunks: 250, uploadedChunks: 1 },
        },
      ],
    });
  }
  const c0 = chunkLink('c0');
  const c1 = chunkLink('c1', c0, { depth: 1, baseStartedAt: c0.startedAt });
  const c2 = chunkLink('c2', c1, { depth: 2, baseStartedAt: c0.startedAt });
  const inc = { domain: 'vm1', host: 'h1', level: 'inc' as const, maxChain: 14 };

  it('an increment on an increment continues the chain (it was taken as broken: its walk stopped at itself)', async () => {
    const r = await findChainHead([{ target: 't', entries: entries(c0, c1, c2) }], inc);
    expect(r).toEqual({
      ok: true,
      parent: c2,
      base: { backupId: 'c0', checkpoint: 'vmbackup.c0' },
      depth: 3,
      baseStartedAt: c0.startedAt,
    });
  });

  it('reads alone: the walk of an increment is the increment itself', async () => {
    const walk = await chainOf(c2, entries(c2), 't');
    expect(walk).toEqual({ links: [c2] });
  });

  it('continues after prune removed the full and the links between (what the manifest recorded counts)', async () => {
    const r = await findChainHead([{ target: 't', entries: entries(c2) }], inc);
    expect(r).toEqual({ ok: true, parent: c2, base: { backupId: 'c0' }, depth: 3, baseStartedAt: c0.startedAt });
    expect(await findChainHead([{ target: 't', entries: entries(c2) }], { ...inc, maxChain: 2 })).toEqual({
      ok: false,
      reason: 'the chain since c0 already has 2 increments (--max-chain 2)',
    });
    const young = await findChainHead([{ target: 't', entries: entries(c2) }], {
      ...inc,
      fullNotBefore: new Date(Date.parse(c0.startedAt) + 1).toISOString(),
    });
    expect(young.ok).toBe(false);
    if (!young.ok) expect(young.reason).toMatch(/the chain's full backup c0 is from .* older than --full-every allows/);
  });

  it('counts the parents still there for a manifest that recorded no depth, and refuses an unknown age', async () => {
    const d1 = chunkLink('d1', c0);
    const d2 = chunkLink('d2', d1);
    const r = await findChainHead([{ target: 't', entries: entries(c0, d1, d2) }], inc);
    expect(r.ok && [r.depth, r.base.backupId]).toEqual([3, 'c0']);
    const alone = await findChainHead([{ target: 't', entries: entries(d2) }], {
      ...inc,
      fullNotBefore: '2020-01-01T00:00:00.000Z',
    });
    expect(alone).toEqual({
      ok: false,
      reason: "the chain's full backup c0 is no longer in the repository, so its age (--full-every) is unknown",
    });
  });
});
