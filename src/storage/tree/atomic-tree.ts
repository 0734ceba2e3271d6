/**
 * One atomic-tree writer and lister for the drivers backed by a directory tree (local, NFS), over the file-tree
 * port (./port.ts). It owns the object format both share: an object is a file at its key's path, written under a
 * temp name (`.name.tmp-<hex>`) and renamed into place after its sidecar (`.name.meta.json`) is durable, so a
 * visible object always has its metadata; listings skip reserved names; deleting the last object of a directory
 * removes the directory; `removeUnfinished` sweeps what a crashed put left behind.
 */
import { createHash, randomBytes, type Hash } from 'node:crypto';
import type { ObjectInfo, PutImageOptions, PutImageResult } from '../contract';
import { StorageError, isAbortError } from '../errors';
import { dirMayHold, isKeySegment, isReservedName, normaliseKey, normalisePrefix } from '../keys';
import {
  decodeSidecar,
  encodeSidecar,
  isTempFor,
  metadataOf,
  SIDECAR_MAX_BYTES,
  sidecarName,
  sidecarOwner,
  tempName,
  tempOwner,
  type Sidecar,
} from '../sidecar';
import { asTempFileCheckpoint, sourceSize, type TempFileCheckpoint } from '../source';
import { childKey, splitKey, type ImageTreePort, type ImageUpload, type TreeEntry } from './port';

function byName(a: TreeEntry, b: TreeEntry): number {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

/** The deepest directory a prefix names completely: listing and sweeping start there. */
function baseOf(prefix: string): string {
  const slash = prefix.lastIndexOf('/');
  return slash >= 0 ? prefix.slice(0, slash) : '';
}

export class AtomicTree {
  /** directories that putBatched renamed into and no flush has synced since */
  private readonly unsynced = new Set<string>();

  constructor(private readonly port: ImageTreePort) {}

  /**
   * Copies an image to `key`: into a temp file (resumed from `opts.resume` when its prefix still matches), durable,
   * checked against `opts.metadata.sha256`, its sidecar written, then renamed into place. `move` may store the
   * source without a copy (`opts.allowMove`); undefined lets the copy go ahead.
   */
  async putImage(
    key: string,
    sourcePath: string,
    opts: PutImageOptions = {},
    move?: (dirKey: string, name: string, size: number) => Promise<PutImageResult | undefined>,
  ): Promise<PutImageResult> {
    const k = normaliseKey(key);
    const { dirKey, name } = splitKey(k);
    const size = await sourceSize(sourcePath, key, this.port.driver);
    await this.mkdirs(dirKey, `create the directory for ${key}`);
    if (opts.allowMove && move) {
      const moved = await move(dirKey, name, size);
      if (moved) return moved;
    }
    let temp: string | undefined;
    let upload: ImageUpload | undefined;
    try {
      let offset = 0;
      let hash: Hash = createHash('sha256');
      const resume = asTempFileCheckpoint(opts.resume);
      if (resume && resume.offset <= size) {
        const resumed = await this.port.resumeUpload(dirKey, resume.temp, resume, sourcePath, opts.signal);
        if (resumed) {
          ({ upload, hash } = resumed);
          offset = resume.offset;
          temp = resume.temp;
        }
      }
      if (!upload) {
        await this.removeStaleTemps(dirKey, name);
        temp = tempName(name, randomBytes(8).toString('hex'));
        upload = await this.port.createUpload(dirKey, temp);
      }
      const tempFile = temp as string;
      const startOffset = offset;
      opts.onProgress?.(offset, size);
      await upload.copy(sourcePath, offset, size, hash, opts, (at, prefixSha256) =>
        opts.onCheckpoint?.({ temp: tempFile, offset: at, prefixSha256 } satisfies TempFileCheckpoint),
      );
      const done = upload;
      upload = undefined;
      await done.finish();
      const sha256 = hash.digest('hex');
      const expected = opts.metadata?.sha256;
      if (expected && expected !== sha256) {
        throw new StorageError(
          'checksum',
          `Copying ${sourcePath} to ${key} on ${this.port.displayUrl} produced SHA-256 ${sha256} but ${expected} was expected; the source changed or is corrupt, run the backup again.`,
          { driver: this.port.driver },
        );
      }
      await this.writeSidecar(dirKey, name, { size, sha256, metadata: { ...opts.metadata, sha256 } });
      await this.port.commit(dirKey, tempFile, name, size);
      return { key: k, size, sha256, bytesSent: size - startOffset };
    } catch (err) {
      if (upload) await upload.abandon();
      const aborted = opts.signal?.aborted || isAbortError(err);
      const classified = aborted ? undefined : this.port.classify(err, `write ${key}`);
      // keep the temp file only when a retry can resume from it
      if (temp && (aborted || classified?.permanent)) await this.port.unlink(dirKey, temp).catch(() => false);
      if (aborted) throw opts.signal?.reason ?? err;
      throw classified;
    }
  }

  /** Creates the directory of a key; `what` names the failure for the user. */
  async mkdirs(dirKey: string, what: string): Promise<void> {
    try {
      await this.port.mkdirs(dirKey);
    } catch (err) {
      throw this.port.classify(err, what);
    }
  }

  /** A small file written whole under a temp name, then renamed over `name` (raw errors: the caller classifies). */
  async writeAtomic(dirKey: string, name: string, body: Buffer): Promise<void> {
    const temp = tempName(name, randomBytes(8).toString('hex'));
    try {
      await this.port.writeNew(dirKey, temp, body);
      await this.port.rename(dirKey, temp, name);
    } catch (err) {
      await this.port.unlink(dirKey, temp).catch(() => false);
      throw err;
    }
  }

  /** The sidecar of `name`, written before the object is renamed into place (raw errors). */
  async writeSidecar(dirKey: string, name: string, body: Sidecar): Promise<void> {
    await this.writeAtomic(dirKey, sidecarName(name), encodeSidecar(body));
  }

  /** Temp files of an earlier attempt at `name` whose checkpoint was lost (a key has one writer at a time). */
  async removeStaleTemps(dirKey: string, name: string): Promise<void> {
    for (const entry of (await this.port.readdir(dirKey)) ?? []) {
      if (isTempFor(name, entry.name)) await this.port.unlink(dirKey, entry.name).catch(() => false);
    }
  }

  async putManifest(key: string, body: Buffer): Promise<void> {
    const { dirKey, name } = splitKey(normaliseKey(key));
    await this.mkdirs(dirKey, `create the directory for ${key}`);
    try {
      await this.writeAtomic(dirKey, name, body);
    } catch (err) {
      throw this.port.classify(err, `write ${key}`);
    }
  }

  /**
   * putManifest without the directory sync: the temp is written and synced (its bytes durable) before the rename, so
   * the name, once it survives a crash, always has its data; the directory is synced by the next flush().
   */
  async putBatched(key: string, body: Buffer): Promise<void> {
    const { dirKey, name } = splitKey(normaliseKey(key));
    await this.mkdirs(dirKey, `create the directory for ${key}`);
    const temp = tempName(name, randomBytes(8).toString('hex'));
    try {
      await this.port.writeNew(dirKey, temp, body);
      await this.port.rename(dirKey, temp, name, { syncDir: false });
    } catch (err) {
      await this.port.unlink(dirKey, temp).catch(() => false);
      throw this.port.classify(err, `write ${key}`);
    }
    this.unsynced.add(dirKey);
  }

  /** Syncs each directory putBatched renamed into, once. */
  async flush(): Promise<void> {
    for (const dirKey of [...this.unsynced]) {
      // taken out before the sync: a rename meanwhile adds it again, for the next flush
      this.unsynced.delete(dirKey);
      try {
        await this.port.syncDir(dirKey);
      } catch (err) {
        this.unsynced.add(dirKey);
        throw this.port.classify(err, `make the objects in ${dirKey || 'the top directory'} durable`);
      }
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const k = normaliseKey(key);
    const { dirKey, name } = splitKey(k);
    try {
      const file = await this.port.statFile(dirKey, name);
      if (!file) return undefined;
      // a sidecar is read bounded: one someone else made huge (or a FIFO, or a link) is ignored
      const side = await this.port.readSmall(dirKey, sidecarName(name), SIDECAR_MAX_BYTES);
      const metadata = side ? metadataOf(decodeSidecar(side, file.size)) : undefined;
      return { key: k, size: file.size, modified: file.modified, ...(metadata ? { metadata } : {}) };
    } catch (err) {
      throw this.port.classify(err, `stat ${key}`);
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const p = normalisePrefix(prefix);
    yield* this.walk(baseOf(p), p);
  }

  async *listTop(): AsyncIterable<string> {
    const entries = await this.readdir('', 'list its directory');
    yield* (entries ?? [])
      .filter((e) => (e.type === 'dir' || e.type === 'file') && !isReservedName(e.name) && isKeySegment(e.name))
      .map((e) => e.name)
      .sort();
  }

  private async readdir(dirKey: string, what: string): Promise<TreeEntry[] | undefined> {
    try {
      return await this.port.readdir(dirKey);
    } catch (err) {
      throw this.port.classify(err, what);
    }
  }

  private async *walk(dirKey: string, prefix: string): AsyncIterable<ObjectInfo> {
    // a target directory nobody wrote to yet holds no objects (the default target starts that way)
    const entries = await this.readdir(dirKey, `list ${dirKey || 'its directory'}`);
    for (const entry of (entries ?? []).sort(byName)) {
      if (isReservedName(entry.name)) continue;
      // a file someone else put there under a name no key can have is not ours to list (S3 skips those too)
      if (!isKeySegment(entry.name)) continue;
      const key = childKey(dirKey, entry.name);
      if (entry.type === 'dir') {
        if (dirMayHold(key, prefix)) yield* this.walk(key, prefix);
      } else if (entry.type === 'file' && key.startsWith(prefix)) {
        const info = this.port.listsMetadata ? await this.stat(key) : await this.plainInfo(key);
        if (info) yield info;
      }
    }
  }

  private async plainInfo(key: string): Promise<ObjectInfo | undefined> {
    const { dirKey, name } = splitKey(key);
    try {
      const file = await this.port.statFile(dirKey, name);
      return file && { key, size: file.size, modified: file.modified };
    } catch (err) {
      throw this.port.classify(err, `stat ${key}`);
    }
  }

  async delete(key: string): Promise<void> {
    const { dirKey, name } = splitKey(normaliseKey(key));
    try {
      await this.port.unlink(dirKey, name);
    } catch (err) {
      throw this.port.classify(err, `delete ${key}`);
    }
    await this.port.unlink(dirKey, sidecarName(name)).catch(() => false);
    try {
      await this.removeEmptyDirs(dirKey);
    } catch (err) {
      throw this.port.classify(err, `delete ${key}`);
    }
  }

  /** Drop `dirKey` and its parents while they are empty (pruning leaves no empty <domain>/<backupId>). */
  private async removeEmptyDirs(dirKey: string): Promise<void> {
    let child = dirKey;
    while (child && (await this.port.rmdir(child))) child = baseOf(child);
  }

  async removeUnfinished(prefix: string): Promise<number> {
    const p = normalisePrefix(prefix);
    return this.sweep(baseOf(p), p);
  }

  /** Temp files (and the sidecars written for them) of keys under `prefix`, below `dirKey`. */
  private async sweep(dirKey: string, prefix: string): Promise<number> {
    const entries = await this.readdir(dirKey, `list ${dirKey || 'its directory'}`);
    if (!entries) return 0;
    const names = new Set(entries.map((e) => e.name));
    let removed = 0;
    for (const entry of entries) {
      const key = childKey(dirKey, entry.name);
      if (entry.type === 'dir') {
        if (!isReservedName(entry.name) && dirMayHold(key, prefix)) removed += await this.sweep(key, prefix);
        continue;
      }
      const temp = tempOwner(entry.name);
      const side = sidecarOwner(entry.name);
      const owner = temp ?? (side !== undefined && !names.has(side) ? side : undefined);
      if (owner === undefined || !childKey(dirKey, owner).startsWith(prefix)) continue;
      let gone: boolean;
      try {
        gone = await this.port.unlink(dirKey, entry.name);
      } catch (err) {
        throw this.port.classify(err, `remove ${key}`);
      }
      if (gone && temp !== undefined) removed++;
    }
    if (dirKey && `${dirKey}/`.startsWith(prefix)) {
      try {
        await this.removeEmptyDirs(dirKey);
      } catch (err) {
        throw this.port.classify(err, `remove ${dirKey}`);
      }
    }
    return removed;
  }
}
