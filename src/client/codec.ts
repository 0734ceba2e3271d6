/**
 * The payload codec: AES-256-GCM over every payload that goes to Temporal (workflow and activity inputs and
 * results, heartbeat details, query results), with a 32-byte key the worker and its clients share
 * (VMBACKUP_PAYLOAD_KEY_FILE / --payload-key-file). A shared cluster's history then holds no host, path, target
 * URL or domain name inside a payload. Search attributes, workflow ids, task queues, activity types, timings and
 * failure messages are not payloads and stay readable (docs/security.md).
 *
 * Format: the original Payload, protobuf-encoded, is the plaintext (as in Temporal's encryption sample); the new
 * payload's data is nonce (12) || ciphertext || tag (16), its metadata names the encoding and the key id (the
 * first 8 bytes of SHA-256 over a label and the key), and the key id is authenticated too. A payload with another
 * key id says so in one sentence instead of failing authentication.
 *
 * A worker with a key decodes only encrypted payloads: someone who can start workflows on the cluster but has no
 * key cannot make it run anything. A client reading backups also accepts plaintext payloads (backups started before
 * the key was set).
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import type { Payload, PayloadCodec } from '@temporalio/common';
import { temporal } from '@temporalio/proto';
import type { Config, ConfigFile } from '../worker/config';

export const ENCRYPTED_ENCODING = 'binary/encrypted';
export const KEY_ID_METADATA = 'encryption-key-id';
const ALGORITHM = 'aes-256-gcm';
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const KEY_BYTES = 32;

/** A payload this process cannot open: no key, another key, or refused plaintext. Callers must not swallow it. */
export class PayloadKeyError extends Error {}

export interface PayloadKey {
  /** 16 hex digits; names the key in payload metadata, reveals nothing about it */
  id: string;
  key: Buffer;
  file: ConfigFile;
}

/** Reads and checks the key file: a regular file of this user (or root), no access for group or others. */
export function loadPayloadKey(file: ConfigFile): PayloadKey {
  const where = `the payload key file ${file.path} (${file.from})`;
  let text: string;
  let fd: number | undefined;
  try {
    fd = openSync(file.path, 'r');
    const st = fstatSync(fd);
    if (!st.isFile()) throw new Error(`${where} is not a regular file`);
    if ((st.mode & 0o077) !== 0) {
      throw new Error(
        `${where} is open to group or others (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}): ` +
          `\`chmod 600 ${file.path}\`, and make a new key if others may have read it`,
      );
    }
    const uid = process.getuid?.();
    if (uid !== undefined && st.uid !== uid && st.uid !== 0) {
      throw new Error(`${where} belongs to uid ${st.uid}, who could replace it: give it to this user (uid ${uid})`);
    }
    text = readFileSync(fd, 'utf8').trim();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new Error(`${where} does not exist`);
    if (code === 'EACCES') throw new Error(`cannot read ${where}: permission denied`);
    if (code === 'EISDIR') throw new Error(`${where} is not a regular file`);
    throw err;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
  const key = parseKey(text);
  if (!key) {
    throw new Error(
      `${where} does not hold a 32-byte key in base64 or hex: make one with \`openssl rand -base64 32 > ${file.path}\``,
    );
  }
  return { id: keyId(key), key, file };
}

function parseKey(text: string): Buffer | undefined {
  if (/^[0-9a-fA-F]{64}$/.test(text)) return Buffer.from(text, 'hex');
  if (/^[A-Za-z0-9+/_-]{43}=?$/.test(text)) {
    const key = Buffer.from(text.replace(/-/g, '+').replace(/_/g, '/'), 'base64');
    if (key.length === KEY_BYTES) return key;
  }
  return undefined;
}

function keyId(key: Buffer): string {
  return createHash('sha256').update('vmbackup payload key id\0').update(key).digest('hex').slice(0, 16);
}

const text = (s: string) => Buffer.from(s, 'utf8');
const str = (b: Uint8Array | null | undefined) => (b ? Buffer.from(b).toString('utf8') : undefined);

export class PayloadEncryption implements PayloadCodec {
  constructor(
    private readonly key: PayloadKey,
    /** refuse plaintext payloads (a worker); a client reading old backups accepts them */
    private readonly requireEncrypted: boolean,
  ) {}

  async encode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) => {
      const plain = temporal.api.common.v1.Payload.encode(p).finish();
      const nonce = randomBytes(NONCE_BYTES);
      const cipher = createCipheriv(ALGORITHM, this.key.key, nonce);
      cipher.setAAD(text(this.key.id));
      const sealed = Buffer.concat([nonce, cipher.update(plain), cipher.final(), cipher.getAuthTag()]);
      return {
        metadata: { encoding: text(ENCRYPTED_ENCODING), [KEY_ID_METADATA]: text(this.key.id) },
        data: sealed,
      };
    });
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((p) => {
      if (str(p.metadata?.encoding) !== ENCRYPTED_ENCODING) {
        if (!this.requireEncrypted) return p;
        throw new PayloadKeyError(
          `a payload is not encrypted: this worker has a payload key (${this.key.file.from}) and runs only what a client with that key started`,
        );
      }
      const id = str(p.metadata?.[KEY_ID_METADATA]);
      if (id !== this.key.id) {
        throw new PayloadKeyError(
          `a payload was encrypted with another key (key id ${id ?? 'none'}; the key in ${this.key.file.from} has key id ${this.key.id}): use the key the backup was started with`,
        );
      }
      const data = Buffer.from(p.data ?? []);
      if (data.length < NONCE_BYTES + TAG_BYTES)
        throw new PayloadKeyError(`an encrypted payload (key id ${id}) is truncated`);
      const decipher = createDecipheriv(ALGORITHM, this.key.key, data.subarray(0, NONCE_BYTES));
      decipher.setAAD(text(id));
      decipher.setAuthTag(data.subarray(data.length - TAG_BYTES));
      let plain: Buffer;
      try {
        plain = Buffer.concat([decipher.update(data.subarray(NONCE_BYTES, data.length - TAG_BYTES)), decipher.final()]);
      } catch {
        throw new PayloadKeyError(
          `an encrypted payload (key id ${id}) failed authentication: it was altered after encryption`,
        );
      }
      return temporal.api.common.v1.Payload.decode(plain);
    });
  }
}

/**
 * The codec of a process without a key: plaintext passes, and an encrypted payload (a backup started with a key)
 * fails with the sentence that says which option is missing, instead of the converter's "Unknown encoding".
 */
export class MissingPayloadKey implements PayloadCodec {
  async encode(payloads: Payload[]): Promise<Payload[]> {
    return payloads;
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    for (const p of payloads) {
      if (str(p.metadata?.encoding) === ENCRYPTED_ENCODING) {
        throw new PayloadKeyError(
          `this backup's workflow data is encrypted (key id ${str(p.metadata?.[KEY_ID_METADATA]) ?? 'unknown'}): ` +
            'give its payload key with VMBACKUP_PAYLOAD_KEY_FILE or --payload-key-file',
        );
      }
    }
    return payloads;
  }
}

const keys = new WeakMap<ConfigFile, PayloadKey>();

/** The data converter option for Client, Worker and every other connection. */
export function payloadCodecs(config: Config, role: 'worker' | 'client'): { payloadCodecs: PayloadCodec[] } {
  const file = config.payloadKeyFile;
  if (!file) return { payloadCodecs: [new MissingPayloadKey()] };
  let key = keys.get(file);
  if (!key) {
    key = loadPayloadKey(file);
    keys.set(file, key);
  }
  return { payloadCodecs: [new PayloadEncryption(key, role === 'worker')] };
}
