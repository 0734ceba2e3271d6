import { StorageError } from '../../src/storage/errors';
import { imageKey, manifestKey, normaliseKey, normalisePrefix, parseManifestKey } from '../../src/storage/keys';

describe('object keys', () => {
  test.each(['dom/b1/vda.qcow2', 'a', 'web-01/web-01-20260101T000000Z-ab12/manifest.json'])(
    '%s is accepted as is',
    (k) => {
      expect(normaliseKey(k)).toBe(k);
    },
  );

  test.each([
    ['', /empty/],
    ['../etc/passwd', /\.\./],
    ['a/../b', /\.\./],
    ['/abs', /absolute/],
    ['a//b', /empty segment/],
    ['a/b/', /empty segment/],
    ['a\\b', /backslash/],
    ['a\0b', /NUL/],
    ['.staging/x', /reserved/],
    ['a/b c', /characters/],
  ])('%j is rejected with one sentence', (k, why) => {
    let err: unknown;
    try {
      normaliseKey(k);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).kind).toBe('invalid-key');
    expect((err as StorageError).permanent).toBe(true);
    expect((err as StorageError).message).toMatch(why);
    expect((err as StorageError).message).not.toMatch(/\n/);
  });

  test('layout: <domain>/<backupId>/<disk>.<format> and manifest.json', () => {
    expect(imageKey('web', 'web-1', 'vda', 'qcow2')).toBe('web/web-1/vda.qcow2');
    expect(manifestKey('web', 'web-1')).toBe('web/web-1/manifest.json');
    expect(parseManifestKey('web/web-1/manifest.json')).toEqual({ domain: 'web', backupId: 'web-1' });
    expect(parseManifestKey('web/web-1/vda.qcow2')).toBeUndefined();
    expect(() => imageKey('..', 'b', 'vda', 'raw')).toThrow(StorageError);
  });

  test('prefixes may end in / or be empty', () => {
    expect(normalisePrefix('')).toBe('');
    expect(normalisePrefix('dom/')).toBe('dom/');
    expect(normalisePrefix('dom/b')).toBe('dom/b');
    expect(() => normalisePrefix('../')).toThrow(StorageError);
  });
});
