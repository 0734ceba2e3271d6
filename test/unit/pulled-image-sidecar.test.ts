/**
 * An image pulled in place (pull mode into a local image tree) is committed with the content digest of its guest data
 * only: the file is never read again, so its sidecar claims no file SHA-256. The chain check a later increment runs
 * (chainProblem) compares that digest, and accepts the sidecar a copy writes (the file's SHA-256 and the content).
 */
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chainProblem } from '../../src/repository/chain-head';
import { buildManifest, storedDigest } from '../../src/repository/manifest';
import { LocalTarget } from '../../src/storage/local/driver';
import { fileStamp } from '../../src/shared/file-stamp';

const CONTENT = 'c'.repeat(64);

let dir: string;
let target: LocalTarget;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbt-sidecar-'));
  target = new LocalTarget(join(dir, 'tree'), `file://${join(dir, 'tree')}`);
});
afterEach(async () => {
  await target.close();
  await rm(dir, { recursive: true, force: true });
});

/** A file written in the backup's directory, as the pull writer leaves its temp image there. */
async function writtenInPlace(name: string, body: string): Promise<string> {
  const path = join(dir, 'tree', 'vm1', 'b1', name);
  await target.putManifest('vm1/b1/keep', Buffer.from('x')); // makes the directory
  await writeFile(path, body, { mode: 0o600 });
  return path;
}

function manifestWith(size: number) {
  return buildManifest({
    backupId: 'b1',
    domain: 'vm1',
    host: 'h',
    method: 'pull',
    startedAt: new Date().toISOString(),
    finishedAt: new Date().toISOString(),
    quiesced: false,
    libvirtVersion: '9',
    qemuVersion: '7',
    disks: [
      {
        name: 'vda',
        format: 'qcow2',
        virtualSize: 1 << 20,
        size,
        sha256: CONTENT,
        key: 'vm1/b1/vda.qcow2',
        content: { scheme: 'content-v1', chunkSize: 4 << 20, chunks: 1, zeroChunks: 0 },
      },
    ],
  });
}

test('committed by rename with a content digest and an unchanged stamp: the sidecar holds the digest and no file SHA-256', async () => {
  const temp = await writtenInPlace('.vda.qcow2.tmp-0123456789abcdef', 'image bytes');
  const put = await target.putImage('vm1/b1/vda.qcow2', temp, {
    allowMove: true,
    sourceStamp: fileStamp(await stat(temp)),
    metadata: { content: CONTENT, disk: 'vda' },
  });
  expect(put).toEqual({ key: 'vm1/b1/vda.qcow2', size: 11, sha256: '', bytesSent: 0 });
  const side = JSON.parse(await readFile(join(dir, 'tree', 'vm1', 'b1', '.vda.qcow2.meta.json'), 'utf8')) as object;
  expect(side).toEqual({ size: 11, metadata: { content: CONTENT, disk: 'vda' } });
  const info = await target.stat('vm1/b1/vda.qcow2');
  expect(info?.metadata).toEqual({ content: CONTENT, disk: 'vda' });
  expect(storedDigest({ content: {} }, info?.metadata)).toBe(CONTENT);
  expect(await chainProblem(target, [manifestWith(11)])).toBeUndefined();
});

test('a file changed since its stamp is hashed as before: the sidecar then holds the SHA-256 it computed', async () => {
  const temp = await writtenInPlace('.vda.qcow2.tmp-0123456789abcdef', 'image bytes');
  const stamp = fileStamp(await stat(temp));
  await writeFile(temp, 'other bytes!');
  const put = await target.putImage('vm1/b1/vda.qcow2', temp, {
    allowMove: true,
    sourceStamp: stamp,
    metadata: { content: CONTENT },
  });
  expect(put.sha256).toMatch(/^[0-9a-f]{64}$/);
  expect((await target.stat('vm1/b1/vda.qcow2'))?.metadata).toEqual({ content: CONTENT, sha256: put.sha256 });
});

test("a copied pulled image (the file's SHA-256 and the content) is the image its manifest records; another content is not", async () => {
  const temp = await writtenInPlace('copy.qcow2', 'image bytes');
  await target.putImage('vm1/b1/vda.qcow2', temp, { metadata: { content: CONTENT } });
  const info = await target.stat('vm1/b1/vda.qcow2');
  expect(info?.metadata?.sha256).toMatch(/^[0-9a-f]{64}$/);
  expect(info?.metadata?.sha256).not.toBe(CONTENT);
  expect(await chainProblem(target, [manifestWith(11)])).toBeUndefined();

  const other = await writtenInPlace('other.qcow2', 'image bytes');
  await target.putImage('vm1/b1/vda.qcow2', other, { metadata: { content: 'd'.repeat(64) } });
  expect(await chainProblem(target, [manifestWith(11)])).toMatch(
    /^disk vda of b1 on .* is not the image its manifest records$/,
  );
});
