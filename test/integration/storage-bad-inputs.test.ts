/**
 * Bad inputs against the real servers: each gives one clear sentence (kind, permanence), nothing is
 * written, and no credential ever appears in a message.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { ErrorType } from '../../src/shared/errors';
import { StorageError } from '../../src/storage/errors';
import { openTarget, type TargetEnvironment } from '../../src/storage/registry';
import { requireNfs, requireS3, stackEnv } from '../helpers/stack';
import { stageImage, storageActivities, testStateDir } from '../storage/backups';
import { s3Env, s3Target, uniqueName } from '../storage/fixtures';

const WRONG_SECRET = 'wR0ngS3cretDoNotPrint';
const WRONG_KEY_ID = 'AKIAWRONGKEYID000001';
const messages: string[] = [];
let work: string;
let image: string;

beforeAll(async () => {
  await requireS3();
  await requireNfs();
  work = await mkdtemp(join(tmpdir(), 'vmbackup-badinputs-'));
  image = join(work, 'vda.raw');
  await writeFile(image, randomBytes(6 << 20));
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
  // across every failure above: no secret, no access key id
  const { s3 } = stackEnv();
  expect(messages.length).toBeGreaterThan(10);
  for (const m of messages) {
    for (const secret of [WRONG_SECRET, WRONG_KEY_ID, s3.secretAccessKey, s3.accessKeyId])
      expect(m).not.toContain(secret);
  }
});

async function failure(p: Promise<unknown>): Promise<StorageError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(StorageError);
  const e = err as StorageError;
  messages.push(e.message, String(e), JSON.stringify(e));
  expect(e.message).not.toMatch(/\n/);
  expect(e.message).toMatch(/\.$/);
  return e;
}

test('malformed target URLs: one sentence each, refused before any I/O', async () => {
  for (const url of [
    'ftp://x',
    'file://relative/dir',
    'nfs://',
    's3://UPPER/x',
    's3://b/../x',
    'file:///a/../../etc',
    '',
  ]) {
    const err = await failure(Promise.resolve().then(() => openTarget(url, { env: {} })));
    expect(err.kind).toBe('invalid-target');
    expect(err.message).toMatch(/use file:\/\/\/abs\/dir, nfs:\/\/host\/export\/path or s3:\/\/bucket\/prefix/);
  }
});

test('an unknown bucket: not-found, permanent, names the bucket', async () => {
  const bucket = `vmbackup-missing-${randomBytes(4).toString('hex')}`;
  const t = openTarget(`s3://${bucket}/x`, { env: s3Env() });
  const listing = await failure(
    (async () => {
      for await (const _ of t.list('')) break;
    })(),
  );
  expect(listing.kind).toBe('not-found');
  expect(listing.permanent).toBe(true);
  expect(listing.message).toMatch(
    new RegExp(`bucket "${bucket}" does not exist; create the bucket or fix the URL\\.$`),
  );
  const put = await failure(t.putImage('web/b/vda.raw', image));
  expect(put.kind).toBe('not-found');
  await t.close();
});

test('wrong credentials: permission, permanent, and neither key id nor secret in the message; nothing written', async () => {
  const good = await s3Target();
  try {
    for (const env of [
      { ...s3Env(), AWS_SECRET_ACCESS_KEY: WRONG_SECRET },
      { ...s3Env(), AWS_ACCESS_KEY_ID: WRONG_KEY_ID, AWS_SECRET_ACCESS_KEY: WRONG_SECRET },
    ] satisfies TargetEnvironment[]) {
      const t = openTarget(good.url, { env, s3: { partSizeMiB: 5 } });
      const put = await failure(t.putImage('web/b/vda.raw', image));
      expect(put.kind).toBe('permission');
      expect(put.permanent).toBe(true);
      expect(put.message).toMatch(/check the S3 credentials/);
      expect((await failure(t.putManifest('web/b/manifest.json', Buffer.from('{}')))).kind).toBe('permission');
      expect((await failure(t.getBuffer('web/b/manifest.json'))).kind).toBe('permission');
      await t.close();
    }
    expect(await good.leftovers()).toEqual([]);
  } finally {
    await good.cleanup();
    await good.target.close();
  }
});

test('unreachable servers: unreachable and transient (a retry may succeed), named in the message', async () => {
  const nfs = openTarget('nfs://127.0.0.1:1/export', { env: {} });
  const n = await failure(nfs.putImage('web/b/vda.raw', image));
  expect(n.kind).toBe('unreachable');
  expect(n.permanent).toBe(false);
  expect(n.message).toMatch(/^NFS target nfs:\/\/127\.0\.0\.1:1\/export is unreachable .*ECONNREFUSED/);
  await nfs.close();

  const s3 = openTarget('s3://vmbackup-test/x', { env: { ...s3Env(), AWS_ENDPOINT_URL: 'http://127.0.0.1:1' } });
  const s = await failure(s3.putManifest('web/b/manifest.json', Buffer.from('{}')));
  expect(s.kind).toBe('unreachable');
  expect(s.permanent).toBe(false);
  expect(s.message).toMatch(/at http:\/\/127\.0\.0\.1:1 is unreachable/);
  await s3.close();
});

test('an NFS export that does not exist: not-found, permanent', async () => {
  const t = openTarget(`nfs://127.0.0.1/no-such-export-${uniqueName('x')}`, { env: {} });
  const err = await failure(t.putManifest('web/b/manifest.json', Buffer.from('{}')));
  expect(err.kind).toBe('not-found');
  expect(err.permanent).toBe(true);
  await t.close();
});

test('activities turn bad input into non-retryable failures and write nothing', async () => {
  const t = await s3Target();
  try {
    const acts = storageActivities();
    const disk = await stageImage('b1', {
      name: 'vda',
      format: 'raw',
      path: image,
      virtualSize: 6 << 20,
      size: 6 << 20,
      sha256: 'a'.repeat(64),
    });
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ backupId: 'b1', domain: '..', target: t.url, disk }, ErrorType.InvalidInput],
      [{ backupId: 'a/../b', domain: 'web', target: t.url, disk }, ErrorType.InvalidInput],
      [{ backupId: 'b1', domain: 'web', target: 'ftp://x', disk }, ErrorType.InvalidTarget],
      // an image this host did not stage for the backup
      [{ backupId: 'b1', domain: 'web', target: t.url, disk: { ...disk, path: image } }, ErrorType.InvalidInput],
      [
        {
          backupId: 'b2',
          domain: 'web',
          target: t.url,
          disk: { ...disk, path: join(testStateDir(), 'staging', 'b2', 'vda.raw') },
        },
        ErrorType.NotFound,
      ],
      // the image on disk is not the one the backup hashed
      [{ backupId: 'b1', domain: 'web', target: t.url, disk }, ErrorType.ChecksumMismatch],
    ];
    for (const [input, type] of cases) {
      const err = await new MockActivityEnvironment()
        .run(acts.shipImage, input as unknown as Parameters<typeof acts.shipImage>[0])
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ApplicationFailure);
      messages.push((err as Error).message);
      expect([(err as ApplicationFailure).type, (err as ApplicationFailure).nonRetryable]).toEqual([type, true]);
    }
    expect(await t.leftovers()).toEqual([]);
  } finally {
    await t.cleanup();
    await t.target.close();
  }
});
