import { chmod, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadConfig, readManifestKey } from '../../src/worker/config';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-key-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function keyFile(name: string, body: string | Buffer, mode = 0o600): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, body, { mode });
  await chmod(path, mode); // whatever the umask
  return path;
}

describe('VMBACKUP_MANIFEST_KEY_FILE', () => {
  test('is only a path in the config: reading the key is left to the commands that need it', () => {
    expect(loadConfig({ VMBACKUP_MANIFEST_KEY_FILE: 'rel/key' }).manifestKeyFile).toBe(join(process.cwd(), 'rel/key'));
    expect(loadConfig({}).manifestKeyFile).toBeUndefined();
  });

  test('the key is the file without its trailing newline, so an editor copy gives the same key', async () => {
    const text = 'q'.repeat(64);
    expect(readManifestKey(await keyFile('a', `${text}\n`)).toString()).toBe(text);
    expect(readManifestKey(await keyFile('b', `${text}\r\n`)).toString()).toBe(text);
    expect(readManifestKey(await keyFile('c', text)).toString()).toBe(text);
    const raw = Buffer.from([...Array(40).keys()].map((i) => (i * 37) & 0xff));
    expect(readManifestKey(await keyFile('d', raw)).equals(raw)).toBe(true);
  });

  test.each([
    ['readable by others', 0o644, /is readable or writable by group or others \(mode 644\); run `chmod 600 .*`/],
    ['readable by the group', 0o640, /mode 640/],
    ['writable by the group', 0o620, /mode 620/],
  ])('refused when %s', async (_name, mode, message) => {
    expect(() => readManifestKey(`${dir}/nothing`)).toThrow(/cannot be read \(ENOENT\)/);
    const path = await keyFile(`m${mode.toString(8)}`, 'k'.repeat(48), mode);
    expect(() => readManifestKey(path)).toThrow(message);
  });

  test('refused when it holds less than 32 bytes of key, is too big, or is not a file', async () => {
    expect(() => readManifestKey(`${dir}`)).toThrow(/is not a regular file/);
    const short = await keyFile('short', `${'s'.repeat(31)}\n`);
    expect(() => readManifestKey(short)).toThrow(/holds 31 bytes of key; it needs at least 32/);
    const big = await keyFile('big', 'b'.repeat(5000));
    expect(() => readManifestKey(big)).toThrow(/larger than 4096 bytes/);
    // a symlink to a good key file is fine (the key is where the link points)
    const good = await keyFile('good', 'g'.repeat(48));
    await symlink(good, join(dir, 'link'));
    expect(readManifestKey(join(dir, 'link')).toString()).toBe('g'.repeat(48));
  });
});
