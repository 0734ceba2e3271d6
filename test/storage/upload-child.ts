/**
 * A putImage in its own process, so a test can kill -9 it mid-upload. Every checkpoint is appended
 * to a file as one JSON line (what Temporal's heartbeat would have recorded), then `{"done": ...}`.
 *
 *   node -r ./test/storage/ts-register.js test/storage/upload-child.ts URL KEY FILE CHECKPOINTS [S3OPTIONS_JSON]
 *
 * The S3 endpoint and credentials come from the environment (this process is an edge).
 */
import { appendFileSync } from 'node:fs';
import { openTarget, targetEnvironmentFrom } from '../../src/storage/registry';

const [url, key, file, checkpoints, s3json] = process.argv.slice(2);
if (!url || !key || !file || !checkpoints) {
  process.stderr.write('usage: upload-child.ts URL KEY FILE CHECKPOINTS [S3OPTIONS_JSON]\n');
  process.exit(2);
}
const target = openTarget(url, { env: targetEnvironmentFrom(process.env), s3: JSON.parse(s3json ?? '{}') });
target.putImage(key, file, { onCheckpoint: (cp) => appendFileSync(checkpoints, `${JSON.stringify(cp)}\n`) }).then(
  (r) => {
    appendFileSync(checkpoints, `${JSON.stringify({ done: r })}\n`);
    process.exit(0);
  },
  (err: unknown) => {
    process.stderr.write(`${(err as Error).message}\n`);
    process.exit(1);
  },
);
