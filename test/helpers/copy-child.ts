/**
 * vmbackup's own single-pass copy in a process of its own, so a test can kill -9 it in the middle.
 *
 *   node -r ./test/storage/ts-register.js test/helpers/copy-child.ts SOURCE DEST EVENTS CHECKPOINT_BYTES STOP_AT
 *
 * Every checkpoint (fdatasync) is appended to EVENTS as one JSON line, `{"checkpoint": bytes}` (what the
 * heartbeat would carry), then `{"done": outcome}`. Once a checkpoint reaches STOP_AT bytes the process
 * blocks its event loop (the reads and writes already in flight still finish) and waits to be killed,
 * so the test kills it at a known point, with more written than the last checkpoint. Holes are skipped
 * as copyImage skips them (qemu-img map).
 */
import { appendFileSync } from 'node:fs';
import { singlePassCopy } from '../../src/activities/single-pass-copy';
import { fileHoles } from '../../src/hypervisor/qemu-img';

const [source, dest, events, checkpointBytes, stopAt] = process.argv.slice(2);
if (!source || !dest || !events || !checkpointBytes || !stopAt) {
  process.stderr.write('usage: copy-child.ts SOURCE DEST EVENTS CHECKPOINT_BYTES STOP_AT\n');
  process.exit(2);
}
fileHoles(source)
  .then((holes) =>
    singlePassCopy({
      source,
      dest,
      holes,
      signal: new AbortController().signal,
      checkpointBytes: Number(checkpointBytes),
      onProgress: () => undefined,
      onCheckpoint: (bytes) => {
        appendFileSync(events, `${JSON.stringify({ checkpoint: bytes })}\n`);
        if (bytes >= Number(stopAt)) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
      },
    }),
  )
  .then(
    (outcome) => {
      appendFileSync(events, `${JSON.stringify({ done: outcome })}\n`);
      process.exit(0);
    },
    (err: unknown) => {
      process.stderr.write(`${(err as Error).message}\n`);
      process.exit(1);
    },
  );
