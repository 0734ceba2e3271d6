import { StorageError } from '../../src/storage/errors';
import { defaultTargetUrl, openTarget, parseTargetUrl, redactUrl } from '../../src/storage/registry';

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
