/**
 * The chain walk over manifests (no target, no images): which links a backup depends on, and one sentence naming
 * the link that is missing or is not the one its child was built on.
 */
import { diskChain, walkChain, type ManifestLookup } from '../../src/repository/chain';
import { buildManifest, type Manifest } from '../../src/repository/manifest';

const sha = (c: string): string => c.repeat(64);
let seq = 0;

/** A backup of domain web; `parent` makes it an increment (or a diff with level 'diff') of that backup. */
function backup(
  id: string,
  opts: { level?: 'full' | 'inc' | 'diff'; parent?: Manifest; base?: string; disks?: string[]; digest?: string } = {},
): Manifest {
  seq += 1;
  const level = opts.level ?? (opts.parent ? 'inc' : 'full');
  const backupId = `web-2026112${seq % 10}T0${seq % 10}0000Z-${id}`;
  const names = opts.disks ?? ['vda'];
  return buildManifest({
    backupId,
    domain: 'web',
    host: 'hv1',
    method: 'push',
    startedAt: `2026-11-2${seq % 10}T01:00:00.000Z`,
    finishedAt: `2026-11-2${seq % 10}T01:00:00.000Z`,
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    chain:
      level === 'full'
        ? { level: 'full', base: backupId }
        : {
            level,
            parent: opts.parent!.backupId,
            base: opts.base ?? opts.parent!.chain.base,
          },
    disks: names.map((name) => {
      const below = opts.parent?.disks.find((d) => d.name === name);
      return {
        name,
        format: 'qcow2',
        virtualSize: 1 << 30,
        size: 1000,
        sha256: sha(opts.digest ?? id.slice(-1)),
        key: `web/${backupId}/${name}.qcow2`,
        ...(below ? { backing: { backupId: opts.parent!.backupId, key: below.key, sha256: below.sha256 } } : {}),
      };
    }),
  });
}

function lookupIn(ms: Manifest[]): ManifestLookup {
  return async (id) => ms.find((m) => m.backupId === id);
}

const ids = (ms: Manifest[]): string[] => ms.map((m) => m.backupId);

describe('walkChain', () => {
  const full = backup('000a');
  const inc1 = backup('001b', { parent: full });
  const inc2 = backup('002c', { parent: inc1 });
  const diff = backup('003d', { level: 'diff', parent: full });
  const all = [full, inc1, inc2, diff];

  test('a full is its own chain', async () => {
    expect(await walkChain(full, lookupIn(all), 'T')).toEqual({ links: [full] });
  });

  test('an increment depends on every previous link back to the full, oldest first', async () => {
    expect(ids((await walkChain(inc2, lookupIn(all), 'T')).links)).toEqual(ids([full, inc1, inc2]));
  });

  test('a differential depends on the full only', async () => {
    expect(ids((await walkChain(diff, lookupIn(all), 'T')).links)).toEqual(ids([full, diff]));
  });

  test('a missing parent is named, with the backup that needs it', async () => {
    const walk = await walkChain(inc2, lookupIn([full, inc2]), 'file:///t');
    expect(walk.broken).toEqual({
      missing: inc1.backupId,
      child: inc2.backupId,
      reason: `it depends on backup ${inc1.backupId} (the parent of ${inc2.backupId}), which is not on file:///t (no committed manifest)`,
    });
    expect(ids(walk.links)).toEqual(ids([inc2]));
  });

  test('a missing full two links down is named too', async () => {
    const walk = await walkChain(inc2, lookupIn([inc1, inc2]), 'T');
    expect(walk.broken?.missing).toBe(full.backupId);
    expect(walk.broken?.child).toBe(inc1.backupId);
  });

  test('a parent whose image is not the one the child was built on breaks the chain (SHA-256 named)', async () => {
    const replaced = { ...inc1, disks: inc1.disks.map((d) => ({ ...d, sha256: sha('e') })) };
    const walk = await walkChain(inc2, lookupIn([full, replaced, inc2]), 'T');
    expect(walk.broken?.missing).toBe(inc1.backupId);
    expect(walk.broken?.reason).toMatch(
      new RegExp(`its disk vda has SHA-256 e{64}, while ${inc2.backupId} was built on ${sha('b')}`),
    );
  });

  test('a parent of another domain, or lacking the disk, is not the parent', async () => {
    const other = { ...inc1, domain: 'db' };
    expect((await walkChain(inc2, lookupIn([full, other, inc2]), 'T')).broken?.reason).toMatch(
      /belongs to domain db, not web/,
    );
    const noDisk = { ...inc1, disks: [{ ...inc1.disks[0]!, name: 'vdb' }] };
    expect((await walkChain(inc2, lookupIn([full, noDisk, inc2]), 'T')).broken?.reason).toMatch(/has no disk vda/);
  });

  test('a forged loop of parents ends with a sentence instead of spinning', async () => {
    const a = backup('00aa', { parent: full });
    const b = backup('00bb', { parent: a });
    const loopedA = { ...a, chain: { ...a.chain, parent: b.backupId } };
    const walk = await walkChain(b, lookupIn([loopedA, b]), 'T');
    expect(walk.broken?.reason).toMatch(/loops back|was built on/);
  });

  test('a base that its parents do not lead to is refused', async () => {
    const wrongBase = { ...inc2, chain: { ...inc2.chain, base: inc1.backupId } };
    expect((await walkChain(wrongBase, lookupIn(all), 'T')).broken?.reason).toMatch(
      new RegExp(`names ${inc1.backupId} as the full of its chain, but its parents lead to ${full.backupId}`),
    );
  });

  test("a damaged parent manifest breaks the chain with the reader's sentence", async () => {
    const { StorageError } = await import('../../src/storage/errors');
    const lookup: ManifestLookup = async (id) => {
      if (id === inc1.backupId)
        throw new StorageError('checksum', 'The manifest x is not valid JSON.', { driver: 'catalog' });
      return all.find((m) => m.backupId === id);
    };
    expect((await walkChain(inc2, lookup, 'T')).broken?.reason).toMatch(
      /whose manifest cannot be used: The manifest x is not valid JSON$/,
    );
  });
});

describe('diskChain', () => {
  test('follows each disk through the manifests, top first; a disk new to the chain is whole', () => {
    const full = backup('100a');
    const inc1 = backup('101b', { parent: full, disks: ['vda', 'vdb'] });
    const inc2 = backup('102c', { parent: inc1, disks: ['vda', 'vdb'] });
    const links = [full, inc1, inc2];
    expect(diskChain(links, 'vda').map((l) => l.backupId)).toEqual(ids([inc2, inc1, full]));
    expect(diskChain(links, 'vdb').map((l) => l.backupId)).toEqual(ids([inc2, inc1]));
    expect(diskChain(links, 'vda').map((l) => l.disk.key)).toEqual([
      inc2.disks[0]!.key,
      inc1.disks[0]!.key,
      full.disks[0]!.key,
    ]);
  });
});
