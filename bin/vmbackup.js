#!/usr/bin/env node
'use strict';
// Which build of the command line to load:
// - a command that hosts a Temporal worker (`worker`, `recover`, and every command of the embedded
//   default, i.e. without TEMPORAL_ADDRESS) runs dist/cli/main.js: the worker loads @temporalio/* from
//   node_modules anyway, and a second, bundled copy of them would cost ~0.4 s more;
// - a client of a cluster runs dist/cli/bundle.js: the same code in one file (scripts/bundle-cli.js),
//   read in one go instead of ~220 module files (~0.2 s less from a cold page cache), and compiled with
//   V8's code cache of an earlier run (bin/code-cache.js).
const { join } = require('node:path');

const command = process.argv[2];
const hostsWorker = !process.env.TEMPORAL_ADDRESS || command === 'worker' || command === 'recover';
let cli;
let afterRun = () => undefined;
if (hostsWorker) {
  cli = require('../dist/cli/main.js');
} else {
  const { codeCacheDir, requireWithCodeCache } = require('./code-cache.js');
  const bundle = requireWithCodeCache(join(__dirname, '..', 'dist', 'cli', 'bundle.js'), codeCacheDir());
  cli = bundle.exports;
  afterRun = bundle.save;
}
cli.main(process.argv).then(() => {
  afterRun();
  // The Temporal native runtime keeps handles open; leave once the command is done.
  process.exit(process.exitCode ?? 0);
});
