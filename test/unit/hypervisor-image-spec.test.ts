/**
 * How qemu-img is told to open an image we did not configure: its format given, and the backing chain WE name (or
 * none) in a `json:` filename, so a header naming /etc/hostname or an NBD server is never followed.
 */
import { chainSpec, imageSpecFilename } from '../../src/hypervisor/qemu-img';

const parse = (filename: string): unknown => {
  expect(filename.startsWith('json:')).toBe(true);
  return JSON.parse(filename.slice('json:'.length));
};

test('a qcow2 image opens with backing null: the backing file its header names is not opened', () => {
  expect(parse(imageSpecFilename({ path: '/b/vda.qcow2', format: 'qcow2', backing: null }))).toEqual({
    driver: 'qcow2',
    file: { driver: 'file', filename: '/b/vda.qcow2' },
    backing: null,
  });
});

test('a raw image has no backing option (qemu-img would refuse one)', () => {
  expect(parse(imageSpecFilename({ path: '/b/vda.raw', format: 'raw' }))).toEqual({
    driver: 'raw',
    file: { driver: 'file', filename: '/b/vda.raw' },
  });
  expect(() => imageSpecFilename({ path: '/x', format: 'raw', backing: { path: '/y', format: 'raw' } })).toThrow(
    /a raw image has no backing file/,
  );
});

test('a chain from the manifests nests top first and ends with backing null', () => {
  const spec = chainSpec([
    { path: '/t/web/inc2/vda.qcow2', format: 'qcow2' },
    { path: '/t/web/inc1/vda.qcow2', format: 'qcow2' },
    { path: '/t/web/full/vda.qcow2', format: 'qcow2' },
  ]);
  expect(parse(imageSpecFilename(spec))).toEqual({
    driver: 'qcow2',
    file: { driver: 'file', filename: '/t/web/inc2/vda.qcow2' },
    backing: {
      driver: 'qcow2',
      file: { driver: 'file', filename: '/t/web/inc1/vda.qcow2' },
      backing: { driver: 'qcow2', file: { driver: 'file', filename: '/t/web/full/vda.qcow2' }, backing: null },
    },
  });
});

test('paths are JSON strings, so quotes and commas in them cannot inject options', () => {
  const path = '/t/a","driver":"nbd/x,y.qcow2';
  expect(parse(imageSpecFilename({ path, format: 'qcow2' }))).toMatchObject({ file: { filename: path } });
});

test('the format is a name, never a spec', () => {
  expect(() => imageSpecFilename({ path: '/x', format: 'qcow2","driver":"nbd' })).toThrow(/is not an image format/);
});
