/**
 * What a persistent virsh session buys, measured against its baseline in the same run on the same domain:
 * - the latency of one read-only query, a one-shot `virsh -c URI CMD` process vs a query in a session;
 * - the in-workflow overhead of a 64 MiB push backup (workflow time minus libvirt's own job time, from the
 *   history) with virsh sessions on and off (VMBACKUP_VIRSH_SESSION=0), one worker process each, backups
 *   taking turns; `await-job` is how long awaitBackupJob ran beyond libvirt's job time (how late the end
 *   was noticed; the job starts inside beginPushBackup, so it can be negative).
 * Prints tables; writes nothing under bench/results.
 *
 *   npm run build && npx tsc -p bench/tsconfig.json --outDir /tmp/vs-bench && \
 *     NODE_PATH=$PWD/node_modules node /tmp/vs-bench/bench/virsh-session.js [--reps N] [--baseline DIR]
 *
 * --baseline DIR: a built checkout of another vmbackup (e.g. `git archive 4e526f7`, node_modules linked,
 * `npm run build`); its worker joins the rotation and becomes the ratio's baseline.
 *
 * (run from the repository root with the stack's environment: eval "$(bash scripts/stack.sh env)")
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execTool } from '../src/hypervisor/exec';
import { VirshSessions } from '../src/hypervisor/virsh-session';
import { createFixtureDomain } from '../test/fixtures/domains';
import type { FixtureDomain } from '../test/fixtures/domains';
import { stackEnv } from '../test/helpers/stack';
import { median } from './lib/measure';
import { backupTimeline, cli, startWorker, temporal } from './lib/vmbackup';
import type { WorkerProcess } from './lib/vmbackup';

const CALLS = 50;

/** Median ms of CALLS sequential runs of each query, one-shot and in a session. */
async function queryLatency(domain: string): Promise<void> {
  const uri = stackEnv().libvirt.uri;
  const sessions = new VirshSessions({ virsh: 'virsh', uri });
  const queries = [['domstate', domain], ['dumpxml', domain], ['domjobinfo', domain, '--rawstats'], ['version']];
  const time = async (fn: () => Promise<unknown>): Promise<number> => {
    const samples: number[] = [];
    for (let i = 0; i < CALLS; i++) {
      const t0 = process.hrtime.bigint();
      await fn();
      samples.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
    return median(samples);
  };
  console.log(`
per-call latency, median of ${CALLS} sequential calls (ms)`);
  console.log('query                     one-shot  session  ratio');
  try {
    for (const args of queries) {
      const once = await time(() => execTool('virsh', ['-c', uri, ...args], { timeoutMs: 60_000 }));
      const session = await time(async () => {
        if (!(await sessions.run(args, 60_000))) throw new Error(`no session answered ${args.join(' ')}`);
      });
      const name = args.map((a) => (a === domain ? 'DOM' : a)).join(' ');
      console.log(
        `${name.padEnd(25)} ${once.toFixed(1).padStart(8)} ${session.toFixed(2).padStart(8)} ${(once / session).toFixed(1).padStart(6)}x`,
      );
    }
  } finally {
    sessions.close();
  }
}

interface BackupSample {
  workflowMs: number;
  jobMs: number;
  split: Record<string, number>;
}

async function pushBackup(host: string, domain: string, target: string): Promise<BackupSample> {
  const r = await cli([
    'backup',
    domain,
    '--host',
    host,
    '--method',
    'push',
    '--target',
    `file://${target}`,
    '--wait',
    '--json',
  ]);
  if (r.json.status !== 'completed') throw new Error(`backup of ${domain} on ${host} failed: ${r.stdout} ${r.stderr}`);
  const t = await temporal();
  try {
    const timeline = await backupTimeline(t.client, host, domain);
    const split: Record<string, number> = {};
    for (const a of timeline.activities) split[a.name] = (split[a.name] ?? 0) + (a.closedAt - a.startedAt);
    const job = timeline.activities.find((a) => a.name === 'awaitBackupJob')?.result as { elapsedMs?: number };
    return { workflowMs: timeline.workflowMs, jobMs: job?.elapsedMs ?? NaN, split };
  } finally {
    await t.close();
    await rm(target, { recursive: true, force: true });
  }
}

function backupRow(name: string, samples: BackupSample[], baseline: BackupSample[]): string {
  const med = (list: BackupSample[], f: (s: BackupSample) => number): number => median(list.map(f));
  const m = (f: (s: BackupSample) => number): string => med(samples, f).toFixed(0).padStart(8);
  const step = (a: string) => m((s) => s.split[a] ?? 0);
  const overhead = (s: BackupSample) => s.workflowMs - s.jobMs;
  return (
    `${name.padEnd(14)} ${m((s) => s.workflowMs)} ${m((s) => s.jobMs)} ${m(overhead)}` +
    ` ${(med(samples, overhead) / med(baseline, overhead)).toFixed(2).padStart(6)}` +
    ` ${step('inspectDomain')} ${step('beginPushBackup')} ${m((s) => (s.split.awaitBackupJob ?? 0) - s.jobMs)}`
  );
}

function option(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : undefined;
}

async function main(): Promise<void> {
  const reps = Math.max(1, Number(option('--reps') ?? 5));
  // another checkout of vmbackup, built (e.g. the commit before the sessions): its worker joins the rotation
  const baselineRepo = option('--baseline');
  const work = await mkdtemp(join(tmpdir(), 'vmbt-vs-bench-'));
  const id = randomBytes(3).toString('hex');
  const workers: Array<[string, WorkerProcess]> = [];
  let dom: FixtureDomain | undefined;
  try {
    dom = await createFixtureDomain({ prefix: 'vs', disks: [{ format: 'qcow2', sizeMiB: 64, randomMiB: 32 }] });
    await queryLatency(dom.name);
    if (baselineRepo) {
      workers.push(['baseline', await startWorker(`vs-base-${id}`, { bin: join(baselineRepo, 'bin', 'vmbackup') })]);
    }
    workers.push(['sessions off', await startWorker(`vs-off-${id}`, { env: { VMBACKUP_VIRSH_SESSION: '0' } })]);
    workers.push(['sessions on', await startWorker(`vs-on-${id}`)]);

    const samples = new Map<string, BackupSample[]>(workers.map(([name]) => [name, []]));
    for (const [, w] of workers) await pushBackup(w.host, dom.name, join(work, 'warmup')); // not recorded
    for (let rep = 0; rep < reps; rep++) {
      // each worker goes first in turn: load that comes and goes hits all alike
      for (let k = 0; k < workers.length; k++) {
        const [name, w] = workers[(rep + k) % workers.length]!;
        samples.get(name)!.push(await pushBackup(w.host, dom.name, join(work, `${w.host}-${rep}`)));
      }
    }
    const [baseName] = workers[0]!;
    console.log(`\n64 MiB push backup, medians of ${reps} (ms); ratio: in-workflow time against ${baseName}`);
    console.log('               workflow      job in-workflow ratio  inspect    begin await-job');
    for (const [name] of workers) console.log(backupRow(name, samples.get(name)!, samples.get(baseName)!));
  } finally {
    await Promise.allSettled(workers.map(([, w]) => w.stop()));
    await dom?.cleanup();
    await rm(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
