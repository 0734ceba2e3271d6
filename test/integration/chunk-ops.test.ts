/**
 * A chunk repository through the CLI (bin/vmbackup) on the real local, NFS (ganesha) and S3 (radosgw) targets:
 * `repo init` / `repo key`, and `list`, `restore` and `verify` of backups stored in it. The backups are made with the
 * repository layer (test/helpers/chunk-backups.ts) from a sparse raw disk, so what a user checks is checked: the
 * restored disk equals the source (`qemu-img compare`), its holes are kept, damage is named by disk and offset and
 * refused by restore with nothing left behind, and a manifest not signed with the repository's key is refused.
 * Every test makes its own repository (below the backend's target), so the tests run in any order.
 */
import { spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, open, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chunkKey, indexKey, openRepository, type DiskIndex, type OpenRepository } from '../../src/repository/chunks';
import { signRepositoryManifest, type Manifest } from '../../src/repository/manifest';
import { openTarget } from '../../src/storage/registry';
import {
  REPO_BACKENDS,
  initTestRepository,
  ownLines,
  useRepositoryPlaces,
  writePasswordFile,
} from '../helpers/chunk-repo';
import { makeChunkBackup, putChunkManifest, chunkBackupId } from '../helpers/chunk-backups';
import { identical, virsh } from '../helpers/images';
import { requireLibvirt } from '../helpers/stack';
import { REPO_ROOT, cliEnv, runCli, type CliResult } from '../helpers/vmbackup';
import { localTarget } from '../storage/fixtures';

jest.setTimeout(600_000);

const BIN = join(REPO_ROOT, 'bin', 'vmbackup');

const MiB = 1 << 20;
const VIRTUAL = 256 * MiB;
const DOMAIN = 'vmbt-co-chunks';

let work: string;
let source: string;
const passwords: Record<'one' | 'two' | 'three' | 'wrong', string> = {
  one: 'first password of the chunk-ops test',
  two: 'second password of the chunk-ops test',
  three: 'third password of the chunk-ops test',
  wrong: 'not a password of this repository',
};
const pwFile = (p: keyof typeof passwords): string => join(work, `pw-${p}`);

/**
 * A 256 MiB sparse raw disk with 8 MiB of data: [0, 6 MiB) random (chunk 1 is half data, half zero), [8, 9 MiB)
 * random (the chunk at offset 8388608), [100, 101 MiB) text; everything else never written.
 */
async function makeSource(path: string): Promise<void> {
  const fh = await open(path, 'wx', 0o600);
  try {
    await fh.truncate(VIRTUAL);
    await fh.write(randomBytes(6 * MiB), 0, 6 * MiB, 0);
    await fh.write(randomBytes(MiB), 0, MiB, 8 * MiB);
    await fh.write(Buffer.alloc(MiB, 'guest text of the chunk-ops test '), 0, MiB, 100 * MiB);
  } finally {
    await fh.close();
  }
}

/** Bytes the file occupies on disk (du), not its size. */
async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmbackup-chunk-ops-'));
  source = join(work, 'source.raw');
  await makeSource(source);
  for (const [name, pw] of Object.entries(passwords)) await writePasswordFile(work, pw, `pw-${name}`);
});

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

describe.each(REPO_BACKENDS)('a chunk repository on %s', (_name, requireBackend, makeTarget) => {
  const place = useRepositoryPlaces(requireBackend, makeTarget);

  const vmbackup = (...args: string[]): Promise<CliResult> => runCli(args, { env: cliEnv() });

  /** An encrypted repository (made through the CLI) holding one backup of the source disk. */
  async function repositoryWithBackup(
    sub: string,
  ): Promise<{ url: string; repo: OpenRepository; manifest: Manifest; index: DiskIndex }> {
    const { url, target } = place(sub);
    const init = await vmbackup('repo', 'init', url, '--password-file', pwFile('one'));
    expect([init.code, ownLines(init.stderr)]).toEqual([0, []]);
    const repo = await openRepository(target, passwords.one);
    const made = await makeChunkBackup(repo, { domain: DOMAIN, disks: [{ name: 'vda', rawPath: source }] });
    return { url, repo, manifest: made.manifest, index: made.indexes.get('vda') as DiskIndex };
  }

  test('repo init creates an encrypted repository once; a wrong password is one sentence; key add, change and remove', async () => {
    const { url } = place('keys');
    const init = await vmbackup('repo', 'init', url, '--password-file', pwFile('one'), '--json');
    expect(init.code).toBe(0);
    const made = JSON.parse(init.stdout) as { encryption: string; compression: string; keyId: string };
    expect([made.encryption, made.compression]).toEqual(['aes-256-gcm', 'zstd']);

    const again = await vmbackup('repo', 'init', url, '--password-file', pwFile('two'));
    expect([again.code, ownLines(again.stderr)]).toEqual([
      1,
      [`vmbackup: ${url} already holds a chunk repository; nothing was changed.`],
    ]);
    const noPassword = await runCli(['repo', 'init', `${url}-other`], { env: cliEnv() });
    expect(noPassword.code).toBe(1);
    expect(ownLines(noPassword.stderr)).toEqual([
      `vmbackup: The chunk repository on ${url}-other needs a password: give it with --password-file FILE, VMBACKUP_PASSWORD_FILE or VMBACKUP_PASSWORD (stdin is not a terminal, so it cannot be asked for).`,
    ]);

    const wrong = await vmbackup('repo', 'key', 'list', url, '--password-file', pwFile('wrong'));
    expect([wrong.code, ownLines(wrong.stderr)]).toEqual([
      1,
      [`vmbackup: The password does not open any key of the chunk repository on ${url}.`],
    ]);

    // add a second password: both open the repository
    const add = await runCli(['repo', 'key', 'add', url, '--password-file', pwFile('one'), '--json'], {
      env: cliEnv({ VMBACKUP_NEW_PASSWORD: passwords.two }),
    });
    expect(add.code).toBe(0);
    const added = (JSON.parse(add.stdout) as { added: string }).added;
    const listed = await runCli(['repo', 'key', 'list', url, '--json'], {
      env: cliEnv({ VMBACKUP_PASSWORD: passwords.two }),
    });
    expect(JSON.parse(listed.stdout)).toEqual({
      target: url,
      keys: expect.arrayContaining([
        { id: made.keyId, current: false },
        { id: added, current: true },
      ]) as unknown,
    });

    // change the first password to a third: the first no longer opens it, the third does
    const change = await vmbackup(
      'repo',
      'key',
      'change',
      url,
      '--password-file',
      pwFile('one'),
      '--new-password-file',
      pwFile('three'),
    );
    expect([change.code, ownLines(change.stderr)]).toEqual([0, []]);
    const old = await vmbackup('repo', 'key', 'list', url, '--password-file', pwFile('one'));
    expect(ownLines(old.stderr)).toEqual([
      `vmbackup: The password does not open any key of the chunk repository on ${url}.`,
    ]);
    const info = await vmbackup('repo', 'info', url, '--password-file', pwFile('three'), '--json');
    expect(JSON.parse(info.stdout)).toMatchObject({ keys: 2, checkedWithPassword: true, encryption: 'aes-256-gcm' });

    // remove the second password's key with the third: it then opens nothing
    const remove = await vmbackup('repo', 'key', 'remove', url, added, '--password-file', pwFile('three'));
    expect([remove.code, ownLines(remove.stderr)]).toEqual([0, []]);
    const gone = await vmbackup('repo', 'key', 'list', url, '--password-file', pwFile('two'));
    expect(ownLines(gone.stderr)).toEqual([
      `vmbackup: The password does not open any key of the chunk repository on ${url}.`,
    ]);
    // the key the password opens cannot be removed (it would be the last one here too)
    const self = JSON.parse(
      (await vmbackup('repo', 'key', 'list', url, '--password-file', pwFile('three'), '--json')).stdout,
    ) as { keys: Array<{ id: string; current: boolean }> };
    expect(self.keys).toHaveLength(1);
    const last = await vmbackup('repo', 'key', 'remove', url, self.keys[0]!.id, '--password-file', pwFile('three'));
    expect(last.code).toBe(1);
    expect(ownLines(last.stderr)).toHaveLength(1);
  });

  test('restore equals the source as qcow2 and as raw with the holes kept; list needs no password; verify passes fast and with --read-data', async () => {
    const { url, manifest } = await repositoryWithBackup('restore');
    const id = manifest.backupId;

    const list = await vmbackup('list', '--target', url); // no password anywhere in its environment
    expect(list.code).toBe(0);
    expect(list.stdout).toMatch(new RegExp(`^${id}\\s+${DOMAIN}\\s.*\\svda\\s+chunks\\s+xml\\s`, 'm'));
    const json = JSON.parse((await vmbackup('list', '--target', url, '--json')).stdout) as {
      backups: Array<{ backupId: string; format: string; repository: { id: string; encryption: string } }>;
    };
    expect(json.backups.map((b) => [b.backupId, b.format, b.repository.encryption])).toEqual([
      [id, 'chunks', 'aes-256-gcm'],
    ]);

    const noPassword = await vmbackup(
      'restore',
      id,
      '--target',
      url,
      '--to',
      join(work, `np-${randomBytes(3).toString('hex')}`),
    );
    expect([noPassword.code, ownLines(noPassword.stderr)]).toEqual([
      1,
      [
        `vmbackup: The chunk repository on ${url} needs a password: give it with --password-file FILE, VMBACKUP_PASSWORD_FILE or VMBACKUP_PASSWORD (stdin is not a terminal, so it cannot be asked for).`,
      ],
    ]);
    const wrong = await vmbackup(
      'restore',
      id,
      '--target',
      url,
      '--to',
      join(work, 'never'),
      '--password-file',
      pwFile('wrong'),
    );
    expect(ownLines(wrong.stderr)).toEqual([
      `vmbackup: The password does not open any key of the chunk repository on ${url}.`,
    ]);

    const to = join(work, `restored-${randomBytes(3).toString('hex')}`);
    const restored = await vmbackup('restore', id, '--target', url, '--to', to, '--password-file', pwFile('one'));
    expect([restored.code, ownLines(restored.stderr)]).toEqual([0, []]);
    expect(await readdir(to)).toEqual(['vda.qcow2']);
    expect(await identical(source, join(to, 'vda.qcow2'))).toBe(true);
    // 8 MiB of data in a 256 MiB disk: the qcow2 holds about the data
    expect(await allocated(join(to, 'vda.qcow2'))).toBeLessThan(16 * MiB);

    const raw = join(work, `raw-${randomBytes(3).toString('hex')}`);
    const asRaw = await runCli(['restore', id, '--target', url, '--to', raw, '--format', 'raw'], {
      env: cliEnv({ VMBACKUP_PASSWORD_FILE: pwFile('one') }),
    });
    expect([asRaw.code, ownLines(asRaw.stderr)]).toEqual([0, []]);
    const rawFile = join(raw, 'vda.raw');
    expect((await stat(rawFile)).size).toBe(VIRTUAL);
    expect(await identical(source, rawFile)).toBe(true);
    // zero chunks are holes, and so is the zero half of chunk 1: 8 MiB of data, not 4 chunks x 4 MiB
    expect(await allocated(rawFile)).toBeLessThanOrEqual(9 * MiB);

    // copy opens the source repository (its password) before anything is written (chunk-copy.test.ts copies)
    const copy = await vmbackup('copy', id, '--from', url, '--to', `${url}-copy`);
    expect([copy.code, ownLines(copy.stderr)]).toEqual([
      1,
      [
        `vmbackup: The chunk repository on ${url} needs a password: give it with --password-file FILE, VMBACKUP_PASSWORD_FILE or VMBACKUP_PASSWORD (stdin is not a terminal, so it cannot be asked for).`,
      ],
    ]);

    const fast = await vmbackup('verify', id, '--target', url, '--password-file', pwFile('one'));
    expect([fast.code, ownLines(fast.stderr)]).toEqual([0, []]);
    expect(fast.stderr).toContain(
      `Backup ${id} on ${url} is intact (1 disk, domain.xml; every chunk is present, none was read: --read-data reads and authenticates them).`,
    );
    const full = await vmbackup(
      'verify',
      id,
      '--target',
      url,
      '--read-data',
      '--password-file',
      pwFile('one'),
      '--json',
    );
    expect(full.code).toBe(0);
    const report = JSON.parse(full.stdout) as { ok: boolean; disks: Array<{ name: string; chunks: unknown }> };
    expect(report.ok).toBe(true);
    expect(report.disks).toEqual([
      expect.objectContaining({
        name: 'vda',
        ok: true,
        chunks: { referenced: 4, distinct: 4, checked: 'read', missing: 0, damaged: 0 },
      }),
    ]);
  });

  test('one flipped byte in a chunk: verify --read-data names disk and offset, fast verify does not read it, restore refuses the disk and leaves nothing; a deleted chunk: fast verify names it', async () => {
    const { url, repo, manifest, index } = await repositoryWithBackup('damage');
    const id = manifest.backupId;
    const target = repo.target;
    const damagedId = index.entries[2] as string; // the chunk at offset 8388608
    const key = chunkKey(damagedId);
    const body = await target.getBuffer(key, { maxBytes: 8 * MiB });
    body[body.length >> 1]! ^= 0x01;
    await target.delete(key);
    await target.putManifest(key, body);

    const readData = await vmbackup('verify', id, '--target', url, '--read-data', '--password-file', pwFile('one'));
    expect(readData.code).toBe(1);
    expect(ownLines(readData.stderr)).toEqual([
      `vmbackup: Backup ${id} on ${url} failed verification: vda: the chunk at offset 8388608 (${damagedId}) is damaged.`,
    ]);
    // fast verify checks existence: the damaged chunk exists
    const fast = await vmbackup('verify', id, '--target', url, '--password-file', pwFile('one'));
    expect([fast.code, ownLines(fast.stderr)]).toEqual([0, []]);

    const to = join(work, `refused-${randomBytes(3).toString('hex')}`);
    const restore = await vmbackup('restore', id, '--target', url, '--to', to, '--password-file', pwFile('one'));
    expect(restore.code).toBe(1);
    expect(ownLines(restore.stderr)).toEqual([
      `vmbackup: Cannot restore disk vda of backup ${id} from ${url}: the chunk at offset 8388608 (${damagedId}) is damaged; restore it from another copy.`,
    ]);
    expect(await readdir(to).catch(() => [])).toEqual([]);

    const deletedId = index.entries[0] as string;
    await target.delete(chunkKey(deletedId));
    const missing = await vmbackup('verify', id, '--target', url, '--password-file', pwFile('one'), '--json');
    expect(missing.code).toBe(1);
    const report = JSON.parse(missing.stdout) as { ok: boolean; disks: Array<{ problem: string }> };
    expect(report.disks.map((d) => d.problem)).toEqual([`vda: the chunk at offset 0 (${deletedId}) is missing`]);
  });

  test('a manifest that is not signed with the repository key (edited, or re-signed with another key) is refused by restore and verify', async () => {
    const { url, repo, manifest } = await repositoryWithBackup('forged');
    /** the same backup under a new id (its chain's base is its own id) */
    const renamed = (): Manifest => {
      const backupId = chunkBackupId(DOMAIN);
      return { ...manifest, backupId, chain: { ...manifest.chain, base: backupId } };
    };
    const edited: Manifest = { ...renamed(), host: 'someone-else' };
    await putChunkManifest(repo, edited); // still carries the original signature: it covers other fields
    const other = await initTestRepository(place('other').target, 'x');
    const resigned = signRepositoryManifest({ ...renamed(), repositorySignature: undefined }, other.keys!.authKey);
    await putChunkManifest(repo, resigned);
    for (const forged of [edited, resigned]) {
      const sentence = `vmbackup: The manifest of backup ${forged.backupId} on ${url} is not signed with its chunk repository's key: it was written by someone else or changed; do not trust this backup.`;
      const to = join(work, `forged-${randomBytes(3).toString('hex')}`);
      const restore = await vmbackup(
        'restore',
        forged.backupId,
        '--target',
        url,
        '--to',
        to,
        '--password-file',
        pwFile('one'),
      );
      expect([restore.code, ownLines(restore.stderr)]).toEqual([1, [sentence]]);
      expect(await readdir(to).catch(() => [])).toEqual([]);
      const verify = await vmbackup('verify', forged.backupId, '--target', url, '--password-file', pwFile('one'));
      expect(verify.code).toBe(1);
      expect(verify.stderr).toContain("is not signed with its chunk repository's key");
    }
    // the genuine one still restores
    const to = join(work, `genuine-${randomBytes(3).toString('hex')}`);
    const ok = await vmbackup(
      'restore',
      manifest.backupId,
      '--target',
      url,
      '--to',
      to,
      '--format',
      'raw',
      '--password-file',
      pwFile('one'),
    );
    expect([ok.code, ownLines(ok.stderr)]).toEqual([0, []]);
    expect(await identical(source, join(to, 'vda.raw'))).toBe(true);
    expect(indexKey(manifest.disks[0]!.sha256)).toBe(manifest.disks[0]!.key);
  });
});

describe('whole-VM and instant restore of a chunk backup (local target)', () => {
  let base: { url: string; dir: string; cleanup: () => Promise<void> };
  const defined: string[] = [];
  beforeAll(async () => {
    await requireLibvirt();
    base = await localTarget();
  });
  afterAll(async () => {
    for (const name of defined) await virsh('undefine', name).catch(() => undefined);
    await base?.cleanup();
  });

  test('--define NEW restores the disks and the definition stored in the repository; --instant is refused with one sentence', async () => {
    const url = `${base.url}/vm`;
    const target = openTarget(url, { env: {} });
    try {
      expect((await runCli(['repo', 'init', url, '--password-file', pwFile('one')])).code).toBe(0);
      const repo = await openRepository(target, passwords.one);
      const xml = `<domain type='qemu'>
  <name>${DOMAIN}</name>
  <uuid>${randomUUID()}</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/nonexistent/${DOMAIN}-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
`;
      const { manifest } = await makeChunkBackup(repo, {
        domain: DOMAIN,
        disks: [{ name: 'vda', rawPath: source }],
        xml,
      });
      const id = manifest.backupId;

      const name = `vmbt-co-${randomBytes(3).toString('hex')}`;
      const to = join(work, `vm-${name}`);
      defined.push(name);
      const res = await runCli(
        ['restore', id, '--target', url, '--define', name, '--to', to, '--password-file', pwFile('one'), '--json'],
        { env: cliEnv() },
      );
      expect([res.code, ownLines(res.stderr)]).toEqual([0, []]);
      const r = JSON.parse(res.stdout) as {
        domain: string;
        disks: Array<{ name: string; path: string; format: string }>;
      };
      expect(r.disks).toEqual([{ name: 'vda', path: join(to, 'vda.qcow2'), format: 'qcow2' }]);
      expect(await identical(source, join(to, 'vda.qcow2'))).toBe(true);
      const dumped = await virsh('dumpxml', '--inactive', name);
      expect(dumped).toContain(`<source file='${join(to, 'vda.qcow2')}'/>`);
      expect(dumped).toMatch(/<driver name='qemu' type='qcow2'\/>/);

      const instant = await runCli(
        ['restore', id, '--target', url, '--instant', `vmbt-co-${randomBytes(3).toString('hex')}`],
        {
          env: cliEnv(),
        },
      );
      expect([instant.code, ownLines(instant.stderr)]).toEqual([
        1,
        [
          `vmbackup: Backup ${id} is stored in a chunk repository, and --instant runs a VM on the backup's own disk images, which a chunk repository does not have; restore it with --to or --define instead.`,
        ],
      ]);
    } finally {
      await target.close();
    }
  });
});

describe('the password prompt at a terminal', () => {
  /** `vmbackup ...args` on a pseudo-terminal (python3's pty), answering each prompt in turn */
  function atTerminal(answers: string[], args: string[]): Promise<{ code: number; shown: string }> {
    return new Promise((resolvePromise, reject) => {
      const child = spawn('python3', [join(REPO_ROOT, 'test', 'helpers', 'pty-answer.py'), BIN, ...args], {
        env: { ...cliEnv(), PTY_ANSWERS: answers.join('|') },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let shown = '';
      child.stdout.on('data', (d: Buffer) => (shown += d.toString()));
      child.stderr.on('data', (d: Buffer) => (shown += d.toString()));
      child.on('error', (err) => reject(new Error(`python3 is needed to drive a terminal: ${err.message}`)));
      child.on('close', (code) => resolvePromise({ code: code ?? -1, shown }));
    });
  }

  test('repo init asks twice without echo; two different answers change nothing', async () => {
    const base = await localTarget();
    try {
      const pw = `typed at a terminal ${randomBytes(4).toString('hex')}`;
      const made = await atTerminal([pw, pw], ['repo', 'init', `${base.url}/typed`]);
      expect(made.code).toBe(0);
      expect(made.shown).toContain('Password for the chunk repository on');
      expect(made.shown).toContain('The same password again:');
      expect(made.shown).not.toContain(pw);
      const info = await runCli(['repo', 'info', `${base.url}/typed`, '--json'], {
        env: cliEnv({ VMBACKUP_PASSWORD: pw }),
      });
      expect(JSON.parse(info.stdout)).toMatchObject({ checkedWithPassword: true, keys: 1 });

      const differ = await atTerminal([pw, `${pw}x`], ['repo', 'init', `${base.url}/differ`]);
      expect(differ.code).toBe(1);
      expect(differ.shown).toContain('vmbackup: The two passwords differ; nothing was changed.');
      expect(await readdir(join(base.dir, 'differ')).catch(() => [])).toEqual([]);
    } finally {
      await base.cleanup();
    }
  });
});

describe('an unencrypted chunk repository (local target)', () => {
  test('no password to restore or verify; one given is refused (the config may have been rewritten); a flipped byte is still found', async () => {
    const base = await localTarget();
    const url = `${base.url}/plain`;
    const target = openTarget(url, { env: {} });
    try {
      const init = await runCli(['repo', 'init', url, '--encryption', 'none', '--compression', 'none', '--json']);
      expect(init.code).toBe(0);
      expect(JSON.parse(init.stdout)).toMatchObject({ encryption: 'none', compression: 'none', keyId: null });
      const keys = await runCli(['repo', 'key', 'list', url]);
      expect([keys.code, ownLines(keys.stderr)]).toEqual([
        1,
        [`vmbackup: The chunk repository on ${url} is not encrypted: it has no keys (no password).`],
      ]);

      const repo = await openRepository(target, undefined);
      const { manifest, indexes } = await makeChunkBackup(repo, {
        domain: DOMAIN,
        disks: [{ name: 'vda', rawPath: source }],
      });
      expect(manifest.repositorySignature).toBeUndefined();
      const id = manifest.backupId;
      const to = join(work, `plain-${randomBytes(3).toString('hex')}`);
      const restored = await runCli(['restore', id, '--target', url, '--to', to]);
      expect([restored.code, ownLines(restored.stderr)]).toEqual([0, []]);
      expect(await identical(source, join(to, 'vda.qcow2'))).toBe(true);

      const given = await runCli(['restore', id, '--target', url, '--to', `${to}-2`], {
        env: cliEnv({ VMBACKUP_PASSWORD: passwords.one }),
      });
      expect([given.code, ownLines(given.stderr)]).toEqual([
        1,
        [
          `vmbackup: The chunk repository on ${url} says it is unencrypted, but a password was given; its config was changed or the URL is wrong.`,
        ],
      ]);

      const damagedId = indexes.get('vda')!.entries[25] as string; // the chunk at offset 100 MiB
      const key = chunkKey(damagedId);
      const body = await target.getBuffer(key, { maxBytes: 8 * MiB });
      body[body.length >> 1]! ^= 0x01;
      await target.delete(key);
      await target.putManifest(key, body);
      const verify = await runCli(['verify', id, '--target', url, '--read-data']);
      expect([verify.code, ownLines(verify.stderr)]).toEqual([
        1,
        [
          `vmbackup: Backup ${id} on ${url} failed verification: vda: the chunk at offset ${100 * MiB} (${damagedId}) is damaged.`,
        ],
      ]);
    } finally {
      await target.close();
      await base.cleanup();
    }
  });
});
