/**
 * The notify activity against a real HTTP receiver on 127.0.0.1: what it sends, what it refuses, and which answers
 * Temporal should retry.
 */
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { createNotifyActivities, postEvent, WebhookError, webhookAllowed } from '../../src/activities/notify';
import type { BackupEvent } from '../../src/shared/events';
import { redactTargetUrl, redactWebhookUrl } from '../../src/shared/events';

interface Received {
  method: string;
  url: string;
  headers: IncomingMessage['headers'];
  body: string;
}

let server: Server;
let base: string;
const received: Received[] = [];
/** the status the receiver answers next (per path) */
const answers = new Map<string, number>();

beforeAll(async () => {
  server = createServer((req: IncomingMessage, res: ServerResponse) => {
    let body = '';
    req.on('data', (d: Buffer) => (body += d.toString()));
    req.on('end', () => {
      received.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, body });
      const status = answers.get(req.url ?? '') ?? 204;
      if (status === 0) return; // never answers
      res.writeHead(status, status >= 300 && status < 400 ? { location: 'http://127.0.0.1:1/elsewhere' } : {});
      res.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  server.closeAllConnections();
  await new Promise((r) => server.close(r));
});
beforeEach(() => {
  received.length = 0;
  answers.clear();
});

const SECRET = 'canary-secret-0123456789abcdef';

function failureEvent(): BackupEvent {
  return {
    kind: 'failure',
    domain: 'vm1',
    host: 'hv1',
    backupId: 'vm1-20260101T000000Z-abcd',
    targets: [
      {
        target: 's3://user:pw@bucket/prefix?X-Amz-Signature=abc#frag',
        ok: false,
        error: `The bucket does not exist (request signed with ${SECRET})`,
      },
    ],
    error: `backup vm1-20260101T000000Z-abcd of vm1 reached no target: ${SECRET}`,
    at: '2026-01-01T00:00:01.000Z',
  };
}

async function runNotify(url: string, event: BackupEvent, allowUrls?: string[]): Promise<unknown> {
  const env = new MockActivityEnvironment();
  const { notify } = createNotifyActivities({
    secrets: [SECRET],
    timeoutMs: 2000,
    ...(allowUrls ? { allowUrls } : {}),
  });
  return env.run(notify, { url, event });
}

describe('notify activity', () => {
  test('POSTs the event as JSON, targets redacted and the worker secrets scrubbed', async () => {
    const result = await runNotify(`${base}/hook/T0/B0/token`, failureEvent());
    expect(result).toEqual({ status: 204 });
    expect(received).toHaveLength(1);
    const got = received[0]!;
    expect(got.method).toBe('POST');
    expect(got.url).toBe('/hook/T0/B0/token');
    expect(got.headers['content-type']).toBe('application/json');
    expect(got.body).not.toContain(SECRET);
    expect(got.body).not.toContain('pw@');
    expect(got.body).not.toContain('X-Amz-Signature');
    const body = JSON.parse(got.body) as BackupEvent;
    expect(body).toEqual({
      kind: 'failure',
      domain: 'vm1',
      host: 'hv1',
      backupId: 'vm1-20260101T000000Z-abcd',
      targets: [
        { target: 's3://bucket/prefix', ok: false, error: 'The bucket does not exist (request signed with ***)' },
      ],
      error: 'backup vm1-20260101T000000Z-abcd of vm1 reached no target: ***',
      at: '2026-01-01T00:00:01.000Z',
    });
  });

  test.each([
    [500, true],
    [503, true],
    [408, true],
    [429, true],
    [400, false],
    [404, false],
    [410, false],
    [301, false],
  ])('an answer %i is a failure that Temporal retries: %s', async (status, retryable) => {
    answers.set('/status', status);
    const err = await runNotify(`${base}/status`, failureEvent()).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(ApplicationFailure);
    const failure = err as ApplicationFailure;
    expect(failure.type).toBe('NotifyFailed');
    expect(failure.nonRetryable).toBe(!retryable);
    expect(failure.message).toBe(
      `the webhook at ${base}/… answered ${status}${status === 301 ? ' (a redirect, which vmbackup does not follow: give the final URL)' : ''}`,
    );
    // one POST per attempt, and a redirect is not followed
    expect(received).toHaveLength(1);
  });

  test('a receiver that does not answer, or nothing listening, is retryable', async () => {
    answers.set('/silent', 0);
    const silent = (await runNotify(`${base}/silent`, failureEvent()).catch((e: unknown) => e)) as ApplicationFailure;
    expect(silent.message).toBe(`the webhook at ${base}/… could not be reached (no answer in 2 s)`);
    expect(silent.nonRetryable).toBe(false);
    const closed = await new Promise<number>((r) => {
      const s = createServer();
      s.listen(0, '127.0.0.1', () => {
        const port = (s.address() as AddressInfo).port;
        s.close(() => r(port));
      });
    });
    const refused = (await runNotify(`http://127.0.0.1:${closed}/x`, failureEvent()).catch(
      (e: unknown) => e,
    )) as ApplicationFailure;
    expect(refused.message).toBe(`the webhook at http://127.0.0.1:${closed}/… could not be reached (ECONNREFUSED)`);
    expect(refused.nonRetryable).toBe(false);
  });

  test.each([
    ['ftp://example.org/x', 'the notify URL ftp://example.org/… is not http:// or https:// (ftp)'],
    ['file:///etc/passwd', 'the notify URL file:///… is not http:// or https:// (file)'],
    ['not a url', 'the notify URL (not a URL) is not a URL'],
    [
      'https://user:secret@example.org/hook',
      "the notify URL https://example.org/… carries a user name or password: put the receiver's token in its path or query instead",
    ],
  ])('%s is refused with one sentence, never retried, nothing sent', async (url, sentence) => {
    const err = (await runNotify(url, failureEvent()).catch((e: unknown) => e)) as ApplicationFailure;
    expect(err.message).toBe(sentence);
    expect(err.nonRetryable).toBe(true);
    expect(err.message).not.toContain('secret@');
    expect(received).toHaveLength(0);
  });

  test('postEvent (the CLI path) throws a WebhookError', async () => {
    answers.set('/gone', 404);
    await expect(postEvent(`${base}/gone`, failureEvent())).rejects.toBeInstanceOf(WebhookError);
  });
});

describe('--allow-notify', () => {
  test('a worker with an allow-list POSTs within it and refuses anything else without sending', async () => {
    await expect(runNotify(`${base}/hooks/a`, failureEvent(), [`${base}/hooks`])).resolves.toEqual({ status: 204 });
    expect(received).toHaveLength(1);
    const refused = (await runNotify(`${base}/hooks-evil/a`, failureEvent(), [`${base}/hooks`]).catch(
      (e: unknown) => e,
    )) as ApplicationFailure;
    expect(refused.message).toBe(
      `the notify URL ${base}/… is not within this worker's --allow-notify (VMBACKUP_ALLOW_NOTIFY): nothing was sent`,
    );
    expect(refused.nonRetryable).toBe(true);
    expect(received).toHaveLength(1);
  });
  test.each([
    ['https://h.example/hooks/a', ['https://h.example/hooks'], true],
    ['https://h.example/hooks', ['https://h.example/hooks/'], true],
    ['https://h.example/hooks?x=1', ['https://h.example/hooks'], true],
    ['https://h.example/anything', ['https://h.example'], true],
    ['https://h.example/hooks-evil', ['https://h.example/hooks'], false],
    ['http://h.example/hooks/a', ['https://h.example/hooks'], false],
    ['https://h.example:8443/hooks/a', ['https://h.example/hooks'], false],
    ['https://evil.example/hooks/a', ['https://h.example/hooks'], false],
    ['https://h.example.evil/hooks/a', ['https://h.example/hooks'], false],
  ])('%s within %j: %s', (url, prefixes, allowed) => {
    expect(webhookAllowed(url, prefixes)).toBe(allowed);
  });
});

describe('redaction', () => {
  test.each([
    ['s3://bucket/prefix', 's3://bucket/prefix'],
    ['s3://key:secret@bucket/prefix?x=1#y', 's3://bucket/prefix'],
    ['nfs://10.0.0.1/export/path', 'nfs://10.0.0.1/export/path'],
    ['file:///backups/a', 'file:///backups/a'],
  ])('target %s is shown as %s', (url, shown) => {
    expect(redactTargetUrl(url)).toBe(shown);
  });
  test.each([
    ['https://hooks.example.org/services/T0/B0/XXXX', 'https://hooks.example.org/…'],
    ['https://hooks.example.org/?token=abc', 'https://hooks.example.org/…'],
    ['http://127.0.0.1:8080/', 'http://127.0.0.1:8080'],
    ['http://u:p@127.0.0.1:8080', 'http://127.0.0.1:8080'],
  ])('webhook %s is shown as %s', (url, shown) => {
    expect(redactWebhookUrl(url)).toBe(shown);
  });
});
