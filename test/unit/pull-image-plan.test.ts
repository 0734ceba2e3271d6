import { buildManifest, decodeManifest, encodeManifest } from '../../src/repository/manifest';
import { createHash } from 'node:crypto';
import { ContentDigest } from '../../src/repository/content-digest';
import { intersectExtents, planPullWindow, widenRanges } from '../../src/repository/pull-plan';
import { zeroRuns } from '../../src/repository/pull-image';

const K = 1024;

describe('pull plan', () => {
  test('a full copies the data extents only (holes and zero extents untouched)', () => {
    const allocation = [
      { offset: 0, length: 64 * K, flags: 0 },
      { offset: 64 * K, length: 64 * K, flags: 3 },
      { offset: 128 * K, length: 64 * K, flags: 2 },
      { offset: 192 * K, length: 64 * K, flags: 0 },
    ];
    expect(planPullWindow({ start: 0, end: 256 * K, allocation, cluster: 64 * K })).toEqual([
      { offset: 0, length: 64 * K, kind: 'copy' },
      { offset: 192 * K, length: 64 * K, kind: 'copy' },
    ]);
  });

  test('an increment: dirty ranges widened to clusters, data copied, holes and zeros zeroed', () => {
    const allocation = [
      { offset: 0, length: 100 * K, flags: 0 },
      { offset: 100 * K, length: 156 * K, flags: 3 },
    ];
    const dirty = [
      { offset: 0, length: 70 * K, flags: 0 },
      { offset: 70 * K, length: 4 * K, flags: 1 }, // inside the second cluster
      { offset: 74 * K, length: 182 * K, flags: 0 },
    ];
    expect(planPullWindow({ start: 0, end: 256 * K, allocation, dirty, cluster: 64 * K })).toEqual([
      { offset: 64 * K, length: 36 * K, kind: 'copy' },
      { offset: 100 * K, length: 28 * K, kind: 'zero' },
    ]);
  });

  test('widen and intersect clip to the window', () => {
    expect(
      widenRanges(
        [
          { offset: 10, length: 5 },
          { offset: 60, length: 10 },
        ],
        32,
        0,
        80,
      ),
    ).toEqual([{ offset: 0, length: 80 }]);
    expect(
      intersectExtents(
        [{ offset: 5, length: 10 }],
        [
          { offset: 0, length: 8, flags: 1 },
          { offset: 8, length: 20, flags: 2 },
        ],
      ),
    ).toEqual([
      { offset: 5, length: 3, flags: 1 },
      { offset: 8, length: 7, flags: 2 },
    ]);
  });

  test('zero runs are cut at 64 KiB grains', () => {
    const data = Buffer.alloc(192 * K);
    data[70 * K] = 1;
    expect(zeroRuns(0, data)).toEqual([
      { offset: 0, length: 64 * K, zero: true },
      { offset: 64 * K, length: 64 * K, zero: false },
      { offset: 128 * K, length: 64 * K, zero: true },
    ]);
  });
});

describe('content digest', () => {
  const size = 10 * K;
  const disk = Buffer.alloc(size);
  disk.fill(7, 1 * K, 3 * K); // chunk 0 (4 KiB chunks)
  disk.fill(9, 9 * K, 10 * K); // chunk 2, the short last one
  const expected = () => {
    const outer = createHash('sha256').update(Buffer.from('vmbackup-content-v1\0', 'latin1'));
    const head = Buffer.alloc(12);
    head.writeBigUInt64BE(BigInt(size), 0);
    head.writeUInt32BE(4 * K, 8);
    outer.update(head);
    outer.update(
      createHash('sha256')
        .update(disk.subarray(0, 4 * K))
        .digest(),
    );
    outer.update(Buffer.alloc(32)); // chunk 1: all zero
    outer.update(
      createHash('sha256')
        .update(disk.subarray(8 * K, 10 * K))
        .digest(),
    );
    return outer.digest('hex');
  };

  test('the combination of chunk records, zero chunks marked', () => {
    const d = new ContentDigest(size, 4 * K);
    d.update(0, disk);
    expect(d.digest()).toEqual({ sha256: expected(), chunkSize: 4 * K, chunks: 3, zeroChunks: 1 });
  });

  test('the same however the data arrives: only the non-zero pieces, split anywhere', () => {
    const d = new ContentDigest(size, 4 * K);
    d.update(1 * K, disk.subarray(1 * K, 2500));
    d.update(2500, disk.subarray(2500, 3 * K));
    d.skipTo(9 * K);
    d.update(9 * K, disk.subarray(9 * K));
    expect(d.digest().sha256).toBe(expected());
  });

  test('a changed byte changes it; data out of order is refused', () => {
    const d = new ContentDigest(size, 4 * K);
    const other = Buffer.from(disk);
    other[5 * K] = 1;
    d.update(0, other);
    expect(d.digest().sha256).not.toBe(expected());
    const e = new ContentDigest(size, 4 * K);
    e.update(4 * K, disk.subarray(4 * K, 5 * K));
    expect(() => e.update(0, disk.subarray(0, K))).toThrow(RangeError);
  });
});

describe('manifest: a pulled disk (content digest)', () => {
  const input = {
    backupId: 'b1',
    domain: 'vm1',
    host: 'h',
    method: 'push' as const,
    startedAt: '2026-11-30T00:00:00Z',
    finishedAt: '2026-11-30T00:00:01Z',
    quiesced: false,
    libvirtVersion: '9',
    qemuVersion: '7',
    disks: [
      {
        name: 'vda',
        format: 'qcow2',
        virtualSize: 1 << 20,
        size: 4096,
        sha256: 'a'.repeat(64),
        key: 'vm1/b1/vda.qcow2',
        content: { scheme: 'content-v1' as const, chunkSize: 4 << 20, chunks: 1, zeroChunks: 0 },
      },
    ],
  };

  test('is written as version 4, which a reader of versions 1-3 refuses ("upgrade vmbackup")', () => {
    const m = buildManifest(input);
    expect(m.version).toBe(4);
    expect(decodeManifest(encodeManifest(m), 'm').disks[0]!.content?.scheme).toBe('content-v1');
  });

  test('a content digest in a version-2 manifest is refused (an old reader would take it for a file hash)', () => {
    const m = { ...buildManifest(input), version: 2 };
    expect(() => decodeManifest(Buffer.from(JSON.stringify(m)), 'm')).toThrow(/invalid \(version must be 4/);
  });
});
