/**
 * Lets a plain `node` child process require the TypeScript sources (ts-node and tsx are not
 * dependencies): each .ts file is transpiled on load with the project's own `typescript`.
 * Used by the kill -9 tests, which need a process they can really kill.
 */
'use strict';
const fs = require('node:fs');
const ts = require('typescript');

require.extensions['.ts'] = (module, filename) => {
  const { outputText } = ts.transpileModule(fs.readFileSync(filename, 'utf8'), {
    fileName: filename,
    compilerOptions: {
      module: ts.ModuleKind.CommonJS,
      target: ts.ScriptTarget.ES2022,
      esModuleInterop: true,
      sourceMap: false,
    },
  });
  module._compile(outputText, filename);
};
