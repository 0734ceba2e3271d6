/** Reading a whole-VM file a running VM may be writing: until two reads in a row are equal, capped, no symlinks. */
import { renameSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readStable } from '../../src/activities/vm-files';

describe('readStable', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmbackup-vmfiles-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('a file that settles is returned as it settled; a missing one is undefined', async () => {
    const file = join(dir, 'nvram.fd');
    await writeFile(file, 'first');
    // rewritten once while the first reads run, then left alone
    const settle = new Promise<void>((resolve) =>
      setTimeout(() => void writeFile(file, 'second, final').then(() => resolve()), 50),
    );
    const got = await readStable(file, 1024, 'the NVRAM file');
    await settle;
    expect(['first', 'second, final']).toContain(got?.toString());
    expect((await readStable(file, 1024, 'the NVRAM file'))?.toString()).toBe('second, final');
    expect(await readStable(join(dir, 'missing'), 1024, 'x')).toBeUndefined();
  });

  test('a file that changes between every two reads fails (retryable) naming it', async () => {
    const file = join(dir, 'tpm2-00.permall');
    let i = 0;
    await writeFile(file, String(i));
    // each change whole and at once (temp + rename), as swtpm writes: a truncate-then-write could show two equal
    // empty reads; synchronous, so every 100 ms pause between two reads sees at least one change
    const writer = setInterval(() => {
      writeFileSync(`${file}.tmp`, String(++i));
      renameSync(`${file}.tmp`, file);
    }, 20);
    try {
      await expect(readStable(file, 1024, 'TPM state file tpm2-00.permall of vm1')).rejects.toMatchObject({
        message: expect.stringMatching(
          /^TPM state file tpm2-00\.permall of vm1 \(.*\) changed between every two of 9 reads/,
        ),
        nonRetryable: false,
      });
    } finally {
      clearInterval(writer);
    }
  });

  test('a symlink, a directory and a file over the cap are refused for good', async () => {
    await writeFile(join(dir, 'secret'), 'root:x:0:0');
    await symlink(join(dir, 'secret'), join(dir, 'nvram.fd'));
    await expect(readStable(join(dir, 'nvram.fd'), 1024, 'the NVRAM file')).rejects.toMatchObject({
      message: expect.stringMatching(/is a symbolic link; refused$/),
      nonRetryable: true,
    });
    await expect(readStable(dir, 1024, 'the NVRAM file')).rejects.toMatchObject({
      message: expect.stringMatching(/is not a regular file; refused$/),
      nonRetryable: true,
    });
    await writeFile(join(dir, 'big'), Buffer.alloc(2048));
    await expect(readStable(join(dir, 'big'), 1024, 'the NVRAM file')).rejects.toMatchObject({
      message: expect.stringMatching(/is 2048 bytes, more than a backup stores \(1024\)$/),
      nonRetryable: true,
    });
  });
});
