/** Repository config and keys (docs/chunk-format.md): wrong password, key add/remove/change, a tampered config. */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CONFIG_KEY,
  ChunkFormatError,
  DEFAULT_SCRYPT,
  KEYS_PREFIX,
  addKey,
  changePassword,
  derivedKeyStats,
  initRepository,
  listKeys,
  openRepository,
  parseKeyObject,
  removeKey,
  type ScryptParams,
} from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';

/** Cheaper than the default so the many derivations here stay quick; one test checks the default itself. */
const FAST: ScryptParams = { N: 2 ** 14, r: 8, p: 1 };

let dir: string;
let target: StorageTarget;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-keys-'));
  target = openTarget(`file://${dir}`, { env: {} });
});
afterEach(async () => {
  await target.close();
  await rm(dir, { recursive: true, force: true });
});

async function failure(p: Promise<unknown>): Promise<ChunkFormatError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ChunkFormatError);
  return err as ChunkFormatError;
}

function init(password = 'correct horse') {
  return initRepository(target, { encryption: 'aes-256-gcm', compression: 'zstd', password, scrypt: FAST });
}

test('a wrong password is one sentence naming the target, no stack', async () => {
  await init();
  const err = await failure(openRepository(target, 'battery staple'));
  expect(err.kind).toBe('wrong-password');
  expect(err.message).toBe(`The password does not open any key of the chunk repository on ${target.displayUrl}.`);
  const none = await failure(openRepository(target, undefined));
  expect(none.kind).toBe('wrong-password');
  expect(none.message.split('\n')).toHaveLength(1);
});

test('a second open derives no key again; a wrong password after a right one is still refused', async () => {
  const repo = await init('right');
  const before = derivedKeyStats();
  const a = await openRepository(target, 'right');
  const b = await openRepository(target, 'right');
  const after = derivedKeyStats();
  // init derived with its own random salt; the first open derives (once: one key object), the second reuses it
  expect(after.derived - before.derived).toBe(1);
  expect(after.reused - before.reused).toBe(1);
  expect(a.keys!.encKey.equals(repo.keys!.encKey)).toBe(true);
  expect(b.keys!.idKey.equals(repo.keys!.idKey)).toBe(true);
  expect((await failure(openRepository(target, 'wrong'))).kind).toBe('wrong-password');
  expect((await failure(openRepository(target, 'righ'))).kind).toBe('wrong-password');
  expect(derivedKeyStats().derived - after.derived).toBe(2);
});

test('the default scrypt cost is stored in the key object and opens again', async () => {
  const repo = await initRepository(target, { encryption: 'aes-256-gcm', compression: 'zstd', password: 'pw' });
  const body = await target.getBuffer(`${KEYS_PREFIX}${repo.keyId}`);
  const obj = parseKeyObject(body);
  expect(obj).toMatchObject({ kdf: 'scrypt', N: DEFAULT_SCRYPT.N, r: DEFAULT_SCRYPT.r, p: DEFAULT_SCRYPT.p });
  expect(DEFAULT_SCRYPT.N).toBeGreaterThanOrEqual(2 ** 17);
  const again = await openRepository(target, 'pw');
  expect(again.keys?.encKey.equals(repo.keys!.encKey)).toBe(true);
});

test('add a key: both passwords open the same master keys; remove it: only the first does', async () => {
  const repo = await init('first');
  const second = await addKey(repo, 'second', FAST);
  expect((await listKeys(repo)).sort()).toEqual([repo.keyId, second].sort());
  const viaSecond = await openRepository(target, 'second');
  expect(viaSecond.keyId).toBe(second);
  expect(viaSecond.keys?.idKey.equals(repo.keys!.idKey)).toBe(true);
  expect(viaSecond.keys?.encKey.equals(repo.keys!.encKey)).toBe(true);

  await removeKey(repo, second);
  expect(await listKeys(repo)).toEqual([repo.keyId]);
  expect((await failure(openRepository(target, 'second'))).kind).toBe('wrong-password');
  expect((await openRepository(target, 'first')).keyId).toBe(repo.keyId);
  await removeKey(repo, second); // idempotent
});

test('the key in use and the last key cannot be removed', async () => {
  const repo = await init('first');
  expect((await failure(removeKey(repo, repo.keyId!))).kind).toBe('invalid-argument');
  const second = await addKey(repo, 'second', FAST);
  const viaSecond = await openRepository(target, 'second');
  await removeKey(viaSecond, repo.keyId!);
  expect(await listKeys(viaSecond)).toEqual([second]);
  expect((await failure(removeKey(viaSecond, second))).message).toMatch(/one this password opens|last key/);
});

test('change password: the new one opens, the old one no longer does, data keys unchanged', async () => {
  const repo = await init('old');
  const changed = await changePassword(repo, 'new', FAST);
  expect(await listKeys(changed)).toEqual([changed.keyId]);
  expect((await failure(openRepository(target, 'old'))).kind).toBe('wrong-password');
  const reopened = await openRepository(target, 'new');
  expect(reopened.keys?.encKey.equals(repo.keys!.encKey)).toBe(true);
});

test('a config changed by someone else (encryption off, another chunk size) is refused', async () => {
  const repo = await init('pw');
  for (const change of [{ encryption: 'none', idAlgorithm: 'sha256' }, { chunkSize: 1024 * 1024 }]) {
    await target.putManifest(CONFIG_KEY, Buffer.from(JSON.stringify({ ...repo.config, ...change })));
    const err = await failure(openRepository(target, 'pw'));
    expect(err.kind).toBe('bad-config');
    expect(err.message.split('\n')).toHaveLength(1);
  }
  // switched to unencrypted: even a caller without a password is refused while key objects exist
  await target.putManifest(
    CONFIG_KEY,
    Buffer.from(JSON.stringify({ ...repo.config, encryption: 'none', idAlgorithm: 'sha256' })),
  );
  expect((await failure(openRepository(target, undefined))).message).toContain('it has key objects');
});

test('no repository, a second init, and garbage key objects: one sentence each', async () => {
  const none = await failure(openRepository(target, 'pw'));
  expect(none.kind).toBe('bad-config');
  expect(none.message).toContain('holds no chunk repository');
  const repo = await init('pw');
  expect((await failure(init('pw'))).message).toContain('already holds a chunk repository');
  await target.putManifest(
    `${KEYS_PREFIX}${'0'.repeat(64)}`,
    Buffer.from('{"version":1,"kdf":"scrypt","N":1073741824}'),
  );
  // a well-formed key object asking for 2 GiB of scrypt memory (N = 2^20, r = 16) is not even tried
  const greedy = JSON.parse((await target.getBuffer(`${KEYS_PREFIX}${repo.keyId}`)).toString()) as object;
  expect(parseKeyObject(Buffer.from(JSON.stringify({ ...greedy, N: 2 ** 20, r: 16 })))).toBeUndefined();
  expect(parseKeyObject(Buffer.from(JSON.stringify({ ...greedy, N: 2 ** 20, r: 8 })))).toBeDefined();
  expect((await openRepository(target, 'pw')).keyId).toBe(repo.keyId);
  expect((await failure(openRepository(target, 'nope'))).kind).toBe('wrong-password');
});
