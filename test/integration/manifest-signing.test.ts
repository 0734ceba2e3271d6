/**
 * Manifest signing (issue #11, item 8): a worker given VMBACKUP_MANIFEST_KEY_FILE signs every manifest it writes;
 * with the key, `verify` and `restore` refuse a manifest someone else wrote (here: an image and its manifest
 * replaced together, the manifest naming the new image's true SHA-256, which no checksum can catch), `list` marks
 * it, and `copy` keeps the signature. Without a key nothing changes. Real worker, real domain, built CLI.
 */
import { randomBytes } from 'node:crypto';
import { copyFile, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { signManifest, type Manifest } from '../../src/repository/manifest';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, uniqueHost, type WorkerProcess } from '../helpers/vmbackup';
import { makeImage } from '../storage/backups';

/** stderr without the AWS SDK's Node-version warning */
function ownLines(stderr: string): string[] {
  return stderr.split('\n').filter((l) => l.startsWith('vmbackup:'));
}

describe('manifest signing', () => {
  const newDomain = useFixtureDomains();
  const host = uniqueHost('sig');
  let work: string;
  let keyFile: string;
  let worker: WorkerProcess;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-sign-'));
    keyFile = join(work, 'manifest.key');
    await writeFile(keyFile, `${randomBytes(48).toString('base64')}\n`, { mode: 0o600 });
    worker = await startWorkerProcess(host, { env: cliEnv({ VMBACKUP_MANIFEST_KEY_FILE: keyFile }) });
  });
  afterAll(async () => {
    await worker?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('signed by the worker; a forged image + manifest pair is refused by verify and restore with the key, accepted without', async () => {
    const dom = await newDomain({
      prefix: 'sig',
      disks: [{ format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0x5e, offsetMiB: 0, lengthMiB: 4 }] }],
    });
    const dir = join(work, 'target');
    const target = pathToFileURL(dir).href;
    const withKey = cliEnv({ VMBACKUP_MANIFEST_KEY_FILE: keyFile });
    const noKey = cliEnv();

    const backup = await runCli(['backup', dom.name, '--host', host, '--target', target, '--wait', '--json']);
    expect(backup.code).toBe(0);
    const { backupId } = JSON.parse(backup.stdout) as { backupId: string };
    const manifestPath = join(dir, dom.name, backupId, 'manifest.json');
    const original = await readFile(manifestPath);
    const stored = JSON.parse(original.toString()) as Manifest & { signature?: string };
    expect(stored.signature).toMatch(/^hmac-sha256:[0-9a-f]{64}$/);

    const verified = await runCli(['verify', backupId, '--target', target], { env: withKey });
    expect([verified.code, ownLines(verified.stderr)]).toEqual([0, []]);
    expect(verified.stderr).toMatch(/is intact \(1 disk, domain\.xml\)/);
    const listed = await runCli(['list', '--target', target], { env: withKey });
    expect(listed.stdout.split('\n')[0]).toMatch(/\s+SIGNED$/);
    expect(listed.stdout).toMatch(new RegExp(`^${backupId}\\s.*\\syes$`, 'm'));

    // copy writes the manifest as stored: the signature still verifies on the other target
    const copyTarget = pathToFileURL(join(work, 'copy')).href;
    expect((await runCli(['copy', backupId, '--from', target, '--to', copyTarget], { env: withKey })).code).toBe(0);
    expect(await readFile(join(work, 'copy', dom.name, backupId, 'manifest.json'))).toEqual(original);
    expect((await runCli(['verify', backupId, '--target', copyTarget], { env: withKey })).code).toBe(0);

    // someone who can write the target replaces the image and its manifest together; the SHA-256 is right
    const forged = await makeImage(work, 'forged', 'qcow2', 0x66);
    await copyFile(forged.path, join(dir, dom.name, backupId, 'vda.qcow2'));
    const forgedManifest = {
      ...stored,
      disks: [{ ...stored.disks[0]!, sha256: forged.sha256, size: forged.size }],
    };
    const refusal = `vmbackup: The manifest of ${backupId} on ${target} is not signed with your key: it was written by someone else or changed; do not trust this backup.`;
    const otherKey = randomBytes(48);
    const { signature: _old, ...unsigned } = forgedManifest;
    const variants: Array<[string, unknown]> = [
      ['the old signature kept', forgedManifest],
      ['no signature', unsigned],
      ['signed with another key', signManifest(unsigned as Manifest, otherKey)],
    ];
    const out = join(work, 'restored');
    for (const [what, body] of variants) {
      await writeFile(manifestPath, JSON.stringify(body, null, 2));
      const v = await runCli(['verify', backupId, '--target', target], { env: withKey });
      expect([what, v.code, ownLines(v.stderr)]).toEqual([what, 1, [refusal]]);
      const r = await runCli(['restore', backupId, '--target', target, '--to', out], { env: withKey });
      expect([what, r.code, ownLines(r.stderr)]).toEqual([what, 1, [refusal]]);
      expect(await readdir(out).catch(() => [])).toEqual([]);
      const l = await runCli(['list', '--target', target], { env: withKey });
      expect(l.code).toBe(0);
      expect(l.stdout).toMatch(new RegExp(`^${backupId}\\s.*\\sNO$`, 'm'));
      expect(ownLines(l.stderr)).toEqual([
        expect.stringMatching(/^vmbackup: 1 manifest\(s\) on .* are not signed with your key/),
      ]);
    }

    // without a key nothing is checked: the forged pair is consistent, which is why the key matters
    const v = await runCli(['verify', backupId, '--target', target], { env: noKey });
    expect(v.code).toBe(0);
    const r = await runCli(['restore', backupId, '--target', target, '--to', out], { env: noKey });
    expect(r.code).toBe(0);
    expect((await readFile(join(out, 'vda.qcow2'))).equals(await readFile(forged.path))).toBe(true);
    expect((await runCli(['list', '--target', target], { env: noKey })).stdout.split('\n')[0]).not.toMatch(/SIGNED/);
  });

  test('a key file others can read stops the worker and the commands, with one sentence', async () => {
    const loose = join(work, 'loose.key');
    await writeFile(loose, randomBytes(48).toString('base64'), { mode: 0o644 });
    const env = cliEnv({ VMBACKUP_MANIFEST_KEY_FILE: loose });
    const list = await runCli(['list', '--target', pathToFileURL(work).href], { env });
    expect(list.code).toBe(1);
    expect(ownLines(list.stderr)).toEqual([
      `vmbackup: VMBACKUP_MANIFEST_KEY_FILE ${loose} is readable or writable by group or others (mode 644); run \`chmod 600 ${loose}\`: anyone who reads the key can sign manifests.`,
    ]);
    await expect(startWorkerProcess(uniqueHost('sigbad'), { env })).rejects.toThrow(
      /exited with 1:[\s\S]*is readable or writable by group or others/,
    );
  });
});
