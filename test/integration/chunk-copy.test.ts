/**
 * `vmbackup copy` with chunk repositories (issue #15) on the real local, NFS (ganesha) and S3 (radosgw) targets:
 * chunk repository -> another chunk repository (other password, other keys), -> the same repository elsewhere (a
 * copied bucket: objects byte for byte), -> an image tree, and image tree -> chunk repository. What a user checks:
 * the restore of the copy equals the source (`qemu-img compare`), a second copy sends nothing (the destination's
 * objects are the same, and a copy whose manifest was lost uploads no chunk again), and a wrong destination password
 * is one sentence that writes nothing. Chunk backups are made with test/helpers/chunk-backups.ts, image-tree backups
 * with test/storage/backups.ts; every test makes its own repositories, so the tests run in any order.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CONFIG_KEY, KEYS_PREFIX, openRepository, type OpenRepository } from '../../src/repository/chunks';
import { restoreBackup } from '../../src/repository/restore';
import { manifestKey } from '../../src/storage/keys';
import type { StorageTarget } from '../../src/storage/contract';
import { makeChunkBackup, putChunkManifest } from '../helpers/chunk-backups';
import {
  REPO_BACKENDS,
  initTestRepository,
  ownLines,
  useRepositoryPlaces,
  writePasswordFile,
} from '../helpers/chunk-repo';
import { buildChain, putChain, type BuiltChain } from '../storage/chains';
import { identical } from '../helpers/images';
import { cliEnv, runCli, type CliResult } from '../helpers/vmbackup';
import { backUp, makeImage } from '../storage/backups';

jest.setTimeout(600_000);

const MiB = 1 << 20;
const VIRTUAL = 64 * MiB;
const DOMAIN = 'vmbt-cc-copy';

let work: string;
let source: string;
let chain: BuiltChain;
const passwords = {
  one: 'source password of the chunk-copy test',
  two: 'destination password of the chunk-copy test',
  wrong: 'not a password of either repository',
};
type Pw = keyof typeof passwords;
const pwFile = (p: Pw): string => join(work, `pw-${p}`);

/** A 64 MiB sparse raw disk: [0, 6 MiB) random, [20, 21 MiB) text, the rest never written. */
async function makeSource(path: string): Promise<void> {
  const fh = await open(path, 'wx', 0o600);
  try {
    await fh.truncate(VIRTUAL);
    await fh.write(randomBytes(6 * MiB), 0, 6 * MiB, 0);
    await fh.write(Buffer.alloc(MiB, 'guest text of the chunk-copy test '), 0, MiB, 20 * MiB);
  } finally {
    await fh.close();
  }
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-copy-'));
  source = join(work, 'source.raw');
  await makeSource(source);
  chain = await buildChain(join(work, 'chain'), DOMAIN);
  for (const [name, pw] of Object.entries(passwords)) await writePasswordFile(work, pw, `pw-${name}`);
});

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

describe.each(REPO_BACKENDS)('copy with chunk repositories on %s', (_name, requireBackend, makeTarget) => {
  const place = useRepositoryPlaces(requireBackend, makeTarget);

  async function repository(
    sub: string,
    pw: Pw,
    chunkSize = 1 * MiB,
  ): Promise<{ url: string; target: StorageTarget; repo: OpenRepository }> {
    const { url, target } = place(sub);
    const repo = await initTestRepository(target, passwords[pw], { chunkSize });
    return { url, target, repo };
  }

  /** Every object under `target` with its size: what a second copy must leave exactly as it is. */
  async function objects(target: StorageTarget): Promise<string[]> {
    const out: string[] = [];
    for await (const o of target.list('')) out.push(`${o.key} ${o.size}`);
    return out.sort();
  }

  const copy = (...args: string[]): Promise<CliResult> => runCli(['copy', ...args, '--json'], { env: cliEnv() });

  interface Report {
    copied: string[];
    skipped: string[];
  }

  async function restoredEqualsSource(target: StorageTarget, backupId: string, pw: Pw | undefined, than = source) {
    const to = await mkdtemp(join(work, 'restore-'));
    try {
      const [disk] = await restoreBackup(target, backupId, {
        to,
        format: 'raw',
        ...(pw ? { password: async () => passwords[pw] } : {}),
      });
      return await identical(disk!.path, than);
    } finally {
      await rm(to, { recursive: true, force: true });
    }
  }

  test('into another repository (another password): the restore equals the source, a second copy sends nothing, a lost manifest uploads no chunk again', async () => {
    const src = await repository('src', 'one');
    const { manifest } = await makeChunkBackup(src.repo, { domain: DOMAIN, disks: [{ name: 'vda', rawPath: source }] });
    const dst = await repository('dst', 'two');

    const first = await copy(
      manifest.backupId,
      '--from',
      src.url,
      '--to',
      dst.url,
      '--password-file',
      pwFile('one'),
      '--to-password-file',
      pwFile('two'),
    );
    expect([first.code, ownLines(first.stderr)]).toEqual([0, []]);
    expect(await restoredEqualsSource(dst.target, manifest.backupId, 'two')).toBe(true);
    // the destination's manifest is its own: its password opens it, the source's does not
    await expect(
      restoreBackup(dst.target, manifest.backupId, { to: join(work, 'never'), password: async () => passwords.one }),
    ).rejects.toThrow(`The password does not open any key of the chunk repository on ${dst.url}.`);

    const after = await objects(dst.target);
    const second = await copy(
      manifest.backupId,
      '--from',
      src.url,
      '--to',
      dst.url,
      '--password-file',
      pwFile('one'),
      '--to-password-file',
      pwFile('two'),
    );
    expect(second.code).toBe(0);
    expect((JSON.parse(second.stdout) as Report).copied).toEqual([]);
    expect(await objects(dst.target)).toEqual(after);

    // an interrupted copy (everything but the manifest there) resumes without uploading one chunk
    const mKey = manifestKey(DOMAIN, manifest.backupId);
    await dst.target.delete(mKey);
    const resumed = await copy(
      manifest.backupId,
      '--from',
      src.url,
      '--to',
      dst.url,
      '--password-file',
      pwFile('one'),
      '--to-password-file',
      pwFile('two'),
    );
    expect(resumed.code).toBe(0);
    expect((JSON.parse(resumed.stdout) as Report).copied).toEqual([mKey]);
    // the same chunks and indexes (the new manifest records that this copy uploaded nothing)
    const notManifest = (l: string[]) => l.filter((o) => !o.startsWith(`${mKey} `));
    expect(notManifest(await objects(dst.target))).toEqual(notManifest(after));
    expect(await restoredEqualsSource(dst.target, manifest.backupId, 'two')).toBe(true);
  });

  test('a wrong destination password is one sentence and writes nothing', async () => {
    const src = await repository('src', 'one');
    const { manifest } = await makeChunkBackup(src.repo, { domain: DOMAIN, disks: [{ name: 'vda', rawPath: source }] });
    const dst = await repository('dst', 'two');
    const before = await objects(dst.target);
    const wrong = await copy(
      manifest.backupId,
      '--from',
      src.url,
      '--to',
      dst.url,
      '--password-file',
      pwFile('one'),
      '--to-password-file',
      pwFile('wrong'),
    );
    expect([wrong.code, ownLines(wrong.stderr)]).toEqual([
      1,
      [`vmbackup: The password does not open any key of the chunk repository on ${dst.url}.`],
    ]);
    expect(await objects(dst.target)).toEqual(before);
    // a repository that cuts disks into other chunks cannot take them whole: refused before anything is written
    const other = await repository('dst-2m', 'two', 2 * MiB);
    const otherBefore = await objects(other.target);
    const sizes = await copy(
      manifest.backupId,
      '--from',
      src.url,
      '--to',
      other.url,
      '--password-file',
      pwFile('one'),
      '--to-password-file',
      pwFile('two'),
    );
    expect([sizes.code, ownLines(sizes.stderr)]).toEqual([
      1,
      [
        `vmbackup: Cannot copy backup ${manifest.backupId} into ${other.url}: its chunk repository stores ${2 * MiB}-byte chunks, the one on ${src.url} ${MiB}-byte chunks; nothing was written (copy into a repository with the same chunk size).`,
      ],
    ]);
    expect(await objects(other.target)).toEqual(otherBefore);
    const missing = await copy(manifest.backupId, '--from', src.url, '--to', dst.url, '--password-file', pwFile('one'));
    expect([missing.code, ownLines(missing.stderr)]).toEqual([
      1,
      [
        `vmbackup: The chunk repository on ${dst.url} (the destination) needs a password: give it with --to-password-file FILE, VMBACKUP_TO_PASSWORD_FILE or VMBACKUP_TO_PASSWORD (stdin is not a terminal, so it cannot be asked for).`,
      ],
    ]);
    expect(await objects(dst.target)).toEqual(before);
  });

  test('into the same repository elsewhere (its config and keys copied): every object byte for byte, manifest as stored', async () => {
    const src = await repository('src', 'one');
    const { manifest } = await makeChunkBackup(src.repo, { domain: DOMAIN, disks: [{ name: 'vda', rawPath: source }] });
    const { url, target } = place('same');
    await target.putManifest(CONFIG_KEY, await src.target.getBuffer(CONFIG_KEY));
    for await (const k of src.target.list(KEYS_PREFIX))
      await target.putManifest(k.key, await src.target.getBuffer(k.key));
    const done = await runCli(['copy', manifest.backupId, '--from', src.url, '--to', url, '--json'], {
      env: cliEnv({ VMBACKUP_PASSWORD: passwords.one, VMBACKUP_TO_PASSWORD: passwords.one }),
    });
    expect([done.code, ownLines(done.stderr)]).toEqual([0, []]);
    // every object of the source is on the destination with the same bytes
    for await (const o of src.target.list(''))
      expect((await target.getBuffer(o.key)).equals(await src.target.getBuffer(o.key))).toBe(true);
    expect(await objects(target)).toEqual(await objects(src.target));
    await openRepository(target, passwords.one);
    expect(await restoredEqualsSource(target, manifest.backupId, 'one')).toBe(true);
  });

  test('to an image tree and from it into another chunk repository: each restore equals the source; a second copy sends nothing', async () => {
    const src = await repository('src', 'one');
    const { manifest } = await makeChunkBackup(src.repo, { domain: DOMAIN, disks: [{ name: 'vda', rawPath: source }] });
    const tree = place('tree');
    const out = await copy(manifest.backupId, '--from', src.url, '--to', tree.url, '--password-file', pwFile('one'));
    expect([out.code, ownLines(out.stderr)]).toEqual([0, []]);
    expect(await restoredEqualsSource(tree.target, manifest.backupId, undefined)).toBe(true);
    const verify = await runCli(['verify', manifest.backupId, '--target', tree.url], { env: cliEnv() });
    expect(verify.code).toBe(0);
    const treeObjects = await objects(tree.target);
    const again = await copy(manifest.backupId, '--from', src.url, '--to', tree.url, '--password-file', pwFile('one'));
    expect((JSON.parse(again.stdout) as Report).copied).toEqual([]);
    expect(await objects(tree.target)).toEqual(treeObjects);

    // and back into a chunk repository of its own password
    const dst = await repository('back', 'two');
    const back = await copy(
      manifest.backupId,
      '--from',
      tree.url,
      '--to',
      dst.url,
      '--to-password-file',
      pwFile('two'),
    );
    expect([back.code, ownLines(back.stderr)]).toEqual([0, []]);
    expect(await restoredEqualsSource(dst.target, manifest.backupId, 'two')).toBe(true);
    const dstObjects = await objects(dst.target);
    const backAgain = await copy(
      manifest.backupId,
      '--from',
      tree.url,
      '--to',
      dst.url,
      '--to-password-file',
      pwFile('two'),
    );
    expect((JSON.parse(backAgain.stdout) as Report).copied).toEqual([]);
    expect(await objects(dst.target)).toEqual(dstObjects);
  });

  test('an image-tree backup (qcow2, shipped by the storage activities) into a chunk repository: its restore equals the image', async () => {
    const tree = place('qcow2');
    const images = await mkdtemp(join(work, 'images-'));
    const image = await makeImage(images, 'vda', 'qcow2', 7);
    const backupId = `${DOMAIN}-20261130T120000Z-${randomBytes(4).toString('hex')}`;
    await backUp(tree.url, DOMAIN, backupId, new Date().toISOString(), [image]);
    const dst = await repository('from-tree', 'two');
    const out = await copy(backupId, '--from', tree.url, '--to', dst.url, '--to-password-file', pwFile('two'));
    expect([out.code, ownLines(out.stderr)]).toEqual([0, []]);
    expect(await restoredEqualsSource(dst.target, backupId, 'two', image.path)).toBe(true);
    const wrong = await copy(backupId, '--from', tree.url, '--to', dst.url, '--to-password-file', pwFile('wrong'));
    expect([wrong.code, ownLines(wrong.stderr)]).toEqual([
      1,
      [`vmbackup: The password does not open any key of the chunk repository on ${dst.url}.`],
    ]);
  });

  test('an increment of an image-tree chain into a chunk repository: built from the manifests, each disk equals the disk at that point', async () => {
    const tree = place('chain');
    await putChain(tree.target, chain);
    const dst = await repository('from-chain', 'two');
    const out = await copy(chain.ids.inc2, '--from', tree.url, '--to', dst.url, '--to-password-file', pwFile('two'));
    expect([out.code, ownLines(out.stderr)]).toEqual([0, []]);
    const to = await mkdtemp(join(work, 'restore-'));
    try {
      const disks = await restoreBackup(dst.target, chain.ids.inc2, {
        to,
        format: 'raw',
        password: async () => passwords.two,
      });
      expect(disks.map((d) => d.name).sort()).toEqual(Object.keys(chain.refs.inc2).sort());
      for (const d of disks) expect(await identical(d.path, chain.refs.inc2[d.name]!)).toBe(true);
    } finally {
      await rm(to, { recursive: true, force: true });
    }
  });

  test('a source manifest not signed with its repository key is refused with one sentence and nothing is written', async () => {
    const src = await repository('forged', 'one');
    const { manifest } = await makeChunkBackup(src.repo, { domain: DOMAIN, disks: [{ name: 'vda', rawPath: source }] });
    const { repositorySignature: _dropped, ...unsigned } = manifest;
    await putChunkManifest(src.repo, unsigned as typeof manifest);
    const dst = await repository('forged-dst', 'two');
    const tree = place('forged-tree');
    const before = await objects(dst.target);
    for (const [to, extra] of [
      [dst.url, ['--to-password-file', pwFile('two')]],
      [tree.url, []],
    ] as const) {
      const refused = await copy(
        manifest.backupId,
        '--from',
        src.url,
        '--to',
        to,
        '--password-file',
        pwFile('one'),
        ...extra,
      );
      expect([refused.code, ownLines(refused.stderr)]).toEqual([
        1,
        [
          `vmbackup: The manifest of backup ${manifest.backupId} on ${src.url} is not signed with its chunk repository's key: it was written by someone else or changed; do not trust this backup.`,
        ],
      ]);
    }
    expect(await objects(dst.target)).toEqual(before);
    expect(await objects(tree.target)).toEqual([]);
  });
});
