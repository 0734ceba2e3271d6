/**
 * vmbackup on the Node it runs on (bin/vmbackup takes `node` from PATH, or VMBACKUP_NODE): a worker and the CLI
 * back a VM up to S3 and restore it, through the built CLI. scripts/test-all.sh runs this file on Node 20 and
 * again on Node 22 (scripts/node22.sh, VMBACKUP_TEST_NODE_MAJOR=22). On Node 22 the AWS SDK's warning that its
 * releases after January 2027 need Node >= 22 must not appear.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { DeleteObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { useFixtureDomains } from '../fixtures/domains';
import { identical } from '../helpers/images';
import { requireLibvirt, requireS3, requireTemporal, s3ClientConfig, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, uniqueHost } from '../helpers/vmbackup';

const run = promisify(execFile);

async function removePrefix(prefix: string): Promise<void> {
  const s3 = new S3Client(s3ClientConfig());
  const Bucket = stackEnv().s3.bucket;
  try {
    const { Contents } = await s3.send(new ListObjectsV2Command({ Bucket, Prefix: `${prefix}/` }));
    for (const o of Contents ?? []) await s3.send(new DeleteObjectCommand({ Bucket, Key: o.Key! }));
  } finally {
    s3.destroy();
  }
}
const AWS_NODE_WARNING = /NodeVersionSupportWarning|will require node >=22/;

describe('the CLI and the worker on this Node', () => {
  const newDomain = useFixtureDomains();
  let work: string;
  let nodeMajor: number;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-node-'));
    // the node bin/vmbackup runs: VMBACKUP_NODE, else the first on PATH
    const env = cliEnv();
    const { stdout } = await run(env.VMBACKUP_NODE ?? 'node', ['--version'], { env });
    nodeMajor = Number(/^v(\d+)\./.exec(stdout.trim())?.[1]);
    const wanted = process.env.VMBACKUP_TEST_NODE_MAJOR;
    if (wanted && (nodeMajor !== Number(wanted) || process.versions.node.split('.')[0] !== wanted)) {
      throw new Error(
        `VMBACKUP_TEST_NODE_MAJOR=${wanted}, but the CLI runs on ${stdout.trim()} and jest on v${process.versions.node}`,
      );
    }
  });
  afterAll(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('a backup to S3 and a restore from it; on Node >= 22 without the SDK warning', async () => {
    const dom = await newDomain({
      prefix: 'node',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x4e, offsetMiB: 2, lengthMiB: 6 }] }],
    });
    const host = uniqueHost('node');
    const worker = await startWorkerProcess(host);
    const prefix = `node-runtime-${host}`;
    const target = `s3://${stackEnv().s3.bucket}/${prefix}`;
    try {
      const backup = await runCli(['backup', dom.name, '--host', host, '--target', target, '--wait', '--json']);
      expect(backup.code).toBe(0);
      const { backupId, status } = JSON.parse(backup.stdout) as { backupId: string; status: string };
      expect(status).toBe('completed');

      const to = join(work, 'vda.restored');
      const restore = await runCli(['restore', backupId, '--target', target, '--disk', 'vda', '--to', to]);
      expect(restore.code).toBe(0);
      expect(await identical(to, dom.disks[0]!.path)).toBe(true);

      if (nodeMajor >= 22) {
        expect(backup.stderr).not.toMatch(AWS_NODE_WARNING);
        expect(restore.stderr).not.toMatch(AWS_NODE_WARNING);
        expect(worker.output()).not.toMatch(AWS_NODE_WARNING);
      }
    } finally {
      await worker.stop();
      await removePrefix(prefix);
    }
  });
});
