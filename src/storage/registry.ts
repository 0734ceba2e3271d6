/**
 * Target URLs -> drivers. The one place that knows which URL scheme means which driver; the
 * rest of the code holds a StorageTarget. Environment is passed in (parsed at the edge).
 */
import { join } from 'node:path';
import { z } from 'zod';
import type { S3TargetOptions } from '../shared/types';
import { withBandwidthLimit } from './bandwidth';
import type { StorageTarget } from './contract';
import { StorageError } from './errors';
import { normaliseKey } from './keys';
import { LocalTarget } from './local/driver';
import { NfsTarget } from './nfs/driver';
import type * as S3DriverModuleNs from './s3/driver';
import type { S3Environment } from './s3/settings';

/** The S3 defaults the CLI shows in its help (settings only: importing them loads no SDK). */
export { DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE_MIB, MIN_PART_SIZE_MIB } from './s3/settings';

type S3DriverModule = typeof S3DriverModuleNs;

export type TargetSpec =
  | { kind: 'file'; path: string }
  /** `path` is the full path after the host; the driver splits export and subdirectory using the server's export list */
  | { kind: 'nfs'; host: string; port?: number; path: string }
  | { kind: 's3'; bucket: string; prefix: string };

const SUPPORTED = 'use file:///abs/dir, nfs://host/export/path or s3://bucket/prefix';

/** Removes user info and query strings (which may carry secrets) from anything URL-shaped; other URLs come back as given. */
export function redactUrl(url: string): string {
  return url.replace(/^([a-z0-9+.-]+:\/\/)[^/@]*@/i, '$1***@').replace(/[?#].*$/s, '');
}

function bad(url: string, why?: string): StorageError {
  const shown = JSON.stringify(redactUrl(url));
  const msg = why
    ? `${shown} is not a valid target URL: ${why}; ${SUPPORTED}.`
    : `${shown} is not a supported target URL: ${SUPPORTED}.`;
  return new StorageError('invalid-target', msg, { driver: 'registry' });
}

/** Validates the relative part of a path as a key (no '..', no empty or dot segments). */
function safeRelative(path: string): boolean {
  const trimmed = path.replace(/^\/+/, '').replace(/\/+$/, '');
  if (trimmed === '') return true;
  try {
    normaliseKey(trimmed);
    return true;
  } catch {
    return false;
  }
}

const BUCKET_RE = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

const TargetUrlSchema = z.string().transform((url, ctx): TargetSpec => {
  const fail = (why?: string): typeof z.NEVER => {
    ctx.addIssue({ code: z.ZodIssueCode.custom, message: bad(url, why).message });
    return z.NEVER;
  };
  // WHATWG URL parsing silently resolves '.' and '..': refuse them on the raw text instead
  const afterScheme = url.replace(/^[a-z0-9+.-]+:\/\/[^/]*/i, '').replace(/[?#].*$/, '');
  if (afterScheme.split('/').some((s) => s === '..' || s === '.' || s === '%2e%2e' || s === '%2E%2E')) {
    return fail('the path contains "." or ".."');
  }
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return fail();
  }
  if (u.username || u.password) return fail('credentials do not belong in the URL (use the environment or ~/.aws)');
  if (u.search || u.hash) return fail('query strings and fragments are not supported');
  const rawPath = decodeURIComponent(u.pathname);
  if (rawPath.includes('\0') || rawPath.includes('\\')) return fail('the path contains a NUL or backslash');
  switch (u.protocol) {
    case 'file:': {
      if (u.host !== '') return fail('file URLs take no host (file:///abs/dir)');
      if (!rawPath.startsWith('/') || rawPath === '/') return fail('the directory must be absolute and not /');
      if (rawPath.split('/').some((s) => s === '..' || s === '.')) return fail('the path contains "." or ".."');
      return { kind: 'file', path: rawPath.replace(/\/+$/, '') };
    }
    case 'nfs:': {
      if (!u.hostname) return fail('the NFS server host is missing');
      if (rawPath === '' || rawPath === '/') return fail('the export path is missing');
      if (rawPath.split('/').some((s) => s === '..' || s === '.')) return fail('the path contains "." or ".."');
      const port = u.port ? Number(u.port) : undefined;
      return {
        kind: 'nfs',
        host: u.hostname.replace(/^\[|\]$/g, ''),
        ...(port ? { port } : {}),
        path: rawPath.replace(/\/+$/, ''),
      };
    }
    case 's3:': {
      if (u.port) return fail('an S3 URL takes a bucket, not host:port (set AWS_ENDPOINT_URL for the server)');
      const bucket = u.hostname;
      if (!BUCKET_RE.test(bucket)) return fail(`${JSON.stringify(bucket)} is not a valid bucket name`);
      if (!safeRelative(rawPath)) return fail('the prefix contains "..", "." or empty segments');
      return { kind: 's3', bucket, prefix: rawPath.replace(/^\/+/, '').replace(/\/+$/, '') };
    }
    default:
      return fail();
  }
});

/** Parses a target URL; throws StorageError 'invalid-target' with one sentence naming the URL. */
export function parseTargetUrl(url: string): TargetSpec {
  const parsed = TargetUrlSchema.safeParse(url);
  if (!parsed.success) {
    throw new StorageError('invalid-target', parsed.error.issues[0]?.message ?? bad(url).message, {
      driver: 'registry',
    });
  }
  return parsed.data;
}

/** `file://<stateDir>/backups`: the target used when the CLI is given none. */
export function defaultTargetUrl(stateDir: string): string {
  return `file://${join(stateDir, 'backups')}`;
}

/** The environment variables the drivers understand; read once at the edge and passed in. */
export type TargetEnvironment = S3Environment;

export interface OpenTargetOptions {
  s3?: S3TargetOptions;
  env?: TargetEnvironment;
}

/**
 * Opens the driver for `url`. `env` should be passed by the caller's edge (CLI, worker); when it
 * is omitted the process environment is used, which is what the AWS SDK's own chain would read.
 */
export function openTarget(url: string, options: OpenTargetOptions = {}): StorageTarget {
  const spec = parseTargetUrl(url);
  const env = options.env ?? targetEnvironmentFrom(process.env);
  const display = redactUrl(url);
  switch (spec.kind) {
    case 'file':
      return new LocalTarget(spec.path, display);
    case 'nfs':
      return new NfsTarget(spec, display);
    case 's3': {
      // The AWS SDK costs ~0.15 s of start-up and ~20 MB: loaded when the first S3 target is opened, so commands
      // and workers that never touch S3 do not pay for it.
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const { S3Target } = require('./s3/driver') as S3DriverModule;
      const target = new S3Target(spec, display, options.s3 ?? {}, env);
      return withBandwidthLimit(target, options.s3?.bandwidthLimit ?? 0);
    }
  }
}

/** Picks the variables drivers use out of a process environment (call at the edge only). */
export function targetEnvironmentFrom(env: NodeJS.ProcessEnv): TargetEnvironment {
  const pick = (name: keyof S3Environment): Record<string, string> =>
    env[name] ? { [name]: env[name] as string } : {};
  return {
    ...pick('AWS_ENDPOINT_URL'),
    ...pick('AWS_ENDPOINT_URL_S3'),
    ...pick('AWS_REGION'),
    ...pick('AWS_DEFAULT_REGION'),
    ...pick('AWS_ACCESS_KEY_ID'),
    ...pick('AWS_SECRET_ACCESS_KEY'),
    ...pick('AWS_SESSION_TOKEN'),
    ...pick('AWS_PROFILE'),
  };
}
