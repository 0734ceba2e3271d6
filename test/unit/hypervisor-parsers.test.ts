/**
 * The parsers of virsh and qemu-img output, against outputs captured from libvirt 9.0.0 / QEMU 7.2
 * on the test hosts (test/fixtures/virsh/, re-captured by capture.sh there).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseConvertProgress, parseFileHoles, parseImageCheck, parseImageInfo } from '../../src/hypervisor/qemu-img';
import {
  parseBlockJobRaw,
  parseDomBlkInfo,
  parseDomainState,
  parseJobInfo,
  parseSize,
  parseVersions,
  versionAtLeast,
} from '../../src/hypervisor/virsh';

const captured = (file: string): string => readFileSync(join(__dirname, '..', 'fixtures', 'virsh', file), 'utf8');
const GiB = 1 << 30;

describe('domjobinfo', () => {
  test('no job', () => {
    expect(parseJobInfo(captured('domjobinfo.none.txt'))).toEqual({ type: 'None' });
    expect(parseJobInfo(captured('domjobinfo.none.rawstats.txt'))).toEqual({ type: 'None' });
    expect(parseJobInfo('')).toEqual({ type: 'None' });
  });

  test('a running push backup: exact bytes from --rawstats', () => {
    expect(parseJobInfo(captured('domjobinfo.running.rawstats.txt'))).toEqual({
      type: 'Unbounded',
      operation: 'Backup',
      dataProcessed: 473956352,
      dataTotal: GiB,
      timeElapsedMs: 1465,
    });
  });

  test('a running push backup: human output, sizes rounded by virsh', () => {
    expect(parseJobInfo(captured('domjobinfo.running.txt'))).toEqual({
      type: 'Unbounded',
      operation: 'Backup',
      dataProcessed: 452 * (1 << 20),
      dataTotal: GiB,
      timeElapsedMs: 505,
    });
  });

  test('completed, both forms agree', () => {
    const expected = {
      type: 'Completed',
      operation: 'Backup',
      dataProcessed: GiB,
      dataTotal: GiB,
      timeElapsedMs: 5791,
    };
    expect(parseJobInfo(captured('domjobinfo.completed.rawstats.txt'))).toEqual(expected);
    expect(parseJobInfo(captured('domjobinfo.completed.txt'))).toEqual(expected);
  });

  test('cancelled carries the error message', () => {
    expect(parseJobInfo(captured('domjobinfo.cancelled.rawstats.txt'))).toEqual({
      type: 'Cancelled',
      operation: 'Backup',
      dataProcessed: 83886080,
      dataTotal: GiB,
      timeElapsedMs: 1088,
      errorMessage: 'Operation canceled',
    });
    expect(parseJobInfo(captured('domjobinfo.cancelled.txt'))).toMatchObject({
      type: 'Cancelled',
      errorMessage: 'Operation canceled',
      dataProcessed: 80 * (1 << 20),
    });
  });

  test('sizes with units', () => {
    expect(parseSize('0.000 B')).toBe(0);
    expect(parseSize('455.000 MiB')).toBe(455 * 2 ** 20);
    expect(parseSize('1.500 GiB')).toBe(1.5 * 2 ** 30);
    expect(parseSize('12 KiB')).toBe(12 * 1024);
    expect(parseSize('lots')).toBeUndefined();
  });
});

describe('blockjob --raw', () => {
  test('no job: an empty line', () => {
    expect(parseBlockJobRaw(captured('blockjob.none.raw.txt'))).toEqual({ type: undefined, cur: 0, end: 0 });
  });
  test('active commit, running and synchronised', () => {
    expect(parseBlockJobRaw(captured('blockjob.running.raw.txt'))).toEqual({
      type: 'Active Block Commit',
      cur: 606076928,
      end: GiB,
    });
    expect(parseBlockJobRaw(captured('blockjob.ready.raw.txt'))).toEqual({
      type: 'Active Block Commit',
      cur: GiB,
      end: GiB,
    });
  });
});

describe('version, domblkinfo, domstate', () => {
  test('versions: the library and the running hypervisor, not the API or compile-time ones', () => {
    expect(parseVersions(captured('version.txt'))).toEqual({ libvirt: '9.0.0', qemu: '7.2.22' });
    expect(() => parseVersions('error: failed to connect')).toThrow(/cannot read the libvirt and QEMU versions/);
  });

  test('versionAtLeast', () => {
    expect(versionAtLeast('9.0.0', '7.2.0')).toBe(true);
    expect(versionAtLeast('7.2.0', '7.2')).toBe(true);
    expect(versionAtLeast('7.1.9', '7.2.0')).toBe(false);
    expect(versionAtLeast('7.2.22', '4.2.0')).toBe(true);
    expect(versionAtLeast('4.1.1', '4.2.0')).toBe(false);
    expect(versionAtLeast('10.0.0', '9.9.9')).toBe(true);
  });

  test('domblkinfo in bytes', () => {
    expect(parseDomBlkInfo(captured('domblkinfo.vda.txt'))).toEqual({
      capacity: GiB,
      allocation: 1074077696,
      physical: 1074135040,
    });
    expect(parseDomBlkInfo(captured('domblkinfo.shutoff.txt')).capacity).toBe(GiB);
  });

  test('domstate', () => {
    expect(parseDomainState(captured('domstate.running.txt'))).toBe('running');
    expect(parseDomainState(captured('domstate.shutoff.txt'))).toBe('shut off');
    expect(parseDomainState(captured('domstate.destroyed.txt'))).toBe('other'); // with --reason
    expect(parseDomainState('paused\n')).toBe('paused');
    expect(parseDomainState('in shutdown\n')).toBe('other');
  });
});

describe('qemu-img', () => {
  test('map -f raw: the holes of an image file (qcow2 metadata preallocated, two ranges written)', () => {
    expect(parseFileHoles(captured('qemu-img-map.raw.json.txt'))).toEqual([
      [200704, 262144],
      [327680, 1376256],
      [3473408, 42270720],
      [43319296, 67436544],
    ]);
    // adjacent holes merge; data and "zero but allocated" ranges are not holes
    expect(
      parseFileHoles(
        JSON.stringify([
          { start: 0, length: 10, data: false, zero: true },
          { start: 10, length: 5, data: false, zero: true },
          { start: 15, length: 5, data: true, zero: true },
          { start: 20, length: 5, data: false, zero: false },
        ]),
      ),
    ).toEqual([[0, 15]]);
  });

  test('info --backing-chain: the top image and the chain below it', () => {
    const info = parseImageInfo(captured('qemu-img-info.chain.json.txt'));
    expect(info).toMatchObject({
      filename: '/VM/vda.qcow2',
      format: 'qcow2',
      virtualSize: GiB,
      actualSize: 1074077696,
      clusterSize: 65536,
      backingFile: '/VM/template.qcow2',
      backingFormat: 'qcow2',
      dirty: false,
      corrupt: false,
    });
    expect(info.chain?.map((i) => i.filename)).toEqual(['/VM/template.qcow2']);
    expect(info.chain?.[0]?.backingFile).toBeUndefined();
  });

  test('info of a raw image', () => {
    expect(parseImageInfo(captured('qemu-img-info.raw.json.txt'))).toEqual({
      filename: '/VM/vdb.raw',
      format: 'raw',
      virtualSize: 32 << 20,
      actualSize: 4096,
      clusterSize: undefined,
      backingFile: undefined,
      backingFormat: undefined,
      dirty: false,
      corrupt: undefined,
    });
  });

  test('check: clean image, corrupt image, leaks only, incomplete', () => {
    expect(parseImageCheck(captured('qemu-img-check.ok.json.txt'), 0)).toEqual({
      ok: true,
      checked: true,
      format: 'qcow2',
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      summary: '0 corruptions, 0 leaked clusters',
    });
    const corrupt = '{"corruptions": 2, "leaks": 1, "check-errors": 0, "format": "qcow2"}';
    expect(parseImageCheck(corrupt, 2)).toMatchObject({ ok: false, corruptions: 2, leaks: 1 });
    expect(parseImageCheck('{"leaks": 3, "format": "qcow2"}', 3)).toMatchObject({ ok: true, leaks: 3 });
    expect(parseImageCheck('{"check-errors": 1, "format": "qcow2"}', 1)).toMatchObject({
      ok: false,
      summary: expect.stringMatching(/could not complete/),
    });
  });

  test('convert -p progress', () => {
    const out = captured('qemu-img-convert.progress.txt');
    expect(parseConvertProgress(out)).toBeCloseTo(Number(/\(([\d.]+)\/100%\)\s*$/.exec(out)![1]) / 100, 6);
    expect(parseConvertProgress('    (0.00/100%)\r')).toBe(0);
    expect(parseConvertProgress('    (100.00/100%)\r')).toBe(1);
    expect(parseConvertProgress('no progress here')).toBeUndefined();
  });
});
