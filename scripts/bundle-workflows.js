// Bundles the workflows once at build time (dist/workflow-bundle.js), so a worker starts without
// running webpack: seconds faster and ~100 MB less at its peak.
'use strict';
const { writeFile } = require('node:fs/promises');
const { join } = require('node:path');
const { bundleWorkflowCode } = require('@temporalio/worker');

async function main() {
  const dist = join(__dirname, '..', 'dist');
  const { code } = await bundleWorkflowCode({
    workflowsPath: require.resolve(join(dist, 'workflows')),
    logger: { trace() {}, debug() {}, info() {}, warn: console.warn, error: console.error, log() {} },
  });
  await writeFile(join(dist, 'workflow-bundle.js'), code);
}
main().catch((err) => {
  console.error(err);
  process.exit(1);
});
