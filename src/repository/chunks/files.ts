/**
 * Small files (a backup's whole-VM files: domain XML, NVRAM, TPM state) in a chunk repository: stored like a disk,
 * as an index over chunks, so they are compressed, encrypted and deduplicated like disk data. The manifest entry's
 * `sha256` is the index's id and its key the index's key.
 */
import { indexKey } from './config';
import { ChunkFormatError } from './errors';
import type { ChunkStore, StoreStats } from './store';

export interface StoredFile {
  /** `@chunk-repo/indexes/<id>` */
  key: string;
  /** the index id */
  sha256: string;
  size: number;
  stats: StoreStats;
}

/** Stores `data` as an index of chunks (missing chunks only); idempotent. */
export async function putSmallFile(store: ChunkStore, data: Buffer): Promise<StoredFile> {
  const { index, stats } = await store.storeDisk(
    (async function* () {
      yield data;
    })(),
    data.length,
  );
  const id = await store.putIndex(index);
  return { key: indexKey(id), sha256: id, size: data.length, stats };
}

/**
 * Reads back a file stored with putSmallFile: the index and every chunk are verified against their ids, and the
 * size against `size` and `maxBytes` before anything is fetched.
 */
export async function getSmallFile(store: ChunkStore, id: string, size: number, maxBytes: number): Promise<Buffer> {
  if (size > maxBytes)
    throw new ChunkFormatError('corrupt', `The file stored as index ${id} is larger than ${maxBytes} bytes.`, {
      objectId: id,
    });
  const index = await store.getIndex(id);
  if (index.virtualSize !== size)
    throw new ChunkFormatError(
      'corrupt',
      `The index ${id} holds ${index.virtualSize} bytes where ${size} were stored.`,
      {
        objectId: id,
      },
    );
  const out = Buffer.alloc(size);
  await store.readDisk(index, async (offset, data) => {
    data.copy(out, offset);
  });
  return out;
}
