/**
 * TLS and API-key settings as the edge parses them (src/worker/config.ts) and as every connection reads them
 * (src/client/access.ts): flags over variables, one sentence for each bad setting, before anything connects.
 * Certificates are made by openssl, as an operator would.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { temporalConnectOptions } from '../../src/client/access';
import { loadConfig } from '../../src/worker/config';
import type { TemporalFlags } from '../../src/worker/config';
import { makeCa, makeLeaf } from '../helpers/certs';
import type { Ca, Pem } from '../helpers/certs';

let dir: string;
let ca: Ca;
let client: Pem;
let other: Pem;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmb-access-'));
  ca = await makeCa(dir, 'ca');
  client = await makeLeaf(dir, ca, 'client', 'client');
  other = await makeLeaf(dir, ca, 'other', 'client');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const CLUSTER = { TEMPORAL_ADDRESS: 'temporal.example:7233' };

function options(env: Record<string, string>, flags: TemporalFlags = {}) {
  return temporalConnectOptions(loadConfig({ HOME: dir, ...env }, flags));
}

test('certificate, key, CA, server name and API key from the Temporal CLI variables', () => {
  const o = options({
    ...CLUSTER,
    TEMPORAL_TLS_CERT: client.cert,
    TEMPORAL_TLS_KEY: client.key,
    TEMPORAL_TLS_CA: ca.cert,
    TEMPORAL_TLS_SERVER_NAME: 'temporal.internal',
    TEMPORAL_API_KEY: 'key-1',
  });
  expect(o.apiKey).toBe('key-1');
  expect(Buffer.from(o.tls!.clientCertPair!.crt).toString()).toMatch(/BEGIN CERTIFICATE/);
  expect(Buffer.from(o.tls!.serverRootCACertificate!).toString()).toMatch(/BEGIN CERTIFICATE/);
  expect(o.tls!.serverNameOverride).toBe('temporal.internal');
});

test('flags win over the variables; TLS is implied by an API key, off without any option', () => {
  const o = options(
    { ...CLUSTER, TEMPORAL_TLS_CERT: join(dir, 'missing.crt'), TEMPORAL_TLS_KEY: join(dir, 'missing.key') },
    { tlsCert: client.cert, tlsKey: client.key, apiKey: 'from-flag' },
  );
  expect(o.apiKey).toBe('from-flag');
  expect(o.tls?.clientCertPair).toBeDefined();
  expect(options({ ...CLUSTER, TEMPORAL_API_KEY: 'k' })).toEqual({ tls: {}, apiKey: 'k' });
  expect(options({ ...CLUSTER, TEMPORAL_TLS: 'true' })).toEqual({ tls: {} });
  expect(options({ ...CLUSTER })).toEqual({});
  expect(options({ ...CLUSTER, TEMPORAL_TLS: 'false', TEMPORAL_API_KEY: 'k' })).toEqual({ apiKey: 'k' });
});

test.each([
  [
    'a missing certificate file',
    { TEMPORAL_TLS_CERT: '/nonexistent/c.crt', TEMPORAL_TLS_KEY: '/nonexistent/c.key' },
    {},
    /^cannot read the TLS client certificate \/nonexistent\/c\.crt \(TEMPORAL_TLS_CERT\): no such file$/,
  ],
  [
    'a directory as CA',
    {},
    { tlsCa: '/etc' },
    /^cannot read the TLS CA certificate \/etc \(--tls-ca\): it is a directory$/,
  ],
  [
    'a CA that is not PEM',
    { TEMPORAL_TLS_CA: '/etc/hostname' },
    {},
    /\/etc\/hostname \(TEMPORAL_TLS_CA\) is not a PEM certificate$/,
  ],
  [
    'a certificate without its key',
    { TEMPORAL_TLS_CERT: 'CLIENT_CERT' },
    {},
    /without its key: give both --tls-cert and --tls-key/,
  ],
  [
    'a key without its certificate',
    {},
    { tlsKey: 'CLIENT_KEY' },
    /TLS client key was given \(--tls-key\) without its certificate/,
  ],
  [
    'a certificate with another key',
    { TEMPORAL_TLS_CERT: 'CLIENT_CERT', TEMPORAL_TLS_KEY: 'OTHER_KEY' },
    {},
    /do not belong together/,
  ],
  [
    'a key that is not PEM',
    { TEMPORAL_TLS_CERT: 'CLIENT_CERT', TEMPORAL_TLS_KEY: '/etc/hostname' },
    {},
    /\/etc\/hostname \(TEMPORAL_TLS_KEY\) is not a PEM private key$/,
  ],
  [
    'TLS turned off with a certificate',
    { TEMPORAL_TLS: 'false', TEMPORAL_TLS_CA: 'CA' },
    {},
    /^TEMPORAL_TLS_CA needs TLS, which TEMPORAL_TLS turns off/,
  ],
  ['a bad TEMPORAL_TLS', { TEMPORAL_TLS: 'yes' }, {}, /^TEMPORAL_TLS must be true or false$/],
])('%s: one sentence', (_what, env: Record<string, string>, flags: TemporalFlags, message) => {
  const fill = (v: string | undefined) =>
    v === 'CLIENT_CERT'
      ? client.cert
      : v === 'CLIENT_KEY'
        ? client.key
        : v === 'OTHER_KEY'
          ? other.key
          : v === 'CA'
            ? ca.cert
            : v;
  const e = Object.fromEntries(Object.entries(env).map(([k, v]) => [k, fill(v)!]));
  const f = Object.fromEntries(Object.entries(flags).map(([k, v]) => [k, fill(v as string)])) as TemporalFlags;
  let error: Error | undefined;
  try {
    options({ ...CLUSTER, ...e }, f);
  } catch (err) {
    error = err as Error;
  }
  expect(error?.message).toMatch(message);
  expect(error?.message.split('\n')).toHaveLength(1);
});

test('an encrypted client key: says it needs one without a passphrase, and never prints the key', () => {
  const encrypted = join(dir, 'encrypted.key');
  execFileSync('openssl', ['pkey', '-in', client.key, '-out', encrypted, '-aes256', '-passout', 'pass:secret']);
  expect(() => options({ ...CLUSTER, TEMPORAL_TLS_CERT: client.cert, TEMPORAL_TLS_KEY: encrypted })).toThrow(
    /is encrypted: vmbackup needs it without a passphrase/,
  );
});

test('TLS options or an API key without TEMPORAL_ADDRESS: the embedded dev server has neither', () => {
  expect(() => options({ TEMPORAL_API_KEY: 'k' })).toThrow(
    /^TEMPORAL_API_KEY is for a Temporal cluster, and TEMPORAL_ADDRESS is not set: .*set TEMPORAL_ADDRESS/,
  );
  expect(() => options({ TEMPORAL_ADDRESS: '' }, { tlsCa: ca.cert })).toThrow(/^--tls-ca is for a Temporal cluster/);
  expect(options({})).toEqual({});
});

test('the API key never appears in a message', () => {
  writeFileSync(join(dir, 'empty.crt'), '');
  let message = '';
  try {
    options({ ...CLUSTER, TEMPORAL_API_KEY: 'sk-very-secret', TEMPORAL_TLS_CA: join(dir, 'empty.crt') });
  } catch (err) {
    message = (err as Error).message;
  }
  expect(message).toMatch(/is not a PEM certificate/);
  expect(message).not.toContain('sk-very-secret');
});
