/** S3 flags shared by every command that opens a target (the backup command reuses them). */
import type { Command } from 'commander';
import { z } from 'zod';
import { MAX_OBJECT_LOCK_DAYS } from '../../shared/object-lock';
import type { ObjectLockOption, S3TargetOptions } from '../../shared/types';
import { DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE_MIB, MIN_PART_SIZE_MIB } from '../../storage/registry';
import { CliError } from '../output';

export function addS3Options(cmd: Command): Command {
  return cmd
    .option('--s3-path-style', 'S3: path-style bucket URLs (radosgw, MinIO); the default when AWS_ENDPOINT_URL is set')
    .option('--s3-storage-class <class>', 'S3: storage class of uploaded objects, e.g. STANDARD_IA')
    .option('--s3-sse <algorithm>', 'S3: server-side encryption, AES256 or aws:kms')
    .option('--s3-concurrency <n>', `S3: parts uploaded in parallel (default ${DEFAULT_CONCURRENCY})`)
    .option(
      '--s3-part-size <MiB>',
      `S3: multipart part size in MiB (default ${DEFAULT_PART_SIZE_MIB}, at least ${MIN_PART_SIZE_MIB})`,
    )
    .option('--bwlimit <rate>', 'S3: upload bandwidth limit in bytes/s, with K, M or G suffix (e.g. 50M); 0 = none')
    .option(
      '--s3-object-lock <DAYS[:mode]>',
      'S3: write every object with Object Lock, retained DAYS days after the backup started; mode governance (default) or compliance; the bucket must have Object Lock enabled',
    );
}

/** "50M" -> 52428800; K/M/G are powers of 1024. */
export function parseRate(text: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?(?:\/s)?$/i.exec(text.trim());
  if (!m) return undefined;
  const unit = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30 }[(m[2] ?? '').toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Math.floor(Number(m[1]) * unit);
}

const FlagsSchema = z.object({
  s3PathStyle: z.boolean().optional(),
  s3StorageClass: z
    .string()
    .regex(/^[A-Z_]+$/, '--s3-storage-class must be an S3 storage class such as STANDARD_IA')
    .optional(),
  s3Sse: z
    .enum(['AES256', 'aws:kms', 'aws:kms:dsse'], { message: '--s3-sse must be AES256, aws:kms or aws:kms:dsse' })
    .optional(),
  s3Concurrency: z.coerce
    .number({ message: '--s3-concurrency must be a number' })
    .int('--s3-concurrency must be a whole number')
    .min(1, '--s3-concurrency must be at least 1')
    .max(64, '--s3-concurrency must be at most 64')
    .optional(),
  s3PartSize: z.coerce
    .number({ message: '--s3-part-size must be a number of MiB' })
    .int('--s3-part-size must be a whole number of MiB')
    .min(MIN_PART_SIZE_MIB, `--s3-part-size must be at least ${MIN_PART_SIZE_MIB} MiB (an S3 limit)`)
    .max(5120, '--s3-part-size must be at most 5120 MiB (an S3 limit)')
    .optional(),
  bwlimit: z.string().optional(),
  s3ObjectLock: z.string().optional(),
});

/** "30" -> 30 days governance, "365:compliance"; throws CliError with one sentence otherwise. */
export function parseObjectLock(text: string): ObjectLockOption {
  const m = /^(\d+)(?::(governance|compliance))?$/i.exec(text.trim());
  const days = m ? Number(m[1]) : NaN;
  if (!m || days < 1 || days > MAX_OBJECT_LOCK_DAYS)
    throw new CliError(
      `--s3-object-lock "${text}" is not a lock: give DAYS (1 to ${MAX_OBJECT_LOCK_DAYS}) and optionally :governance or :compliance, e.g. 30 or 365:compliance.`,
    );
  return { days, mode: (m[2]?.toLowerCase() ?? 'governance') as ObjectLockOption['mode'] };
}

/** Typed S3TargetOptions from parsed commander flags; throws CliError with one sentence for a bad value. */
export function s3OptionsFrom(flags: Record<string, unknown>): S3TargetOptions {
  const parsed = FlagsSchema.safeParse(flags);
  if (!parsed.success) throw new CliError(`${parsed.error.issues[0]?.message ?? 'invalid S3 option'}.`);
  const f = parsed.data;
  let bandwidthLimit: number | undefined;
  if (f.bwlimit !== undefined) {
    bandwidthLimit = parseRate(f.bwlimit);
    if (bandwidthLimit === undefined)
      throw new CliError(
        `--bwlimit "${f.bwlimit}" is not a rate: use bytes per second with an optional K, M or G suffix, e.g. 50M.`,
      );
  }
  return {
    ...(f.s3PathStyle ? { forcePathStyle: true } : {}),
    ...(f.s3StorageClass ? { storageClass: f.s3StorageClass } : {}),
    ...(f.s3Sse ? { serverSideEncryption: f.s3Sse } : {}),
    ...(f.s3Concurrency !== undefined ? { concurrency: f.s3Concurrency } : {}),
    ...(f.s3PartSize !== undefined ? { partSizeMiB: f.s3PartSize } : {}),
    ...(bandwidthLimit ? { bandwidthLimit } : {}),
    ...(f.s3ObjectLock !== undefined ? { objectLock: parseObjectLock(f.s3ObjectLock) } : {}),
  };
}
