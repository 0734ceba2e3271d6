#!/usr/bin/env node
'use strict';
require('../dist/cli/main.js')
  .main(process.argv)
  .then(() => {
    // The Temporal native runtime keeps handles open; leave once the command is done.
    process.exit(process.exitCode ?? 0);
  });
