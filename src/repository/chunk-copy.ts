/**
 * copy where a chunk repository is the source or the destination (docs/chunk-format.md, "Copying"):
 *
 * - chunk -> chunk, the same repository (same id and the same master keys, e.g. a copied bucket): the chunk and index
 *   objects the destination lacks are copied byte for byte (each authenticated with the repository's key first), the
 *   manifest last, as stored (its signatures stay valid).
 * - chunk -> chunk, another repository: each chunk's plaintext is read (verified) and `put` into the destination's
 *   ChunkStore, which uploads only what it lacks (ids differ per repository key); the destination's indexes and small
 *   files are built there and a version-3 manifest with the destination's repository section, signed with its
 *   authentication key (and the user key when configured), is written last.
 * - chunk -> image tree: the backup is restored (restore's own trust checks) to qcow2 files in a work directory and
 *   shipped as a full (version-2 manifest, last).
 * - image tree -> chunk: the backup is restored (its chain built from the manifests, each link's SHA-256 checked, as
 *   restore does) to sparse raw files in a work directory and stored into the destination repository.
 *
 * Both repositories are opened (passwords checked) before anything is written. A destination that holds the backup's
 * manifest already is done (the manifest is written last); one that does not trust it is refused, never overwritten.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import type { StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import {
  imageKey,
  manifestKey as manifestKeyOf,
  vmFileKey,
  VM_NVRAM_NAME,
  VM_TPM_PREFIX,
  VM_XML_NAME,
} from '../storage/keys';
import { MAX_MANIFEST_BYTES, type BackupEntry } from './catalog';
import { openChunkBackup, readChunkVmFile, type PasswordSource } from './chunk-read';
import {
  CONFIG_KEY,
  ChunkStore,
  SMALL_OBJECT_MAX_BYTES,
  chunkKey,
  decodeDiskIndex,
  decodeObject,
  indexKey,
  maxObjectBytes,
  openRepository,
  parseRepositoryConfig,
  putSmallFile,
  type DiskIndex,
  type IndexEntry,
  type OpenRepository,
  type StoreStats,
} from './chunks';
import type { CopyOptions, CopyReport } from './copy';
import { hashFile } from './local-copy';
import {
  buildManifest,
  encodeManifest,
  hasRepositorySignature,
  isChunkManifest,
  manifestVmFiles,
  readManifest,
  signManifest,
  signRepositoryManifest,
  type Manifest,
  type ManifestInput,
  type ManifestVm,
  type ManifestVmFile,
} from './manifest';
import { restoreBackup } from './restore';

function fail(kind: 'checksum' | 'failed', message: string): StorageError {
  return new StorageError(kind, message, { driver: 'catalog', permanent: true });
}

function newReport(from: StorageTarget, to: StorageTarget, backupId: string): CopyReport {
  return { backupId, from: from.displayUrl, to: to.displayUrl, copied: [], skipped: [], links: [] };
}

/** Opens the destination repository with the destination's password (asked only when it is encrypted). */
async function openDestination(to: StorageTarget, password: PasswordSource | undefined): Promise<OpenRepository> {
  const config = parseRepositoryConfig(
    await to.getBuffer(CONFIG_KEY, { maxBytes: SMALL_OBJECT_MAX_BYTES }),
    to.displayUrl,
  );
  return openRepository(to, await password?.(config.encryption !== 'none'));
}

/** The same repository: the same id and the same master keys (a config copied with other keys is another one). */
function sameRepository(a: OpenRepository, b: OpenRepository): boolean {
  if (a.config.repositoryId !== b.config.repositoryId) return false;
  if (!a.keys || !b.keys) return !a.keys && !b.keys;
  const eq = (x: Buffer, y: Buffer) => x.length === y.length && timingSafeEqual(x, y);
  return eq(a.keys.encKey, b.keys.encKey) && eq(a.keys.idKey, b.keys.idKey) && eq(a.keys.authKey, b.keys.authKey);
}

/**
 * Whether the destination holds this backup already. Its manifest is written last, so one the destination trusts
 * means the copy is complete; one it does not trust (unsigned in an encrypted repository, another repository's, or
 * an image tree's whose images are not there) is someone else's and is refused, never overwritten.
 */
async function destinationHas(
  to: StorageTarget,
  key: string,
  backupId: string,
  repo: OpenRepository | undefined,
  manifestKey: Buffer | undefined,
): Promise<boolean> {
  if (!(await to.stat(key))) return false;
  const refuse = (why: string) =>
    fail(
      'checksum',
      `${to.displayUrl} already holds a manifest for backup ${backupId} (${key}) that ${why}; it was not written by this copy, so it is left alone: remove it or copy elsewhere.`,
    );
  const body = await to.getBuffer(key, { maxBytes: MAX_MANIFEST_BYTES });
  let m: Manifest;
  try {
    m = readManifest(body, `${to.displayUrl}/${key}`, manifestKey ? { manifestKey } : {}).manifest;
  } catch (err) {
    throw refuse(`cannot be read (${(err as Error).message.replace(/\.$/, '')})`);
  }
  if (m.backupId !== backupId) throw refuse('names another backup');
  if (repo) {
    if (!isChunkManifest(m) || m.repository.id !== repo.config.repositoryId)
      throw refuse('does not belong to the chunk repository there');
    if (repo.keys && !hasRepositorySignature(body, repo.keys.authKey))
      throw refuse("is not signed with that repository's key");
    return true;
  }
  for (const d of m.disks) {
    const there = await to.stat(d.key);
    if (!there || there.size !== d.size || there.metadata?.sha256 !== d.sha256)
      throw refuse(`names image ${d.key}, which is not there as recorded`);
  }
  return true;
}

/** The fields of the source manifest a copy keeps (who, when, how); chain, disks, files and signatures are its own. */
function copiedFields(m: Manifest): Omit<ManifestInput, 'disks'> & { backupId: string; domain: string } {
  const {
    version: _v,
    chain: _c,
    disks: _d,
    vm: _vm,
    repository: _r,
    signature: _s,
    repositorySignature: _rs,
    objectLock: _ol,
    ...rest
  } = m as Manifest & Record<string, unknown>;
  return rest as unknown as Omit<ManifestInput, 'disks'> & { backupId: string; domain: string };
}

/** `vm` with each file replaced by what `store` made of it (the file's name, its kind and its entry in). */
async function mapVm(
  vm: ManifestVm | undefined,
  store: (f: ManifestVmFile, name: string, maxBytes: number) => Promise<{ key: string; size: number; sha256: string }>,
): Promise<ManifestVm | undefined> {
  if (!vm) return undefined;
  const entries = manifestVmFiles({ vm });
  const at = (k: string) => entries.find((e) => e.key === k)!;
  const one = async <F extends ManifestVmFile>(f: F, name: string): Promise<F> => ({
    ...f,
    ...(await store(f, name, at(f.key).maxBytes)),
  });
  return {
    ...vm,
    xml: await one(vm.xml, VM_XML_NAME),
    ...(vm.nvram ? { nvram: await one(vm.nvram, VM_NVRAM_NAME) } : {}),
    ...(vm.tpm
      ? {
          tpm: {
            ...vm.tpm,
            files: await Promise.all(vm.tpm.files.map((f) => one(f, `${VM_TPM_PREFIX}${basename(f.path)}`))),
          },
        }
      : {}),
  };
}

/** Writes the destination's version-3 manifest, signed with its key (and the user's), last. */
async function commitChunkManifest(
  dst: OpenRepository,
  input: ManifestInput & { backupId: string },
  manifestKey: Buffer | undefined,
  report: CopyReport,
): Promise<void> {
  let manifest = buildManifest({
    ...input,
    chain: { level: 'full', base: input.backupId },
    repository: {
      id: dst.config.repositoryId,
      chunkSize: dst.config.chunkSize,
      encryption: dst.config.encryption,
      compression: dst.config.compression,
    },
  });
  if (dst.keys) manifest = signRepositoryManifest(manifest, dst.keys.authKey);
  if (manifestKey) manifest = signManifest(manifest, manifestKey);
  const key = manifestKeyOf(manifest.domain, manifest.backupId);
  await dst.target.putManifest(key, encodeManifest(manifest));
  report.copied.push(key);
}

// ------------------------------------------------------------------------------------------ chunk -> chunk

/** Copies the chunk backup `entry` from the chunk repository on `from` into the one on `to`. */
export async function copyChunkToChunk(
  from: StorageTarget,
  to: StorageTarget,
  entry: Pick<BackupEntry, 'manifest' | 'body'>,
  opts: CopyOptions,
): Promise<CopyReport> {
  const m = entry.manifest;
  const src = await openChunkBackup(from, entry, { ...(opts.password ? { password: opts.password } : {}) });
  const dstRepo = await openDestination(to, opts.toPassword);
  const report = newReport(from, to, m.backupId);
  const same = sameRepository(src.repo, dstRepo);
  if (await skippedAsPresent(to, m, 'full', dstRepo, opts, report)) return report;
  // a chunk is moved whole: both repositories must cut disks the same way (checked before anything is written)
  if (!same && dstRepo.config.chunkSize !== src.repo.config.chunkSize)
    throw fail(
      'failed',
      `Cannot copy backup ${m.backupId} into ${to.displayUrl}: its chunk repository stores ${dstRepo.config.chunkSize}-byte chunks, the one on ${from.displayUrl} ${src.repo.config.chunkSize}-byte chunks; nothing was written (copy into a repository with the same chunk size).`,
    );
  const dst = new ChunkStore(dstRepo);
  if (same) await copySameRepository(src, dst, entry, report, opts);
  else await copyAcrossRepositories(src, dst, m, report, opts);
  report.links.push({ backupId: m.backupId, level: 'full', action: 'copied' });
  return report;
}

/** Reads an object's stored bytes from the source and checks them with the repository's key. */
async function readVerified(src: ChunkStore, type: 'chunk' | 'index', id: string): Promise<Buffer> {
  const key = type === 'chunk' ? chunkKey(id) : indexKey(id);
  const body = await src.repo.target.getBuffer(key, { maxBytes: maxObjectBytes(src.repo, type) });
  decodeObject(src.repo, type, id, body);
  return body;
}

async function copySameRepository(
  src: ChunkStore,
  dst: ChunkStore,
  entry: Pick<BackupEntry, 'manifest' | 'body'>,
  report: CopyReport,
  opts: CopyOptions,
): Promise<void> {
  const m = entry.manifest;
  const indexIds = [...new Set([...m.disks.map((d) => d.sha256), ...manifestVmFiles(m).map((f) => f.sha256)])];
  for (const id of indexIds) {
    const indexBody = await readVerified(src, 'index', id);
    const index = decodeDiskIndex(decodeObject(src.repo, 'index', id, indexBody));
    const ids = [...new Set(index.entries.filter((e): e is string => e !== 'zero'))];
    await inPool(ids, src.concurrency, async (chunk) => {
      opts.signal?.throwIfAborted();
      if (await dst.has(chunk)) {
        report.skipped.push(chunkKey(chunk));
        return;
      }
      await dst.repo.target.putBatched(chunkKey(chunk), await readVerified(src, 'chunk', chunk));
      report.copied.push(chunkKey(chunk));
    });
    // the index after its chunks, durable: an index there always has every chunk it names
    await dst.repo.target.flush();
    const ik = indexKey(id);
    if (await dst.repo.target.stat(ik)) report.skipped.push(ik);
    else {
      await dst.repo.target.putManifest(ik, indexBody);
      report.copied.push(ik);
    }
  }
  const key = manifestKeyOf(m.domain, m.backupId);
  await dst.repo.target.putManifest(key, entry.body);
  report.copied.push(key);
}

async function copyAcrossRepositories(
  src: ChunkStore,
  dst: ChunkStore,
  m: Manifest,
  report: CopyReport,
  opts: CopyOptions,
): Promise<void> {
  const disks = [];
  // the same source chunk is read and stored once per run
  const mapped = new Map<string, IndexEntry>();
  for (const d of m.disks) {
    const index = await src.getIndex(d.sha256);
    if (index.virtualSize !== d.virtualSize)
      throw fail(
        'checksum',
        `Cannot copy disk ${d.name} of backup ${m.backupId}: its index holds ${index.virtualSize} bytes where the manifest says ${d.virtualSize}; run verify on ${src.repo.where}.`,
      );
    const { index: out, stats } = await recodeDisk(src, dst, index, mapped, opts);
    const id = await dst.putIndex(out);
    const ik = indexKey(id);
    (stats.uploadedChunks > 0 ? report.copied : report.skipped).push(ik);
    disks.push({
      name: d.name,
      format: 'chunks',
      virtualSize: out.virtualSize,
      size: stats.uploadedBytes,
      sha256: id,
      key: ik,
      chunks: {
        chunkSize: out.chunkSize,
        count: out.entries.length,
        zeroChunks: stats.zeroChunks,
        uploadedChunks: stats.uploadedChunks,
      },
    });
  }
  const vm = await mapVm(m.vm, async (f, _name, maxBytes) => {
    const body = await readChunkVmFile(src, {
      name: _name,
      kind: 'xml',
      key: f.key,
      size: f.size,
      sha256: f.sha256,
      maxBytes,
    });
    const put = await putSmallFile(dst, body);
    (put.stats.uploadedChunks > 0 ? report.copied : report.skipped).push(put.key);
    return { key: put.key, size: put.size, sha256: put.sha256 };
  });
  await commitChunkManifest(dst.repo, { ...copiedFields(m), disks, ...(vm ? { vm } : {}) }, opts.manifestKey, report);
}

/**
 * The destination's index of a source disk: each distinct chunk's plaintext read from the source (verified) and put
 * into the destination, which uploads it only when it lacks it.
 */
async function recodeDisk(
  src: ChunkStore,
  dst: ChunkStore,
  index: DiskIndex,
  mapped: Map<string, IndexEntry>,
  opts: CopyOptions,
): Promise<{ index: DiskIndex; stats: StoreStats }> {
  const stats: StoreStats = {
    chunks: index.entries.length,
    zeroChunks: 0,
    knownChunks: 0,
    uploadedChunks: 0,
    uploadedBytes: 0,
  };
  const ids = [...new Set(index.entries.filter((e): e is string => e !== 'zero'))].filter((id) => !mapped.has(id));
  await inPool(ids, src.concurrency, async (id) => {
    opts.signal?.throwIfAborted();
    const put = await dst.put(await src.get(id));
    mapped.set(id, put.id);
    if (put.uploadedBytes > 0) {
      stats.uploadedChunks++;
      stats.uploadedBytes += put.uploadedBytes;
    } else stats.knownChunks++;
  });
  const entries = index.entries.map((e) => (e === 'zero' ? 'zero' : (mapped.get(e) as IndexEntry)));
  stats.zeroChunks = entries.filter((e) => e === 'zero').length;
  return { index: { chunkSize: index.chunkSize, virtualSize: index.virtualSize, entries }, stats };
}

/** Runs `fn` over `items`, `limit` at once; the first failure stops the rest and is thrown. */
async function inPool<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async (): Promise<void> => {
    while (failure === undefined && next < items.length) {
      const item = items[next++] as T;
      try {
        await fn(item);
      } catch (err) {
        failure ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failure !== undefined) throw failure;
}

// ------------------------------------------------------------------------------------------ chunk -> image tree

/** Copies the chunk backup `entry` to the image tree on `to` as a full backup of qcow2 images. */
export async function copyChunkToTree(
  from: StorageTarget,
  to: StorageTarget,
  entry: Pick<BackupEntry, 'manifest' | 'body'>,
  opts: CopyOptions,
): Promise<CopyReport> {
  const m = entry.manifest;
  const password = opts.password ? onceSource(opts.password) : undefined;
  const src = await openChunkBackup(from, entry, password ? { password } : {});
  const report = newReport(from, to, m.backupId);
  if (await skippedAsPresent(to, m, 'full', undefined, opts, report)) return report;
  await withRestoredDisks(from, m, 'qcow2', opts, password ? { password } : {}, async (work, restored) => {
    const disks = [];
    for (const { disk: d, path } of restored) {
      const sha256 = (await hashFile(path, opts.signal ? { signal: opts.signal } : {})).sha256;
      const size = (await stat(path)).size;
      const k = imageKey(m.domain, m.backupId, d.name, 'qcow2');
      await to.putImage(k, path, { metadata: { sha256 }, ...(opts.signal ? { signal: opts.signal } : {}) });
      report.copied.push(k);
      disks.push({ name: d.name, format: 'qcow2', virtualSize: d.virtualSize, size, sha256, key: k });
    }
    const vm = await mapVm(m.vm, async (f, name, maxBytes) => {
      const body = await readChunkVmFile(src, {
        name,
        kind: 'xml',
        key: f.key,
        size: f.size,
        sha256: f.sha256,
        maxBytes,
      });
      const sha256 = createHash('sha256').update(body).digest('hex');
      const k = vmFileKey(m.domain, m.backupId, name);
      const staged = join(work, name);
      await writeFile(staged, body, { mode: 0o600 });
      await to.putImage(k, staged, { metadata: { sha256 } });
      report.copied.push(k);
      return { key: k, size: body.length, sha256 };
    });
    let manifest = buildManifest({
      ...copiedFields(m),
      disks,
      ...(vm ? { vm } : {}),
      chain: { level: 'full', base: m.backupId },
    });
    if (opts.manifestKey) manifest = signManifest(manifest, opts.manifestKey);
    const key = manifestKeyOf(m.domain, m.backupId);
    await to.putManifest(key, encodeManifest(manifest));
    report.copied.push(key);
  });
  report.links.push({ backupId: m.backupId, level: 'full', action: 'copied' });
  return report;
}

/** When the destination holds this backup already: the report says it was skipped, and true is returned. */
async function skippedAsPresent(
  to: StorageTarget,
  m: Pick<Manifest, 'domain' | 'backupId'>,
  level: Manifest['chain']['level'],
  repo: OpenRepository | undefined,
  opts: CopyOptions,
  report: CopyReport,
): Promise<boolean> {
  const key = manifestKeyOf(m.domain, m.backupId);
  if (!(await destinationHas(to, key, m.backupId, repo, opts.manifestKey))) return false;
  report.skipped.push(key);
  report.links.push({ backupId: m.backupId, level, action: 'skipped' });
  return true;
}

/**
 * Restores backup `m` from `from` into a temporary directory and hands each of its disks, in manifest order, to
 * `fn` with the restored file's path; the directory is removed afterwards, whatever happened.
 */
async function withRestoredDisks(
  from: StorageTarget,
  m: Pick<Manifest, 'backupId' | 'disks'>,
  format: 'raw' | 'qcow2',
  opts: CopyOptions,
  extra: { password?: PasswordSource },
  fn: (work: string, disks: Array<{ disk: Manifest['disks'][number]; path: string }>) => Promise<void>,
): Promise<void> {
  const work = await mkdtemp(join(opts.tempDir ?? tmpdir(), 'vmbackup-copy-'));
  try {
    const restored = await restoreBackup(from, m.backupId, {
      to: join(work, 'disks'),
      format,
      ...(extra.password ? { password: extra.password } : {}),
      ...(opts.manifestKey ? { manifestKey: opts.manifestKey } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    const disks = m.disks.map((disk) => {
      const r = restored.find((x) => x.name === disk.name);
      if (!r) throw fail('failed', `The restore of backup ${m.backupId} wrote no disk ${disk.name}.`);
      return { disk, path: r.path };
    });
    await fn(work, disks);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** A password source that asks (or reads) once, whatever opens the repository how often. */
function onceSource(p: PasswordSource): PasswordSource {
  const answers = new Map<boolean, Promise<string | undefined>>();
  return (needed) => {
    let a = answers.get(needed);
    if (!a) {
      a = p(needed);
      answers.set(needed, a);
    }
    return a;
  };
}

// ------------------------------------------------------------------------------------------ image tree -> chunk

/**
 * Copies the image-tree backup `top` (any link of a chain) into the chunk repository on `to`, as a full: each disk
 * restored to a sparse raw file (the chain built from the manifests, every link's SHA-256 checked) and stored.
 */
export async function copyTreeToChunk(
  from: StorageTarget,
  to: StorageTarget,
  top: Manifest,
  opts: CopyOptions,
): Promise<CopyReport> {
  const dstRepo = await openDestination(to, opts.toPassword);
  const report = newReport(from, to, top.backupId);
  if (await skippedAsPresent(to, top, top.chain.level, dstRepo, opts, report)) return report;
  const dst = new ChunkStore(dstRepo);
  await withRestoredDisks(from, top, 'raw', opts, {}, async (_work, restored) => {
    const disks = [];
    for (const { disk: d, path } of restored) {
      const size = (await stat(path)).size;
      if (size !== d.virtualSize)
        throw fail(
          'checksum',
          `Disk ${d.name} of backup ${top.backupId} restored to ${size} bytes, not its ${d.virtualSize}.`,
        );
      const { index, stats } = await dst.storeDisk(createReadStream(path, { highWaterMark: 1 << 20 }), size);
      const id = await dst.putIndex(index);
      const ik = indexKey(id);
      (stats.uploadedChunks > 0 ? report.copied : report.skipped).push(ik);
      disks.push({
        name: d.name,
        format: 'chunks',
        virtualSize: size,
        size: stats.uploadedBytes,
        sha256: id,
        key: ik,
        chunks: {
          chunkSize: index.chunkSize,
          count: index.entries.length,
          zeroChunks: stats.zeroChunks,
          uploadedChunks: stats.uploadedChunks,
        },
      });
      await rm(path, { force: true });
    }
    const vm = await mapVm(top.vm, async (f, name, maxBytes) => {
      const body = await from.getBuffer(f.key, { maxBytes });
      const sha256 = createHash('sha256').update(body).digest('hex');
      if (body.length !== f.size || sha256 !== f.sha256)
        throw fail(
          'checksum',
          `Cannot copy ${name} (${f.key}) from ${from.displayUrl}: it has ${body.length} bytes and SHA-256 ${sha256}, the manifest says ${f.size} bytes and ${f.sha256}; run verify there.`,
        );
      const put = await putSmallFile(dst, body);
      (put.stats.uploadedChunks > 0 ? report.copied : report.skipped).push(put.key);
      return { key: put.key, size: put.size, sha256: put.sha256 };
    });
    await commitChunkManifest(
      dstRepo,
      { ...copiedFields(top), disks, ...(vm ? { vm } : {}) },
      opts.manifestKey,
      report,
    );
  });
  report.links.push({ backupId: top.backupId, level: 'full', action: 'copied' });
  return report;
}
