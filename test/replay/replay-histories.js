// Replays every committed history against the workflows at argv[2] and prints one JSON line of
// results. Runs in plain Node: protobufjs type checks fail inside Jest's module sandbox
// ("type must be a Type").
'use strict';
const { readdirSync, readFileSync } = require('node:fs');
const { join } = require('node:path');
const { historyFromJSON } = require('@temporalio/common/lib/proto-utils');
const { Worker } = require('@temporalio/worker');

async function main() {
  const [workflowsPath, dir] = process.argv.slice(2);
  const histories = readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .map((f) => ({
      workflowId: f.replace(/\.json$/, ''),
      history: historyFromJSON(JSON.parse(readFileSync(join(dir, f), 'utf8'))),
    }));
  const results = [];
  for await (const r of Worker.runReplayHistories({ workflowsPath, replayName: 'vmbackup-replay' }, histories)) {
    results.push({
      workflowId: r.workflowId,
      error: r.error ? { name: r.error.name, message: r.error.message } : null,
    });
  }
  process.stdout.write(`${JSON.stringify(results)}\n`);
}
main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});
