/**
 * A putImage in its own process, so a test can kill -9 it mid-upload. Every checkpoint is appended
 * to a file as one JSON line (what Temporal's heartbeat would have recorded), then `{"done": ...}`.
 *
 *   node -r ./test/storage/ts-register.js test/storage/upload-child.ts URL KEY FILE CHECKPOINTS [OPTIONS_JSON]
 *
 * OPTIONS_JSON is the S3 target options for an s3:// URL; for a file:// URL it is the local driver's
 * options (a small checkpoint window) plus `bandwidthLimit` (bytes/s), so the copy is slow enough to kill.
 * The S3 endpoint and credentials come from the environment (this process is an edge).
 */
import { appendFileSync } from 'node:fs';
import { withBandwidthLimit } from '../../src/storage/bandwidth';
import type { StorageTarget } from '../../src/storage/contract';
import { LocalTarget } from '../../src/storage/local/driver';
import { openTarget, parseTargetUrl, targetEnvironmentFrom } from '../../src/storage/registry';

const [url, key, file, checkpoints, optionsJson] = process.argv.slice(2);
if (!url || !key || !file || !checkpoints) {
  process.stderr.write('usage: upload-child.ts URL KEY FILE CHECKPOINTS [OPTIONS_JSON]\n');
  process.exit(2);
}
const options = JSON.parse(optionsJson ?? '{}') as Record<string, number | undefined>;
const spec = parseTargetUrl(url);
const target: StorageTarget =
  spec.kind === 'file'
    ? withBandwidthLimit(new LocalTarget(spec.path, url, options), options.bandwidthLimit ?? 0)
    : openTarget(url, { env: targetEnvironmentFrom(process.env), s3: options });
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
