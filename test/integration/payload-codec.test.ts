/**
 * The payload codec end to end on the real server: a backup with a payload key leaves a history whose payloads
 * are all ciphertext (read with a client that has no codec, as anyone on the cluster could), a worker with another
 * key cannot run the workflow and says why, and `vmbackup status` with the right key still works.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Client } from '@temporalio/client';
import type { Payload } from '@temporalio/common';
import { defaultPayloadConverter } from '@temporalio/common';
import { ENCRYPTED_ENCODING, loadPayloadKey, PayloadEncryption } from '../../src/client/codec';
import { findBackup } from '../../src/client/backups';
import { useFixtureDomains } from '../fixtures/domains';
import { identical } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';

interface FoundPayload {
  /** where in the event it was: `workflowExecutionStartedEventAttributes.input.payloads.0` */
  path: string;
  payload: Payload;
}

/** Every payload of a history event, except search attributes (indexed in plain text by design). */
function payloadsOf(value: unknown, path: string, out: FoundPayload[]): void {
  if (!value || typeof value !== 'object') return;
  if (ArrayBuffer.isView(value)) return;
  const v = value as Record<string, unknown>;
  if ('data' in v && 'metadata' in v && (v.data === null || ArrayBuffer.isView(v.data))) {
    out.push({ path, payload: v as Payload });
    return;
  }
  for (const [k, child] of Object.entries(v)) {
    if (k === 'searchAttributes' || k === 'upsertWorkflowSearchAttributesEventAttributes') continue;
    payloadsOf(child, path ? `${path}.${k}` : k, out);
  }
}

const encodingOf = (p: Payload) => Buffer.from(p.metadata?.encoding ?? []).toString();
const textOf = (p: Payload) => Buffer.from(p.data ?? []).toString('latin1');

describe('payload codec on the real server', () => {
  const newDomain = useFixtureDomains();
  let client: Client;
  let closeClient: () => Promise<void>;
  let work: string;
  let keyA: string;
  let keyB: string;
  const workers: WorkerProcess[] = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    ({ client, close: closeClient } = await temporalClient());
    work = await mkdtemp(join(stackEnv().stateDir, 'test-codec-'));
    keyA = join(work, 'a.key');
    keyB = join(work, 'b.key');
    await writeFile(keyA, randomBytes(32).toString('base64'), { mode: 0o600 });
    await writeFile(keyB, randomBytes(32).toString('hex'), { mode: 0o600 });
  });
  afterEach(async () => {
    for (const w of workers.splice(0)) await w.stop();
  });
  afterAll(async () => {
    await closeClient?.();
    if (work) await rm(work, { recursive: true, force: true });
  });

  const withKey = (file: string | undefined) => {
    const env = cliEnv(file ? { VMBACKUP_PAYLOAD_KEY_FILE: file } : {});
    if (!file) delete env.VMBACKUP_PAYLOAD_KEY_FILE;
    return env;
  };

  test('a backup with a key: every payload in its history is ciphertext; no domain, path or target inside one', async () => {
    const dom = await newDomain({
      prefix: 'codec',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x2c, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const host = uniqueHost('codec');
    workers.push(await startWorkerProcess(host, { env: withKey(keyA) }));
    const targetDir = join(work, 'target');
    const target = pathToFileURL(targetDir).href;
    // the key from the flag here, from the variable in the worker
    const ok = await runCli(
      ['backup', dom.name, '--host', host, '--target', target, '--wait', '--json', '--payload-key-file', keyA],
      { env: withKey(undefined), timeoutMs: 300_000 },
    );
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    const result = JSON.parse(ok.stdout) as { backupId: string; status: string; disks: Array<{ location: string }> };
    expect(result.status).toBe('completed');
    expect(await identical(fileURLToPath(result.disks[0]!.location), dom.disks[0]!.path)).toBe(true);

    // the history as anyone on the cluster reads it: a client without the codec
    const handle = await findBackup(client, result.backupId);
    const { events } = await handle.fetchHistory();
    const found: FoundPayload[] = [];
    (events ?? []).forEach((e, i) => payloadsOf(e, String(i), found));
    // the SDK's own local-activity and patch markers carry metadata payloads of the SDK ("data": activity type,
    // attempt, times; the patch id); a local activity's "result" in them is ours and encrypted
    const ours = found.filter((f) => !/markerRecordedEventAttributes\.details\.(?!result\b)/.test(f.path));
    expect(ours.length).toBeGreaterThan(10);
    expect(ours.filter((f) => /details\.result/.test(f.path)).length).toBeGreaterThan(2);
    expect(ours.filter((f) => encodingOf(f.payload) !== ENCRYPTED_ENCODING).map((f) => f.path)).toEqual([]);
    // the staging dir is <target>/.staging/<id>, or /var/lib/vmbackup/staging/<id> where QEMU writes it
    const staging = join('staging', result.backupId);
    for (const f of found) {
      expect(textOf(f.payload)).not.toContain(dom.name);
      expect(textOf(f.payload)).not.toContain(targetDir);
      expect(textOf(f.payload)).not.toContain(staging);
      expect(textOf(f.payload)).not.toContain(host);
    }
    // ...and they do hold those names: the check above looked at the real inputs and results
    const codec = new PayloadEncryption(loadPayloadKey({ path: keyA, from: 'test' }), true);
    const plain = (await codec.decode(ours.map((f) => f.payload))).map((p) =>
      String(JSON.stringify(defaultPayloadConverter.fromPayload(p))),
    );
    for (const name of [dom.name, target, staging, host]) expect(plain.some((t) => t.includes(name))).toBe(true);
    // recovery's workflow goes through the codec too: the worker (which has the key) runs it
    const recover = await runCli(['recover', '--host', host, '--json', '--payload-key-file', keyA], {
      env: withKey(undefined),
      timeoutMs: 120_000,
    });
    expect(recover.stderr).toBe('');
    expect(recover.code).toBe(0);
    expect(JSON.parse(recover.stdout)).toEqual([]);
    // status reads the result with the key; without it, it says which option is missing
    const status = await runCli(['status', result.backupId, '--json', '--payload-key-file', keyA]);
    expect(status.code).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({ backupId: result.backupId, status: 'completed' });
    const noKey = await runCli(['status', result.backupId], { env: withKey(undefined) });
    expect(noKey.code).not.toBe(0);
    expect(noKey.stderr.trim().split('\n')).toEqual([
      expect.stringMatching(
        /^vmbackup: this backup's workflow data is encrypted \(key id [0-9a-f]{16}\): give its payload key with VMBACKUP_PAYLOAD_KEY_FILE or --payload-key-file$/,
      ),
    ]);
    // search attributes stay readable: that is how `status` and `list` find a backup without the key
    const raw = await client.workflowService.describeWorkflowExecution({
      namespace: stackEnv().temporal.namespace,
      execution: { workflowId: handle.workflowId },
    });
    const domainAttr = raw.workflowExecutionInfo?.searchAttributes?.indexedFields?.VmbackupDomain;
    expect(defaultPayloadConverter.fromPayload(domainAttr!)).toBe(dom.name);
  });

  test("status of a running backup reads its step's progress (heartbeat details) through the codec", async () => {
    const dom = await newDomain({ prefix: 'codec', disks: [{ format: 'raw', sizeMiB: 1024, randomMiB: 1024 }] });
    const host = uniqueHost('codec');
    workers.push(await startWorkerProcess(host, { env: withKey(keyA) }));
    const target = pathToFileURL(join(work, 'progress')).href;
    const started = await runCli(['backup', dom.name, '--host', host, '--method', 'snapshot', '--target', target], {
      env: withKey(keyA),
    });
    expect(started.code).toBe(0);
    const backupId = started.stdout.trim();
    const handle = await findBackup(client, backupId);
    try {
      const progress = await waitFor(
        'status to show the copy progress',
        async () => {
          const res = await runCli(['status', backupId, '--json'], { env: withKey(keyA) });
          const view = JSON.parse(res.stdout) as { activity?: { name: string; bytesDone: number; bytesTotal: number } };
          return view.activity?.name === 'copyBaseImages' && view.activity.bytesTotal > 0 ? view.activity : undefined;
        },
        { intervalMs: 200 },
      );
      expect(progress.bytesTotal).toBe(1024 * 1024 * 1024);
      const done = await runCli(['status', backupId, '--wait', '--json'], { env: withKey(keyA) });
      expect(JSON.parse(done.stdout)).toMatchObject({ backupId, status: 'completed' });
    } finally {
      // a failed check must not leave the VM on its overlay: cancel runs the undo steps
      if ((await handle.describe()).status.name === 'RUNNING') {
        await handle.cancel();
        await handle.result().catch(() => undefined);
      }
    }
  });

  /** Starts a backup (no --wait) and returns its handle once the worker's workflow task failed, with the failure. */
  async function refusedBackup(host: string, domain: string, key: string | undefined) {
    const started = await runCli(['backup', domain, '--host', host, '--target', pathToFileURL(join(work, 'b')).href], {
      env: withKey(key),
    });
    expect(started.code).toBe(0);
    const backupId = started.stdout.trim();
    const handle = await findBackup(client, backupId);
    const failed = await waitFor('the workflow task to fail', async () => {
      const { events } = await handle.fetchHistory();
      return events?.find((e) => e.workflowTaskFailedEventAttributes)?.workflowTaskFailedEventAttributes;
    });
    const { events } = await handle.fetchHistory();
    // nothing ran: no activity, local or not
    expect(events?.some((e) => e.activityTaskScheduledEventAttributes || e.markerRecordedEventAttributes)).toBe(false);
    return { backupId, handle, message: failed?.failure?.message ?? '' };
  }

  test('a worker with another key cannot run the workflow and says so; status with the right key still works', async () => {
    const dom = await newDomain({ prefix: 'codec', disks: [{ format: 'qcow2', sizeMiB: 64 }] });
    const host = uniqueHost('codec');
    const wrong = await startWorkerProcess(host, { env: withKey(keyB) });
    workers.push(wrong);
    const { backupId, handle, message } = await refusedBackup(host, dom.name, keyA);
    try {
      expect(message).toMatch(
        /^a payload was encrypted with another key \(key id [0-9a-f]{16}; the key in VMBACKUP_PAYLOAD_KEY_FILE has key id [0-9a-f]{16}\): use the key the backup was started with$/,
      );
      await waitFor('the worker to say so', async () => /encrypted with another key/.test(wrong.output()));

      // a client without the key (recovery lists every running backup) can still list it: no encrypted memo
      const listed: string[] = [];
      for await (const wf of client.workflow.list({ query: `WorkflowId = '${handle.workflowId}'` })) {
        listed.push(wf.workflowId);
      }
      expect(listed).toEqual([handle.workflowId]);

      const status = await runCli(['status', backupId, '--json'], { env: withKey(keyA) });
      expect(status.stderr).toBe('');
      expect(status.code).toBe(0);
      expect(JSON.parse(status.stdout)).toMatchObject({ backupId, status: 'running' });
    } finally {
      await handle.terminate('test: a worker with another key cannot run it');
    }
  });

  test('a workflow started without the key (anyone on the cluster) is not run by a worker that has one', async () => {
    const dom = await newDomain({ prefix: 'codec', disks: [{ format: 'qcow2', sizeMiB: 64 }] });
    const host = uniqueHost('codec');
    workers.push(await startWorkerProcess(host, { env: withKey(keyB) }));
    const { handle, message } = await refusedBackup(host, dom.name, undefined);
    try {
      expect(message).toMatch(/^a payload is not encrypted: this worker has a payload key/);
    } finally {
      await handle.terminate('test: a plaintext workflow on a worker with a key');
    }
  });
});
