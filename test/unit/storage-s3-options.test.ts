import { Command } from 'commander';
import { addS3Options, parseRate, s3OptionsFrom } from '../../src/cli/commands/s3-options';

function parse(args: string[]): Record<string, unknown> {
  const cmd = addS3Options(new Command('x').exitOverride());
  cmd.parse(args, { from: 'user' });
  return cmd.opts();
}

describe('S3 command-line options', () => {
  test('flags become typed S3TargetOptions', () => {
    expect(
      s3OptionsFrom(
        parse([
          '--s3-path-style',
          '--s3-storage-class',
          'STANDARD_IA',
          '--s3-sse',
          'AES256',
          '--s3-concurrency',
          '8',
          '--s3-part-size',
          '16',
          '--bwlimit',
          '50M',
        ]),
      ),
    ).toEqual({
      forcePathStyle: true,
      storageClass: 'STANDARD_IA',
      serverSideEncryption: 'AES256',
      concurrency: 8,
      partSizeMiB: 16,
      bandwidthLimit: 50 << 20,
    });
    expect(s3OptionsFrom(parse([]))).toEqual({});
  });

  test.each([
    [['--s3-part-size', '4'], /at least 5 MiB/],
    [['--s3-concurrency', '0'], /at least 1/],
    [['--s3-concurrency', 'many'], /must be a number/],
    [['--s3-sse', 'rot13'], /AES256/],
    [['--bwlimit', 'fast'], /is not a rate/],
  ])('%j is refused with one sentence', (args, message) => {
    expect(() => s3OptionsFrom(parse(args))).toThrow(message);
  });

  test('rates take K, M, G suffixes', () => {
    expect(parseRate('1024')).toBe(1024);
    expect(parseRate('10K')).toBe(10240);
    expect(parseRate('1.5G')).toBe(1.5 * 2 ** 30);
    expect(parseRate('2MiB/s')).toBe(2 << 20);
    expect(parseRate('x')).toBeUndefined();
  });
});
