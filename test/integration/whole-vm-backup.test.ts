/**
 * Whole-VM backups (issue #14, the backup side) on the real stack: every backup stores the domain's inactive XML,
 * and its NVRAM and swtpm state when it has them, beside the images, named in the manifest; verify checks them,
 * copy carries them, an increment stores its own, list shows them, prune removes them with their backup.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { GetObjectCommand } from '@aws-sdk/client-s3';
import type { Client } from '@temporalio/client';
import { startBackup } from '../../src/client/backups';
import { parseDomainXml } from '../../src/hypervisor/xml';
import type { BackupOptions, BackupResult, RequestedMethod } from '../../src/shared/types';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { virsh } from '../helpers/images';
import { requireLibvirt, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { runCli, startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import { s3Target } from '../storage/fixtures';

interface VmFileJson {
  key: string;
  size: number;
  sha256: string;
}
interface ManifestJson {
  backupId: string;
  domain: string;
  method: string;
  chain: { level: string; parent?: string };
  vm?: {
    xml: VmFileJson;
    nvram?: VmFileJson & { path: string };
    tpm?: { version: string; files: Array<VmFileJson & { path: string }> };
  };
}

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe('whole-VM backups (real stack)', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let worker: WorkerProcess | undefined;
  let host: string;
  let work: string;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-whole-vm-'));
    host = uniqueHost('capvm');
    worker = await startWorkerProcess(host);
  });
  afterAll(async () => {
    await worker?.stop();
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  async function localTarget(name: string): Promise<string> {
    return pathToFileURL(await mkdtemp(join(work, `${name}-`))).href;
  }

  async function backup(
    dom: FixtureDomain,
    method: RequestedMethod,
    targets: string[],
    options: BackupOptions = {},
  ): Promise<BackupResult> {
    const { handle } = await startBackup(client, {
      domain: dom.name,
      host,
      method,
      targets,
      options: { heartbeatTimeoutSeconds: 5, ...options },
    });
    const result = await handle.result();
    expect(result.status).toBe('completed');
    return result;
  }

  function objectPath(target: string, key: string): string {
    return join(fileURLToPath(target), key);
  }

  async function manifestAt(target: string, dom: FixtureDomain, id: string): Promise<ManifestJson> {
    return JSON.parse(await readFile(objectPath(target, `${dom.name}/${id}/manifest.json`), 'utf8')) as ManifestJson;
  }

  /** The manifest's domain.xml on a local target: its hash and size are the manifest's, and it is the domain's. */
  async function checkStoredXml(target: string, dom: FixtureDomain, m: ManifestJson): Promise<string> {
    expect(m.vm).toBeDefined();
    const xml = m.vm!.xml;
    expect(xml.key).toBe(`${dom.name}/${m.backupId}/domain.xml`);
    const body = await readFile(objectPath(target, xml.key));
    expect(body.length).toBe(xml.size);
    expect(sha256(body)).toBe(xml.sha256);
    const parsed = parseDomainXml(body.toString('utf8'));
    expect(parsed.name).toBe(dom.name);
    expect(parsed.uuid).toBe(dom.uuid);
    return body.toString('utf8');
  }

  test('push, snapshot and offline store the inactive XML; verify, copy to S3, an increment, list and prune', async () => {
    const dom = await newDomain({
      prefix: 'capvm',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x5c, offsetMiB: 0, lengthMiB: 4 }] }],
    });
    const inactive = await virsh('dumpxml', dom.name, '--inactive');
    const pushTarget = await localTarget('push');
    const snapTarget = await localTarget('snap');
    const s3 = await s3Target();
    try {
      // push: a full, then an incremental link with its own VM files
      const full = await backup(dom, 'push', [pushTarget], { level: 'full' });
      const fullManifest = await manifestAt(pushTarget, dom, full.backupId);
      expect(await checkStoredXml(pushTarget, dom, fullManifest)).toBe(inactive);
      expect(fullManifest.vm!.nvram).toBeUndefined();
      expect(fullManifest.vm!.tpm).toBeUndefined();
      const inc = await backup(dom, 'push', [pushTarget], { level: 'inc' });
      const incManifest = await manifestAt(pushTarget, dom, inc.backupId);
      expect(incManifest.chain).toMatchObject({ level: 'inc', parent: full.backupId });
      expect(await checkStoredXml(pushTarget, dom, incManifest)).toBe(inactive);
      expect(incManifest.vm!.xml.key).toBe(`${dom.name}/${inc.backupId}/domain.xml`);

      // snapshot (running), then offline (shut off), to another target
      const snap = await backup(dom, 'snapshot', [snapTarget]);
      const snapManifest = await manifestAt(snapTarget, dom, snap.backupId);
      expect(snapManifest.method).toBe('snapshot');
      expect(await checkStoredXml(snapTarget, dom, snapManifest)).toBe(inactive);
      await dom.destroy();
      const off = await backup(dom, 'push', [snapTarget]);
      const offManifest = await manifestAt(snapTarget, dom, off.backupId);
      expect(offManifest.method).toBe('offline');
      expect(await checkStoredXml(snapTarget, dom, offManifest)).toBe(inactive);

      for (const [target, id] of [
        [pushTarget, inc.backupId],
        [snapTarget, snap.backupId],
        [snapTarget, off.backupId],
      ] as const) {
        const ok = await runCli(['verify', id, '--target', target]);
        expect({ code: ok.code, stderr: ok.stderr }).toMatchObject({ code: 0 });
        expect(ok.stdout).toMatch(/^\s*ok\s+domain\.xml\s/m);
      }

      // list: the VM column, and vmFiles in --json
      const table = await runCli(['list', '--target', snapTarget]);
      expect(table.stdout.split('\n')[0]).toMatch(/\sVM\s/);
      const json = JSON.parse((await runCli(['list', '--target', snapTarget, '--json'])).stdout) as {
        backups: Array<{ backupId: string; vmFiles: string | null }>;
      };
      expect(json.backups.map((b) => b.vmFiles)).toEqual(['xml', 'xml']);

      // copy to S3 carries domain.xml, and verify passes there
      const copied = await runCli(['copy', snap.backupId, '--from', snapTarget, '--to', s3.url]);
      expect({ code: copied.code, stderr: copied.stderr }).toMatchObject({ code: 0 });
      const object = await s3.client.send(
        new GetObjectCommand({ Bucket: stackEnv().s3.bucket, Key: `${s3.prefix}/${snapManifest.vm!.xml.key}` }),
      );
      expect(Buffer.from(await object.Body!.transformToByteArray()).toString('utf8')).toBe(inactive);
      expect((await runCli(['verify', snap.backupId, '--target', s3.url])).code).toBe(0);

      // one changed byte in the stored domain.xml of the increment: verify fails and names domain.xml
      const xmlPath = objectPath(pushTarget, incManifest.vm!.xml.key);
      const body = await readFile(xmlPath);
      body[10] = body[10]! ^ 0x01;
      await writeFile(xmlPath, body);
      const bad = await runCli(['verify', inc.backupId, '--target', pushTarget]);
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(
        /failed verification: domain\.xml: .*domain\.xml has SHA-256 [0-9a-f]{64}, the manifest says/,
      );
      expect(bad.stderr.trim().split('\n')).toHaveLength(1);

      // prune removes a backup's VM files with it (prune goes by the backup's prefix)
      const pruned = await runCli(['prune', '--target', snapTarget, '--keep-last', '1']);
      expect({ code: pruned.code, stderr: pruned.stderr }).toMatchObject({ code: 0 });
      expect(await readdir(join(fileURLToPath(snapTarget), dom.name))).toEqual([off.backupId]);
    } finally {
      await s3.cleanup();
    }
  });

  test('a running UEFI + TPM domain: the NVRAM and swtpm state are stored, equal to the host files libvirt uses', async () => {
    const dom = await newDomain({
      prefix: 'capuefi',
      guest: true,
      uefi: true,
      tpm: true,
      disks: [{ format: 'qcow2', sizeMiB: 64 }],
    });
    // the firmware has written its variables once the guest's kernel runs
    await dom.waitForMarker();
    const target = await localTarget('uefi');
    const result = await backup(dom, 'push', [target]);
    const m = await manifestAt(target, dom, result.backupId);
    await checkStoredXml(target, dom, m);

    // paused: QEMU and swtpm write nothing now, the host files are stable
    await virsh('suspend', dom.name);
    const xml = await virsh('dumpxml', dom.name, '--inactive');
    expect(xml).toContain(`>${dom.nvramPath}</nvram>`);
    const nvram = m.vm!.nvram!;
    expect(nvram).toBeDefined();
    expect(nvram.path).toBe(dom.nvramPath);
    expect(nvram.key).toBe(`${dom.name}/${result.backupId}/nvram.fd`);
    const hostNvram = await readFile(dom.nvramPath!);
    expect(nvram.sha256).toBe(sha256(hostNvram));
    expect(nvram.size).toBe(hostNvram.length);
    expect(sha256(await readFile(objectPath(target, nvram.key)))).toBe(nvram.sha256);

    const tpm = m.vm!.tpm!;
    expect(tpm).toBeDefined();
    expect(tpm.version).toBe('2.0');
    expect(tpm.files.map((f) => f.path)).toContain('tpm2/tpm2-00.permall');
    for (const f of tpm.files) {
      const host = await readFile(join(dom.tpmStateDir!, f.path));
      expect(f.sha256).toBe(sha256(host));
      expect(f.key).toBe(`${dom.name}/${result.backupId}/tpm.${f.path.split('/')[1]}`);
      expect(sha256(await readFile(objectPath(target, f.key)))).toBe(f.sha256);
    }

    const verified = await runCli(['verify', result.backupId, '--target', target]);
    expect({ code: verified.code, stderr: verified.stderr }).toMatchObject({ code: 0 });
    expect(verified.stdout).toMatch(/^ok\s+nvram\.fd\s/m);
    expect(verified.stdout).toMatch(/^ok\s+TPM state tpm2\/tpm2-00\.permall\s/m);
    const json = JSON.parse((await runCli(['list', '--target', target, '--json'])).stdout) as {
      backups: Array<{ vmFiles: string | null }>;
    };
    expect(json.backups.map((b) => b.vmFiles)).toEqual(['xml+nvram+tpm']);
  });
});
