/** Durability: a rename or a new file is durable only once its directory entry is synced too (restic local.Save). */
import { constants as fsConstants } from 'node:fs';
import { open } from 'node:fs/promises';

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
