'use strict';
// Loading the one-file CLI (dist/cli/bundle.js) with a V8 code cache: V8 then skips compiling the
// functions it compiled in an earlier run (Node 22 does the same with module.enableCompileCache; Node 20
// has no such switch). The cache is written once, after the first command that ran without a usable one,
// under $XDG_CACHE_HOME/vmbackup (or $VMBACKUP_CODE_CACHE; `VMBACKUP_CODE_CACHE=0` turns it off).
//
// A cache belongs to one bundle and one Node: its name has the SHA-256 of the bundle's bytes and the Node
// version, and V8 itself rejects data made by another V8 or with other flags (the bundle is then compiled
// as usual and the cache rewritten). Any failure to read or write it only costs the time it would save.
const { createHash } = require('node:crypto');
const { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } = require('node:fs');
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
  let cachedData;
  if (cacheFile) {
    try {
      cachedData = readFileSync(cacheFile);
    } catch {
      cachedData = undefined;
    }
  }
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
    const tmp = `${cacheFile}.${process.pid}.tmp`;
    try {
      mkdirSync(cacheDir, { recursive: true, mode: 0o700 });
      writeFileSync(tmp, script.createCachedData(), { mode: 0o600 });
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
