/** The real NFS server from scripts/stack.sh (nfs-ganesha): a file written and read back over NFSv3 with libnfs. */
import { execFile } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { requireNfs, stackEnv } from '../helpers/stack';

const run = promisify(execFile);
const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');

describe('NFS smoke (nfs-ganesha over NFSv3)', () => {
  const { url, exportDir } = stackEnv().nfs;
  const name = `smoke-${randomUUID()}.bin`;
  // libnfs 4.0 NFSv4 writes of >= 4 KiB fail (`ZDR error`): pin v3, the protocol the driver uses.
  const v3 = (path: string): string => `${url}/${path}?version=3`;
  let localDir: string | undefined;

  beforeAll(async () => {
    await requireNfs();
    localDir = await mkdtemp(join(tmpdir(), 'vmbackup-smoke-nfs-'));
  });

  afterAll(async () => {
    // libnfs-utils has no rm: clean up through the backing directory.
    await rm(join(exportDir, name), { force: true });
    if (localDir) await rm(localDir, { recursive: true, force: true });
  });

  it('writes a random file with nfs-cp, reads it back and finds it in the backing directory', async () => {
    if (!localDir) throw new Error('no local directory');
    const data = randomBytes(3 * 1024 * 1024 + 17);
    const source = join(localDir, 'source.bin');
    const readBack = join(localDir, 'read-back.bin');
    await writeFile(source, data);

    await run('nfs-cp', [source, v3(name)]);
    const { stdout: listing } = await run('nfs-ls', [`${url}?version=3`]);
    expect(listing).toContain(name);
    await run('nfs-cp', [v3(name), readBack]);

    expect(sha256(await readFile(readBack))).toBe(sha256(data));
    expect(sha256(await readFile(join(exportDir, name)))).toBe(sha256(data));
  });
});
