/**
 * Reading a backup stored in a chunk repository (manifest version 3, docs/chunk-format.md): opening the repository
 * its manifest names and checking that the manifest is the repository's own (same repository id and config, and,
 * when encrypted, signed with the repository's authentication key), writing a disk back as a sparse raw file, and
 * verifying a backup (fast: every index readable and every chunk it references present; read-data: every chunk read
 * and authenticated). Problems are named by disk and offset, the place a user can look at in the guest.
 */
import type { FileHandle } from 'node:fs/promises';
import { open } from 'node:fs/promises';
import type { StorageTarget } from '../storage/contract';
import { StorageError } from '../storage/errors';
import { manifestKey } from '../storage/keys';
import type { BackupEntry } from './catalog';
import {
  CHUNKS_PREFIX,
  CONFIG_KEY,
  ChunkStore,
  SMALL_OBJECT_MAX_BYTES,
  chunkBackupKeys,
  chunkIdOfKey,
  entryRange,
  getSmallFile,
  isAllZero,
  isChunkFormatError,
  lockShortfalls,
  openRepository,
  parseRepositoryConfig,
  type DiskIndex,
  type LockShortfall,
} from './chunks';
import {
  hasRepositorySignature,
  isChunkManifest,
  manifestVmFiles,
  type Manifest,
  type ManifestDisk,
  type ManifestVmEntry,
} from './manifest';

/**
 * Where a chunk repository's password comes from. `needed`: the repository is encrypted (a source may prompt then);
 * a source that has a password configured returns it either way, so that opening an "unencrypted" repository with a
 * password is refused (someone may have rewritten an encrypted repository's config).
 */
export type PasswordSource = (needed: boolean) => Promise<string | undefined>;

export interface ChunkReadOptions {
  /** asked only for a backup in a chunk repository */
  password?: PasswordSource;
  /** chunks fetched at once (default: ChunkStore's) */
  concurrency?: number;
}

function fail(kind: 'not-found' | 'checksum' | 'failed', message: string, cause?: unknown): StorageError {
  return new StorageError(kind, message, { driver: 'catalog', permanent: true, ...(cause ? { cause } : {}) });
}

/**
 * Opens the chunk repository on `target` for the chunk backup `entry` and checks that the manifest belongs to it: the
 * same repository id and config, and (encrypted) a repository signature made with its key. A wrong password is the
 * core's one sentence (ChunkFormatError 'wrong-password'); a foreign or forged manifest is a StorageError 'checksum'.
 */
export async function openChunkBackup(
  target: StorageTarget,
  entry: Pick<BackupEntry, 'manifest' | 'body'>,
  opts: ChunkReadOptions = {},
): Promise<ChunkStore> {
  const m = entry.manifest;
  if (!isChunkManifest(m)) throw new Error(`backup ${m.backupId} is not in a chunk repository`);
  const where = `Backup ${m.backupId} on ${target.displayUrl}`;
  let body: Buffer;
  try {
    body = await target.getBuffer(CONFIG_KEY, { maxBytes: SMALL_OBJECT_MAX_BYTES });
  } catch (err) {
    if (err instanceof StorageError && err.kind === 'not-found')
      throw fail(
        'not-found',
        `${where} is stored in a chunk repository, but the target holds none (no ${CONFIG_KEY}); restore it from another copy.`,
        err,
      );
    throw err;
  }
  const config = parseRepositoryConfig(body, target.displayUrl);
  const password = await opts.password?.(config.encryption !== 'none');
  const repo = await openRepository(target, password);
  const r = m.repository;
  if (r.id !== repo.config.repositoryId)
    throw fail(
      'checksum',
      `${where} belongs to chunk repository ${r.id.slice(0, 12)}…, not to the one there (${repo.config.repositoryId.slice(0, 12)}…); its manifest was copied from elsewhere or changed.`,
    );
  if (
    r.chunkSize !== repo.config.chunkSize ||
    r.encryption !== repo.config.encryption ||
    r.compression !== repo.config.compression
  )
    throw fail(
      'checksum',
      `${where} says its repository stores ${r.chunkSize}-byte chunks with ${r.encryption} and ${r.compression}, but the repository's config says otherwise; the manifest was changed.`,
    );
  if (repo.keys && !hasRepositorySignature(entry.body, repo.keys.authKey))
    throw fail(
      'checksum',
      `The manifest of backup ${m.backupId} on ${target.displayUrl} is not signed with its chunk repository's key: it was written by someone else or changed; do not trust this backup.`,
    );
  return new ChunkStore(repo, opts.concurrency !== undefined ? { concurrency: opts.concurrency } : {});
}

/** The offset of the first entry of `index` that references chunk `id`. */
export function offsetOfChunk(index: DiskIndex, id: string): number {
  const n = index.entries.indexOf(id);
  return n < 0 ? 0 : entryRange(index, n).offset;
}

/** What a read of an index or chunk failed with, as the end of a sentence ("is missing", "is damaged (...)"). */
function whatWentWrong(err: unknown): string | undefined {
  if (!isChunkFormatError(err)) return undefined;
  if (err.kind === 'missing') return 'is missing';
  if (err.kind === 'corrupt' || err.kind === 'invalid-argument') return 'is damaged';
  return undefined;
}

/** The index of a disk (or whole-VM file), checked against what the manifest says it holds. */
async function readIndex(store: ChunkStore, id: string, size: number): Promise<DiskIndex> {
  let index: DiskIndex;
  try {
    index = await store.getIndex(id);
  } catch (err) {
    const what = whatWentWrong(err);
    if (!what) throw err;
    throw fail(what === 'is missing' ? 'not-found' : 'checksum', `its index ${id} ${what}`, err);
  }
  if (index.virtualSize !== size)
    throw fail('checksum', `its index ${id} holds ${index.virtualSize} bytes where the manifest says ${size}`);
  return index;
}

/** Writes `data` at `offset`, leaving every all-zero 64 KiB block a hole (the file was truncated to its size). */
const HOLE_BLOCK = 64 * 1024;
async function writeNonZero(fh: FileHandle, offset: number, data: Buffer): Promise<void> {
  let start = -1; // where the run of non-zero blocks being gathered starts
  for (let off = 0; off < data.length; off += HOLE_BLOCK) {
    const zero = isAllZero(data.subarray(off, Math.min(off + HOLE_BLOCK, data.length)));
    if (!zero && start < 0) start = off;
    if (zero && start >= 0) {
      await writeAll(fh, data.subarray(start, off), offset + start);
      start = -1;
    }
  }
  // the last run, up to the chunk's end (a disk's last chunk may end inside a block)
  if (start >= 0) await writeAll(fh, data.subarray(start), offset + start);
}

async function writeAll(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

/**
 * Writes disk `disk` of a chunk backup as a sparse raw file at `path` (created, never overwritten): zero chunks and
 * all-zero blocks stay holes, every chunk is fetched `concurrency` ahead and checked against its id. A missing or
 * damaged chunk throws one sentence naming the disk and the offset; the caller removes the file.
 */
export async function writeChunkDisk(
  store: ChunkStore,
  m: Manifest,
  disk: ManifestDisk,
  path: string,
  opts: { signal?: AbortSignal; onBytes?: (done: number) => void } = {},
): Promise<void> {
  const where = `Cannot restore disk ${disk.name} of backup ${m.backupId} from ${store.repo.where}`;
  let index: DiskIndex;
  try {
    index = await readIndex(store, disk.sha256, disk.virtualSize);
  } catch (err) {
    if (err instanceof StorageError)
      throw fail(
        err.kind === 'not-found' ? 'not-found' : 'checksum',
        `${where}: ${err.message}; restore it from another copy.`,
        err,
      );
    throw err;
  }
  const fh = await open(path, 'wx', 0o600);
  try {
    await fh.truncate(index.virtualSize);
    let done = 0;
    await store
      .readDisk(index, async (offset, data) => {
        opts.signal?.throwIfAborted();
        await writeNonZero(fh, offset, data);
        done += data.length;
        opts.onBytes?.(done);
      })
      .catch((err: unknown) => {
        const what = whatWentWrong(err);
        const id = isChunkFormatError(err) ? err.objectId : undefined;
        if (!what || !id) throw err;
        throw fail(
          what === 'is missing' ? 'not-found' : 'checksum',
          `${where}: the chunk at offset ${offsetOfChunk(index, id)} (${id}) ${what}; restore it from another copy.`,
          err,
        );
      });
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Reads the whole-VM files of a chunk backup (domain.xml, NVRAM, TPM state), each verified. */
export async function readChunkVmFile(store: ChunkStore, f: ManifestVmEntry): Promise<Buffer> {
  try {
    return await getSmallFile(store, f.sha256, f.size, f.maxBytes);
  } catch (err) {
    const what = whatWentWrong(err);
    if (!what) throw err;
    throw fail(
      what === 'is missing' ? 'not-found' : 'checksum',
      `${f.name} (index ${f.sha256}) ${what} on ${store.repo.where}: ${(err as Error).message.replace(/\.$/, '')}`,
      err,
    );
  }
}

// ------------------------------------------------------------------------------------------ verify

export interface ChunkCheck {
  /** non-zero entries of the index */
  referenced: number;
  /** distinct chunks among them */
  distinct: number;
  /** 'exists': each chunk was found in one listing of chunks/; 'read': each was read and authenticated */
  checked: 'exists' | 'read';
  missing: number;
  damaged: number;
}

export interface ChunkItemVerification {
  name: string;
  key: string;
  ok: boolean;
  /** the index id */
  expectedSha256: string;
  /** the index id, once the index was read and authenticated */
  actualSha256?: string;
  expectedSize: number;
  problem?: string;
  chunks?: ChunkCheck;
}

export interface ChunkVerifyOptions extends ChunkReadOptions {
  readData?: boolean;
}

/** What a verify of a chunk backup found: its manifest's trust, its disks and its whole-VM files. */
export interface ChunkVerification {
  /** one sentence when the manifest itself cannot be trusted (then nothing else was checked) */
  problem?: string;
  disks: ChunkItemVerification[];
  vmFiles: ChunkItemVerification[];
  /**
   * a backup written with S3 Object Lock: the objects it needs (manifest, indexes, chunks) that the server retains
   * for less than its date (or not at all); empty when every one holds
   */
  lock?: { retainUntil: string; objects: number; shortfalls: LockShortfall[] };
}

/**
 * Verifies a chunk backup. Fast: the manifest (repository id, config, signature), every index read and
 * authenticated, and every chunk it references present. Presence is checked against ONE listing of `chunks/` (not a
 * stat per chunk): a listing costs one request per 1000 objects whatever the backup's size, where a 1 TiB disk alone
 * is 262144 chunks, i.e. as many stats. `readData`: every distinct chunk read and authenticated (GCM tag or digest,
 * and its id), and its length checked against the index.
 */
export async function verifyChunkBackup(
  target: StorageTarget,
  entry: Pick<BackupEntry, 'manifest' | 'body'>,
  opts: ChunkVerifyOptions = {},
): Promise<ChunkVerification> {
  let store: ChunkStore;
  try {
    store = await openChunkBackup(target, entry, opts);
  } catch (err) {
    if (err instanceof StorageError && err.kind === 'checksum')
      return { problem: err.message.replace(/\.$/, ''), disks: [], vmFiles: [] };
    throw err;
  }
  let present: Set<string> | undefined;
  if (!opts.readData) {
    present = new Set();
    for await (const obj of target.list(CHUNKS_PREFIX)) {
      const id = chunkIdOfKey(obj.key);
      if (id) present.add(id);
    }
  }
  const m = entry.manifest;
  const disks: ChunkItemVerification[] = [];
  for (const d of m.disks) disks.push(await verifyItem(store, d.name, d.key, d.sha256, d.virtualSize, d.size, present));
  const vmFiles: ChunkItemVerification[] = [];
  for (const f of manifestVmFiles(m))
    vmFiles.push(await verifyItem(store, f.name, f.key, f.sha256, f.size, f.size, present));
  if (!m.objectLock) return { disks, vmFiles };
  return { disks, vmFiles, lock: await checkLock(store, m, m.objectLock.retainUntil, [...disks, ...vmFiles]) };
}

/**
 * A locked chunk backup is as undeletable as the least-locked object it needs: each of them (the manifest, the
 * indexes that could be read, their chunks) must be retained by the server until at least the manifest's date.
 */
async function checkLock(
  store: ChunkStore,
  m: Pick<Manifest, 'domain' | 'backupId'>,
  retainUntil: string,
  items: ChunkItemVerification[],
): Promise<NonNullable<ChunkVerification['lock']>> {
  const readable = items.filter((i) => i.actualSha256 !== undefined).map((i) => i.expectedSha256);
  const keys = [manifestKey(m.domain, m.backupId), ...(await chunkBackupKeys(readable, (id) => store.getIndex(id)))];
  return { retainUntil, objects: keys.length, shortfalls: await lockShortfalls(store.repo.target, keys, retainUntil) };
}

async function verifyItem(
  store: ChunkStore,
  name: string,
  key: string,
  indexId: string,
  virtualSize: number,
  storedSize: number,
  present: Set<string> | undefined,
): Promise<ChunkItemVerification> {
  const base = { name, key, expectedSha256: indexId, expectedSize: storedSize };
  let index: DiskIndex;
  try {
    index = await readIndex(store, indexId, virtualSize);
  } catch (err) {
    if (err instanceof StorageError) return { ...base, ok: false, problem: `${name}: ${err.message}` };
    throw err;
  }
  // each distinct chunk once, named by the first offset that references it
  const firstOffset = new Map<string, number>();
  let referenced = 0;
  for (let n = 0; n < index.entries.length; n++) {
    const e = index.entries[n] as string;
    if (e === 'zero') continue;
    referenced++;
    if (!firstOffset.has(e)) firstOffset.set(e, entryRange(index, n).offset);
  }
  const bad: Array<{ id: string; offset: number; what: string }> = [];
  if (present) {
    for (const [id, offset] of firstOffset) if (!present.has(id)) bad.push({ id, offset, what: 'is missing' });
  } else {
    const ids = [...firstOffset];
    let next = 0;
    const worker = async (): Promise<void> => {
      for (;;) {
        const item = ids[next++];
        if (!item) return;
        const [id, offset] = item;
        try {
          const data = await store.get(id);
          const n = index.entries.indexOf(id);
          if (data.length !== entryRange(index, n).length) bad.push({ id, offset, what: 'is damaged' });
        } catch (err) {
          const what = whatWentWrong(err);
          if (!what) throw err;
          bad.push({ id, offset, what });
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(store.concurrency, ids.length) }, worker));
  }
  bad.sort((a, b) => a.offset - b.offset);
  const chunks: ChunkCheck = {
    referenced,
    distinct: firstOffset.size,
    checked: present ? 'exists' : 'read',
    missing: bad.filter((b) => b.what === 'is missing').length,
    damaged: bad.filter((b) => b.what === 'is damaged').length,
  };
  const result = { ...base, actualSha256: indexId, chunks };
  const [first] = bad;
  if (!first) return { ...result, ok: true };
  const more = bad.length > 1 ? ` (and ${bad.length - 1} more chunk${bad.length > 2 ? 's' : ''})` : '';
  return {
    ...result,
    ok: false,
    problem: `${name}: the chunk at offset ${first.offset} (${first.id}) ${first.what}${more}`,
  };
}
