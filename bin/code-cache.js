'use strict';
// Loading the one-file CLI (dist/cli/bundle.js) with a V8 code cache: V8 then skips compiling the
// functions it compiled in an earlier run (Node 22 does the same with module.enableCompileCache; Node 20
// has no such switch). The cache is written once, after the first command that ran without a usable one,
// under $XDG_CACHE_HOME/vmbackup (or $VMBACKUP_CODE_CACHE; `VMBACKUP_CODE_CACHE=0` turns it off).
//
// A cache belongs to one bundle and one Node: its name has the SHA-256 of the bundle's bytes and the Node
// version, and V8 itself rejects data made by another V8 or with other flags (the bundle is then compiled
// as usual and the cache rewritten). Any failure to read or write it only costs the time it would save.
//
// V8 runs the code in a cache it accepts without compiling the source again: whoever can write the cache can
// make vmbackup (often root) run their code. So a cache is used, and written, only in a directory that belongs to
// this user and that nobody else can write, and a cache file only if it is a regular file of this user that
// nobody else can write; anything else means no cache (VMBACKUP_DEBUG=1 says why).
const { createHash } = require('node:crypto');
const {
  closeSync,
  constants,
  fstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} = require('node:fs');
const Module = require('node:module');
const { homedir } = require('node:os');
const { dirname, join } = require('node:path');
const vm = require('node:vm');

/** Where the cache lives, or undefined when it is turned off. */
function codeCacheDir(env = process.env) {
  const dir = env.VMBACKUP_CODE_CACHE;
  if (dir === '0') return undefined;
  if (dir) return dir;
  return join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'vmbackup');
}

function debug(message) {
  if (process.env.VMBACKUP_DEBUG) process.stderr.write(`vmbackup: ${message}\n`);
}

/** Why `st` (of a cache file or directory) cannot be trusted, or undefined when it can. */
function untrusted(st) {
  const uid = typeof process.getuid === 'function' ? process.getuid() : undefined;
  if (uid !== undefined && st.uid !== uid) return `it belongs to uid ${st.uid}, not to this user (uid ${uid})`;
  if ((st.mode & 0o022) !== 0) return `group or others may write it (mode ${(st.mode & 0o777).toString(8)})`;
  return undefined;
}

/** The cache directory, if this user may use it (created 0700 when `create` and missing). */
function usableDir(cacheDir, create) {
  let st;
  try {
    st = statSync(cacheDir);
  } catch {
    if (!create) return false;
    try {
      mkdirSync(cacheDir, { recursive: true, mode: 0o700 });
      st = statSync(cacheDir);
    } catch {
      return false;
    }
  }
  const why = st.isDirectory() ? untrusted(st) : 'it is not a directory';
  if (why) debug(`not using the code cache in ${cacheDir}: ${why}`);
  return !why;
}

/** The cache file's bytes, if it is a regular file this user may trust (read through one fd: no swap in between). */
function readTrusted(cacheFile) {
  let fd;
  try {
    fd = openSync(cacheFile, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch {
    return undefined; // missing (the first run), or a symbolic link
  }
  try {
    const st = fstatSync(fd);
    const why = st.isFile() ? untrusted(st) : 'it is not a regular file';
    if (why) {
      debug(`not using the code cache ${cacheFile}: ${why}`);
      return undefined;
    }
    return readFileSync(fd);
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/**
 * Runs a CommonJS file as `require` would, using and producing a code cache in `cacheDir`.
 * Returns its exports, whether cached code was used, and `save()`, to call once the command has run
 * (so the functions compiled during the run are in the cache too); it writes only when no usable cache was
 * found.
 */
function requireWithCodeCache(file, cacheDir) {
  const source = readFileSync(file);
  const key = createHash('sha256').update(source).digest('hex').slice(0, 32);
  const cacheFile = cacheDir && join(cacheDir, `cli-${key}-node${process.version}.v8`);
  const cachedData = cacheFile && usableDir(cacheDir, false) ? readTrusted(cacheFile) : undefined;
  const script = new vm.Script(Module.wrap(source.toString('utf8')), {
    filename: file,
    cachedData,
    importModuleDynamically: vm.constants?.USE_MAIN_CONTEXT_DEFAULT_LOADER,
  });
  const used = cachedData !== undefined && script.cachedDataRejected === false;

  const mod = new Module(file, module);
  mod.filename = file;
  mod.paths = Module._nodeModulePaths(dirname(file));
  const require = Module.createRequire(file);
  script.runInThisContext().call(mod.exports, mod.exports, require, mod, file, dirname(file));
  mod.loaded = true;

  let saved = false;
  function save() {
    if (used || saved || !cacheFile) return false;
    saved = true;
    if (!usableDir(cacheDir, true)) return false;
    const tmp = `${cacheFile}.${process.pid}.tmp`;
    try {
      // 'wx': never through a file or link that is already there
      writeFileSync(tmp, script.createCachedData(), { mode: 0o600, flag: 'wx' });
      renameSync(tmp, cacheFile);
    } catch {
      try {
        rmSync(tmp, { force: true });
      } catch {
        // there was no directory to write it in
      }
      return false;
    }
    // the caches of earlier builds will not be used again
    try {
      for (const name of readdirSync(cacheDir)) {
        if (/^cli-[0-9a-f]{32}-node.*\.v8$/.test(name) && join(cacheDir, name) !== cacheFile) {
          rmSync(join(cacheDir, name), { force: true });
        }
      }
    } catch {
      // left for the next save
    }
    return true;
  }
  return { exports: mod.exports, usedCache: used, cacheFile, save };
}

module.exports = { codeCacheDir, requireWithCodeCache };
