/**
 * The set-up every chunk-repository test repeats: a password file, an encrypted repository initialised with a cheap
 * scrypt cost (the worker and the CLI read the cost from the key object, so a cheap one costs them nothing either), a
 * local repository under the test's work dir, a backup's manifest read back, a disk read back through ChunkStore the
 * way a restore reads it, and the chunk objects or keys a target holds.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Client } from '@temporalio/client';
import {
  CHUNKS_PREFIX,
  ChunkStore,
  chunkIdOfKey,
  initRepository,
  type DiskIndex,
  type OpenRepository,
} from '../../src/repository/chunks';
import type { StorageTarget } from '../../src/storage/contract';
import { openTarget } from '../../src/storage/registry';
import { localTarget, nfsTarget, s3Env, s3Target } from '../storage/fixtures';
import { requireNfs, requireS3, stackEnv } from './stack';
import { startWorkerProcess, temporalClient, uniqueHost, type WorkerProcess } from './vmbackup';

/** A cheap scrypt cost for test repositories (the default is memory-hard on purpose; tests open keys often). */
export const TEST_SCRYPT = { N: 1 << 10, r: 8, p: 1 };

/** Writes `password` (and a newline) to `dir/name`, mode 0600, and returns its path. */
export async function writePasswordFile(dir: string, password: string, name = 'password'): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `${password}\n`, { mode: 0o600 });
  return path;
}

/** Initialises an encrypted (AES-256-GCM), zstd-compressed repository on `target` with the cheap test scrypt cost. */
export function initTestRepository(
  target: StorageTarget,
  password: string,
  opts: { chunkSize?: number } = {},
): Promise<OpenRepository> {
  return initRepository(target, {
    encryption: 'aes-256-gcm',
    compression: 'zstd',
    password,
    scrypt: TEST_SCRYPT,
    ...(opts.chunkSize ? { chunkSize: opts.chunkSize } : {}),
  });
}

/** A fresh directory `dir/name-XXXXXX` as a file:// target: its URL, path and the target opened on it. */
export async function localRepoTarget(
  dir: string,
  name: string,
): Promise<{ url: string; dir: string; target: StorageTarget }> {
  const path = await mkdtemp(join(dir, `${name}-`));
  const url = pathToFileURL(path).href;
  return { url, dir: path, target: openTarget(url, { env: {} }) };
}

/** What the chunk tests read of a version-3 manifest. */
export interface ChunkManifestJson {
  version: number;
  backupId: string;
  method: string;
  chain: { level: string; reason?: string; checkpoint?: string };
  repository: { id: string; chunkSize: number; encryption: string };
  repositorySignature?: string;
  disks: Array<{
    name: string;
    format: string;
    virtualSize: number;
    size: number;
    sha256: string;
    key: string;
    chunks: { count: number; zeroChunks: number; uploadedChunks: number };
  }>;
  vm?: { xml: { key: string; sha256: string; size: number } };
}

/** `<domain>/<backupId>/manifest.json` on `target`, parsed, with its bytes (to check a signature). */
export async function manifestOf<M = ChunkManifestJson>(
  target: StorageTarget,
  domain: string,
  backupId: string,
): Promise<{ m: M; body: Buffer }> {
  const body = await target.getBuffer(`${domain}/${backupId}/manifest.json`);
  return { m: JSON.parse(body.toString('utf8')) as M, body };
}

/** One disk's data read back through ChunkStore into memory (small disks). */
export async function readDiskToBuffer(store: ChunkStore, index: DiskIndex): Promise<Buffer> {
  const out = Buffer.alloc(index.virtualSize);
  await store.readDisk(index, async (offset, data) => {
    data.copy(out, offset);
  });
  return out;
}

/**
 * Every disk of a backup read back through ChunkStore into a sparse raw file `dir/<backupId>-<disk>.raw` (what a
 * restore does); returns the paths by disk name. Each index's virtual size must be the manifest's.
 */
export async function readBack(
  repo: OpenRepository,
  m: Pick<ChunkManifestJson, 'backupId' | 'disks'>,
  dir: string,
): Promise<Record<string, string>> {
  const store = new ChunkStore(repo);
  const out: Record<string, string> = {};
  for (const d of m.disks) {
    const index = await store.getIndex(d.sha256);
    if (index.virtualSize !== d.virtualSize)
      throw new Error(`index of ${d.name} says ${index.virtualSize} bytes, its manifest ${d.virtualSize}`);
    const path = join(dir, `${m.backupId}-${d.name}.raw`);
    const fh = await open(path, 'w');
    try {
      await fh.truncate(d.virtualSize);
      await store.readDisk(index, async (offset, data) => {
        await fh.write(data, 0, data.length, offset);
      });
    } finally {
      await fh.close();
    }
    out[d.name] = path;
  }
  return out;
}

/** The ids of the chunk objects stored on `target`, sorted. */
export async function chunkObjects(target: StorageTarget): Promise<string[]> {
  const ids: string[] = [];
  for await (const o of target.list(CHUNKS_PREFIX)) {
    const id = chunkIdOfKey(o.key);
    if (id) ids.push(id);
  }
  return ids.sort();
}

/** Every key under `prefix` on `target`, sorted. */
export async function keysUnder(target: StorageTarget, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const o of target.list(prefix)) out.push(o.key);
  return out.sort();
}

/** A backend for `describe.each`: its name, what fails loudly when its server is missing, and a fresh base target. */
export type RepoBackend = [
  name: string,
  requireBackend: () => Promise<void>,
  makeTarget: () => Promise<{ url: string; cleanup: () => Promise<void> }>,
];

/** The three real backends a chunk repository is tested on: a local directory, ganesha (NFS) and radosgw (S3). */
export const REPO_BACKENDS: RepoBackend[] = [
  ['local', async () => undefined, () => localTarget()],
  ['nfs', requireNfs, () => nfsTarget()],
  ['s3', requireS3, () => s3Target()],
];

/**
 * Registers beforeAll/afterAll in the calling describe: one base target of the backend for the describe, and
 * returns `place(sub)`, a fresh place under it for one test's repository (its URL and the target opened on it,
 * closed after the describe). Every test gets its own place, so the tests run in any order.
 */
export function useRepositoryPlaces(
  requireBackend: RepoBackend[1],
  makeTarget: RepoBackend[2],
): (sub: string) => { url: string; target: StorageTarget } {
  let base: { url: string; cleanup: () => Promise<void> } | undefined;
  const opened: StorageTarget[] = [];
  beforeAll(async () => {
    await requireBackend();
    base = await makeTarget();
  });
  afterAll(async () => {
    for (const t of opened) await t.close();
    await base?.cleanup();
  });
  return (sub) => {
    if (!base) throw new Error('useRepositoryPlaces: place() called outside a test of its describe');
    const url = `${base.url}/${sub}-${randomBytes(3).toString('hex')}`;
    const target = openTarget(url, { env: s3Env() });
    opened.push(target);
    return { url, target };
  };
}

/** The lines vmbackup itself wrote to stderr (not Node's or the AWS SDK's warnings). */
export function ownLines(stderr: string): string[] {
  return stderr.split('\n').filter((l) => l.startsWith('vmbackup: '));
}

/** What useChunkRepoWorker sets up for a describe (filled in its beforeAll). */
export interface ChunkRepoWorker {
  client: Client;
  /** the `vmbackup worker` process of `host`, given the repositories' password with --password-file */
  worker: WorkerProcess;
  host: string;
  /** the describe's own directory under the state dir, removed after it */
  work: string;
  /** `work/password`, holding the password */
  passwordFile: string;
}

/**
 * Registers beforeAll/afterAll in the calling describe: the stack components it needs (failing loudly when one is
 * missing), a Temporal client, a work dir `<state dir>/test-<name>-XXXXXX`, a password file, and one worker of a
 * host of its own that has the password. The returned object's fields are set once beforeAll ran.
 */
export function useChunkRepoWorker(opts: {
  name: string;
  hostPrefix: string;
  password: string;
  require: Array<() => Promise<void>>;
}): ChunkRepoWorker {
  const ctx = {} as ChunkRepoWorker;
  let closeClient: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    for (const need of opts.require) await need();
    let client: Client;
    ({ client, close: closeClient } = await temporalClient());
    ctx.client = client;
    ctx.work = await mkdtemp(join(stackEnv().stateDir, `test-${opts.name}-`));
    ctx.passwordFile = await writePasswordFile(ctx.work, opts.password);
    ctx.host = uniqueHost(opts.hostPrefix);
    ctx.worker = await startWorkerProcess(ctx.host, { args: ['--password-file', ctx.passwordFile] });
  });
  afterAll(async () => {
    // a test may have stopped the worker (SIGSTOP) and failed before it let it go on
    const child = ctx.worker?.child;
    if (child?.pid && child.exitCode === null && child.signalCode === null) process.kill(child.pid, 'SIGCONT');
    await ctx.worker?.stop();
    await closeClient?.();
    if (ctx.work) await rm(ctx.work, { recursive: true, force: true });
  });
  return ctx;
}
