/**
 * S3 target (s3://bucket[/prefix]) over @aws-sdk/client-s3; tested against Ceph radosgw.
 *
 * Images go up as multipart uploads with several parts in flight. The source is read in
 * order, so the whole-image SHA-256 is computed while streaming; each part carries
 * Content-MD5 so the server rejects a damaged part (radosgw ignores the SDK's flexible
 * checksums). The checkpoint is { uploadId, parts done }: a hash state cannot be persisted,
 * so a resume re-reads the prefix locally and sends only parts that ListParts does not show
 * with a matching ETag (the MD5 of the local bytes).
 */
import { createHash } from 'node:crypto';
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import { Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CopyObjectCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  GetObjectLockConfigurationCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectVersionsCommand,
  ListObjectsV2Command,
  ListPartsCommand,
  PutObjectCommand,
  PutObjectRetentionCommand,
  S3Client,
  UploadPartCommand,
  type ObjectLockMode,
  type ServerSideEncryption,
  type StorageClass,
} from '@aws-sdk/client-s3';
import { resolvedLock } from '../../shared/object-lock';
import type { ObjectLockOption, S3TargetOptions } from '../../shared/types';
import type {
  GetBufferOptions,
  ObjectInfo,
  ObjectLockStore,
  ObjectVersion,
  PutCheckpoint,
  PutImageOptions,
  PutBatchedOptions,
  PutImageResult,
  StorageTarget,
  TargetCapabilities,
} from '../contract';
import {
  StorageError,
  adviceFor,
  errnoCode,
  isAbortError,
  kindOfErrno,
  tooLargeError,
  type StorageErrorKind,
} from '../errors';
import { normaliseKey, normalisePrefix } from '../keys';
import { sha256File } from '../../shared/sha256-file';
import { readChunks, sourceSize } from '../source';
import { DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE_MIB, MIN_PART_SIZE_MIB } from './settings';
import type { S3Environment } from './settings';

export { DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE_MIB, MIN_PART_SIZE_MIB };
export type { S3Environment };

const DRIVER = 's3';
const MiB = 1 << 20;
const MAX_PARTS = 10_000;
/** the largest object one CopyObject copies */
const MAX_COPY_BYTES = 5 * 1024 * MiB;

interface DonePart {
  PartNumber: number;
  ETag: string;
  size: number;
}

interface S3Checkpoint {
  uploadId: string;
  key: string;
  partSize: number;
  size: number;
  parts: DonePart[];
}

function asS3Checkpoint(
  cp: PutCheckpoint | undefined,
  key: string,
  partSize: number,
  size: number,
): S3Checkpoint | undefined {
  if (!cp) return undefined;
  const c = cp as Partial<S3Checkpoint>;
  if (typeof c.uploadId !== 'string' || c.key !== key || c.partSize !== partSize || c.size !== size) return undefined;
  if (!Array.isArray(c.parts)) return undefined;
  return c as S3Checkpoint;
}

function unquote(etag: string | undefined): string {
  return (etag ?? '').replace(/^"|"$/g, '').toLowerCase();
}

interface SdkError {
  name?: string;
  Code?: string;
  code?: string;
  $metadata?: { httpStatusCode?: number };
}

export class S3Target implements StorageTarget {
  readonly capabilities: TargetCapabilities = {
    atomicReplace: true,
    multipart: true,
    rangeReads: true,
    signsPayloadHash: true,
  };
  private readonly client: S3Client;
  private readonly bucket: string;
  private readonly prefix: string;
  private readonly endpointDisplay: string;
  private readonly partSize: number;
  private readonly concurrency: number;
  /** the lock every object written gets (`--s3-object-lock`), its date fixed when the target is opened */
  private readonly lock: Required<ObjectLockOption> | undefined;
  private lockEnabled: Promise<boolean> | undefined;
  readonly objectLock: ObjectLockStore;

  constructor(
    spec: { bucket: string; prefix: string },
    readonly displayUrl: string,
    private readonly options: S3TargetOptions,
    env: S3Environment,
  ) {
    this.bucket = spec.bucket;
    this.prefix = spec.prefix;
    const endpoint = env.AWS_ENDPOINT_URL_S3 ?? env.AWS_ENDPOINT_URL;
    this.endpointDisplay = endpoint ? ` at ${endpoint.replace(/\/\/[^/@]*@/, '//')}` : '';
    this.partSize = Math.max(MIN_PART_SIZE_MIB, options.partSizeMiB ?? DEFAULT_PART_SIZE_MIB) * MiB;
    this.concurrency = Math.max(1, Math.floor(options.concurrency ?? DEFAULT_CONCURRENCY));
    this.lock = options.objectLock ? resolvedLock(options.objectLock, new Date()) : undefined;
    this.objectLock = {
      ...(this.lock ? { writeLock: { mode: this.lock.mode, retainUntil: this.lock.retainUntil } } : {}),
      enabled: () => this.bucketLockEnabled(),
      hold: (key) => this.hold(key),
      versions: (prefix) => this.versions(prefix),
      deleteVersion: (key, versionId) => this.deleteVersion(key, versionId),
    };
    const agentOptions = { keepAlive: true, maxSockets: this.concurrency + 4 };
    this.client = new S3Client({
      region: env.AWS_REGION ?? env.AWS_DEFAULT_REGION ?? 'us-east-1',
      ...(endpoint ? { endpoint } : {}),
      // radosgw/MinIO-style servers need path-style addressing; AWS itself prefers virtual hosts
      forcePathStyle: options.forcePathStyle ?? Boolean(endpoint),
      // without these a streamed PutObject gets 411 MissingContentLength from radosgw
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      ...(env.AWS_ACCESS_KEY_ID && env.AWS_SECRET_ACCESS_KEY
        ? {
            credentials: {
              accessKeyId: env.AWS_ACCESS_KEY_ID,
              secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
              ...(env.AWS_SESSION_TOKEN ? { sessionToken: env.AWS_SESSION_TOKEN } : {}),
            },
          }
        : {}),
      ...(env.AWS_PROFILE ? { profile: env.AWS_PROFILE } : {}),
      maxAttempts: 3,
      requestHandler: {
        connectionTimeout: 5_000,
        // no byte in either direction for a minute: a hung server, fail the request (requestTimeout only warns)
        socketTimeout: 60_000,
        httpAgent: new HttpAgent(agentOptions),
        httpsAgent: new HttpsAgent(agentOptions),
      },
    });
  }

  private fullKey(key: string): string {
    const k = normaliseKey(key);
    return this.prefix ? `${this.prefix}/${k}` : k;
  }

  private keyOf(fullKey: string): string | undefined {
    const rel = this.prefix
      ? fullKey.startsWith(`${this.prefix}/`)
        ? fullKey.slice(this.prefix.length + 1)
        : undefined
      : fullKey;
    if (rel === undefined) return undefined;
    try {
      return normaliseKey(rel);
    } catch {
      return undefined; // a foreign object that is not ours to list
    }
  }

  /** One sentence, no credentials: what failed on which target, and what to do. */
  private error(err: unknown, what: string): StorageError {
    if (err instanceof StorageError) return err;
    const e = (typeof err === 'object' && err !== null ? err : {}) as SdkError;
    // network failures arrive as a plain Error whose code (or cause's code) says what happened
    const generic = !e.Code && (!e.name || e.name === 'Error' || e.name === 'TypeError');
    const rawMessage = (e as { message?: unknown }).message;
    const message = typeof rawMessage === 'string' ? (rawMessage.split('\n')[0] ?? '') : '';
    // the SDK may wrap a socket error from another realm into "AWS SDK error wrapper for Error: connect ECONNREFUSED"
    const sysCode =
      errnoCode(err) ??
      errnoCode((err as { cause?: unknown }).cause) ??
      /\b(ECONNREFUSED|ECONNRESET|ETIMEDOUT|EHOSTUNREACH|ENETUNREACH|EPIPE|ENOTFOUND|EAI_AGAIN)\b/.exec(message)?.[1];
    const code = generic
      ? (sysCode ?? (/socket hang up|ECONNRESET/i.test(message) ? 'ECONNRESET' : ''))
      : (e.Code ?? e.name ?? '');
    const status = e.$metadata?.httpStatusCode;
    const where = `S3 target ${this.displayUrl}${this.endpointDisplay}`;
    let kind: StorageErrorKind;
    let sentence: string;
    if (code === 'NoSuchBucket') {
      kind = 'not-found';
      sentence = `${where} could not ${what}: bucket "${this.bucket}" does not exist; create the bucket or fix the URL.`;
    } else if (code === 'NoSuchKey' || code === 'NotFound' || status === 404) {
      kind = 'not-found';
      sentence = `${where} could not ${what}: the object does not exist; ${adviceFor('not-found')}.`;
    } else if (
      [
        'InvalidAccessKeyId',
        'SignatureDoesNotMatch',
        'AccessDenied',
        'Forbidden',
        'ExpiredToken',
        'InvalidToken',
        'CredentialsProviderError',
      ].includes(code) ||
      status === 403
    ) {
      kind = 'permission';
      sentence = `${where} refused to ${what} (${code || 'HTTP 403'}); check the S3 credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile) and the bucket policy.`;
    } else if (code === 'QuotaExceeded' || code === 'EntityTooLarge' || status === 507) {
      kind = 'no-space';
      sentence = `${where} has no room to ${what} (${code}); ${adviceFor('no-space')}.`;
    } else if (kindOfErrno(sysCode ?? code) === 'unreachable' || code === 'TimeoutError' || code === 'RequestTimeout') {
      kind = 'unreachable';
      sentence = `${where} is unreachable while trying to ${what} (${sysCode ?? code}); ${adviceFor('unreachable')}.`;
    } else {
      kind = 'failed';
      const detail = code || (status ? `HTTP ${status}` : message || 'error');
      sentence = `${where} failed to ${what} (${detail}); ${adviceFor('failed')}.`;
    }
    const permanent =
      kind === 'failed'
        ? status !== undefined && status >= 400 && status < 500 && status !== 408 && status !== 429
        : undefined;
    return new StorageError(kind, sentence, {
      driver: DRIVER,
      cause: err,
      ...(permanent !== undefined ? { permanent } : {}),
    });
  }

  async putImage(key: string, sourcePath: string, opts: PutImageOptions = {}): Promise<PutImageResult> {
    const full = this.fullKey(key);
    const size = await sourceSize(sourcePath, key, DRIVER);
    await this.requireObjectLock(`upload ${key}`);
    // S3 allows at most 10000 parts: grow the part size for very large images
    const partSize = Math.max(this.partSize, Math.ceil(size / MAX_PARTS / MiB) * MiB);
    try {
      if (size <= partSize) return await this.putSingle(key, full, sourcePath, size, opts);
      return await this.putMultipart(key, full, sourcePath, size, partSize, opts);
    } catch (err) {
      throw await this.explainUnreachable(err, `upload ${key}`);
    }
  }

  /**
   * A server may answer an upload into a missing bucket with 404 and close the connection while the body is
   * still being sent: the client then sees ECONNRESET/EPIPE, not the 404. Before calling the target unreachable
   * (and retrying for ever), ask whether the bucket exists.
   */
  private async explainUnreachable(err: unknown, what: string): Promise<unknown> {
    if (!(err instanceof StorageError) || err.kind !== 'unreachable') return err;
    try {
      await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }), {
        abortSignal: AbortSignal.timeout(10_000),
      });
      return err;
    } catch (probe) {
      const status = (probe as SdkError).$metadata?.httpStatusCode;
      const code = (probe as SdkError).Code ?? (probe as SdkError).name;
      if (status !== 404 && code !== 'NoSuchBucket' && code !== 'NotFound') return err;
      return new StorageError(
        'not-found',
        `S3 target ${this.displayUrl}${this.endpointDisplay} could not ${what}: bucket "${this.bucket}" does not exist; create the bucket or fix the URL.`,
        { driver: DRIVER, cause: err },
      );
    }
  }

  private storageOptions(): {
    StorageClass?: StorageClass;
    ServerSideEncryption?: ServerSideEncryption;
    ObjectLockMode?: ObjectLockMode;
    ObjectLockRetainUntilDate?: Date;
  } {
    return {
      ...(this.options.storageClass ? { StorageClass: this.options.storageClass as StorageClass } : {}),
      ...(this.options.serverSideEncryption
        ? { ServerSideEncryption: this.options.serverSideEncryption as ServerSideEncryption }
        : {}),
      // every new object (PutObject, CreateMultipartUpload) is locked; Content-MD5, which Object Lock puts need,
      // is on every PutObject and UploadPart already
      ...(this.lock
        ? {
            ObjectLockMode: this.lock.mode.toUpperCase() as ObjectLockMode,
            ObjectLockRetainUntilDate: new Date(this.lock.retainUntil),
          }
        : {}),
    };
  }

  /** GetObjectLockConfiguration, asked once per target: does the bucket have Object Lock enabled? */
  private bucketLockEnabled(): Promise<boolean> {
    this.lockEnabled ??= this.client
      .send(new GetObjectLockConfigurationCommand({ Bucket: this.bucket }))
      .then((out) => out.ObjectLockConfiguration?.ObjectLockEnabled === 'Enabled')
      .catch((err: unknown) => {
        const code = (err as SdkError).Code ?? (err as SdkError).name;
        // radosgw and AWS: the bucket has no Object Lock configuration (it was created without it)
        if (code === 'ObjectLockConfigurationNotFoundError') return false;
        this.lockEnabled = undefined; // a transient failure is asked again
        throw this.error(err, 'read its Object Lock configuration');
      });
    return this.lockEnabled;
  }

  /** With `--s3-object-lock`, nothing is written into a bucket that cannot lock it. */
  private async requireObjectLock(what: string): Promise<void> {
    if (!this.lock || (await this.bucketLockEnabled())) return;
    throw new StorageError(
      'invalid-target',
      `S3 target ${this.displayUrl}${this.endpointDisplay} cannot ${what} with --s3-object-lock: bucket "${this.bucket}" does not have Object Lock enabled, and it can only be enabled when a bucket is created; create a new bucket with \`aws s3api create-bucket --bucket NAME --object-lock-enabled-for-bucket\` and back up there.`,
      { driver: DRIVER, permanent: true },
    );
  }

  /**
   * Makes the current version of `key` retained until at least this target's lock date (PutObjectRetention on
   * that version): radosgw ignores the lock headers of CreateMultipartUpload, and a put that crashed between its
   * completion and its retention left an unlocked object. Extending a retention needs no bypass permission.
   */
  private async hold(key: string): Promise<void> {
    const lock = this.lock;
    if (!lock) return;
    let head;
    try {
      head = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.fullKey(key) }));
    } catch (err) {
      throw this.error(err, `stat ${key}`);
    }
    await this.holdVersion(key, head.VersionId, head.ObjectLockRetainUntilDate, head.ObjectLockMode);
  }

  private async holdVersion(
    key: string,
    versionId: string | undefined,
    until: Date | undefined,
    mode: string | undefined,
  ): Promise<void> {
    const lock = this.lock;
    if (!lock) return;
    const wanted = new Date(lock.retainUntil);
    if (until && until.getTime() >= wanted.getTime() && (mode === 'COMPLIANCE' || lock.mode === 'governance')) return;
    try {
      await this.client.send(
        new PutObjectRetentionCommand({
          Bucket: this.bucket,
          Key: this.fullKey(key),
          ...(versionId ? { VersionId: versionId } : {}),
          Retention: { Mode: lock.mode.toUpperCase() as ObjectLockMode, RetainUntilDate: wanted },
        }),
      );
    } catch (err) {
      throw this.error(err, `lock ${key} until ${lock.retainUntil}`);
    }
  }

  /**
   * Every version and delete marker of the objects under `prefix`, each version with its retention date
   * (ListObjectVersions does not carry it: one HeadObject per version).
   */
  private async versions(prefix: string): Promise<ObjectVersion[]> {
    const p = normalisePrefix(prefix);
    const full = this.prefix ? `${this.prefix}/${p}` : p;
    const out: ObjectVersion[] = [];
    let keyMarker: string | undefined;
    let versionMarker: string | undefined;
    for (;;) {
      let page;
      try {
        page = await this.client.send(
          new ListObjectVersionsCommand({
            Bucket: this.bucket,
            ...(full ? { Prefix: full } : {}),
            ...(keyMarker ? { KeyMarker: keyMarker } : {}),
            ...(versionMarker ? { VersionIdMarker: versionMarker } : {}),
          }),
        );
      } catch (err) {
        throw this.error(err, 'list object versions');
      }
      for (const m of page.DeleteMarkers ?? []) {
        const key = m.Key ? this.keyOf(m.Key) : undefined;
        if (key !== undefined && m.VersionId) out.push({ key, versionId: m.VersionId, deleteMarker: true });
      }
      for (const v of page.Versions ?? []) {
        const key = v.Key ? this.keyOf(v.Key) : undefined;
        if (key === undefined || !v.VersionId) continue;
        let head;
        try {
          head = await this.client.send(
            new HeadObjectCommand({ Bucket: this.bucket, Key: this.fullKey(key), VersionId: v.VersionId }),
          );
        } catch (err) {
          throw this.error(err, `stat version ${v.VersionId} of ${key}`);
        }
        out.push({
          key,
          versionId: v.VersionId,
          deleteMarker: false,
          ...(head.ObjectLockRetainUntilDate ? { retainUntil: head.ObjectLockRetainUntilDate } : {}),
        });
      }
      if (!page.IsTruncated) return out;
      keyMarker = page.NextKeyMarker;
      versionMarker = page.NextVersionIdMarker;
    }
  }

  /** Removes one version (or delete marker) for good; a version still retained fails with kind 'permission'. */
  private async deleteVersion(key: string, versionId: string): Promise<void> {
    try {
      await this.client.send(
        new DeleteObjectCommand({ Bucket: this.bucket, Key: this.fullKey(key), VersionId: versionId }),
      );
    } catch (err) {
      if ((err as SdkError).$metadata?.httpStatusCode === 404 && (err as SdkError).name !== 'NoSuchBucket') return;
      throw this.error(err, `delete version ${versionId} of ${key}`);
    }
  }

  private checksumError(key: string, got: string, expected: string): StorageError {
    return new StorageError(
      'checksum',
      `Uploading ${key} to ${this.displayUrl} read bytes with SHA-256 ${got} but ${expected} was expected; the source changed or is corrupt, run the backup again.`,
      { driver: DRIVER },
    );
  }

  /** One PutObject: atomic by itself, nothing to resume. */
  private async putSingle(
    key: string,
    full: string,
    sourcePath: string,
    size: number,
    opts: PutImageOptions,
  ): Promise<PutImageResult> {
    const chunks: Buffer[] = [];
    for await (const chunk of readChunks(sourcePath, {
      end: size,
      chunkSize: size || 1,
      signal: opts.signal,
      pace: opts.pace,
    }))
      chunks.push(chunk);
    const body = Buffer.concat(chunks, size);
    const sha256 = createHash('sha256').update(body).digest('hex');
    const expected = opts.metadata?.sha256;
    if (expected && expected !== sha256) throw this.checksumError(key, sha256, expected);
    try {
      await this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: full,
          Body: body,
          ContentLength: size,
          ContentMD5: createHash('md5').update(body).digest('base64'),
          ContentType: 'application/octet-stream',
          Metadata: { ...opts.metadata, sha256 },
          ...this.storageOptions(),
        }),
        { abortSignal: opts.signal },
      );
    } catch (err) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      throw this.error(err, `upload ${key}`);
    }
    opts.onProgress?.(size, size);
    return { key: normaliseKey(key), size, sha256, bytesSent: size };
  }

  private async putMultipart(
    key: string,
    full: string,
    sourcePath: string,
    size: number,
    partSize: number,
    opts: PutImageOptions,
  ): Promise<PutImageResult> {
    // x-amz-meta-* is fixed when the upload is created, so the digest must be known first:
    // callers pass it (the backup computed it); otherwise hash the source once beforehand.
    const expected = opts.metadata?.sha256 ?? (await sha256File(sourcePath, { signal: opts.signal }));
    const metadata = { ...opts.metadata, sha256: expected };
    const signal = opts.signal;

    let uploadId: string | undefined;
    const onServer = new Map<number, { etag: string; size: number }>();
    const resume = asS3Checkpoint(opts.resume, full, partSize, size);
    if (resume) {
      try {
        for (const p of await this.listParts(full, resume.uploadId, signal))
          onServer.set(p.PartNumber, { etag: unquote(p.ETag), size: p.size });
        uploadId = resume.uploadId;
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        if ((err as SdkError).Code !== 'NoSuchUpload' && (err as SdkError).name !== 'NoSuchUpload')
          throw this.error(err, `resume the upload of ${key}`);
        // the upload was completed or aborted meanwhile: start a new one
      }
    }
    if (!uploadId) {
      try {
        const created = await this.client.send(
          new CreateMultipartUploadCommand({
            Bucket: this.bucket,
            Key: full,
            ContentType: 'application/octet-stream',
            Metadata: metadata,
            ...this.storageOptions(),
          }),
          { abortSignal: signal },
        );
        if (!created.UploadId) throw new Error('CreateMultipartUpload returned no UploadId');
        uploadId = created.UploadId;
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        throw this.error(err, `start the upload of ${key}`);
      }
    }
    const id = uploadId;
    const done: DonePart[] = [];
    const checkpoint = (): void =>
      opts.onCheckpoint?.({
        uploadId: id,
        key: full,
        partSize,
        size,
        parts: [...done].sort((a, b) => a.PartNumber - b.PartNumber),
      } satisfies S3Checkpoint);
    checkpoint();

    let bytesDone = 0;
    let bytesSent = 0;
    const inFlight = new Set<Promise<void>>();
    let failure: unknown;
    const hash = createHash('sha256');
    try {
      let partNumber = 0;
      for await (const chunk of readChunks(sourcePath, { end: size, chunkSize: partSize, signal, pace: opts.pace })) {
        partNumber += 1;
        hash.update(chunk);
        const md5 = createHash('md5').update(chunk);
        const md5hex = md5.copy().digest('hex');
        const have = onServer.get(partNumber);
        if (have && have.size === chunk.length && have.etag === md5hex) {
          done.push({ PartNumber: partNumber, ETag: have.etag, size: chunk.length });
          bytesDone += chunk.length;
          opts.onProgress?.(bytesDone, size);
          continue;
        }
        while (inFlight.size >= this.concurrency) await Promise.race(inFlight);
        if (failure) throw failure;
        const n = partNumber;
        const p: Promise<void> = this.client
          .send(
            new UploadPartCommand({
              Bucket: this.bucket,
              Key: full,
              UploadId: id,
              PartNumber: n,
              Body: chunk,
              ContentLength: chunk.length,
              ContentMD5: md5.digest('base64'),
            }),
            { abortSignal: signal },
          )
          .then((out) => {
            done.push({ PartNumber: n, ETag: unquote(out.ETag) || md5hex, size: chunk.length });
            bytesDone += chunk.length;
            bytesSent += chunk.length;
            opts.onProgress?.(bytesDone, size);
            checkpoint();
          })
          .catch((err: unknown) => {
            failure ??= err;
          })
          .finally(() => inFlight.delete(p));
        inFlight.add(p);
      }
      await Promise.all(inFlight);
      if (failure) throw failure;
      const sha256 = hash.digest('hex');
      if (sha256 !== expected) throw this.checksumError(key, sha256, expected);
      await this.client.send(
        new CompleteMultipartUploadCommand({
          Bucket: this.bucket,
          Key: full,
          UploadId: id,
          MultipartUpload: {
            Parts: [...done]
              .sort((a, b) => a.PartNumber - b.PartNumber)
              .map((d) => ({ PartNumber: d.PartNumber, ETag: `"${d.ETag}"` })),
          },
        }),
        { abortSignal: signal },
      );
      // radosgw answers Complete with an empty ETag: confirm with HeadObject instead
      const head = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: full }), {
        abortSignal: signal,
      });
      if (head.ContentLength !== size || head.Metadata?.sha256 !== sha256) {
        throw new StorageError(
          'checksum',
          `S3 target ${this.displayUrl} stored ${key} with ${head.ContentLength} bytes and SHA-256 ${head.Metadata?.sha256 ?? 'none'} instead of ${size} bytes and ${sha256}; run the backup again.`,
          { driver: DRIVER },
        );
      }
      // radosgw completes an upload created with lock headers into an unlocked object: lock that version now
      await this.holdVersion(key, head.VersionId, head.ObjectLockRetainUntilDate, head.ObjectLockMode);
      return { key: normaliseKey(key), size, sha256, bytesSent };
    } catch (err) {
      await Promise.allSettled(inFlight);
      const aborted = signal?.aborted || isAbortError(err);
      const classified = aborted ? undefined : this.error(err, `upload ${key}`);
      // keep the upload for a resume unless this attempt is final
      if (aborted || classified?.permanent) await this.abortUpload(full, id);
      if (aborted) throw signal?.reason ?? err;
      throw classified;
    }
  }

  private async abortUpload(full: string, uploadId: string): Promise<void> {
    await this.client
      .send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: full, UploadId: uploadId }))
      .catch(() => undefined);
  }

  private async listParts(full: string, uploadId: string, signal?: AbortSignal): Promise<DonePart[]> {
    const parts: DonePart[] = [];
    let marker: string | undefined;
    for (;;) {
      const out = await this.client.send(
        new ListPartsCommand({
          Bucket: this.bucket,
          Key: full,
          UploadId: uploadId,
          ...(marker ? { PartNumberMarker: marker } : {}),
        }),
        { abortSignal: signal },
      );
      for (const p of out.Parts ?? []) {
        if (p.PartNumber && p.ETag) parts.push({ PartNumber: p.PartNumber, ETag: p.ETag, size: p.Size ?? 0 });
      }
      if (!out.IsTruncated || !out.NextPartNumberMarker) return parts;
      marker = out.NextPartNumberMarker;
    }
  }

  async putManifest(key: string, body: Buffer, opts: PutBatchedOptions = {}): Promise<void> {
    await this.requireObjectLock(`write ${key}`);
    try {
      const command = new PutObjectCommand({
        Bucket: this.bucket,
        Key: this.fullKey(key),
        Body: body,
        ContentLength: body.length,
        // the SDK signs a buffer body's SHA-256 (SigV4 x-amz-content-sha256), which the server checks: Content-MD5
        // would check the same bytes again. It is sent only where Object Lock requires it. Measured on a pull of
        // 2 GiB into an S3 chunk repository: MD5 was 19% of the worker's CPU, all on its main thread.
        ...(this.lock ? { ContentMD5: createHash('md5').update(body).digest('base64') } : {}),
        ContentType: 'application/json',
        ...this.storageOptions(),
      });
      const sha256 = opts.sha256;
      if (sha256 !== undefined) {
        if (!/^[0-9a-f]{64}$/.test(sha256)) throw new TypeError(`not a hex SHA-256: ${JSON.stringify(sha256)}`);
        // SigV4 signs the payload hash this header carries instead of hashing the body again (on this thread); the
        // server hashes what it receives and refuses the put when the two differ (XAmzContentSHA256Mismatch)
        command.middlewareStack.add(
          (next) => async (args) => {
            const request = args.request as { headers?: Record<string, string> };
            if (request.headers) request.headers['x-amz-content-sha256'] = sha256;
            return next(args);
          },
          { step: 'build', name: 'vmbackupPayloadSha256' },
        );
      }
      await this.client.send(command);
    } catch (err) {
      throw this.error(err, `write ${key}`);
    }
  }

  /** A PUT is durable when S3 answers: the same as putManifest (with the body's SHA-256 when the caller has it). */
  putBatched(key: string, body: Buffer, opts?: PutBatchedOptions): Promise<void> {
    return this.putManifest(key, body, opts);
  }

  /** Nothing to do: every put was durable when it returned. */
  flush(): Promise<void> {
    return Promise.resolve();
  }

  async get(key: string, range?: { start: number; end: number }): Promise<Readable> {
    const full = this.fullKey(key);
    if (range && range.end <= range.start) {
      if (!(await this.stat(key))) throw this.error({ name: 'NoSuchKey' }, `read ${key}`);
      return Readable.from([]);
    }
    try {
      const out = await this.client.send(
        new GetObjectCommand({
          Bucket: this.bucket,
          Key: full,
          ...(range ? { Range: `bytes=${range.start}-${range.end - 1}` } : {}),
        }),
      );
      return out.Body as Readable;
    } catch (err) {
      throw this.error(err, `read ${key}`);
    }
  }

  async getBuffer(key: string, opts: GetBufferOptions = {}): Promise<Buffer> {
    const { maxBytes } = opts;
    try {
      const out = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.fullKey(key) }));
      if (maxBytes === undefined) {
        return Buffer.from(await (out.Body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray());
      }
      const body = out.Body as Readable;
      // refused on the announced length without reading, and on what actually arrives (a server may lie)
      if ((out.ContentLength ?? 0) > maxBytes) {
        body.destroy();
        throw tooLargeError(key, this.displayUrl, maxBytes, DRIVER);
      }
      const parts: Buffer[] = [];
      let total = 0;
      for await (const chunk of body as AsyncIterable<Buffer>) {
        total += chunk.length;
        if (total > maxBytes) {
          body.destroy();
          throw tooLargeError(key, this.displayUrl, maxBytes, DRIVER);
        }
        parts.push(chunk);
      }
      return Buffer.concat(parts, total);
    } catch (err) {
      throw this.error(err, `read ${key}`);
    }
  }

  async checkLocation(): Promise<void> {
    try {
      await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
    } catch (err) {
      const status = (err as SdkError).$metadata?.httpStatusCode;
      const code = (err as SdkError).Code ?? (err as SdkError).name;
      if (status === 404 || code === 'NoSuchBucket' || code === 'NotFound') {
        throw new StorageError(
          'not-found',
          `S3 target ${this.displayUrl}${this.endpointDisplay} does not exist: bucket "${this.bucket}" does not exist; create the bucket or fix the URL.`,
          { driver: DRIVER, cause: err },
        );
      }
      throw this.error(err, 'look at its bucket');
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    try {
      const out = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.fullKey(key) }));
      return {
        key: normaliseKey(key),
        size: out.ContentLength ?? 0,
        modified: out.LastModified ?? new Date(0),
        ...(out.Metadata && Object.keys(out.Metadata).length > 0 ? { metadata: out.Metadata } : {}),
        ...(out.ObjectLockRetainUntilDate ? { retainUntil: out.ObjectLockRetainUntilDate } : {}),
      };
    } catch (err) {
      const e = err as SdkError;
      if (e.$metadata?.httpStatusCode === 404 || e.name === 'NotFound' || e.name === 'NoSuchKey') return undefined;
      throw this.error(err, `stat ${key}`);
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const p = normalisePrefix(prefix);
    const full = this.prefix ? `${this.prefix}/${p}` : p;
    let token: string | undefined;
    do {
      let out;
      try {
        out = await this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            ...(full ? { Prefix: full } : {}),
            ...(token ? { ContinuationToken: token } : {}),
          }),
        );
      } catch (err) {
        throw this.error(err, 'list objects');
      }
      for (const o of out.Contents ?? []) {
        const key = o.Key ? this.keyOf(o.Key) : undefined;
        if (key === undefined) continue;
        yield { key, size: o.Size ?? 0, modified: o.LastModified ?? new Date(0) };
      }
      token = out.IsTruncated ? out.NextContinuationToken : undefined;
    } while (token);
  }

  async *listTop(): AsyncIterable<string> {
    const base = this.prefix ? `${this.prefix}/` : '';
    const names = new Set<string>();
    let token: string | undefined;
    do {
      let out;
      try {
        out = await this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Delimiter: '/',
            ...(base ? { Prefix: base } : {}),
            ...(token ? { ContinuationToken: token } : {}),
          }),
        );
      } catch (err) {
        throw this.error(err, 'list objects');
      }
      for (const cp of out.CommonPrefixes ?? []) {
        const name = cp.Prefix?.slice(base.length, -1);
        // the same rule as list(): a name no key can have is someone else's, not ours
        if (name && this.keyOf(`${base}${name}/x`) !== undefined) names.add(name);
      }
      for (const o of out.Contents ?? []) {
        const key = o.Key ? this.keyOf(o.Key) : undefined;
        if (key !== undefined) names.add(key);
      }
      token = out.IsTruncated ? out.NextContinuationToken : undefined;
    } while (token);
    yield* [...names].sort();
  }

  async removeUnfinished(prefix: string): Promise<number> {
    const p = normalisePrefix(prefix);
    const full = this.prefix ? `${this.prefix}/${p}` : p;
    let removed = 0;
    let keyMarker: string | undefined;
    let uploadIdMarker: string | undefined;
    for (;;) {
      let out;
      try {
        out = await this.client.send(
          new ListMultipartUploadsCommand({
            Bucket: this.bucket,
            ...(full ? { Prefix: full } : {}),
            ...(keyMarker ? { KeyMarker: keyMarker } : {}),
            ...(uploadIdMarker ? { UploadIdMarker: uploadIdMarker } : {}),
          }),
        );
      } catch (err) {
        throw this.error(err, 'list unfinished uploads');
      }
      for (const u of out.Uploads ?? []) {
        if (!u.Key || !u.UploadId) continue;
        try {
          await this.client.send(
            new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: u.Key, UploadId: u.UploadId }),
          );
          removed++;
        } catch (err) {
          if ((err as SdkError).name === 'NoSuchUpload') continue;
          throw this.error(err, `abort the unfinished upload of ${this.keyOf(u.Key) ?? u.Key}`);
        }
      }
      if (!out.IsTruncated) return removed;
      keyMarker = out.NextKeyMarker;
      uploadIdMarker = out.NextUploadIdMarker;
    }
  }

  /**
   * S3 has no "set mtime": an object's LastModified changes only when it is written. A copy onto itself with
   * MetadataDirective REPLACE is a write without sending the bytes (S3 refuses a self-copy that changes nothing);
   * the object's metadata, content type, storage class and encryption are given again so they stay. CopySourceIfMatch
   * makes the copy fail rather than stamp another object's metadata onto one replaced between HEAD and COPY; that
   * race is retried. A single CopyObject takes at most 5 GiB: larger objects (never a chunk or an index) are refused.
   */
  async touch(key: string): Promise<void> {
    const full = this.fullKey(key);
    const source = `${this.bucket}/${full.split('/').map(encodeURIComponent).join('/')}`;
    for (let attempt = 1; ; attempt++) {
      let head;
      try {
        head = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: full }));
      } catch (err) {
        throw this.error(err, `touch ${key}`);
      }
      if ((head.ContentLength ?? 0) > MAX_COPY_BYTES)
        throw new StorageError(
          'failed',
          `S3 target ${this.displayUrl} cannot touch ${key}: it is larger than the 5 GiB one CopyObject takes.`,
          { driver: DRIVER, permanent: true },
        );
      try {
        await this.client.send(
          new CopyObjectCommand({
            Bucket: this.bucket,
            Key: full,
            CopySource: source,
            ...(head.ETag ? { CopySourceIfMatch: head.ETag } : {}),
            MetadataDirective: 'REPLACE',
            Metadata: head.Metadata ?? {},
            ...(head.ContentType ? { ContentType: head.ContentType } : {}),
            ...(head.StorageClass
              ? { StorageClass: head.StorageClass as StorageClass }
              : this.options.storageClass
                ? { StorageClass: this.options.storageClass as StorageClass }
                : {}),
            ...(head.ServerSideEncryption
              ? { ServerSideEncryption: head.ServerSideEncryption }
              : this.options.serverSideEncryption
                ? { ServerSideEncryption: this.options.serverSideEncryption as ServerSideEncryption }
                : {}),
            ...(head.SSEKMSKeyId ? { SSEKMSKeyId: head.SSEKMSKeyId } : {}),
          }),
        );
        return;
      } catch (err) {
        const e = err as SdkError;
        const replaced = e.$metadata?.httpStatusCode === 412 || e.name === 'PreconditionFailed';
        if (replaced && attempt < 3) continue;
        throw this.error(err, `touch ${key}`);
      }
    }
  }

  async delete(key: string): Promise<void> {
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.fullKey(key) }));
    } catch (err) {
      if ((err as SdkError).$metadata?.httpStatusCode === 404 && (err as SdkError).name !== 'NoSuchBucket') return;
      throw this.error(err, `delete ${key}`);
    }
  }

  async close(): Promise<void> {
    this.client.destroy();
  }
}
