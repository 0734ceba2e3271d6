/**
 * Master keys and key objects (docs/chunk-format.md, "Keys"): the master keys wrapped with AES-256-GCM under a key
 * derived from a password with scrypt. Several key objects may wrap the same master keys.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, scrypt } from 'node:crypto';
import { z } from 'zod';
import type { RepositoryConfig } from './config';
import { repositoryConfigSchema } from './config';
import { ChunkFormatError } from './errors';

export interface MasterKeys {
  /** AES-256-GCM key of every object */
  encKey: Buffer;
  /** HMAC-SHA256 key of chunk ids */
  idKey: Buffer;
  /** reserved for signing manifests */
  authKey: Buffer;
}

export interface ScryptParams {
  N: number;
  r: number;
  p: number;
}

/** About 0.4-0.8 s and 128 MiB on the 2-core reference machine (docs/chunk-format.md). */
export const DEFAULT_SCRYPT: ScryptParams = { N: 2 ** 17, r: 8, p: 1 };
/** What a key object may ask for: a key written by someone else cannot make derivation unbounded (1 GiB at most). */
const MAX_N = 2 ** 20;
const MAX_R = 16;
const MAX_P = 4;
const MIN_N = 2 ** 10;
const MAX_SCRYPT_BYTES = 2 ** 30;

export function newMasterKeys(): MasterKeys {
  const k = randomBytes(96);
  return { encKey: k.subarray(0, 32), idKey: k.subarray(32, 64), authKey: k.subarray(64, 96) };
}

const b64 = z.string().regex(/^[A-Za-z0-9+/]*={0,2}$/);

const keyObjectSchema = z
  .object({
    version: z.literal(1),
    kdf: z.literal('scrypt'),
    N: z
      .number()
      .int()
      .min(MIN_N)
      .max(MAX_N)
      .refine((n) => (n & (n - 1)) === 0, 'must be a power of two'),
    r: z.number().int().min(1).max(MAX_R),
    p: z.number().int().min(1).max(MAX_P),
    salt: b64,
    nonce: b64,
    data: b64,
    created: z.string().max(64),
  })
  .strict()
  // scrypt holds 128 * N * r bytes: at most 1 GiB, whatever N and r a key object asks for
  .refine((k) => 128 * k.N * k.r <= MAX_SCRYPT_BYTES, 'N * r is too large');

export type KeyObject = z.infer<typeof keyObjectSchema>;

const wrappedSchema = z.object({ masterKeys: b64, config: repositoryConfigSchema }).strict();

function derive(password: string, salt: Buffer, p: ScryptParams): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scrypt(password, salt, 32, { N: p.N, r: p.r, p: p.p, maxmem: 128 * p.N * p.r + 16 * 1024 * 1024 }, (err, key) =>
      err ? reject(err) : resolve(key),
    );
  });
}

/**
 * Key-encryption keys derived for unwrapping, kept a while: a backup opens its repository in several steps (plan,
 * store, manifest), and each scrypt derivation costs ~0.3 s of CPU and 128 MiB (measured: 6% of a 2 GiB pull's
 * worker CPU, most of a small increment's fixed cost). Keyed by a SHA-256 of password, salt and cost, so another
 * password or key object never finds an entry; bounded in count and age. The process holding them already holds the
 * password (VMBACKUP_PASSWORD) and, while a repository is open, its master keys.
 */
const KEK_CACHE_MS = 10 * 60_000;
const KEK_CACHE_MAX = 16;
const kekCache = new Map<string, { kek: Buffer; at: number }>();
const kekStats = { derived: 0, reused: 0 };

async function deriveCached(password: string, salt: Buffer, p: ScryptParams, now = Date.now()): Promise<Buffer> {
  const key = createHash('sha256')
    .update(JSON.stringify([password, salt.toString('base64'), p.N, p.r, p.p]))
    .digest('hex');
  const hit = kekCache.get(key);
  if (hit && now - hit.at < KEK_CACHE_MS) {
    kekStats.reused++;
    return hit.kek;
  }
  const kek = await derive(password, salt, p);
  kekStats.derived++;
  kekCache.delete(key);
  kekCache.set(key, { kek, at: now });
  for (const [k, v] of kekCache) if (kekCache.size > KEK_CACHE_MAX || now - v.at >= KEK_CACHE_MS) kekCache.delete(k);
  return kek;
}

/** Forgets every derived key (tests). */
export function clearDerivedKeys(): void {
  kekCache.clear();
}

/** Unwrapping derivations done and served from the cache in this process (tests; diagnostics). */
export function derivedKeyStats(): { derived: number; reused: number } {
  return { ...kekStats };
}

function associatedData(repositoryId: string): Buffer {
  return Buffer.from(`vmbackup-key-v1:${repositoryId}`, 'utf8');
}

/** Wraps the master keys (and the config they belong to) under `password`; returns the key object's bytes and id. */
export async function wrapMasterKeys(
  keys: MasterKeys,
  config: RepositoryConfig,
  password: string,
  params: ScryptParams = DEFAULT_SCRYPT,
): Promise<{ id: string; body: Buffer }> {
  const salt = randomBytes(32);
  const nonce = randomBytes(12);
  const kek = await derive(password, salt, params);
  const cipher = createCipheriv('aes-256-gcm', kek, nonce);
  cipher.setAAD(associatedData(config.repositoryId));
  const plaintext = Buffer.from(
    JSON.stringify({
      masterKeys: Buffer.concat([keys.encKey, keys.idKey, keys.authKey]).toString('base64'),
      config,
    }),
  );
  const data = Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
  const obj: KeyObject = {
    version: 1,
    kdf: 'scrypt',
    ...params,
    salt: salt.toString('base64'),
    nonce: nonce.toString('base64'),
    data: data.toString('base64'),
    created: new Date().toISOString(),
  };
  const body = Buffer.from(JSON.stringify(obj));
  return { id: createHash('sha256').update(body).digest('hex'), body };
}

export function parseKeyObject(body: Buffer): KeyObject | undefined {
  try {
    const parsed = keyObjectSchema.safeParse(JSON.parse(body.toString('utf8')));
    return parsed.success ? parsed.data : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Unwraps a key object with `password`. Undefined when the password does not open it (the GCM tag fails);
 * throws 'corrupt' when it opens but holds something that is not master keys of this repository.
 */
export async function unwrapMasterKeys(
  obj: KeyObject,
  repositoryId: string,
  password: string,
): Promise<{ keys: MasterKeys; config: RepositoryConfig } | undefined> {
  const kek = await deriveCached(password, Buffer.from(obj.salt, 'base64'), obj);
  const data = Buffer.from(obj.data, 'base64');
  if (data.length < 16) return undefined;
  const decipher = createDecipheriv('aes-256-gcm', kek, Buffer.from(obj.nonce, 'base64'));
  decipher.setAAD(associatedData(repositoryId));
  decipher.setAuthTag(data.subarray(data.length - 16));
  let plaintext: Buffer;
  try {
    plaintext = Buffer.concat([decipher.update(data.subarray(0, data.length - 16)), decipher.final()]);
  } catch {
    return undefined; // wrong password, or a key object of another repository
  }
  const parsed = (() => {
    try {
      return wrappedSchema.safeParse(JSON.parse(plaintext.toString('utf8')));
    } catch {
      return undefined;
    }
  })();
  const master = parsed?.success ? Buffer.from(parsed.data.masterKeys, 'base64') : undefined;
  if (!parsed?.success || !master || master.length !== 96)
    throw new ChunkFormatError('corrupt', 'A key object of the chunk repository opens but holds no master keys.');
  return {
    keys: { encKey: master.subarray(0, 32), idKey: master.subarray(32, 64), authKey: master.subarray(64, 96) },
    config: parsed.data.config,
  };
}
