import { StorageError } from '../../src/storage/errors';
import {
  canonicalTargetUrl,
  defaultTargetUrl,
  duplicateTargets,
  openTarget,
  parseTargetUrl,
  redactUrl,
  targetWithin,
} from '../../src/storage/registry';

describe('target URLs', () => {
  test('file, nfs and s3 URLs parse into typed specs', () => {
    expect(parseTargetUrl('file:///var/backups/vm/')).toEqual({ kind: 'file', path: '/var/backups/vm' });
    expect(parseTargetUrl('nfs://filer.example/export')).toEqual({
      kind: 'nfs',
      host: 'filer.example',
      path: '/export',
    });
    expect(parseTargetUrl('nfs://10.0.0.5:2049/srv/nfs/vm')).toEqual({
      kind: 'nfs',
      host: '10.0.0.5',
      port: 2049,
      path: '/srv/nfs/vm',
    });
    expect(parseTargetUrl('s3://my-bucket')).toEqual({ kind: 's3', bucket: 'my-bucket', prefix: '' });
    expect(parseTargetUrl('s3://my-bucket/vm/prod/')).toEqual({ kind: 's3', bucket: 'my-bucket', prefix: 'vm/prod' });
  });

  test.each([
    [
      'ftp://x',
      /"ftp:\/\/x" is not a supported target URL: use file:\/\/\/abs\/dir, nfs:\/\/host\/export\/path or s3:\/\/bucket\/prefix/,
    ],
    ['not a url', /is not a supported target URL/],
    ['/plain/path', /is not a supported target URL/],
    ['file://host/dir', /no host/],
    ['file:///', /absolute and not \//],
    ['file:///a/../b', /"\." or "\.\."/],
    ['nfs://host', /export path is missing/],
    ['nfs://host/export/../etc', /"\." or "\.\."/],
    ['s3://Bad_Bucket/x', /not a valid bucket name/],
    ['s3://bucket/a//b', /prefix/],
    ['s3://bucket:9000/x', /AWS_ENDPOINT_URL/],
    ['s3://bucket/x?versionId=1', /query/],
  ])('%s is refused with one sentence', (url, message) => {
    let err: unknown;
    try {
      parseTargetUrl(url);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).kind).toBe('invalid-target');
    expect((err as StorageError).message).toMatch(message);
    expect((err as StorageError).message).not.toMatch(/\n/);
  });

  test('credentials in a URL are refused and never echoed', () => {
    let message = '';
    try {
      parseTargetUrl('s3://AKIDSECRETKEY:VERYSECRET@bucket/x');
    } catch (e) {
      message = (e as Error).message;
    }
    expect(message).toMatch(/credentials do not belong in the URL/);
    expect(message).not.toMatch(/AKIDSECRETKEY|VERYSECRET/);
    expect(redactUrl('nfs://user:pw@host/export?token=abc')).toBe('nfs://***@host/export');
  });

  test('the default target lives under the state directory', () => {
    expect(defaultTargetUrl('/var/lib/vmbackup')).toBe('file:///var/lib/vmbackup/backups');
    expect(parseTargetUrl(defaultTargetUrl('/var/lib/vmbackup'))).toEqual({
      kind: 'file',
      path: '/var/lib/vmbackup/backups',
    });
  });

  test('openTarget picks the driver by scheme and shows a safe URL', async () => {
    const local = openTarget('file:///tmp/x', { env: {} });
    expect(local.capabilities.localPath).toBe('/tmp/x');
    const s3 = openTarget('s3://bucket/p', { env: { AWS_ACCESS_KEY_ID: 'AKID', AWS_SECRET_ACCESS_KEY: 'SECRET' } });
    expect(s3.displayUrl).toBe('s3://bucket/p');
    expect(s3.capabilities.multipart).toBe(true);
    await Promise.all([local.close(), s3.close()]);
  });
});

describe('redactUrl hides user info whatever it holds', () => {
  test.each([
    // AWS secret keys hold '/', unencoded
    ['s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/x', 's3://***@bucket/x'],
    // an '@' inside the secret
    ['s3://AKIAIOSFODNN7EXAMPLE:wJal@rX/Utn@bucket/x', 's3://***@bucket/x'],
    ['s3://AKIAIOSFODNN7EXAMPLE:wJal@rXUtn@bucket/x', 's3://***@bucket/x'],
    // percent-encoded forms
    ['s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtn%2FK7MDENG%40x@bucket/x', 's3://***@bucket/x'],
    ['s3://AKIAIOSFODNN7EXAMPLE%3AwJalrXUtn%2FK7MDENG@bucket/x', 's3://***@bucket/x'],
    ['nfs://user:p/w@host/export?token=abc', 'nfs://***@host/export'],
    ['file://u:s/e/c@/backups', 'file://***@/backups'],
    ['s3://user@bucket/key@2', 's3://***@bucket/key@2'],
  ])('%s', (url, shown) => {
    expect(redactUrl(url)).toBe(shown);
    for (const secret of ['wJal', 'XUtn', 'K7MDENG', 'p/w', 's/e/c', 'token'])
      expect(redactUrl(url)).not.toContain(secret);
  });

  test.each(['s3://bucket/prefix@2026', 'file:///backups/a@b', 'nfs://filer/export/x@y', 's3://bucket/a:b'])(
    '%s has no user info and is shown as it is',
    (url) => expect(redactUrl(url)).toBe(url),
  );
});

describe('"." and ".." are refused however they are spelled', () => {
  test.each([
    'file:///tmp/x/.%2e/t',
    'file:///tmp/x/%2E./t',
    'file:///tmp/x/%2e%2E/t',
    'file:///tmp/x/%2e/t',
    'file:///tmp/x\\..\\..\\etc',
    'file:///tmp/x/.\t./t',
    'file:///tmp/x/.\n./t',
    'nfs://127.0.0.1/export/.%2e/etc',
    'nfs://127.0.0.1/export/%2E%2e',
    'nfs://127.0.0.1/export/a\\..',
    's3://bucket/p/.%2E/x',
    's3://bucket/p/%2e./x',
    's3://bucket/%2e',
  ])('%s', (url) => {
    expect(() => parseTargetUrl(url)).toThrow(StorageError);
    expect(() => parseTargetUrl(url)).toThrow(/"\." or "\.\."|control character or a backslash/);
  });

  test('a double-encoded dot stays a literal name, never a traversal', () => {
    expect(parseTargetUrl('file:///tmp/x/%252e%252e/t')).toEqual({ kind: 'file', path: '/tmp/x/%2e%2e/t' });
    expect(parseTargetUrl('nfs://h/export/%252E./t')).toEqual({ kind: 'nfs', host: 'h', path: '/export/%2E./t' });
    expect(canonicalTargetUrl('file:///tmp/x/%252e%252e/t')).toBe('file:///tmp/x/%252e%252e/t');
    // S3 keys have no '%' at all
    expect(() => parseTargetUrl('s3://bucket/%252e%252e/x')).toThrow(StorageError);
  });
});

describe('one canonical form per target', () => {
  test.each([
    ['s3://b-1/p', 's3://b-1/p/'],
    ['s3://b-1', 's3://b-1/'],
    ['file:///a/b', 'file:///a//b/'],
    ['file:///a/b', 'file:///a/%62'],
    ['file:///a b', 'file:///a%20b'],
    ['nfs://filer/export/x', 'nfs://FILER/export//x/'],
  ])('%s and %s are the same target', (a, b) => {
    expect(canonicalTargetUrl(a)).toBe(canonicalTargetUrl(b));
    expect(duplicateTargets([a, 's3://other/x', b])).toEqual([{ first: a, dup: b }]);
  });

  test.each([
    ['s3://b-1/p', 's3://b-1/p/x'],
    ['file:///a/b', 'file:///a/bc'],
    ['nfs://filer/export', 'nfs://filer:2049/export'],
    ['s3://b-1/p', 'file:///b-1/p'],
  ])('%s and %s are different targets', (a, b) => {
    expect(canonicalTargetUrl(a)).not.toBe(canonicalTargetUrl(b));
    expect(duplicateTargets([a, b])).toEqual([]);
  });

  test('prefixes match at segment boundaries only', () => {
    expect(targetWithin('file:///backups', 'file:///backups')).toBe(true);
    expect(targetWithin('file:///backups/vm1', 'file:///backups/')).toBe(true);
    expect(targetWithin('file:///backups-evil', 'file:///backups')).toBe(false);
    expect(targetWithin('file:///backups//x', 'file:///backups')).toBe(true);
    expect(targetWithin('s3://b-1/p/x', 's3://b-1/p')).toBe(true);
    expect(targetWithin('s3://b-1/px', 's3://b-1/p')).toBe(false);
    expect(targetWithin('s3://b-1/anything', 's3://b-1')).toBe(true);
    expect(targetWithin('s3://b-10/p', 's3://b-1')).toBe(false);
    expect(targetWithin('nfs://filer/export/x', 'nfs://filer/export')).toBe(true);
    expect(targetWithin('nfs://filer/exports', 'nfs://filer/export')).toBe(false);
    expect(targetWithin('nfs://other/export/x', 'nfs://filer/export')).toBe(false);
    // an encoded '/' is a separator once decoded, as the drivers read it
    expect(targetWithin('file:///backups%2Fvm1', 'file:///backups')).toBe(true);
    expect(targetWithin('file:///backups%2D1', 'file:///backups')).toBe(false);
  });
});
