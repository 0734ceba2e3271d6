/**
 * The `chunk-repo` group (issue #15's benchmark): vmbackup into a chunk repository against restic 0.14 and borg 1.2
 * (Debian's packages, installed by bench/run.sh), each with compression and encryption on, on the same guest data.
 *
 * The data: a qcow2 disk (4 GiB; 64 MiB with --smoke), its first half random, the second never written, in a shut-off
 * fixture domain of its own. The peers read the same guest data as a sparse raw file (`qemu-img convert -O raw` of the
 * disk, not timed). Per repetition, in a fresh repository of each tool:
 *
 * 1. first backup, each tool from a cold page cache, ending synced (which tool goes first rotates per repetition):
 *    - restic: `restic backup --stdin --stdin-filename vda.raw --compression auto < RAW` (repository version 2, made
 *      by `restic init --repository-version 2` with a password file), then `sync -f REPO`;
 *    - borg: `borg create --chunker-params fixed,4194304 --compression zstd REPO::NAME -` reading RAW on stdin
 *      (`borg init --encryption repokey`, BORG_PASSPHRASE), then `sync -f REPO`;
 *    - vmbackup: `vmbackup backup DOMAIN --method auto (the domain is shut off: the offline method) --target URL --wait --json` (the whole CLI process timed)
 *      into a repository made by `vmbackup repo init URL --encryption repokey --compression zstd`, VMBACKUP_PASSWORD
 *      in the environment of the CLI and of the group's own worker; a file:// repository, and an s3:// one (radosgw).
 * 2. scattered changes: COUNT x 64 KiB of fresh random bytes (1024 on the 4 GiB disk: 64 MiB) at distinct 64 KiB
 *    aligned offsets in the random half, written with qemu-io into the qcow2 and into the raw file alike.
 *    changedChunkMiB = the distinct 4 MiB chunks those writes touch x 4 MiB.
 * 3. second backup, as in 1. Stored = the repository's growth (du; S3: the sum of the object sizes); vmbackup's
 *    uploaded bytes are the manifest's (`disks[].size`: what this backup uploaded).
 * 4. restore of the second point, cold page cache, written as a raw file and synced: `restic restore latest
 *    --target DIR`, `borg extract --sparse REPO::NAME` (in DIR), `vmbackup restore ID --target URL --to DIR --format
 *    raw`, and the baseline `qemu-img convert -f qcow2 -O raw` of the disk itself. Every restored file is compared
 *    with the disk (`qemu-img compare`) after it is timed: the bench never times a wrong restore.
 *
 * In `npm run bench` as the group `chunk-repo`; alone (root, for drop_caches; the stack up):
 *   npx tsc -p bench/tsconfig.json --outDir /tmp/b && NODE_PATH=$PWD/node_modules node /tmp/b/bench/chunk-repo.js \
 *     [--size-mib 4096] [--reps 3] [--peers-only] [--no-s3] [--out bench/results/chunk-repo]
 * (`--peers-only`: restic, borg and the qemu-img baseline only, for a vmbackup without `repo init`).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { GetObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { cleanupStaleFixtures, createFixtureDomain } from '../test/fixtures/domains';
import type { FixtureDomain } from '../test/fixtures/domains';
import { s3ClientConfig, stackEnv } from '../test/helpers/stack';
import { emptyS3Prefix } from '../test/storage/fixtures';
import { scatteredOffsets } from './incremental';
import { dirBytes, dropCaches, must, run, timed } from './lib/measure';
import type { RunResult } from './lib/measure';
import { benchHost, cli, startWorker } from './lib/vmbackup';
import type { WorkerProcess } from './lib/vmbackup';
import type { RatioDef, Sample } from './report';

const MiB = 1 << 20;
const KiB64 = 64 * 1024;
const CHUNK = 4 * MiB;

/** What the group needs from its runner (bench/main.ts, or main() below). */
export interface ChunkRepoBench {
  work: string;
  record(id: string, label: string, sample: Sample, extra?: Record<string, unknown>): void;
  log(line: string): void;
}

export interface ChunkRepoOptions {
  /** restic, borg and the qemu-img baseline only (a vmbackup without `repo init`) */
  peersOnly?: boolean;
  /** also vmbackup into an s3:// chunk repository on the stack's radosgw */
  s3?: boolean;
}

type Tool = 'vmbackup-file' | 'vmbackup-s3' | 'restic' | 'borg';

/**
 * The group's ratios for bench/report.ts (every size the run has cases of). Goals from issue #15: vmbackup's ingest
 * faster than both peers, its repository no larger, its second backup uploading <= 1.1x the changed chunks' bytes,
 * its restore throughput at least restic's and >= 0.8x `qemu-img convert` of the same image.
 */
export function chunkRepoRatioDefs(ids: string[]): RatioDef[] {
  const defs: RatioDef[] = [];
  const sizes = new Set(ids.map((id) => /^(\d+[mg])\/crepo-/.exec(id)?.[1]).filter((s): s is string => !!s));
  for (const sz of sizes) {
    const c = (tool: string, what: string) => `${sz}/crepo-${tool}-${what}`;
    const v = 'vmbackup-file';
    defs.push(
      {
        name: `chunk repo, first backup: vmbackup / restic (${sz})`,
        num: c(v, 'backup1'),
        den: c('restic', 'backup1'),
        metric: 'wallMs',
        goal: { op: '<=', value: 1 },
      },
      {
        name: `chunk repo, first backup: vmbackup / borg (${sz})`,
        num: c(v, 'backup1'),
        den: c('borg', 'backup1'),
        metric: 'wallMs',
        goal: { op: '<=', value: 1 },
      },
      {
        name: `chunk repo, second backup: vmbackup / restic (${sz})`,
        num: c(v, 'backup2'),
        den: c('restic', 'backup2'),
        metric: 'wallMs',
      },
      {
        name: `chunk repo, second backup: vmbackup / borg (${sz})`,
        num: c(v, 'backup2'),
        den: c('borg', 'backup2'),
        metric: 'wallMs',
      },
      {
        name: `chunk repo, first backup: vmbackup to S3 / to file (${sz})`,
        num: c('vmbackup-s3', 'backup1'),
        den: c(v, 'backup1'),
        metric: 'wallMs',
      },
      {
        name: `chunk repo size after the first backup: vmbackup / restic (${sz})`,
        num: c(v, 'backup1'),
        den: c('restic', 'backup1'),
        metric: 'repoMiB',
        goal: { op: '<=', value: 1 },
      },
      {
        name: `chunk repo size after the first backup: vmbackup / borg (${sz})`,
        num: c(v, 'backup1'),
        den: c('borg', 'backup1'),
        metric: 'repoMiB',
        goal: { op: '<=', value: 1 },
      },
      {
        name: `chunk repo size after 2 backups: vmbackup / restic (${sz})`,
        num: c(v, 'backup2'),
        den: c('restic', 'backup2'),
        metric: 'repoMiB',
        goal: { op: '<=', value: 1 },
      },
      {
        name: `chunk repo size after 2 backups: vmbackup / borg (${sz})`,
        num: c(v, 'backup2'),
        den: c('borg', 'backup2'),
        metric: 'repoMiB',
        goal: { op: '<=', value: 1 },
      },
      {
        name: `chunk repo size after 2 backups: vmbackup S3 / file (${sz})`,
        num: c('vmbackup-s3', 'backup2'),
        den: c(v, 'backup2'),
        metric: 'repoMiB',
      },
      {
        name: `chunk repo, second backup: vmbackup uploaded / changed chunks' bytes (${sz})`,
        num: c(v, 'backup2'),
        den: c(v, 'backup2'),
        metric: 'uploadedMiB',
        denMetric: 'changedChunkMiB',
        goal: { op: '<=', value: 1.1 },
      },
      {
        name: `chunk repo, second backup: vmbackup S3 uploaded / changed chunks' bytes (${sz})`,
        num: c('vmbackup-s3', 'backup2'),
        den: c('vmbackup-s3', 'backup2'),
        metric: 'uploadedMiB',
        denMetric: 'changedChunkMiB',
        goal: { op: '<=', value: 1.1 },
      },
      {
        name: `chunk repo, second backup: restic stored / changed chunks' bytes (${sz})`,
        num: c('restic', 'backup2'),
        den: c('restic', 'backup2'),
        metric: 'storedMiB',
        denMetric: 'changedChunkMiB',
      },
      {
        name: `chunk repo, second backup: borg stored / changed chunks' bytes (${sz})`,
        num: c('borg', 'backup2'),
        den: c('borg', 'backup2'),
        metric: 'storedMiB',
        denMetric: 'changedChunkMiB',
      },
      {
        name: `chunk repo restore throughput: vmbackup / restic (${sz})`,
        num: c(v, 'restore'),
        den: c('restic', 'restore'),
        metric: 'wallMs',
        throughput: true,
        goal: { op: '>=', value: 1 },
      },
      {
        name: `chunk repo restore throughput: vmbackup / borg (${sz})`,
        num: c(v, 'restore'),
        den: c('borg', 'restore'),
        metric: 'wallMs',
        throughput: true,
      },
      {
        name: `chunk repo restore throughput: vmbackup / qemu-img convert (${sz})`,
        num: c(v, 'restore'),
        den: `${sz}/crepo-qemu-img-convert`,
        metric: 'wallMs',
        throughput: true,
        goal: { op: '>=', value: 0.8 },
      },
      {
        name: `chunk repo restore throughput: vmbackup from S3 / from file (${sz})`,
        num: c('vmbackup-s3', 'restore'),
        den: c(v, 'restore'),
        metric: 'wallMs',
        throughput: true,
      },
      {
        name: `chunk repo restore throughput: restic / qemu-img convert (${sz})`,
        num: c('restic', 'restore'),
        den: `${sz}/crepo-qemu-img-convert`,
        metric: 'wallMs',
        throughput: true,
      },
    );
  }
  return defs;
}

/** The stderr line that says why, or the stdout's when stderr is empty. */
function firstLine(r: { stdout: string; stderr: string }): string {
  return (
    (r.stderr.trim() || r.stdout.trim())
      .split('\n')
      .find((l) => l.trim())
      ?.trim() ?? 'no output'
  );
}

/** `sync -f PATH` (the file system holding it), in ms: the peers' commands end with it, inside their timing. */
async function syncMsOf(path: string): Promise<number> {
  const t = process.hrtime.bigint();
  await must('sync', ['-f', path]);
  return Number(process.hrtime.bigint() - t) / 1e6;
}

/** The distinct 4 MiB chunks that 64 KiB writes at these offsets touch, in MiB. */
export function changedChunkMiB(offsets: number[]): number {
  return (new Set(offsets.map((o) => Math.floor(o / CHUNK))).size * CHUNK) / MiB;
}

interface Repos {
  dir: string;
  restic: string;
  borg: string;
  vmbackupFile: string;
  s3Prefix: string;
  /** each tool's repository size after its first backup (bytes), for the second backup's growth */
  after1: Partial<Record<Tool, number>>;
  /** vmbackup's second backup ids */
  backup2: Partial<Record<Tool, string>>;
  borgArchive?: string;
}

export class ChunkRepoGroup {
  private raw = '';
  private worker?: WorkerProcess;
  private readonly password = randomBytes(18).toString('base64url');
  private readonly passwordFile: string;
  private readonly s3: S3Client | undefined;
  private readonly s3Base: string;

  constructor(
    private readonly io: ChunkRepoBench,
    private readonly sz: string,
    private readonly dom: FixtureDomain,
    private readonly diskMiB: number,
    private readonly opts: ChunkRepoOptions = {},
  ) {
    this.passwordFile = join(io.work, 'crepo-password');
    const tag = randomBytes(3).toString('hex');
    this.s3Base = `bench-crepo-${tag}`;
    this.s3 = opts.s3 && !opts.peersOnly ? new S3Client(s3ClientConfig()) : undefined;
  }

  private get tools(): Tool[] {
    const t: Tool[] = ['restic', 'borg'];
    if (!this.opts.peersOnly) t.unshift('vmbackup-file');
    if (this.s3) t.push('vmbackup-s3');
    return t;
  }

  /** vmbackup's: the password in VMBACKUP_PASSWORD (the CLI and the worker read it from their environment) */
  private get vmEnv(): Record<string, string> {
    return { VMBACKUP_PASSWORD: this.password };
  }

  /** the peers': restic's password file, borg's passphrase, their caches and keys in the bench's work directory */
  private env(): NodeJS.ProcessEnv {
    return {
      ...process.env,
      RESTIC_PASSWORD_FILE: this.passwordFile,
      RESTIC_CACHE_DIR: join(this.io.work, 'crepo-restic-cache'),
      BORG_PASSPHRASE: this.password,
      BORG_DISPLAY_PASSPHRASE: 'no',
      BORG_BASE_DIR: join(this.io.work, 'crepo-borg-home'),
    };
  }

  /**
   * Checks the tools before any data is written: restic, borg and (unless peers-only) `vmbackup repo init`, which
   * fails the group with one line when this vmbackup has no chunk repository commands. Then the peers' raw file and
   * the group's worker.
   */
  async prepare(): Promise<void> {
    await mkdir(this.io.work, { recursive: true });
    await writeFile(this.passwordFile, this.password, { mode: 0o600 });
    for (const [tool, args] of [
      ['restic', ['version']],
      ['borg', ['--version']],
    ] as const) {
      const r = await run(tool, [...args]).catch((e: unknown) => ({ code: -1, stdout: '', stderr: String(e) }));
      if (r.code !== 0)
        throw new Error(`chunk-repo: ${tool} is not installed (bench/run.sh installs it): ${firstLine(r)}`);
      this.io.log(`chunk-repo: ${firstLine(r)}`);
    }
    if (!this.opts.peersOnly) {
      const probe = join(this.io.work, 'crepo-probe');
      await mkdir(probe, { recursive: true });
      const r = await cli(['repo', 'init', `file://${probe}`, '--encryption', 'repokey', '--compression', 'zstd'], {
        env: this.vmEnv,
        allowFail: true,
      });
      await rm(probe, { recursive: true, force: true });
      if (r.code !== 0) {
        throw new Error(`chunk-repo: \`vmbackup repo init\` failed, so vmbackup cannot be measured: ${firstLine(r)}`);
      }
      this.worker = await startWorker(benchHost(), { env: { VMBACKUP_PASSWORD: this.password } });
    }
    this.raw = join(this.io.work, `crepo-${this.sz}.raw`);
    await must('qemu-img', [
      'convert',
      '-f',
      this.dom.disks[0]!.format,
      '-O',
      'raw',
      this.dom.disks[0]!.path,
      this.raw,
    ]);
  }

  async cleanup(): Promise<void> {
    await this.worker?.stop().catch(() => undefined);
    if (this.s3) {
      await emptyS3Prefix(this.s3Base, this.s3).catch((e: unknown) => this.io.log(`S3 cleanup: ${String(e)}`));
      this.s3.destroy();
    }
    if (this.raw) await rm(this.raw, { force: true });
  }

  async run(rep: number): Promise<void> {
    const dir = join(this.io.work, `crepo-r${rep}`);
    const repos: Repos = {
      dir,
      restic: join(dir, 'restic'),
      borg: join(dir, 'borg'),
      vmbackupFile: join(dir, 'vmbackup'),
      s3Prefix: `${this.s3Base}/r${rep}`,
      after1: {},
      backup2: {},
    };
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    // which tool goes first rotates: a drift of the machine's load shows as a spread, not as one tool's loss
    const tools = this.tools;
    const order = tools.map((_, i) => tools[(i + rep - 1) % tools.length]!);
    try {
      for (const t of order) await this.init(t, repos);
      for (const t of order) await this.backup(t, repos, 1, 0);
      const offsets = await this.change(rep);
      const changed = changedChunkMiB(offsets);
      this.io.log(
        `chunk-repo: ${offsets.length} x 64 KiB written, ${changed} MiB of ${CHUNK / MiB} MiB chunks changed`,
      );
      for (const t of order) await this.backup(t, repos, 2, changed);
      await this.qemuImgBaseline(rep);
      for (const t of order) await this.restore(t, repos);
    } finally {
      await rm(dir, { recursive: true, force: true });
      if (this.s3) await emptyS3Prefix(repos.s3Prefix, this.s3).catch((e: unknown) => this.io.log(`S3: ${String(e)}`));
    }
  }

  private rec(tool: string, what: string, label: string, sample: Sample): void {
    this.io.record(`${this.sz}/crepo-${tool}-${what}`, `${label} (${this.sz})`, sample);
  }

  private sh(script: string, args: string[]): Promise<RunResult> {
    return timed('sh', ['-c', script, 'sh', ...args], { env: this.env() });
  }

  private s3Url(repos: Repos): string {
    return `s3://${stackEnv().s3.bucket}/${repos.s3Prefix}`;
  }

  private async init(tool: Tool, repos: Repos): Promise<void> {
    if (tool === 'restic') {
      await this.sh('restic init --repository-version 2 -r "$1" >/dev/null', [repos.restic]);
    } else if (tool === 'borg') {
      await this.sh('borg init --encryption repokey "$1"', [repos.borg]);
    } else {
      if (tool === 'vmbackup-file') await mkdir(repos.vmbackupFile, { recursive: true });
      const url = tool === 'vmbackup-file' ? `file://${repos.vmbackupFile}` : this.s3Url(repos);
      const r = await cli(['repo', 'init', url, '--encryption', 'repokey', '--compression', 'zstd'], {
        env: this.vmEnv,
        allowFail: true,
      });
      if (r.code !== 0) throw new Error(`vmbackup repo init ${url}: ${firstLine(r)}`);
    }
  }

  private async repoBytes(tool: Tool, repos: Repos): Promise<number> {
    if (tool === 'restic') return dirBytes(repos.restic);
    if (tool === 'borg') return dirBytes(repos.borg);
    if (tool === 'vmbackup-file') return dirBytes(repos.vmbackupFile);
    let n = 0;
    let token: string | undefined;
    do {
      const page = await this.s3!.send(
        new ListObjectsV2Command({
          Bucket: stackEnv().s3.bucket,
          Prefix: `${repos.s3Prefix}/`,
          ContinuationToken: token,
        }),
      );
      for (const o of page.Contents ?? []) n += o.Size ?? 0;
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    return n;
  }

  private async backup(tool: Tool, repos: Repos, point: 1 | 2, changedChunk: number): Promise<void> {
    await dropCaches();
    let sample: Sample;
    let label: string;
    if (tool === 'restic') {
      const r = await this.sh(
        'restic -r "$1" backup --stdin --stdin-filename vda.raw --compression auto --quiet < "$2" && sync -f "$1"',
        [repos.restic, this.raw],
      );
      label = 'restic backup --stdin --compression auto';
      sample = { wallMs: r.wallMs, cpuMs: r.cpuMs, peakRssMiB: r.peakRssMiB };
    } else if (tool === 'borg') {
      const name = `vda-${point}`;
      const r = await this.sh(
        'borg create --chunker-params fixed,4194304 --compression zstd --stdin-name vda.raw "$1::$2" - < "$3" && sync -f "$1"',
        [repos.borg, name, this.raw],
      );
      repos.borgArchive = name;
      label = 'borg create --chunker-params fixed,4194304 --compression zstd';
      sample = { wallMs: r.wallMs, cpuMs: r.cpuMs, peakRssMiB: r.peakRssMiB };
    } else {
      const url = tool === 'vmbackup-file' ? `file://${repos.vmbackupFile}` : this.s3Url(repos);
      const w = this.worker!;
      await w.meter.reset();
      const r = await cli(
        ['backup', this.dom.name, '--host', w.host, '--method', 'auto', '--target', url, '--wait', '--json'],
        { env: this.vmEnv, allowFail: true },
      );
      const wm = await w.meter.read();
      if (r.code !== 0 || r.json.status !== 'completed') {
        throw new Error(`vmbackup backup ${this.dom.name} --target ${url} did not complete: ${firstLine(r)}`);
      }
      const backupId = String(r.json.backupId);
      if (point === 2) repos.backup2[tool] = backupId;
      // ending synced like the peers: vmbackup fsyncs what it writes, so this is ~0 unless it does not
      const syncMs = tool === 'vmbackup-file' ? await syncMsOf(repos.vmbackupFile) : 0;
      label = `vmbackup backup (offline method), ${tool === 'vmbackup-file' ? 'file' : 'S3'} chunk repository`;
      sample = {
        wallMs: r.wallMs + syncMs,
        cliWallMs: r.wallMs,
        syncMs,
        cliCpuMs: r.cpuMs,
        cliPeakRssMiB: r.peakRssMiB,
        workerCpuMs: wm.cpuMs,
        workerPeakRssMiB: wm.peakRssMiB,
        uploadedMiB: (await this.uploadedBytes(tool, repos, backupId)) / MiB,
      };
      // the --json result's own figure, when it has one per target (for reference; the manifest's is the ratio's)
      const targets = (r.json.targets ?? []) as Array<Record<string, unknown>>;
      const reported = targets.map((t) => t.uploadedBytes).find((b): b is number => typeof b === 'number');
      if (reported !== undefined) sample.jsonUploadedMiB = reported / MiB;
    }
    const bytes = await this.repoBytes(tool, repos);
    sample.repoMiB = bytes / MiB;
    if (point === 1) repos.after1[tool] = bytes;
    else {
      sample.storedMiB = (bytes - (repos.after1[tool] ?? 0)) / MiB;
      sample.changedChunkMiB = changedChunk;
    }
    this.rec(tool, `backup${point}`, point === 1 ? `${label}, first` : `${label}, after scattered changes`, sample);
  }

  /**
   * What this backup uploaded for its disks: the manifest's `disks[].size` (issue #15: the bytes of the chunks this
   * backup stored; the others were in the repository already), read from the directory of a file:// repository or
   * from the bucket. The manifest must be a chunk repository's (version 3, disks of format `chunks`): the bench does
   * not report an image-tree backup as a chunk repository's figure.
   */
  private async uploadedBytes(tool: Tool, repos: Repos, backupId: string): Promise<number> {
    const rel = join(this.dom.name, backupId, 'manifest.json');
    let text: string;
    if (tool === 'vmbackup-file') text = await readFile(join(repos.vmbackupFile, rel), 'utf8');
    else {
      const o = await this.s3!.send(
        new GetObjectCommand({ Bucket: stackEnv().s3.bucket, Key: `${repos.s3Prefix}/${rel}` }),
      );
      text = await o.Body!.transformToString();
    }
    const m = JSON.parse(text) as { version?: number; disks?: Array<{ size?: number; format?: string }> };
    if (m.version !== 3 || !(m.disks ?? []).every((d) => d.format === 'chunks')) {
      throw new Error(`backup ${backupId} is not a chunk repository backup (manifest version ${String(m.version)})`);
    }
    return (m.disks ?? []).reduce((n, d) => n + (d.size ?? 0), 0);
  }

  /**
   * COUNT x 64 KiB of fresh random bytes at distinct aligned offsets in the random half (seeded per repetition), the
   * same bytes into the qcow2 disk and into the peers' raw file. Returns the byte offsets.
   */
  private async change(rep: number): Promise<number[]> {
    const randomMiB = Math.floor(this.diskMiB / 2);
    const count = Math.max(16, Math.round((1024 * this.diskMiB) / 4096));
    const offsets = scatteredOffsets((randomMiB * MiB) / KiB64, count, 15_000 + rep).map((s) => s * KiB64);
    const pieces = join(this.io.work, `crepo-pieces-r${rep}`);
    await mkdir(pieces, { recursive: true });
    try {
      const commands: string[] = [];
      for (const [i, off] of offsets.entries()) {
        const f = join(pieces, String(i));
        await writeFile(f, randomBytes(KiB64));
        commands.push('-c', `write -q -s ${f} ${off} ${KiB64}`);
      }
      const disk = this.dom.disks[0]!;
      await must('qemu-io', ['-f', disk.format, ...commands, disk.path]);
      await must('qemu-io', ['-f', 'raw', ...commands, this.raw]);
    } finally {
      await rm(pieces, { recursive: true, force: true });
    }
    return offsets;
  }

  private async qemuImgBaseline(rep: number): Promise<void> {
    const disk = this.dom.disks[0]!;
    const out = join(this.io.work, `crepo-convert-r${rep}.raw`);
    try {
      await dropCaches();
      const r = await this.sh('qemu-img convert -f "$1" -O raw "$2" "$3" && sync -f "$3"', [
        disk.format,
        disk.path,
        out,
      ]);
      this.io.record(`${this.sz}/crepo-qemu-img-convert`, `qemu-img convert -O raw of the disk (${this.sz})`, {
        wallMs: r.wallMs,
        cpuMs: r.cpuMs,
        MiBps: this.diskMiB / (r.wallMs / 1000),
      });
    } finally {
      await rm(out, { force: true });
    }
  }

  private async restore(tool: Tool, repos: Repos): Promise<void> {
    const to = join(repos.dir, `restore-${tool}`);
    if (!tool.startsWith('vmbackup')) await mkdir(to, { recursive: true });
    try {
      await dropCaches();
      let r: RunResult;
      let label: string;
      if (tool === 'restic') {
        r = await this.sh('restic -r "$1" restore latest --target "$2" --quiet && sync -f "$2"', [repos.restic, to]);
        label = 'restic restore latest';
      } else if (tool === 'borg') {
        r = await this.sh('cd "$2" && borg extract --sparse "$1::$3" && sync -f .', [
          repos.borg,
          to,
          repos.borgArchive ?? '',
        ]);
        label = 'borg extract --sparse';
      } else {
        const url = tool === 'vmbackup-file' ? `file://${repos.vmbackupFile}` : this.s3Url(repos);
        const id = repos.backup2[tool]!;
        // --to DIR: a directory it makes, one file per disk
        r = await cli(['restore', id, '--target', url, '--to', to, '--format', 'raw'], {
          env: this.vmEnv,
          allowFail: true,
        });
        if (r.code !== 0) throw new Error(`vmbackup restore ${id} --target ${url}: ${firstLine(r)}`);
        r = { ...r, wallMs: r.wallMs + (await syncMsOf(to)) };
        label = `vmbackup restore --format raw from the ${tool === 'vmbackup-file' ? 'file' : 'S3'} chunk repository`;
      }
      this.rec(tool, 'restore', label, {
        wallMs: r.wallMs,
        cpuMs: r.cpuMs,
        peakRssMiB: r.peakRssMiB,
        MiBps: this.diskMiB / (r.wallMs / 1000),
      });
      await this.expectSameAsDisk(tool, to);
    } finally {
      await rm(to, { recursive: true, force: true });
    }
  }

  /** The disk's one file a restore wrote (vda.*) must hold the disk's data: a wrong restore is not a figure. */
  private async expectSameAsDisk(tool: Tool, dir: string): Promise<void> {
    const dev = this.dom.disks[0]!.dev;
    const files = (await readdir(dir, { recursive: true, withFileTypes: true })).filter(
      (e) => e.isFile() && e.name.startsWith(`${dev}.`),
    );
    if (files.length !== 1) {
      throw new Error(
        `${tool} restored ${files.length} files of ${dev} into ${dir}, not one: ${files.map((f) => f.name).join(', ')}`,
      );
    }
    const f = join(files[0]!.parentPath ?? dir, files[0]!.name);
    const disk = this.dom.disks[0]!;
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', disk.format, f, disk.path]);
    if (cmp.code !== 0) {
      throw new Error(`${tool}'s restore ${f} differs from the disk: ${(cmp.stdout + cmp.stderr).trim()}`);
    }
  }
}

/** The group's disk: a shut-off fixture domain (offline backups), half random, half never written. */
export async function chunkRepoDomain(prefix: string, sizeMiB: number): Promise<FixtureDomain> {
  return createFixtureDomain({
    prefix,
    disks: [{ format: 'qcow2', sizeMiB, randomMiB: Math.floor(sizeMiB / 2) }],
    start: false,
  });
}

export function sizeName(mib: number): string {
  return mib % 1024 === 0 ? `${mib / 1024}g` : `${mib}m`;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const arg = (name: string, fallback: string) => {
    const i = argv.indexOf(name);
    return i >= 0 ? (argv[i + 1] ?? fallback) : fallback;
  };
  const sizeMiB = Number(arg('--size-mib', '4096'));
  const reps = Math.max(1, Number(arg('--reps', '3')));
  const out = arg('--out', join(process.cwd(), 'bench', 'results', 'chunk-repo'));
  const opts: ChunkRepoOptions = { peersOnly: argv.includes('--peers-only'), s3: !argv.includes('--no-s3') };
  const env = stackEnv();
  const work = await mkdtemp(join(env.stateDir, 'bench-ck-'));
  const log = (line: string) =>
    process.stderr.write(`[chunk-repo ${new Date().toISOString().slice(11, 19)}] ${line}\n`);
  const { buildReport } = await import('./report');
  type Case = { id: string; label: string; samples: Sample[] };
  const cases = new Map<string, Case>();
  const io: ChunkRepoBench = {
    work,
    log,
    record(id, label, sample) {
      const c = cases.get(id) ?? { id, label, samples: [] };
      c.samples.push(sample);
      cases.set(id, c);
      log(
        `${id}: ${Object.entries(sample)
          .map(([k, v]) => `${k}=${Math.round(v)}`)
          .join(' ')}`,
      );
    },
  };
  const started = Date.now();
  const load = async () => (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');
  const loadStart = await load();
  const sz = sizeName(sizeMiB);
  await cleanupStaleFixtures('bench-ck');
  log(`a shut-off domain with a ${sz} qcow2 disk, half random, half never written`);
  const dom = await chunkRepoDomain('bench-ck', sizeMiB);
  const group = new ChunkRepoGroup(io, sz, dom, sizeMiB, opts);
  try {
    await group.prepare();
    for (let rep = 1; rep <= reps; rep++) {
      log(`--- repetition ${rep}/${reps}`);
      await group.run(rep);
    }
  } finally {
    await group.cleanup();
    await dom.cleanup();
    await rm(work, { recursive: true, force: true });
  }
  await mkdir(out, { recursive: true });
  await buildReport(
    {
      startedAt: new Date(started).toISOString(),
      durationS: Math.round((Date.now() - started) / 1000),
      args: { reps, sizeMiB, ...opts },
      machine: {
        'load average (1/5/15 min) at start': loadStart,
        'load average at end': await load(),
        restic: (await run('restic', ['version'])).stdout.trim(),
        borg: (await run('borg', ['--version'])).stdout.trim(),
      },
      cases: [...cases.values()],
    },
    out,
  );
  process.stdout.write(await readFile(join(out, 'latest.md'), 'utf8'));
}

if (require.main === module) {
  main().catch((err: unknown) => {
    process.stderr.write(`chunk-repo: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  });
}
