/**
 * bin/code-cache.js, the loader of the one-file CLI, in real Node processes: each run is a new process, as each
 * vmbackup command is.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const LOADER = resolve(__dirname, '..', '..', 'bin', 'code-cache.js');

interface Run {
  usedCache: boolean;
  saved: boolean;
  cacheFile: string | null;
  value: unknown;
  /** what the process printed on stderr (VMBACKUP_DEBUG lines) */
  stderr: string;
}

let dir: string;
let bundle: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmb-code-cache-'));
  bundle = join(dir, 'dist', 'bundle.js');
  execFileSync('mkdir', ['-p', join(dir, 'dist')]);
  // like the webpack bundle: a relative require of a file beside it, a builtin, __dirname and module.exports
  writeFileSync(join(dir, 'dist', 'beside.js'), 'module.exports = 40;');
  writeBundle('2');
});

afterEach(() => rmSync(dir, { recursive: true, force: true }));

function writeBundle(plus: string): void {
  writeFileSync(
    bundle,
    `const path = require('node:path');
     const beside = require('./beside.js');
     module.exports = { main: () => beside + ${plus}, dir: path.basename(__dirname), self: this === module.exports };`,
  );
}

/** One process: load the bundle with the cache in `cacheDir` (env as the CLI reads it), run main, save. */
function run(env: Record<string, string>): Run {
  const script = `
    const { codeCacheDir, requireWithCodeCache } = require(${JSON.stringify(LOADER)});
    const b = requireWithCodeCache(${JSON.stringify(bundle)}, codeCacheDir());
    const value = [b.exports.main(), b.exports.dir, b.exports.self];
    const saved = b.save();
    process.stdout.write(JSON.stringify({ usedCache: b.usedCache, saved, cacheFile: b.cacheFile ?? null, value }));`;
  const res = spawnSync(process.execPath, ['-e', script], {
    env: { PATH: process.env.PATH ?? '', HOME: dir, ...env },
    encoding: 'utf8',
  });
  if (res.status !== 0) throw new Error(`the loader failed: ${res.stderr}`);
  return { ...(JSON.parse(res.stdout) as Omit<Run, 'stderr'>), stderr: res.stderr };
}

const v8Files = (cacheDir: string) => readdirSync(cacheDir).filter((n) => n.endsWith('.v8'));

test('the first run writes the cache, the next one uses it and writes nothing', () => {
  const cacheDir = join(dir, 'cache');
  const first = run({ VMBACKUP_CODE_CACHE: cacheDir });
  expect(first).toMatchObject({ usedCache: false, saved: true, value: [42, 'dist', true] });
  expect(first.cacheFile).toMatch(new RegExp(`^${cacheDir}/cli-[0-9a-f]{32}-node${process.version}\\.v8$`));
  expect(v8Files(cacheDir)).toHaveLength(1);

  const second = run({ VMBACKUP_CODE_CACHE: cacheDir });
  expect(second).toMatchObject({ usedCache: true, saved: false, value: [42, 'dist', true] });
  expect(second.cacheFile).toBe(first.cacheFile);
});

test('by default the cache is under $XDG_CACHE_HOME/vmbackup, else ~/.cache/vmbackup; 0 turns it off', () => {
  const xdg = run({ XDG_CACHE_HOME: join(dir, 'xdg') });
  expect(xdg.cacheFile?.startsWith(join(dir, 'xdg', 'vmbackup') + '/')).toBe(true);
  expect(v8Files(join(dir, 'xdg', 'vmbackup'))).toHaveLength(1);

  const home = run({});
  expect(home.cacheFile?.startsWith(join(dir, '.cache', 'vmbackup') + '/')).toBe(true);

  const off = run({ VMBACKUP_CODE_CACHE: '0' });
  expect(off).toMatchObject({ usedCache: false, saved: false, cacheFile: null, value: [42, 'dist', true] });
});

test("a rebuilt bundle gets a cache of its own and the old bundle's cache is removed", () => {
  const cacheDir = join(dir, 'cache');
  const old = run({ VMBACKUP_CODE_CACHE: cacheDir });
  writeBundle('3'); // same length, other code: V8's own check (the source length) would not see it
  const rebuilt = run({ VMBACKUP_CODE_CACHE: cacheDir });
  expect(rebuilt).toMatchObject({ usedCache: false, saved: true, value: [43, 'dist', true] });
  expect(rebuilt.cacheFile).not.toBe(old.cacheFile);
  expect(v8Files(cacheDir)).toEqual([rebuilt.cacheFile!.slice(cacheDir.length + 1)]);
  expect(run({ VMBACKUP_CODE_CACHE: cacheDir })).toMatchObject({ usedCache: true, value: [43, 'dist', true] });
});

test('a cache V8 rejects (corrupt, or from another V8) is not used, the bundle still runs, and it is rewritten', () => {
  const cacheDir = join(dir, 'cache');
  const { cacheFile } = run({ VMBACKUP_CODE_CACHE: cacheDir });
  writeFileSync(cacheFile!, Buffer.alloc(4096, 0x5a));
  expect(run({ VMBACKUP_CODE_CACHE: cacheDir })).toMatchObject({
    usedCache: false,
    saved: true,
    value: [42, 'dist', true],
  });
  expect(readFileSync(cacheFile!).equals(Buffer.alloc(4096, 0x5a))).toBe(false);
  expect(run({ VMBACKUP_CODE_CACHE: cacheDir })).toMatchObject({ usedCache: true });
});

test('a cache directory that cannot be written only means no cache', () => {
  const file = join(dir, 'not-a-dir');
  writeFileSync(file, '');
  expect(run({ VMBACKUP_CODE_CACHE: join(file, 'cache') })).toMatchObject({
    usedCache: false,
    saved: false,
    value: [42, 'dist', true],
  });
  expect(readdirSync(dir).filter((n) => n.endsWith('.tmp'))).toEqual([]);
});

describe('a cache someone else could have written is never run', () => {
  // V8 runs an accepted cache's code without compiling the source: a cache others can write is their code.
  const NOBODY = 65534;
  const requireRoot = () => {
    if (process.getuid?.() !== 0) throw new Error('this test gives files to another user (chown): run it as root');
  };

  test('a cache file that group or others may write: not used, replaced by one of our own', () => {
    const cacheDir = join(dir, 'cache');
    const { cacheFile } = run({ VMBACKUP_CODE_CACHE: cacheDir });
    chmodSync(cacheFile!, 0o666);
    const refused = run({ VMBACKUP_CODE_CACHE: cacheDir, VMBACKUP_DEBUG: '1' });
    expect(refused).toMatchObject({ usedCache: false, value: [42, 'dist', true] });
    expect(refused.stderr).toContain(`not using the code cache ${cacheFile}: group or others may write it (mode 666)`);
    expect(statSync(cacheFile!).mode & 0o777).toBe(0o600);
    expect(run({ VMBACKUP_CODE_CACHE: cacheDir })).toMatchObject({ usedCache: true });
  });

  test("another user's cache file: not used", () => {
    requireRoot();
    const cacheDir = join(dir, 'cache');
    const { cacheFile } = run({ VMBACKUP_CODE_CACHE: cacheDir });
    chownSync(cacheFile!, NOBODY, NOBODY);
    const refused = run({ VMBACKUP_CODE_CACHE: cacheDir, VMBACKUP_DEBUG: '1' });
    expect(refused).toMatchObject({ usedCache: false, value: [42, 'dist', true] });
    expect(refused.stderr).toContain(`it belongs to uid ${NOBODY}, not to this user (uid 0)`);
  });

  test('a symbolic link in place of the cache file: not followed', () => {
    const cacheDir = join(dir, 'cache');
    const { cacheFile } = run({ VMBACKUP_CODE_CACHE: cacheDir });
    const elsewhere = join(dir, 'elsewhere.v8');
    writeFileSync(elsewhere, readFileSync(cacheFile!), { mode: 0o600 });
    rmSync(cacheFile!);
    symlinkSync(elsewhere, cacheFile!);
    expect(run({ VMBACKUP_CODE_CACHE: cacheDir })).toMatchObject({ usedCache: false, value: [42, 'dist', true] });
    expect(lstatSync(cacheFile!).isSymbolicLink()).toBe(false); // replaced by a file of our own
  });

  test('a cache directory that others may write: neither read nor written', () => {
    const cacheDir = join(dir, 'shared');
    const { cacheFile } = run({ VMBACKUP_CODE_CACHE: cacheDir });
    chmodSync(cacheDir, 0o777);
    const before = readFileSync(cacheFile!);
    const refused = run({ VMBACKUP_CODE_CACHE: cacheDir, VMBACKUP_DEBUG: '1' });
    expect(refused).toMatchObject({ usedCache: false, saved: false, value: [42, 'dist', true] });
    expect(refused.stderr).toContain(
      `not using the code cache in ${cacheDir}: group or others may write it (mode 777)`,
    );
    expect(readFileSync(cacheFile!).equals(before)).toBe(true);
    expect(v8Files(cacheDir)).toHaveLength(1);
  });

  test("another user's cache directory: neither read nor written", () => {
    requireRoot();
    const cacheDir = join(dir, 'theirs');
    mkdirSync(cacheDir, { mode: 0o755 });
    chownSync(cacheDir, NOBODY, NOBODY);
    const refused = run({ VMBACKUP_CODE_CACHE: cacheDir, VMBACKUP_DEBUG: '1' });
    expect(refused).toMatchObject({ usedCache: false, saved: false, value: [42, 'dist', true] });
    expect(v8Files(cacheDir)).toEqual([]);
    // without VMBACKUP_DEBUG nothing is printed: a refused cache only costs the time it would save
    expect(run({ VMBACKUP_CODE_CACHE: cacheDir }).stderr).toBe('');
  });
});
