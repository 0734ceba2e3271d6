/**
 * mTLS and API keys end to end. The dev server has no TLS, so a real gRPC-over-HTTP/2 proxy (node:http2, TLS with
 * required client certificates, API key check) fronts it: a `vmbackup worker` and `vmbackup backup --wait` that
 * reach Temporal only through it complete a real backup, and without the client certificate, with the wrong CA or
 * with the wrong API key the CLI fails with one sentence and the worker does not start. The proxy is the
 * enforcement point, so the test asserts on what it recorded.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { useFixtureDomains } from '../fixtures/domains';
import { makeCa, makeLeaf } from '../helpers/certs';
import type { Ca, Pem } from '../helpers/certs';
import { startGrpcTlsProxy } from '../helpers/grpc-tls-proxy';
import type { GrpcTlsProxy } from '../helpers/grpc-tls-proxy';
import { identical } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, spawnCli, startWorkerProcess, uniqueHost } from '../helpers/vmbackup';
import type { CliResult } from '../helpers/vmbackup';

const WORKER_STARTED = /vmbackup worker for host/;

describe('Temporal through TLS with client certificates and an API key', () => {
  const newDomain = useFixtureDomains();
  let dir: string;
  let ca: Ca;
  let otherCa: Ca;
  let client: Pem;
  let proxy: GrpcTlsProxy;
  const apiKey = `vmbt-${randomBytes(16).toString('hex')}`;

  beforeAll(async () => {
    await requireTemporal();
    dir = await mkdtemp(join(stackEnv().stateDir, 'test-tls-'));
    ca = await makeCa(dir, 'ca');
    otherCa = await makeCa(dir, 'other-ca');
    const server = await makeLeaf(dir, ca, 'server', 'server');
    client = await makeLeaf(dir, ca, 'vmbackup-client', 'client');
    proxy = await startGrpcTlsProxy({
      upstream: stackEnv().temporal.address,
      cert: await readFile(server.cert, 'utf8'),
      key: await readFile(server.key, 'utf8'),
      clientCa: await readFile(ca.cert, 'utf8'),
      apiKey,
    });
  });
  afterAll(async () => {
    await proxy?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** The cluster is the proxy; nothing in the environment about TLS unless a test puts it there. */
  function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
    const e = cliEnv({ TEMPORAL_ADDRESS: proxy.address, ...extra });
    for (const k of Object.keys(e)) if (/^TEMPORAL_(TLS|API_KEY)/.test(k) && !(k in extra)) delete e[k];
    return e;
  }

  function expectOneSentence(res: CliResult, pattern: RegExp): void {
    expect(res.code).not.toBe(0);
    const lines = res.stderr.trim().split('\n');
    expect(lines).toEqual([expect.stringMatching(pattern)]);
    expect(lines[0]).toMatch(/^vmbackup: /);
    // secrets never printed
    expect(res.stderr).not.toContain(apiKey);
    expect(res.stderr).not.toMatch(/PRIVATE KEY/);
  }

  /** `vmbackup worker` with these settings must fail with the sentence and never serve its queue. */
  async function expectWorkerRefused(args: string[], extraEnv: Record<string, string>, pattern: RegExp) {
    const worker = spawnCli(['worker', '--host', uniqueHost('tls'), '--no-recover', ...args], { env: env(extraEnv) });
    const exit = await worker.exited(60_000);
    expect(exit.code).not.toBe(0);
    expect(worker.stderr()).not.toMatch(WORKER_STARTED);
    expect(worker.stderr().trim().split('\n')).toEqual([expect.stringMatching(pattern)]);
    expect(worker.stderr()).not.toContain(apiKey);
  }

  test('worker and backup --wait with certificate, key, CA and API key complete a real backup through the proxy', async () => {
    await requireLibvirt();
    const dom = await newDomain({
      prefix: 'tls',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0x6b, offsetMiB: 4, lengthMiB: 8 }] }],
    });
    const host = uniqueHost('tls');
    const seenBefore = proxy.calls.length;
    // the worker from flags (the API key from the environment: flags are visible in ps)...
    const worker = await startWorkerProcess(host, {
      env: env({ TEMPORAL_API_KEY: apiKey }),
      args: ['--tls-cert', client.cert, '--tls-key', client.key, '--tls-ca', ca.cert],
    });
    try {
      // ...the CLI from the Temporal CLI's variables
      const target = pathToFileURL(join(dir, 'backups')).href;
      const res = await runCli(['backup', dom.name, '--host', host, '--target', target, '--wait', '--json'], {
        env: env({
          TEMPORAL_TLS_CERT: client.cert,
          TEMPORAL_TLS_KEY: client.key,
          TEMPORAL_TLS_CA: ca.cert,
          TEMPORAL_TLS_SERVER_NAME: 'localhost',
          TEMPORAL_API_KEY: apiKey,
        }),
      });
      expect(res.stderr).toBe('');
      expect(res.code).toBe(0);
      const out = JSON.parse(res.stdout) as { status: string; disks: Array<{ location: string }> };
      expect(out.status).toBe('completed');
      expect(await identical(fileURLToPath(out.disks[0]!.location), dom.disks[0]!.path)).toBe(true);

      const status = await runCli(['status', (JSON.parse(res.stdout) as { backupId: string }).backupId, '--json'], {
        env: env({ TEMPORAL_TLS_CERT: client.cert, TEMPORAL_TLS_KEY: client.key, TEMPORAL_TLS_CA: ca.cert }),
      });
      // no API key: the proxy answers UNAUTHENTICATED, and the CLI says so
      expectOneSentence(status, /refused|wants an API key/);
    } finally {
      await worker.stop();
    }
    const calls = proxy.calls.slice(seenBefore);
    const forwarded = calls.filter((c) => c.outcome === 'forwarded');
    const paths = new Set(forwarded.map((c) => c.path.split('/').pop()));
    // the worker polled and completed tasks, the CLI started the workflow: all through the proxy
    for (const rpc of ['StartWorkflowExecution', 'PollWorkflowTaskQueue', 'RespondWorkflowTaskCompleted']) {
      expect(paths).toContain(rpc);
    }
    expect(forwarded.every((c) => c.clientCert === 'vmbackup-client' && c.apiKey === apiKey)).toBe(true);
    expect(calls.filter((c) => c.outcome === 'unauthenticated').every((c) => c.apiKey === undefined)).toBe(true);
  });

  test('without a client certificate: one sentence from the CLI, and the worker does not start', async () => {
    const errorsBefore = proxy.handshakeErrors.length;
    const settings = { TEMPORAL_TLS_CA: ca.cert, TEMPORAL_API_KEY: apiKey };
    const res = await runCli(['backup', 'vm1', '--host', uniqueHost('tls'), '--wait'], { env: env(settings) });
    expectOneSentence(
      res,
      /the Temporal server at 127\.0\.0\.1:\d+ requires a TLS client certificate: give --tls-cert/,
    );
    await expectWorkerRefused([], settings, /requires a TLS client certificate/);
    expect(proxy.handshakeErrors.slice(errorsBefore).join('\n')).toMatch(/peer did not return a certificate/);
  });

  test('with a CA that did not issue the server certificate: one sentence, no worker', async () => {
    const settings = {
      TEMPORAL_TLS_CERT: client.cert,
      TEMPORAL_TLS_KEY: client.key,
      TEMPORAL_TLS_CA: otherCa.cert,
      TEMPORAL_API_KEY: apiKey,
    };
    const before = proxy.calls.length;
    const res = await runCli(['backup', 'vm1', '--host', uniqueHost('tls'), '--wait'], { env: env(settings) });
    expectOneSentence(res, /presented a certificate this client does not trust .*--tls-ca or TEMPORAL_TLS_CA/);
    await expectWorkerRefused([], settings, /presented a certificate this client does not trust/);
    expect(proxy.calls.length).toBe(before); // nothing got through the handshake
  });

  test('with a client certificate from another CA: one sentence, no worker', async () => {
    const stranger = await makeLeaf(dir, otherCa, 'stranger', 'client');
    const settings = { TEMPORAL_TLS_CA: ca.cert, TEMPORAL_API_KEY: apiKey };
    const flags = ['--tls-cert', stranger.cert, '--tls-key', stranger.key];
    const res = await runCli(['backup', 'vm1', '--host', uniqueHost('tls'), '--wait', ...flags], {
      env: env(settings),
    });
    expectOneSentence(res, new RegExp(`refused the TLS client certificate ${stranger.cert}`));
    await expectWorkerRefused(flags, settings, /refused the TLS client certificate/);
  });

  test('with a wrong API key: one sentence naming where the key came from, no worker', async () => {
    const wrong = `wrong-${randomBytes(8).toString('hex')}`;
    const before = proxy.calls.length;
    const settings = { TEMPORAL_TLS_CERT: client.cert, TEMPORAL_TLS_KEY: client.key, TEMPORAL_TLS_CA: ca.cert };
    const res = await runCli(['backup', 'vm1', '--host', uniqueHost('tls'), '--wait', '--api-key', wrong], {
      env: env(settings),
    });
    expectOneSentence(res, /refused the API key from --api-key \(UNAUTHENTICATED\): check the key$/);
    expect(res.stderr).not.toContain(wrong);
    await expectWorkerRefused(
      [],
      { ...settings, TEMPORAL_API_KEY: wrong },
      /refused the API key from TEMPORAL_API_KEY/,
    );
    const refused = proxy.calls.slice(before).filter((c) => c.outcome === 'unauthenticated');
    expect(refused.length).toBeGreaterThanOrEqual(2);
    expect(refused.every((c) => c.apiKey === wrong && c.clientCert === 'vmbackup-client')).toBe(true);
    expect(proxy.calls.slice(before).filter((c) => c.outcome === 'forwarded')).toEqual([]);
  });
});
