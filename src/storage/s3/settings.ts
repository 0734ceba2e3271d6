/**
 * What the S3 driver's callers need to know without loading the AWS SDK (the CLI parses its
 * flags and the registry names the environment before any S3 target is opened).
 */

// 16 MiB parts, 4 in flight: ~80 MiB of buffers per upload (64 MiB parts made a worker peak at 670 MiB).
export const DEFAULT_PART_SIZE_MIB = 16;
export const MIN_PART_SIZE_MIB = 5;
export const DEFAULT_CONCURRENCY = 4;

/** Variables of the standard AWS configuration this driver reads (passed in, never read from process.env there). */
export interface S3Environment {
  AWS_ENDPOINT_URL?: string;
  AWS_ENDPOINT_URL_S3?: string;
  AWS_REGION?: string;
  AWS_DEFAULT_REGION?: string;
  AWS_ACCESS_KEY_ID?: string;
  AWS_SECRET_ACCESS_KEY?: string;
  AWS_SESSION_TOKEN?: string;
  AWS_PROFILE?: string;
}
