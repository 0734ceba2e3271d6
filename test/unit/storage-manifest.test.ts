import { StorageError } from '../../src/storage/errors';
import { buildManifest, decodeManifest, encodeManifest } from '../../src/repository/manifest';

const input = {
  backupId: 'web-20261128T010000Z-ab12',
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
      key: 'web/web-20261128T010000Z-ab12/vda.qcow2',
    },
  ],
};

describe('manifest v1', () => {
  test('round-trips, with version and a full-backup chain filled in', () => {
    const m = buildManifest(input);
    expect(m.version).toBe(1);
    expect(m.chain).toEqual({ kind: 'full' });
    expect(decodeManifest(encodeManifest(m), 'x')).toEqual(m);
  });

  test('keeps fields a newer writer added', () => {
    const body = Buffer.from(JSON.stringify({ ...buildManifest(input), comment: 'from the future' }));
    expect(decodeManifest(body, 'x')).toMatchObject({ comment: 'from the future' });
  });

  test('a disk key must follow the layout', () => {
    expect(() => buildManifest({ ...input, disks: [{ ...input.disks[0]!, key: 'elsewhere/vda.qcow2' }] })).toThrow(
      /disks.0.key must be web\//,
    );
  });

  test('damaged or newer manifests are refused with one sentence', () => {
    expect(() => decodeManifest(Buffer.from('{nope'), 'web/b/manifest.json on file:///x')).toThrow(/not valid JSON/);
    expect(() => decodeManifest(Buffer.from(JSON.stringify({ version: 2 })), 'm')).toThrow(/upgrade vmbackup/);
    const bad = { ...buildManifest(input), disks: [] };
    let err: unknown;
    try {
      decodeManifest(Buffer.from(JSON.stringify(bad)), 'm');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).message).toMatch(/^The manifest m is invalid \(disks /);
  });
});
