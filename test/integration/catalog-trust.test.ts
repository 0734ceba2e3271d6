/**
 * The catalog does not trust what a target holds (issue #11, item 8 and two Low items), through the built CLI on
 * the real targets: a manifest that is far too big, not JSON, invalid or moved is skipped with a warning naming its
 * key while the good backups are listed (and `list` stays small in memory); terminal escape sequences in a manifest
 * never reach the terminal; a target location that does not exist is an error, not an empty list.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { existsSync } from 'node:fs';
import { PutObjectCommand, type S3Client } from '@aws-sdk/client-s3';
import { buildManifest } from '../../src/repository/manifest';
import type { DiskImage } from '../../src/shared/types';
import { requireNfs, requireS3, stackEnv } from '../helpers/stack';
import { cliEnv, REPO_ROOT, runCli, type CliResult } from '../helpers/vmbackup';
import { backUp, makeImage } from '../storage/backups';
import { localTarget, nfsTarget, s3Target, uniqueName } from '../storage/fixtures';

const MiB = 1 << 20;
const GiB = 1 << 30;
/** what a terminal would act on: ESC, BEL, and the 8-bit CSI */
// eslint-disable-next-line no-control-regex -- finding control characters is the point
const RAW_CONTROLS = /[\u001b\u0007\u009b]/;
const EVIL = '\u001b]0;pwned\u0007\u001b[31m';

interface Made {
  url: string;
  cleanup(): Promise<void>;
  target: { close(): Promise<void> };
  dir?: string;
  prefix?: string;
  client?: S3Client;
}

/** An object written behind the driver's back: what another writer of the directory or bucket can do. */
async function plant(made: Made, key: string, body: Buffer | { sparseBytes: number }): Promise<void> {
  if (made.client && made.prefix) {
    const bytes = Buffer.isBuffer(body) ? body : Buffer.alloc(body.sparseBytes, 0x20);
    await made.client.send(
      new PutObjectCommand({ Bucket: stackEnv().s3.bucket, Key: `${made.prefix}/${key}`, Body: bytes }),
    );
    return;
  }
  const file = join(made.dir as string, key);
  await mkdir(dirname(file), { recursive: true });
  if (Buffer.isBuffer(body)) await writeFile(file, body);
  else {
    await writeFile(file, '');
    await truncate(file, body.sparseBytes); // sparse: no disk space, but that is its size
  }
}

/** The built CLI under GNU time: the result, and the child's peak resident memory. */
function runMeasured(args: string[]): Promise<CliResult & { maxRssBytes: number }> {
  if (!existsSync('/usr/bin/time')) throw new Error('GNU time is missing: apt-get install -y time');
  return new Promise((resolvePromise, reject) => {
    const child = spawn(
      '/usr/bin/time',
      ['-f', 'vmbackup-maxrss-kib=%M', join(REPO_ROOT, 'bin', 'vmbackup'), ...args],
      { env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const m = /vmbackup-maxrss-kib=(\d+)\n?$/.exec(stderr);
      if (!m) return reject(new Error(`no peak RSS from /usr/bin/time in:\n${stderr}`));
      stderr = stderr
        .slice(0, m.index)
        .replace(/Command exited with non-zero status \d+\n$/, '')
        .replace(/Command terminated by signal \d+\n$/, '');
      resolvePromise({ code: code ?? -1, stdout, stderr, maxRssBytes: Number(m[1]) * 1024 });
    });
  });
}

/** stderr without the AWS SDK's Node-version warning (another item of the issue). */
function ownLines(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((l) => l.startsWith('vmbackup:') || l.startsWith('No backups'))
    .filter(Boolean);
}

const id = (day: number, hex: string): string => `web-202611${day}T010000Z-${hex}`;

let work: string;
let vda: DiskImage;

beforeAll(async () => {
  await requireS3();
  await requireNfs();
  work = await mkdtemp(join(tmpdir(), 'vmbackup-trust-'));
  vda = await makeImage(work, 'vda', 'qcow2', 0x4d);
});

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

// radosgw's OSD holds 10 GiB: the S3 case plants 20 MiB (above the 16 MiB cap), local and NFS a sparse 3 GiB file.
const kinds: Array<[string, () => Promise<Made>, number]> = [
  ['local', localTarget, 3 * GiB],
  ['nfs', nfsTarget, 3 * GiB],
  ['s3', () => s3Target(), 20 * MiB],
];

describe.each(kinds)('manifests someone else wrote, on a %s target', (kind, make, bigBytes) => {
  let made: Made;
  beforeEach(async () => {
    made = await make();
  });
  afterEach(async () => {
    await made.cleanup(); // the S3 prefix is emptied: nothing stays on radosgw
    await made.target.close();
  });

  test('list lists the good backups, warns naming each bad manifest, exits 0, and never reads the big one', async () => {
    const good = [id(20, '0001'), id(21, '0002')];
    for (const [i, g] of good.entries()) await backUp(made.url, 'web', g, `2026-11-2${i}T01:00:00.000Z`, [vda]);
    const [big, junk, invalid, moved, evil] = [
      id(22, '0b19'),
      id(23, '0bad'),
      id(24, '0bad'),
      id(25, '0bad'),
      id(26, '0e51'),
    ];
    const keyOf = (b: string): string => `web/${b}/manifest.json`;
    await plant(made, keyOf(big), { sparseBytes: bigBytes });
    await plant(made, keyOf(junk), Buffer.from('{nope'));
    const fields = {
      domain: 'web',
      host: 'hv1',
      method: 'push' as const,
      startedAt: '2026-11-24T01:00:00.000Z',
      finishedAt: '2026-11-24T01:00:00.000Z',
      quiesced: false,
      libvirtVersion: '9.0.0',
      qemuVersion: '7.2.0',
    };
    const manifestOf = (b: string): Record<string, unknown> => ({
      ...buildManifest({
        ...fields,
        backupId: b,
        disks: [
          {
            name: 'vda',
            format: 'qcow2',
            virtualSize: MiB,
            size: 1,
            sha256: 'a'.repeat(64),
            key: `web/${b}/vda.qcow2`,
          },
        ],
      }),
    });
    await plant(made, keyOf(invalid), Buffer.from(JSON.stringify({ ...manifestOf(invalid), disks: [] })));
    // a good manifest copied under another backup's prefix
    await plant(made, keyOf(moved), Buffer.from(JSON.stringify(manifestOf(good[0]!))));
    // escape sequences in a field the schema refuses (the refusal quotes it)
    await plant(made, keyOf(evil), Buffer.from(JSON.stringify({ ...manifestOf(evil), method: EVIL })));

    const res = await runMeasured(['list', '--target', made.url]);
    expect(res.code).toBe(0);
    expect(res.stdout.split('\n')[0]).toMatch(/^BACKUP ID\s+DOMAIN/);
    for (const g of good) expect(res.stdout).toContain(g);
    for (const b of [big, junk, invalid, moved, evil]) expect(res.stdout).not.toContain(b);
    const warnings = ownLines(res.stderr);
    expect(warnings).toHaveLength(5);
    expect(warnings).toEqual(
      expect.arrayContaining([
        expect.stringMatching(
          new RegExp(
            `^vmbackup: skipping ${keyOf(big)}: The manifest ${keyOf(big)} on \\S+ is ${kind === 's3' ? '20.0 MiB' : '3.0 GiB'}, larger than the 16 MiB a manifest may have`,
          ),
        ),
        expect.stringMatching(new RegExp(`^vmbackup: skipping ${keyOf(junk)}: .* is not valid JSON`)),
        expect.stringMatching(new RegExp(`^vmbackup: skipping ${keyOf(invalid)}: .* is invalid \\(disks `)),
        expect.stringMatching(
          new RegExp(`^vmbackup: skipping ${keyOf(moved)}: .* describes web/${good[0]}; it was moved`),
        ),
        expect.stringMatching(
          new RegExp(`^vmbackup: skipping ${keyOf(evil)}: .* is invalid \\(method .*\\\\x1b\\]0;pwned\\\\x07`),
        ),
      ]),
    );
    expect(res.stdout + res.stderr).not.toMatch(RAW_CONTROLS);
    if (kind !== 's3') {
      // the 3 GiB file was refused by its size: the whole CLI stays a small fraction of it (700 MB used 771 MB)
      expect(res.maxRssBytes).toBeLessThan(bigBytes / 8);
    }

    // the one backup whose manifest is too big: one sentence, exit 1
    const verify = await runCli(['verify', big, '--target', made.url]);
    expect(verify.code).toBe(1);
    expect(ownLines(verify.stderr)).toEqual([
      expect.stringMatching(
        new RegExp(
          `^vmbackup: The manifest ${keyOf(big)} on \\S+ is .*, larger than the 16 MiB a manifest may have; it was not written by vmbackup: remove it\\.$`,
        ),
      ),
    ]);
    // the good ones are still usable
    expect((await runCli(['verify', good[1]!, '--target', made.url])).code).toBe(0);
  });

  test('escape sequences in a valid manifest (host, an unknown field) never reach the terminal', async () => {
    const b = id(20, '0e5c');
    await backUp(made.url, 'web', b, '2026-11-20T01:00:00.000Z', [vda]);
    const stored = buildManifest({
      backupId: b,
      domain: 'web',
      host: EVIL,
      method: 'push',
      startedAt: '2026-11-20T01:00:00.000Z',
      finishedAt: '2026-11-20T01:00:00.000Z',
      quiesced: false,
      libvirtVersion: `9.0.0\u009b2J`,
      qemuVersion: '7.2.0',
      disks: [
        {
          name: 'vda',
          format: 'qcow2',
          virtualSize: vda.virtualSize,
          size: vda.size,
          sha256: vda.sha256,
          key: `web/${b}/vda.qcow2`,
        },
      ],
    });
    await plant(
      made,
      `web/${b}/manifest.json`,
      Buffer.from(JSON.stringify({ ...stored, note: `\u009b31m${EVIL}\u202e` })),
    );

    const table = await runCli(['list', '--target', made.url]);
    expect(table.code).toBe(0);
    expect(table.stdout).toContain(b);
    const json = await runCli(['list', '--target', made.url, '--json']);
    expect(json.code).toBe(0);
    // eslint-disable-next-line no-control-regex -- finding control characters is the point
    expect(json.stdout).not.toMatch(/[\u001b\u0007\u009b\u202e]/);
    // the same values for a script: only their spelling in JSON changed
    const parsed = JSON.parse(json.stdout) as { backups: Array<Record<string, unknown>> };
    expect(parsed.backups[0]).toMatchObject({
      host: EVIL,
      libvirtVersion: '9.0.0\u009b2J',
      note: `\u009b31m${EVIL}\u202e`,
    });
    expect(json.stdout).toContain('"host": "\\u001b]0;pwned\\u0007\\u001b[31m"');
    for (const r of [table, json, await runCli(['verify', b, '--target', made.url])]) {
      expect(r.stdout + r.stderr).not.toMatch(RAW_CONTROLS);
    }
  });
});

describe('list of a target whose location does not exist', () => {
  test('local: a missing directory is an error (exit 1), an existing empty one has no backups', async () => {
    const missing = join(work, 'no-such-dir', 'backups');
    const res = await runCli(['list', '--target', pathToFileURL(missing).href]);
    expect([res.code, ownLines(res.stderr)]).toEqual([
      1,
      [
        `vmbackup: Target ${pathToFileURL(missing).href} does not exist: there is no directory ${missing}; check the URL.`,
      ],
    ]);
    expect(res.stdout).toBe('');
    const empty = join(work, 'empty');
    await mkdir(empty);
    const ok = await runCli(['list', '--target', pathToFileURL(empty).href]);
    expect([ok.code, ownLines(ok.stderr)]).toEqual([0, [`No backups on ${pathToFileURL(empty).href}.`]]);
  });

  test('NFS: a missing path below the export is an error (exit 1), an existing empty one has no backups', async () => {
    const { nfs } = stackEnv();
    const sub = uniqueName('missing');
    const res = await runCli(['list', '--target', `${nfs.url}/${sub}`]);
    expect(res.code).toBe(1);
    expect(ownLines(res.stderr)).toEqual([
      expect.stringMatching(
        new RegExp(
          `^vmbackup: NFS target ${nfs.url}/${sub} does not exist: the export has no directory /\\S+/${sub}; check the URL\\.$`,
        ),
      ),
    ]);
    const dir = join(nfs.exportDir, sub);
    await mkdir(dir);
    try {
      const ok = await runCli(['list', '--target', `${nfs.url}/${sub}`]);
      expect([ok.code, ownLines(ok.stderr)]).toEqual([0, [`No backups on ${nfs.url}/${sub}.`]]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('S3: a missing bucket is an error (exit 1); an empty prefix in an existing bucket has no backups', async () => {
    const bucket = `vmbackup-missing-${randomBytes(4).toString('hex')}`;
    const res = await runCli(['list', '--target', `s3://${bucket}/x`]);
    expect(res.code).toBe(1);
    expect(ownLines(res.stderr)).toEqual([
      expect.stringMatching(
        new RegExp(
          `^vmbackup: S3 target s3://${bucket}/x .*bucket "${bucket}" does not exist; create the bucket or fix the URL\\.$`,
        ),
      ),
    ]);
    const url = `s3://${stackEnv().s3.bucket}/${uniqueName('empty')}`;
    const ok = await runCli(['list', '--target', url]);
    expect([ok.code, ownLines(ok.stderr)]).toEqual([0, [`No backups on ${url}.`]]);
  });
});
