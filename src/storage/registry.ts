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

/**
 * Removes user info and query strings (which may carry secrets) from anything URL-shaped; other URLs come
 * back as given. User info may hold a '/' or an '@' of its own (AWS secret keys do, unencoded): when the
 * text between `scheme://` and the last '@' has a ':', all of it is taken for user info. That can hide
 * more than the user info (`nfs://host:2049/a@b` shows as `nfs://***@b`), never less.
 */
export function redactUrl(url: string): string {
  const m = /^([a-z0-9+.-]+:\/\/)(.*)$/is.exec(url);
  if (!m) return url.replace(/[?#].*$/s, '');
  const [, scheme, rest] = m as unknown as [string, string, string];
  const at = rest.lastIndexOf('@');
  let shown = rest;
  if (at >= 0) {
    const before = rest.slice(0, at);
    const slash = before.indexOf('/');
    const colon = before.indexOf(':');
    if (slash < 0 || (colon >= 0 && colon < slash)) {
      // `user@host`, or `user:secret@host` whose secret holds '/' or '@': everything up to the last '@'
      shown = `***${rest.slice(at)}`;
    } else {
      // `user@bucket/key@x`: the user info ends at the first '@' (a path may hold '@', keys allow it)
      const first = rest.indexOf('@');
      if (!rest.slice(0, first).includes('/')) shown = `***${rest.slice(first)}`;
    }
  }
  return `${scheme}${shown}`.replace(/[?#].*$/s, '');
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
  // WHATWG URL parsing silently resolves '.' and '..' (also spelled '.%2e', '%2E.', '%2e'), drops tabs and
  // newlines and reads '\' as '/' in file URLs (`file:///t/x\..\..\etc` is /etc): refuse all of that on the
  // raw text, each segment decoded once, as the path is decoded once below.
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f\\]/.test(url)) return fail('the URL contains a control character or a backslash');
  const afterScheme = url.replace(/^[a-z0-9+.-]+:\/\/[^/]*/i, '').replace(/[?#].*$/, '');
  for (const segment of afterScheme.split('/')) {
    let decoded: string;
    try {
      decoded = decodeURIComponent(segment);
    } catch {
      return fail('the path is not valid percent-encoding');
    }
    if (decoded === '.' || decoded === '..') return fail('the path contains "." or ".."');
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

/**
 * The one spelling of a target, for comparing targets (never for display: the user's spelling is kept
 * there). Scheme, host (lower case) and port, then the path's segments as parseTargetUrl decoded them,
 * each percent-encoded the same way, without empty segments or a trailing '/': `s3://b/p/` and `s3://b/p`
 * are `s3://b/p`, `file:///a//b/` is `file:///a/b`. Throws like parseTargetUrl.
 */
export function canonicalTargetUrl(url: string): string {
  const spec = parseTargetUrl(url);
  const segments = (path: string): string =>
    path
      .split('/')
      .filter((s) => s !== '')
      .map(encodeURIComponent)
      .join('/');
  switch (spec.kind) {
    case 'file':
      return `file:///${segments(spec.path)}`;
    case 'nfs': {
      const host = spec.host.toLowerCase();
      return `nfs://${host.includes(':') ? `[${host}]` : host}${spec.port ? `:${spec.port}` : ''}/${segments(spec.path)}`;
    }
    case 's3': {
      const prefix = segments(spec.prefix);
      return `s3://${spec.bucket}${prefix ? `/${prefix}` : ''}`;
    }
  }
}

/**
 * Whether target `url` is `prefix` or lies below it, compared canonically and segment by segment:
 * `s3://b/p` covers `s3://b/p/x` but not `s3://b/px`; `file:///backups` does not cover `file:///backups-evil`.
 */
export function targetWithin(url: string, prefix: string): boolean {
  const u = canonicalTargetUrl(url);
  const p = canonicalTargetUrl(prefix);
  return u === p || u.startsWith(`${p}/`);
}

/** Pairs of targets in `urls` that name the same place (`dup` repeats `first`), in order. */
export function duplicateTargets(urls: readonly string[]): Array<{ first: string; dup: string }> {
  const seen = new Map<string, string>();
  const dups: Array<{ first: string; dup: string }> = [];
  for (const url of urls) {
    const key = canonicalTargetUrl(url);
    const first = seen.get(key);
    if (first === undefined) seen.set(key, url);
    else dups.push({ first, dup: url });
  }
  return dups;
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
