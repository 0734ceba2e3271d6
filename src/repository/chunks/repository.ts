/**
 * Creating and opening a chunk repository on a StorageTarget: the config object and the key objects
 * (docs/chunk-format.md). Password management: add, remove, change.
 */
import { randomBytes } from 'node:crypto';
import type { StorageTarget } from '../../storage/contract';
import { isStorageError } from '../../storage/errors';
import type { ChunkCodec } from './codec';
import type { RepositoryConfig } from './config';
import {
  CONFIG_KEY,
  DEFAULT_CHUNK_SIZE,
  FORMAT_NAME,
  FORMAT_VERSION,
  ID_RE,
  KEYS_PREFIX,
  SMALL_OBJECT_MAX_BYTES,
  parseRepositoryConfig,
  sameConfig,
} from './config';
import { ChunkFormatError } from './errors';
import type { MasterKeys, ScryptParams } from './keys';
import { DEFAULT_SCRYPT, newMasterKeys, parseKeyObject, unwrapMasterKeys, wrapMasterKeys } from './keys';
import type { Zstd } from './zstd';
import { loadZstd } from './zstd';

/** More key objects than this are not tried (each costs one scrypt derivation). */
export const MAX_KEY_OBJECTS = 64;

export interface InitOptions {
  encryption: 'aes-256-gcm' | 'none';
  compression: 'zstd' | 'none';
  /** required when encrypted */
  password?: string;
  chunkSize?: number;
  /** scrypt cost; the default is what docs/chunk-format.md states */
  scrypt?: ScryptParams;
  zstd?: Zstd;
}

/** An opened repository: what encoding, decoding and key management need. */
export interface OpenRepository extends ChunkCodec {
  readonly target: StorageTarget;
  /** the key object the password opened (undefined when unencrypted) */
  readonly keyId: string | undefined;
}

function where(target: StorageTarget): string {
  return target.displayUrl;
}

async function readConfig(target: StorageTarget): Promise<RepositoryConfig> {
  let body: Buffer;
  try {
    body = await target.getBuffer(CONFIG_KEY, { maxBytes: SMALL_OBJECT_MAX_BYTES });
  } catch (err) {
    if (isStorageError(err) && err.kind === 'not-found')
      throw new ChunkFormatError(
        'bad-config',
        `${where(target)} holds no chunk repository (no ${CONFIG_KEY}); create one first.`,
        { cause: err },
      );
    throw err;
  }
  return parseRepositoryConfig(body, where(target));
}

/** Creates the repository's config and first key. Refuses a target that already holds one. */
export async function initRepository(target: StorageTarget, opts: InitOptions): Promise<OpenRepository> {
  if (await target.stat(CONFIG_KEY))
    throw new ChunkFormatError('bad-config', `${where(target)} already holds a chunk repository.`);
  const encrypted = opts.encryption === 'aes-256-gcm';
  if (encrypted && !opts.password)
    throw new ChunkFormatError('invalid-argument', 'An encrypted chunk repository needs a password.');
  const config: RepositoryConfig = {
    format: FORMAT_NAME,
    version: FORMAT_VERSION,
    repositoryId: randomBytes(32).toString('hex'),
    chunkSize: opts.chunkSize ?? DEFAULT_CHUNK_SIZE,
    idAlgorithm: encrypted ? 'hmac-sha256' : 'sha256',
    compression: opts.compression,
    encryption: opts.encryption,
  };
  // validates chunkSize and the combination the same way a reader will
  parseRepositoryConfig(Buffer.from(JSON.stringify(config)), where(target));
  let keys: MasterKeys | undefined;
  let keyId: string | undefined;
  if (encrypted) {
    keys = newMasterKeys();
    const wrapped = await wrapMasterKeys(keys, config, opts.password as string, opts.scrypt ?? DEFAULT_SCRYPT);
    // the key before the config: a config without a key would be a repository nobody can open
    await target.putManifest(`${KEYS_PREFIX}${wrapped.id}`, wrapped.body);
    keyId = wrapped.id;
  }
  await target.putManifest(CONFIG_KEY, Buffer.from(JSON.stringify(config)));
  return { target, config, keys, keyId, zstd: opts.zstd ?? (await loadZstd()), where: where(target) };
}

async function keyIds(target: StorageTarget): Promise<string[]> {
  const ids: string[] = [];
  for await (const obj of target.list(KEYS_PREFIX)) {
    const id = obj.key.slice(KEYS_PREFIX.length);
    if (ID_RE.test(id)) ids.push(id);
  }
  return ids.sort();
}

/**
 * Opens the repository with `password` (ignored when unencrypted). A password that opens no key is one sentence
 * (kind 'wrong-password'); a config that differs from the one the master keys carry is refused ('bad-config').
 */
export async function openRepository(
  target: StorageTarget,
  password: string | undefined,
  opts: { zstd?: Zstd } = {},
): Promise<OpenRepository> {
  const config = await readConfig(target);
  const zstd = opts.zstd ?? (await loadZstd());
  if (config.encryption === 'none') {
    // someone who can write the target could turn an encrypted repository's config into an unencrypted one so that
    // the next backup stores plaintext: a caller that has a password expects encryption, and key objects mean it
    if (password || (await keyIds(target)).length > 0)
      throw new ChunkFormatError(
        'bad-config',
        `The chunk repository on ${where(target)} says it is unencrypted, but ${password ? 'a password was given' : 'it has key objects'}; its config was changed or the URL is wrong.`,
      );
    return { target, config, keys: undefined, keyId: undefined, zstd, where: where(target) };
  }
  if (!password)
    throw new ChunkFormatError(
      'wrong-password',
      `The chunk repository on ${where(target)} is encrypted: give its password.`,
    );
  const ids = await keyIds(target);
  if (ids.length === 0)
    throw new ChunkFormatError('bad-config', `The chunk repository on ${where(target)} has no key objects left.`);
  for (const id of ids.slice(0, MAX_KEY_OBJECTS)) {
    let body: Buffer;
    try {
      body = await target.getBuffer(`${KEYS_PREFIX}${id}`, { maxBytes: SMALL_OBJECT_MAX_BYTES });
    } catch (err) {
      if (isStorageError(err) && (err.kind === 'not-found' || err.kind === 'checksum')) continue;
      throw err;
    }
    const obj = parseKeyObject(body);
    if (!obj) continue; // not a key object (someone else's file): it opens nothing
    const opened = await unwrapMasterKeys(obj, config.repositoryId, password);
    if (!opened) continue;
    if (!sameConfig(opened.config, config))
      throw new ChunkFormatError(
        'bad-config',
        `The chunk repository config on ${where(target)} differs from the one its keys were made for; someone changed it.`,
      );
    return { target, config, keys: opened.keys, keyId: id, zstd, where: where(target) };
  }
  throw new ChunkFormatError(
    'wrong-password',
    `The password does not open any key of the chunk repository on ${where(target)}.`,
  );
}

function needKeys(repo: OpenRepository): MasterKeys {
  if (!repo.keys)
    throw new ChunkFormatError(
      'invalid-argument',
      `The chunk repository on ${repo.where} is not encrypted: it has no keys.`,
    );
  return repo.keys;
}

/** Adds a key object for `password` wrapping the same master keys; returns its id. */
export async function addKey(
  repo: OpenRepository,
  password: string,
  scrypt: ScryptParams = DEFAULT_SCRYPT,
): Promise<string> {
  if (!password) throw new ChunkFormatError('invalid-argument', 'A key needs a non-empty password.');
  const wrapped = await wrapMasterKeys(needKeys(repo), repo.config, password, scrypt);
  await repo.target.putManifest(`${KEYS_PREFIX}${wrapped.id}`, wrapped.body);
  return wrapped.id;
}

/** Lists the key objects' ids. */
export function listKeys(repo: OpenRepository): Promise<string[]> {
  needKeys(repo);
  return keyIds(repo.target);
}

/** Removes key `id`: never the one this repository was opened with, never the last one. Idempotent. */
export async function removeKey(repo: OpenRepository, id: string): Promise<void> {
  needKeys(repo);
  if (!ID_RE.test(id)) throw new ChunkFormatError('invalid-argument', `${JSON.stringify(id)} is not a key id.`);
  if (id === repo.keyId)
    throw new ChunkFormatError(
      'invalid-argument',
      `Key ${id} is the one this password opens; open the repository with another password to remove it.`,
    );
  const ids = await keyIds(repo.target);
  if (!ids.includes(id)) return;
  if (ids.length <= 1)
    throw new ChunkFormatError('invalid-argument', 'The last key of a chunk repository cannot be removed.');
  await repo.target.delete(`${KEYS_PREFIX}${id}`);
}

/**
 * Replaces the opened key's password: writes the new key first, then deletes the old one (a crash in between
 * leaves both passwords working, never neither). Returns the repository opened with the new key.
 */
export async function changePassword(
  repo: OpenRepository,
  newPassword: string,
  scrypt: ScryptParams = DEFAULT_SCRYPT,
): Promise<OpenRepository> {
  const newId = await addKey(repo, newPassword, scrypt);
  if (repo.keyId) await repo.target.delete(`${KEYS_PREFIX}${repo.keyId}`);
  return { ...repo, keyId: newId };
}

/** Whether `target` holds a chunk repository (its config object exists). */
export async function isChunkRepository(target: StorageTarget): Promise<boolean> {
  return (await target.stat(CONFIG_KEY)) !== undefined;
}
