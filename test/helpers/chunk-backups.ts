/**
 * Backups in a chunk repository made directly with the repository layer, as the backup path stores them
 * (docs/chunk-format.md): each disk's raw guest data chunked with ChunkStore.storeDisk, its index stored, the domain
 * XML stored as a small file, a version-3 manifest with its `repository` section, signed with the repository's
 * authentication key when encrypted, written last. Tests of restore / verify / list use it without a VM.
 */
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { ChunkStore, indexKey, putSmallFile, type DiskIndex, type OpenRepository } from '../../src/repository/chunks';
import { buildManifest, encodeManifest, signRepositoryManifest, type Manifest } from '../../src/repository/manifest';
import { manifestKey } from '../../src/storage/keys';

export interface ChunkBackupDisk {
  name: string;
  /** a raw image: its bytes are the guest's disk */
  rawPath: string;
}

export interface ChunkBackup {
  manifest: Manifest;
  /** the disks' indexes by disk name, as stored */
  indexes: Map<string, DiskIndex>;
}

/** A backup id as the backup path makes them: `<domain>-<yyyymmddThhmmssZ>-<hex>`. */
export function chunkBackupId(domain: string, at = new Date()): string {
  const stamp = at
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z');
  return `${domain}-${stamp}-${randomBytes(4).toString('hex')}`;
}

/** Stores `disks` and a domain XML in the opened repository and commits the backup's manifest. */
export async function makeChunkBackup(
  repo: OpenRepository,
  opts: { domain: string; disks: ChunkBackupDisk[]; xml?: string; backupId?: string },
): Promise<ChunkBackup> {
  const store = new ChunkStore(repo);
  const backupId = opts.backupId ?? chunkBackupId(opts.domain);
  const started = new Date();
  const indexes = new Map<string, DiskIndex>();
  const disks = [];
  for (const d of opts.disks) {
    const virtualSize = (await stat(d.rawPath)).size;
    const { index, stats } = await store.storeDisk(
      createReadStream(d.rawPath, { highWaterMark: 1 << 20 }),
      virtualSize,
    );
    const id = await store.putIndex(index);
    indexes.set(d.name, index);
    disks.push({
      name: d.name,
      format: 'chunks',
      virtualSize,
      size: stats.uploadedBytes,
      sha256: id,
      key: indexKey(id),
      chunks: {
        chunkSize: index.chunkSize,
        count: index.entries.length,
        zeroChunks: stats.zeroChunks,
        uploadedChunks: stats.uploadedChunks,
      },
    });
  }
  const xml = Buffer.from(opts.xml ?? `<domain type='kvm'><name>${opts.domain}</name></domain>\n`);
  const xmlFile = await putSmallFile(store, xml);
  let manifest = buildManifest({
    backupId,
    domain: opts.domain,
    host: 'chunk-test-host',
    method: 'offline',
    startedAt: started.toISOString(),
    finishedAt: new Date().toISOString(),
    quiesced: false,
    libvirtVersion: '9.0.0',
    qemuVersion: '7.2.0',
    disks,
    vm: { xml: { key: xmlFile.key, size: xmlFile.size, sha256: xmlFile.sha256 } },
    repository: {
      id: repo.config.repositoryId,
      chunkSize: repo.config.chunkSize,
      encryption: repo.config.encryption,
      compression: repo.config.compression,
    },
  });
  if (repo.keys) manifest = signRepositoryManifest(manifest, repo.keys.authKey);
  await putChunkManifest(repo, manifest);
  return { manifest, indexes };
}

/** Writes `manifest` as `<domain>/<backupId>/manifest.json` exactly as given (a test may forge one). */
export async function putChunkManifest(repo: OpenRepository, manifest: Manifest): Promise<void> {
  await repo.target.putManifest(manifestKey(manifest.domain, manifest.backupId), encodeManifest(manifest));
}
