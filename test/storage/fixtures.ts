/** Targets on the real stack for storage tests: fresh, uniquely named, and a look behind each driver's back. */
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import {
  AbortMultipartUploadCommand,
  DeleteObjectsCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  S3Client,
} from '@aws-sdk/client-s3';
import type { S3TargetOptions } from '../../src/shared/types';
import { LocalTarget, type LocalTargetOptions } from '../../src/storage/local/driver';
import { openTarget, type TargetEnvironment } from '../../src/storage/registry';
import { s3ClientConfig, stackEnv } from '../helpers/stack';
import type { ConformanceTarget } from './conformance';

export function s3Env(): TargetEnvironment {
  const { s3 } = stackEnv();
  return {
    AWS_ENDPOINT_URL: s3.endpoint,
    AWS_REGION: s3.region,
    AWS_ACCESS_KEY_ID: s3.accessKeyId,
    AWS_SECRET_ACCESS_KEY: s3.secretAccessKey,
  };
}

export function uniqueName(kind: string): string {
  return `${kind}-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
}

/** Every file below `dir`, relative, hidden ones included. */
export async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  async function walk(d: string): Promise<void> {
    let entries;
    try {
      entries = await readdir(d, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else out.push(relative(dir, p));
    }
  }
  await walk(dir);
  return out.sort();
}

/** A fresh local target; `options` (a smaller checkpoint window) builds the driver directly instead of through the registry. */
export async function localTarget(
  options?: LocalTargetOptions,
): Promise<ConformanceTarget & { dir: string; url: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'vmbackup-local-target-'));
  const url = `file://${dir}`;
  return {
    dir,
    url,
    target: options ? new LocalTarget(dir, url, options) : openTarget(url, { env: {} }),
    leftovers: () => filesUnder(dir),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

export async function nfsTarget(): Promise<ConformanceTarget & { dir: string; url: string }> {
  const { nfs } = stackEnv();
  const sub = uniqueName('t');
  const dir = join(nfs.exportDir, sub);
  const url = `${nfs.url}/${sub}`;
  return {
    dir,
    url,
    target: openTarget(url, { env: {} }),
    leftovers: () => filesUnder(dir),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

export async function s3Target(
  options: S3TargetOptions = {},
): Promise<ConformanceTarget & { prefix: string; url: string; client: S3Client }> {
  const { s3 } = stackEnv();
  const prefix = uniqueName('t');
  const url = `s3://${s3.bucket}/${prefix}`;
  const client = new S3Client(s3ClientConfig());
  const leftovers = async (): Promise<string[]> => {
    const names: string[] = [];
    const objects = await client.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: `${prefix}/` }));
    for (const o of objects.Contents ?? []) names.push(o.Key ?? '');
    const uploads = await client.send(new ListMultipartUploadsCommand({ Bucket: s3.bucket, Prefix: `${prefix}/` }));
    for (const u of uploads.Uploads ?? []) names.push(`upload:${u.Key}:${u.UploadId}`);
    return names.sort();
  };
  return {
    prefix,
    url,
    client,
    target: openTarget(url, { env: s3Env(), s3: { partSizeMiB: 5, ...options } }),
    leftovers,
    cleanup: async () => {
      await emptyS3Prefix(prefix, client);
      client.destroy();
    },
  };
}

/**
 * Deletes every object under `prefix/` in the stack's bucket and aborts unfinished multipart uploads there.
 * radosgw's OSD is 10 GiB: tests and the bench leave nothing behind.
 */
export async function emptyS3Prefix(prefix: string, shared?: S3Client): Promise<void> {
  const client = shared ?? new S3Client(s3ClientConfig());
  try {
    await emptyWith(client, prefix);
  } finally {
    if (!shared) client.destroy();
  }
}

async function emptyWith(client: S3Client, prefix: string): Promise<void> {
  const { bucket } = stackEnv().s3;
  const Prefix = `${prefix.replace(/\/+$/, '')}/`;
  for (;;) {
    const objects = await client.send(new ListObjectsV2Command({ Bucket: bucket, Prefix }));
    const keys = (objects.Contents ?? []).map((o) => ({ Key: o.Key ?? '' }));
    if (keys.length === 0) break;
    await client.send(new DeleteObjectsCommand({ Bucket: bucket, Delete: { Objects: keys } }));
  }
  const uploads = await client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix }));
  for (const u of uploads.Uploads ?? []) {
    await client.send(new AbortMultipartUploadCommand({ Bucket: bucket, Key: u.Key, UploadId: u.UploadId }));
  }
}
