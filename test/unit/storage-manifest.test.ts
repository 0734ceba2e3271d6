import { StorageError } from '../../src/storage/errors';
import {
  buildManifest,
  canonicalManifestJson,
  decodeManifest,
  encodeManifest,
  hasRepositorySignature,
  isChunkManifest,
  readManifest,
  signManifest,
  signRepositoryManifest,
  type ManifestInput,
} from '../../src/repository/manifest';

const FULL = 'web-20261128T010000Z-ab12';
const INC = 'web-20261129T010000Z-cd34';
const INC2 = 'web-20261130T010000Z-ef56';

const input = {
  backupId: FULL,
  domain: 'web',
  host: 'hv1',
  method: 'push' as const,
  startedAt: '2026-11-28T01:00:00.000Z',
  finishedAt: '2026-11-28T01:05:00.000Z',
  quiesced: false,
  libvirtVersion: '9.0.0',
  qemuVersion: '7.2.0',
  disks: [
    {
      name: 'vda',
      format: 'qcow2',
      virtualSize: 1 << 30,
      size: 123456,
      sha256: 'a'.repeat(64),
      key: `web/${FULL}/vda.qcow2`,
    },
  ],
};

/** An incremental link on top of `parent`, with vda backed by the parent's image. */
function incInput(id: string, parent: string, overrides: Partial<ManifestInput> = {}): ManifestInput {
  return {
    ...input,
    backupId: id,
    chain: { level: 'inc', parent, base: FULL, checkpoint: `vmbackup.${id}` },
    disks: [
      {
        ...input.disks[0]!,
        key: `web/${id}/vda.qcow2`,
        backing: { backupId: parent, key: `web/${parent}/vda.qcow2`, sha256: 'b'.repeat(64) },
      },
    ],
    ...overrides,
  };
}

function body(json: unknown): Buffer {
  return Buffer.from(JSON.stringify(json));
}

function failure(fn: () => unknown): StorageError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(StorageError);
    return err as StorageError;
  }
  throw new Error('expected a StorageError');
}

describe('manifest v2', () => {
  test('round-trips, version 2, a missing chain written as a full whose base is itself', () => {
    const m = buildManifest(input);
    expect(m.version).toBe(2);
    expect(m.chain).toEqual({ level: 'full', base: FULL });
    expect(JSON.parse(encodeManifest(m).toString())).toMatchObject({
      version: 2,
      chain: { level: 'full', base: FULL },
    });
    expect(decodeManifest(encodeManifest(m), 'x')).toEqual(m);
  });

  test('keeps fields a newer writer added', () => {
    const b = body({ ...buildManifest(input), comment: 'from the future' });
    expect(decodeManifest(b, 'x')).toMatchObject({ comment: 'from the future' });
  });

  test('a disk key must follow the layout', () => {
    expect(() => buildManifest({ ...input, disks: [{ ...input.disks[0]!, key: 'elsewhere/vda.qcow2' }] })).toThrow(
      /disks.0.key must be web\//,
    );
  });

  test('an incremental link: parent, base, and a backing image in the same domain read back as written', () => {
    const m = buildManifest(incInput(INC2, INC));
    expect(m.chain).toEqual({ level: 'inc', parent: INC, base: FULL, checkpoint: `vmbackup.${INC2}` });
    expect(m.disks[0]?.backing).toEqual({ backupId: INC, key: `web/${INC}/vda.qcow2`, sha256: 'b'.repeat(64) });
    expect(decodeManifest(encodeManifest(m), 'x')).toEqual(m);
  });

  test('a disk new to the chain has no backing in an incremental link', () => {
    const m = buildManifest(incInput(INC, FULL, { disks: [{ ...input.disks[0]!, key: `web/${INC}/vda.qcow2` }] }));
    expect(m.disks[0]?.backing).toBeUndefined();
  });

  test('a diff links to the chain full', () => {
    const diff = incInput(INC2, FULL, { chain: { level: 'diff', parent: FULL, base: FULL } });
    expect(buildManifest(diff).chain.level).toBe('diff');
    const wrong = incInput(INC2, INC, { chain: { level: 'diff', parent: INC, base: FULL } });
    expect(() => buildManifest(wrong)).toThrow(/chain.parent must be the chain's full/);
  });

  test.each([
    ['a full with a parent', { ...input, chain: { level: 'full', parent: INC } }, /chain.parent must be absent/],
    ['a full whose base is another backup', { ...input, chain: { level: 'full', base: INC } }, /chain.base must be/],
    [
      'a full with a backing disk',
      {
        ...input,
        disks: [
          { ...input.disks[0]!, backing: { backupId: INC, key: `web/${INC}/vda.qcow2`, sha256: 'b'.repeat(64) } },
        ],
      },
      /disks.0.backing must be absent in a full backup/,
    ],
    ['an inc without parent', incInput(INC2, INC, { chain: { level: 'inc', base: FULL } }), /chain.parent is required/],
    ['an inc without base', incInput(INC2, INC, { chain: { level: 'inc', parent: INC } }), /chain.base is required/],
    [
      'an inc that is its own parent',
      incInput(INC2, INC2, { chain: { level: 'inc', parent: INC2, base: FULL } }),
      /must not be the backup itself/,
    ],
    [
      'a backing image of another domain',
      incInput(INC2, INC, {
        disks: [
          {
            ...input.disks[0]!,
            key: `web/${INC2}/vda.qcow2`,
            backing: { backupId: INC, key: `db/${INC}/vda.qcow2`, sha256: 'b'.repeat(64) },
          },
        ],
      }),
      /disks.0.backing.key must be web\/web-20261129T010000Z-cd34\/vda.qcow2/,
    ],
    [
      'a backing image of another disk',
      incInput(INC2, INC, {
        disks: [
          {
            ...input.disks[0]!,
            key: `web/${INC2}/vda.qcow2`,
            backing: { backupId: INC, key: `web/${INC}/vdb.qcow2`, sha256: 'b'.repeat(64) },
          },
        ],
      }),
      /disks.0.backing.key must be/,
    ],
    [
      'a backing image that is not the parent link',
      incInput(INC2, INC, {
        disks: [
          {
            ...input.disks[0]!,
            key: `web/${INC2}/vda.qcow2`,
            backing: { backupId: FULL, key: `web/${FULL}/vda.qcow2`, sha256: 'b'.repeat(64) },
          },
        ],
      }),
      /disks.0.backing.backupId must be the chain's parent/,
    ],
    [
      'a backing id that climbs out of the layout',
      incInput(INC2, '..', {
        chain: { level: 'inc', parent: '..', base: FULL },
        disks: [
          {
            ...input.disks[0]!,
            key: `web/${INC2}/vda.qcow2`,
            backing: { backupId: '..', key: 'web/../vda.qcow2', sha256: 'b'.repeat(64) },
          },
        ],
      }),
      /must be a single key segment/,
    ],
    [
      'a raw image in an incremental link',
      incInput(INC2, INC, { disks: [{ ...input.disks[0]!, format: 'raw', key: `web/${INC2}/vda.raw` }] }),
      /disks.0.format must be qcow2 in an inc backup/,
    ],
    [
      'a checkpoint name a shell would read',
      { ...input, chain: { level: 'full', checkpoint: 'x; rm -rf /' } },
      /chain.checkpoint must be a checkpoint name/,
    ],
  ] as Array<[string, ManifestInput, RegExp]>)('refused: %s', (_name, bad, message) => {
    expect(() => buildManifest(bad)).toThrow(message);
    // and the same manifest written by someone else is refused on read
    const stored = { ...bad, version: 2 };
    expect(failure(() => decodeManifest(body(stored), 'm')).message).toMatch(/^The manifest m is invalid \(/);
  });

  test('damaged or newer manifests are refused with one sentence', () => {
    expect(() => decodeManifest(Buffer.from('{nope'), 'web/b/manifest.json on file:///x')).toThrow(/not valid JSON/);
    // version 4 is an image tree with content digests (pull mode); 5 is newer than this vmbackup
    expect(() => decodeManifest(body({ version: 5 }), 'm')).toThrow(/has version 5; upgrade vmbackup/);
    const bad = { ...buildManifest(input), disks: [] };
    expect(failure(() => decodeManifest(body(bad), 'm')).message).toMatch(/^The manifest m is invalid \(disks /);
    expect(failure(() => decodeManifest(body({ ...buildManifest(input), version: 0 }), 'm')).message).toMatch(
      /invalid \(version/,
    );
  });
});

describe('manifest v1 (read only)', () => {
  const v1 = { ...input, version: 1, chain: { kind: 'full' } };

  test('reads as a full backup whose chain base is itself', () => {
    const m = decodeManifest(body(v1), 'm');
    expect(m.version).toBe(1);
    expect(m.chain).toEqual({ level: 'full', base: FULL });
    expect(m.disks[0]?.backing).toBeUndefined();
  });

  test('without a chain (the oldest writers) it is a full backup too', () => {
    const { chain: _chain, ...noChain } = v1;
    expect(decodeManifest(body(noChain), 'm').chain).toEqual({ level: 'full', base: FULL });
  });

  test('a version-1 manifest cannot smuggle in a chain or a backing image', () => {
    const withBacking = {
      ...v1,
      disks: [{ ...input.disks[0]!, backing: { backupId: INC, key: `web/${INC}/vda.qcow2`, sha256: 'b'.repeat(64) } }],
    };
    expect(() => decodeManifest(body(withBacking), 'm')).toThrow(/disks.0.backing must be absent in a full backup/);
    expect(() => decodeManifest(body({ ...v1, chain: { kind: 'inc', parent: FULL } }), 'm')).toThrow(/invalid/);
    expect(() => decodeManifest(body({ ...v1, chain: { kind: 'full', parent: INC } }), 'm')).toThrow(
      /chain.parent must be absent/,
    );
  });
});

describe('manifest signatures', () => {
  const key = Buffer.from('k'.repeat(32));
  const otherKey = Buffer.from('o'.repeat(32));

  test('a manifest signed with the key reads as signed, with any other key or none as not signed', () => {
    const stored = encodeManifest(signManifest(buildManifest(input), key));
    expect(JSON.parse(stored.toString()).signature).toMatch(/^hmac-sha256:[0-9a-f]{64}$/);
    expect(readManifest(stored, 'm', { manifestKey: key }).signed).toBe(true);
    expect(readManifest(stored, 'm', { manifestKey: otherKey }).signed).toBe(false);
    expect(readManifest(encodeManifest(buildManifest(input)), 'm', { manifestKey: key }).signed).toBe(false);
    // without a key nothing is claimed either way, and the signature does not stop a reader
    expect(readManifest(stored, 'm').signed).toBeUndefined();
  });

  test('changing any field, adding one, or re-indenting: only the first two break the signature', () => {
    const signed = JSON.parse(encodeManifest(signManifest(buildManifest(input), key)).toString()) as Record<
      string,
      unknown
    >;
    const check = (json: unknown): boolean | undefined => readManifest(body(json), 'm', { manifestKey: key }).signed;
    expect(check(signed)).toBe(true);
    const forged = JSON.parse(JSON.stringify(signed)) as { disks: Array<{ sha256: string }> };
    forged.disks[0]!.sha256 = 'c'.repeat(64);
    expect(check(forged)).toBe(false);
    expect(check({ ...signed, comment: 'added later' })).toBe(false);
    expect(check({ ...signed, host: 'elsewhere' })).toBe(false);
    expect(readManifest(Buffer.from(JSON.stringify(signed, null, 7)), 'm', { manifestKey: key }).signed).toBe(true);
  });

  test('the canonical form: keys sorted at every level, no whitespace, no signature', () => {
    expect(canonicalManifestJson({ b: 1, a: { d: [1, { z: 'x', y: null }], c: 'é' }, signature: 's' })).toBe(
      '{"a":{"c":"é","d":[1,{"y":null,"z":"x"}]},"b":1}',
    );
    // a "__proto__" key from a file is data, not a prototype
    const json = JSON.parse('{"__proto__":{"x":1},"a":2}') as Record<string, unknown>;
    expect(canonicalManifestJson(json)).toBe('{"__proto__":{"x":1},"a":2}');
  });

  test('a signature that is not hmac-sha256 hex is an invalid manifest', () => {
    const m = { ...buildManifest(input), signature: 'md5:abc' };
    expect(() => decodeManifest(body(m), 'm')).toThrow(/signature must be/);
  });
});

describe('whole-VM files (vm)', () => {
  const vm = {
    xml: { key: `web/${FULL}/domain.xml`, size: 2048, sha256: 'c'.repeat(64) },
    nvram: {
      key: `web/${FULL}/nvram.fd`,
      size: 540672,
      sha256: 'd'.repeat(64),
      path: '/var/lib/libvirt/qemu/nvram/web_VARS.fd',
    },
    tpm: {
      version: '2.0' as const,
      files: [
        { key: `web/${FULL}/tpm.tpm2-00.permall`, size: 9000, sha256: 'e'.repeat(64), path: 'tpm2/tpm2-00.permall' },
      ],
    },
  };

  it('round-trips the definition, NVRAM and TPM files of a backup', () => {
    const m = buildManifest({ ...input, vm });
    expect(decodeManifest(encodeManifest(m), 'x').vm).toEqual(vm);
  });

  it('is optional: a backup without it still reads', () => {
    expect(decodeManifest(encodeManifest(buildManifest(input)), 'x').vm).toBeUndefined();
  });

  it.each([
    [
      'an xml key outside the backup',
      { ...vm, xml: { ...vm.xml, key: 'web/other/domain.xml' } },
      /vm\.xml\.key must be web\//,
    ],
    [
      'an nvram key under another name',
      { ...vm, nvram: { ...vm.nvram, key: `web/${FULL}/vda.qcow2` } },
      /vm\.nvram\.key must be/,
    ],
    ['a relative nvram path', { ...vm, nvram: { ...vm.nvram, path: 'nvram/web_VARS.fd' } }, /vm\.nvram\.path/],
    [
      'a TPM path that climbs out of the state directory',
      { ...vm, tpm: { ...vm.tpm, files: [{ ...vm.tpm.files[0]!, path: 'tpm2/../../../etc/shadow' }] } },
      /vm\.tpm\.files\.0\.path/,
    ],
    [
      'a TPM file whose key is not tpm.<its name>',
      { ...vm, tpm: { ...vm.tpm, files: [{ ...vm.tpm.files[0]!, key: `web/${FULL}/domain.xml` }] } },
      /vm\.tpm\.files\.0\.key must be/,
    ],
    [
      'two TPM files stored under one key',
      {
        ...vm,
        tpm: {
          ...vm.tpm,
          files: [vm.tpm.files[0]!, { ...vm.tpm.files[0]!, path: 'tpm1_2/tpm2-00.permall' }],
        },
      },
      /vm keys must differ/,
    ],
    ['an XML larger than a definition can be', { ...vm, xml: { ...vm.xml, size: 5 << 20 } }, /vm\.xml is larger/],
  ])('refuses %s', (_what, bad, message) => {
    const err = failure(() => buildManifest({ ...input, vm: bad as typeof vm }));
    expect(err.message).toMatch(message);
  });

  it('refuses a disk whose image would take the definition key', () => {
    const disk = { ...input.disks[0]!, name: 'domain', format: 'xml', key: `web/${FULL}/domain.xml` };
    const err = failure(() => buildManifest({ ...input, disks: [disk], vm }));
    expect(err.message).toMatch(/vm keys must differ/);
  });
});

describe('manifest v3 (a backup in a chunk repository)', () => {
  const IDX = 'c'.repeat(64);
  const chunkDisk = {
    name: 'vda',
    format: 'chunks',
    virtualSize: 1 << 30,
    size: 4096,
    sha256: IDX,
    key: `@chunk-repo/indexes/${IDX}`,
    chunks: { chunkSize: 4 << 20, count: 256, zeroChunks: 250, uploadedChunks: 1 },
  };
  const chunkInput: ManifestInput = {
    ...input,
    repository: { id: 'd'.repeat(64), chunkSize: 4 << 20, encryption: 'aes-256-gcm', compression: 'zstd' },
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
      // a second disk with the same data shares the index
      {
        name: 'vdb',
        format: 'chunks',
        virtualSize: 1 << 30,
        size: 0,
        sha256: IDX,
        key: `@chunk-repo/indexes/${IDX}`,
        chunks: { chunkSize: 4 << 20, count: 256, zeroChunks: 250, uploadedChunks: 0 },
      },
    ],
    vm: { xml: { key: `@chunk-repo/indexes/${'e'.repeat(64)}`, size: 900, sha256: 'e'.repeat(64) } },
  };

  test('is written as version 3 and reads back; disks sharing an index are allowed', () => {
    const m = buildManifest(chunkInput);
    expect(m.version).toBe(3);
    expect(isChunkManifest(m)).toBe(true);
    expect(decodeManifest(encodeManifest(m), 'm')).toEqual(m);
    expect(isChunkManifest(buildManifest(input))).toBe(false);
  });

  test('a pull increment is a whole backup that names the backup it read the changes since', () => {
    const m = buildManifest({ ...chunkInput, method: 'pull', chain: { level: 'inc', parent: INC, base: INC } });
    expect(m.chain).toMatchObject({ level: 'inc', parent: INC });
    expect(decodeManifest(encodeManifest(m), 'm')).toEqual(m);
  });

  test.each([
    [
      'an image key',
      { disks: [{ ...chunkDisk, key: `web/${FULL}/vda.chunks` }] },
      /disks.0.key must be @chunk-repo\/indexes\//,
    ],
    ['a qcow2 disk', { disks: [{ ...input.disks[0]! }] }, /disks.0.format must be chunks/],
    ['no chunk counts', { disks: [{ ...chunkDisk, chunks: undefined }] }, /disks.0.chunks is required/],
    ['an incremental level', { chain: { level: 'inc', parent: INC, base: INC } }, /chain.level must be full/],
    [
      'a pull differential',
      { method: 'pull', chain: { level: 'diff', parent: INC, base: INC } },
      /chain.level must be/,
    ],
    [
      'a pull increment naming no parent',
      { method: 'pull', chain: { level: 'inc', base: INC } },
      /chain.parent must name/,
    ],
    [
      'a whole-VM file at its image-tree key',
      { vm: { xml: { key: `web/${FULL}/domain.xml`, size: 1, sha256: 'e'.repeat(64) } } },
      /vm.xml.key must be @chunk-repo/,
    ],
    [
      'another chunk size than the repository',
      {
        disks: [{ ...chunkDisk, chunks: { chunkSize: 1 << 20, count: 1024, zeroChunks: 0, uploadedChunks: 0 } }],
      },
      /chunkSize must be the repository/,
    ],
  ] as Array<[string, Partial<ManifestInput>, RegExp]>)('refused: %s', (_name, change, message) => {
    expect(() => buildManifest({ ...chunkInput, ...change })).toThrow(message);
  });

  test('a chunks disk in a version-2 manifest is refused (an older reader would take the index for an image)', () => {
    const stored = { ...buildManifest(chunkInput), version: 2, repository: undefined };
    expect(failure(() => decodeManifest(body(stored), 'm')).message).toMatch(/format is chunks only in a version-3/);
  });

  test('the repository signature: checked over the stored JSON, covered by the user signature made after it', () => {
    const authKey = Buffer.alloc(32, 7);
    const signed = signRepositoryManifest(buildManifest(chunkInput), authKey);
    const stored = encodeManifest(signed);
    expect(hasRepositorySignature(stored, authKey)).toBe(true);
    expect(hasRepositorySignature(stored, Buffer.alloc(32, 8))).toBe(false);
    expect(hasRepositorySignature(encodeManifest(buildManifest(chunkInput)), authKey)).toBe(false);
    const changed = { ...JSON.parse(stored.toString()), host: 'evil' };
    expect(hasRepositorySignature(body(changed), authKey)).toBe(false);
    const user = Buffer.alloc(32, 9);
    const both = encodeManifest(signManifest(signed, user));
    expect(hasRepositorySignature(both, authKey)).toBe(true);
    expect(readManifest(both, 'm', { manifestKey: user }).signed).toBe(true);
    const stripped = { ...JSON.parse(both.toString()), repositorySignature: undefined };
    expect(readManifest(body(stripped), 'm', { manifestKey: user }).signed).toBe(false);
  });
});
