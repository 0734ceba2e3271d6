/**
 * The payload codec (src/client/codec.ts) on real payloads made by Temporal's default converter: what a history
 * holds is ciphertext with the key id beside it; another key, an altered payload and a plaintext payload sent to a
 * worker each fail with one sentence; the key file must be private to its owner.
 */
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultPayloadConverter } from '@temporalio/common';
import type { Payload } from '@temporalio/common';
import { ENCRYPTED_ENCODING, KEY_ID_METADATA, loadPayloadKey, PayloadEncryption } from '../../src/client/codec';
import type { PayloadKey } from '../../src/client/codec';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmb-codec-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function keyFile(name: string, content: string, mode = 0o600): string {
  const path = join(dir, name);
  writeFileSync(path, content, { mode });
  chmodSync(path, mode);
  return path;
}

function key(name: string, bytes = randomBytes(32), encoding: 'base64' | 'hex' = 'base64'): PayloadKey {
  return loadPayloadKey({ path: keyFile(name, `${bytes.toString(encoding)}\n`), from: 'VMBACKUP_PAYLOAD_KEY_FILE' });
}

const input = {
  backupId: 'web1-20261130T010203Z-ab12',
  domain: 'web1',
  host: 'hv7',
  targets: ['s3://backups/web1', 'file:///srv/backups'],
  stagingDir: '/srv/backups/.staging/web1-20261130T010203Z-ab12',
};

function payload(value: unknown): Payload {
  return defaultPayloadConverter.toPayload(value)!;
}

const text = (p: Payload) => Buffer.from(p.data ?? []).toString('latin1');

test('a payload becomes ciphertext with the encoding and the key id; the same key gets it back', async () => {
  const k = key('a.key');
  const codec = new PayloadEncryption(k, true);
  const [sealed] = await codec.encode([payload(input)]);
  expect(Buffer.from(sealed!.metadata!.encoding!).toString()).toBe(ENCRYPTED_ENCODING);
  expect(Buffer.from(sealed!.metadata![KEY_ID_METADATA]!).toString()).toBe(k.id);
  expect(Object.keys(sealed!.metadata!)).toEqual(['encoding', KEY_ID_METADATA]);
  for (const secret of ['web1', 'hv7', 's3://backups', '/srv/backups', 'json/plain']) {
    expect(text(sealed!)).not.toContain(secret);
  }
  const [opened] = await codec.decode([sealed!]);
  expect(defaultPayloadConverter.fromPayload(opened!)).toEqual(input);
  // a fresh nonce each time: equal inputs do not look equal in a history
  const [again] = await codec.encode([payload(input)]);
  expect(Buffer.from(again!.data!).equals(Buffer.from(sealed!.data!))).toBe(false);
});

test('the key file may hold the key in base64 or hex: the same key, the same id', () => {
  const bytes = randomBytes(32);
  const b64 = key('b64.key', bytes, 'base64');
  const hex = key('hex.key', bytes, 'hex');
  expect(hex.id).toBe(b64.id);
  expect(hex.key.equals(bytes)).toBe(true);
  expect(hex.id).toMatch(/^[0-9a-f]{16}$/);
  expect(hex.id).not.toBe(bytes.toString('hex').slice(0, 16));
});

test('a payload encrypted with another key: one sentence naming both key ids, never the key', async () => {
  const a = key('one.key');
  const b = key('two.key');
  const [sealed] = await new PayloadEncryption(a, true).encode([payload(input)]);
  const err = await new PayloadEncryption(b, true).decode([sealed!]).then(
    () => undefined,
    (e: unknown) => e as Error,
  );
  expect(err?.message).toBe(
    `a payload was encrypted with another key (key id ${a.id}; the key in VMBACKUP_PAYLOAD_KEY_FILE has key id ${b.id}): use the key the backup was started with`,
  );
  expect(err?.message).not.toContain(b.key.toString('base64'));
});

test('an altered payload fails authentication', async () => {
  const k = key('auth.key');
  const codec = new PayloadEncryption(k, true);
  const [sealed] = await codec.encode([payload(input)]);
  const data = Buffer.from(sealed!.data!);
  data[20]! ^= 0x01;
  await expect(codec.decode([{ ...sealed!, data }])).rejects.toThrow(
    `an encrypted payload (key id ${k.id}) failed authentication: it was altered after encryption`,
  );
  await expect(codec.decode([{ ...sealed!, data: data.subarray(0, 10) }])).rejects.toThrow(/is truncated/);
});

test('a worker refuses plaintext payloads (a workflow started without the key); a client passes them on', async () => {
  const k = key('strict.key');
  const plain = payload(input);
  await expect(new PayloadEncryption(k, true).decode([plain])).rejects.toThrow(
    /^a payload is not encrypted: this worker has a payload key \(VMBACKUP_PAYLOAD_KEY_FILE\) and runs only what a client with that key started$/,
  );
  const [same] = await new PayloadEncryption(k, false).decode([plain]);
  expect(defaultPayloadConverter.fromPayload(same!)).toEqual(input);
});

describe('the key file', () => {
  const from = '--payload-key-file';
  const load = (path: string) => () => loadPayloadKey({ path, from });

  test.each([
    ['0644', 0o644],
    ['0640', 0o640],
    ['0604', 0o604],
    ['0620', 0o620],
  ])('mode %s (readable or writable by group or others) is refused', (shown, mode) => {
    const path = keyFile(`mode-${shown}.key`, randomBytes(32).toString('base64'), mode);
    expect(load(path)).toThrow(
      `the payload key file ${path} (${from}) is open to group or others (mode ${shown}): \`chmod 600 ${path}\`, and make a new key if others may have read it`,
    );
  });

  test('0400 and 0600 are fine', () => {
    expect(load(keyFile('ro.key', randomBytes(32).toString('hex'), 0o400))).not.toThrow();
    expect(load(keyFile('rw.key', randomBytes(32).toString('hex'), 0o600))).not.toThrow();
  });

  test.each([
    ['empty', ''],
    ['too short', randomBytes(16).toString('base64')],
    ['too long', randomBytes(48).toString('hex')],
    ['a passphrase', 'correct horse battery staple'],
  ])('%s: refused with how to make a key', (name, content) => {
    const path = keyFile(`${name.replace(/ /g, '-')}.key`, content);
    expect(load(path)).toThrow(
      `the payload key file ${path} (${from}) does not hold a 32-byte key in base64 or hex: make one with \`openssl rand -base64 32 > ${path}\``,
    );
  });

  test('missing, or a directory: one sentence', () => {
    expect(load(join(dir, 'nope.key'))).toThrow(
      `the payload key file ${join(dir, 'nope.key')} (${from}) does not exist`,
    );
    const sub = join(dir, 'a-dir');
    mkdirSync(sub, { mode: 0o700 });
    expect(load(sub)).toThrow(`the payload key file ${sub} (${from}) is not a regular file`);
  });
});
