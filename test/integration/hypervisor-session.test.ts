/**
 * Virsh sessions against the real libvirt: every query a session answers prints what a one-shot virsh
 * prints, failures read the same, and a session that dies, hangs or loses libvirtd hands the query to a
 * one-shot process instead.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { HypervisorError } from '../../src/hypervisor/errors';
import { execTool } from '../../src/hypervisor/exec';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { VirshHypervisor } from '../../src/hypervisor/virsh';
import { VirshSessions } from '../../src/hypervisor/virsh-session';
import { createHostWorker, recoverHostOverlays } from '../../src/worker';
import { loadConfig } from '../../src/worker/config';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { requireTemporal, stackEnv, stackScript } from '../helpers/stack';
import { cliEnv, uniqueHost, waitFor } from '../helpers/vmbackup';

const exec = promisify(execFile);
const uri = stackEnv().libvirt.uri;
const TIMEOUT_MS = 60_000;
const CHECKPOINT = 'vs-ck';

function oneShot(args: readonly string[]) {
  return execTool('virsh', ['-c', uri, ...args], { timeoutMs: TIMEOUT_MS });
}

/** this process's virsh shells (`virsh -c URI` and nothing else: a one-shot run has a command), as pid -> start */
async function shells(): Promise<Map<number, string>> {
  const { stdout } = await exec('ps', ['-o', 'pid=,lstart=,args=', '--ppid', String(process.pid)], {
    env: { ...process.env, LC_ALL: 'C', TZ: 'UTC' },
  });
  const found = new Map<number, string>();
  for (const line of stdout.split('\n')) {
    const m = /^\s*(\d+)\s+(\S+\s+\S+\s+\d+\s+[\d:]+\s+\d+)\s+(.*)$/.exec(line);
    if (m?.[3] === `virsh -c ${uri}`) found.set(Number(m[1]), m[2]!);
  }
  return found;
}

/**
 * Shells some earlier code in this process opened: jest runs every test file of a --runInBand run in one
 * process, and a file's hypervisor (a worker's too) keeps its idle shells for 10 s unless it is closed.
 */
let foreign = new Map<number, string>();

/** pids of the shells this test opened */
async function sessionPids(): Promise<number[]> {
  return [...(await shells())].filter(([pid, start]) => foreign.get(pid) !== start).map(([pid]) => pid);
}

async function failure(p: Promise<unknown>): Promise<HypervisorError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (err instanceof HypervisorError) return err;
  throw new Error(`expected a HypervisorError, got ${String(err)}`);
}

function sameError(err: HypervisorError) {
  return { kind: err.kind, message: err.message, stderr: err.stderr, domain: err.domain, disk: err.disk };
}

describe('virsh sessions on real libvirt', () => {
  const newDomain = useFixtureDomains();
  let running: FixtureDomain;
  let off: FixtureDomain;
  const opened: Array<VirshSessions | VirshHypervisor> = [];
  const sessions = (opts: { idleMs?: number } = {}) => {
    const s = new VirshSessions({ virsh: 'virsh', uri, ...opts });
    opened.push(s);
    return s;
  };
  const hypervisor = (opts: { timeoutMs?: number } = {}) => {
    const hv = createVirshHypervisor({ uri, ...opts });
    opened.push(hv);
    return hv;
  };
  const oneShotHypervisor = createVirshHypervisor({ uri, sessions: false });

  beforeAll(async () => {
    [running, off] = await Promise.all([
      newDomain({
        prefix: 'vs',
        disks: [
          { format: 'qcow2', sizeMiB: 32, patterns: [{ byte: 0xab, offsetMiB: 0, lengthMiB: 4 }] },
          { format: 'raw', sizeMiB: 16 },
        ],
        cdrom: true,
      }),
      newDomain({
        prefix: 'vs-off',
        disks: [
          { format: 'qcow2', sizeMiB: 16 },
          { format: 'raw', sizeMiB: 8 },
        ],
        start: false,
      }),
    ]);
    // a checkpoint to query (an incremental backup reads checkpoints 4-6 times)
    await exec('virsh', [
      '-c',
      uri,
      'checkpoint-create-as',
      running.name,
      '--name',
      CHECKPOINT,
      '--diskspec',
      'vda,checkpoint=bitmap',
      '--diskspec',
      'vdb,checkpoint=no',
    ]);
  });
  beforeEach(async () => {
    foreign = await shells();
  });
  afterEach(() => {
    for (const s of opened.splice(0)) s.close();
  });

  const queries = (dom: string): string[][] => [
    ['version'],
    ['domstate', dom],
    ['dumpxml', dom],
    ['dumpxml', dom, '--inactive'],
    ['domblkinfo', dom, 'vda'],
    ['domblkinfo', dom, 'vdb'],
    ['domjobinfo', dom, '--rawstats'],
    ['domjobinfo', dom, '--completed', '--keep-completed', '--rawstats'],
    ['blockjob', dom, 'vda', '--raw'],
    ['checkpoint-list', dom, '--name', '--topological'],
    ['checkpoint-dumpxml', '--domain', dom, '--checkpointname', CHECKPOINT, '--no-domain'],
    ['checkpoint-dumpxml', '--domain', dom, '--checkpointname', CHECKPOINT, '--no-domain', '--size'],
  ];

  test.each(['running', 'shut off'])('each query prints what a one-shot virsh prints (%s domain)', async (state) => {
    const dom = state === 'running' ? running : off;
    expect(await dom.state()).toBe(state);
    const s = sessions();
    for (const args of queries(dom.name)) {
      const want = await oneShot(args);
      const got = await s.run(args, TIMEOUT_MS);
      expect(got).toBeDefined(); // a session answered it, not the one-shot fallback
      expect({ args, code: got?.code, stdout: got?.stdout, stderr: got?.stderr }).toEqual({
        args,
        code: want.code,
        stdout: want.stdout,
        stderr: want.stderr,
      });
    }
    expect((await sessionPids()).length).toBe(1); // one shell answered them all
  });

  test('checkpoints listed, read and checked through one shell: what one-shot virsh gives, and no virsh process of their own', async () => {
    // a virsh that logs how it was started: a session is `-c URI` alone, a one-shot run names its command
    const dir = await mkdtemp(join(tmpdir(), 'vmbt-vs-virsh-'));
    try {
      const logged = join(dir, 'virsh');
      await writeFile(logged, `#!/bin/sh\necho "$*" >>"${dir}/calls.log"\nexec virsh "$@"\n`, { mode: 0o755 });
      const hv = createVirshHypervisor({ uri, virsh: logged });
      opened.push(hv);
      expect(await hv.state(running.name)).toBe('running'); // the shell is up
      await writeFile(join(dir, 'calls.log'), '');
      const got = {
        list: await hv.listCheckpoints(running.name),
        xml: await hv.checkpointXml(running.name, CHECKPOINT),
        bitmaps: await hv.checkpointBitmaps(running.name, CHECKPOINT),
      };
      expect(got.list.map((c) => c.name)).toEqual([CHECKPOINT]);
      expect(got.bitmaps).toEqual([
        { disk: 'vda', state: 'ok', changedBytes: expect.any(Number) as number },
        { disk: 'vdb', state: 'no-bitmap' },
        { disk: 'sda', state: 'no-bitmap' }, // the cdrom: libvirt marks every unlisted disk 'no'
      ]);
      expect(got).toEqual({
        list: await oneShotHypervisor.listCheckpoints(running.name),
        xml: await oneShotHypervisor.checkpointXml(running.name, CHECKPOINT),
        bitmaps: await oneShotHypervisor.checkpointBitmaps(running.name, CHECKPOINT),
      });
      expect(await readFile(join(dir, 'calls.log'), 'utf8')).toBe('');
      // a checkpoint that is not there reads the same both ways
      const [viaSession, viaProcess] = await Promise.all([
        failure(hv.checkpointXml(running.name, 'vs-no-such-checkpoint')),
        failure(oneShotHypervisor.checkpointXml(running.name, 'vs-no-such-checkpoint')),
      ]);
      expect(viaSession.kind).toBe('checkpoint-not-found');
      expect(sameError(viaSession)).toEqual(sameError(viaProcess));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('an unknown domain or disk fails with the same kind and sentence as one-shot', async () => {
    const s = sessions();
    const unknown: string[][] = [
      ['domstate', 'vmbt-vs-no-such-domain'],
      ['domblkinfo', running.name, 'vdz'],
      ['blockjob', running.name, 'vdz', '--raw'],
      ['blockjob', off.name, 'vda', '--raw'], // a block job of a shut-off domain
    ];
    for (const args of unknown) {
      const want = await oneShot(args);
      const got = await s.run(args, TIMEOUT_MS);
      expect(want.code).toBe(1);
      expect({ args, code: got?.code, stdout: got?.stdout, stderr: got?.stderr }).toEqual({
        args,
        code: 1,
        stdout: want.stdout,
        stderr: want.stderr,
      });
    }

    const hv = hypervisor();
    const calls: Array<(h: VirshHypervisor) => Promise<unknown>> = [
      (h) => h.state('vmbt-vs-no-such-domain'),
      (h) => h.inspect('vmbt-vs-no-such-domain'),
      (h) => h.jobInfo('vmbt-vs-no-such-domain'),
      (h) => h.blockJobInfo(running.name, 'vdz'),
      (h) => h.blockJobInfo(off.name, 'vda'),
    ];
    for (const call of calls) {
      const [viaSession, viaProcess] = await Promise.all([failure(call(hv)), failure(call(oneShotHypervisor))]);
      expect(sameError(viaSession)).toEqual(sameError(viaProcess));
    }
    expect(sameError(await failure(hv.state('vmbt-vs-no-such-domain')))).toMatchObject({
      kind: 'not-found',
      message: `domain "vmbt-vs-no-such-domain" does not exist on ${uri} (virsh: failed to get domain 'vmbt-vs-no-such-domain')`,
    });
  });

  test('arguments reach virsh exactly: quotes, spaces, backslashes, ; and # in a path, . _ + in a domain name, long lines', async () => {
    const s = sessions();
    const path = `/tmp/vmbt vs/it's a "path"; \\with #things`;
    const weirdName = 'vmbt-vs-no.such_dom+1';
    const longName = `vmbt-vs-${'x'.repeat(56)}`; // readline scrolls lines wider than its 80 columns unless told
    const cases: Array<[string[], string]> = [
      [['domblkinfo', running.name, path], path],
      [['domstate', weirdName], weirdName],
      [['domjobinfo', longName, '--completed', '--keep-completed', '--rawstats'], longName],
    ];
    for (const [args, named] of cases) {
      const want = await oneShot(args);
      const got = await s.run(args, TIMEOUT_MS);
      expect(got?.stderr).toBe(want.stderr);
      expect(got?.stderr).toContain(named); // libvirt names the path or domain it was given
    }
  });

  test('many concurrent callers: right answers, at most 4 shells, the rest one-shot', async () => {
    const hv = hypervisor();
    const [xml, blk] = await Promise.all([hv.domainXml(running.name), hv.inspect(running.name)]);
    const results = await Promise.all(
      Array.from({ length: 40 }, (_, i) =>
        i % 4 === 0
          ? hv.domainXml(running.name)
          : i % 4 === 1
            ? hv.state(off.name)
            : i % 4 === 2
              ? hv.jobInfo(running.name)
              : hv.inspect(running.name),
      ),
    );
    results.forEach((r, i) => {
      if (i % 4 === 0) expect(r).toBe(xml);
      else if (i % 4 === 1) expect(r).toBe('shut off');
      else if (i % 4 === 2) expect(r).toEqual({ type: 'None' });
      else expect(r).toEqual(blk);
    });
    expect((await sessionPids()).length).toBeLessThanOrEqual(4);
  });

  test('a shell killed with SIGKILL in the middle of a query: the query is answered one-shot', async () => {
    const hv = hypervisor();
    expect(await hv.state(running.name)).toBe('running');
    const [pid] = await sessionPids();
    expect(pid).toBeDefined();
    process.kill(pid!, 'SIGSTOP'); // it cannot answer before the kill
    const answer = hv.domainXml(running.name);
    await new Promise((r) => setTimeout(r, 100));
    process.kill(pid!, 'SIGKILL');
    expect(await answer).toBe((await oneShot(['dumpxml', running.name])).stdout);
    expect(await sessionPids()).not.toContain(pid);
    expect(await hv.state(running.name)).toBe('running'); // and a new shell takes the next one
    expect((await sessionPids()).length).toBe(1);
  });

  test('a shell that does not answer in time is killed and the query answered one-shot', async () => {
    const hv = hypervisor({ timeoutMs: 1_000 });
    expect(await hv.state(off.name)).toBe('shut off');
    const [pid] = await sessionPids();
    process.kill(pid!, 'SIGSTOP');
    expect(await hv.state(off.name)).toBe('shut off');
    await new Promise((r) => setTimeout(r, 100));
    expect(await sessionPids()).not.toContain(pid);
  });

  test('an idle shell exits after the idle time', async () => {
    const s = sessions({ idleMs: 200 });
    expect((await s.run(['domstate', off.name], TIMEOUT_MS))?.stdout).toBe('shut off\n\n');
    expect((await sessionPids()).length).toBe(1);
    await new Promise((r) => setTimeout(r, 600));
    expect(await sessionPids()).toEqual([]);
  });

  test('a host worker, once closed, leaves no virsh shell behind', async () => {
    await requireTemporal();
    const config = { ...loadConfig(cliEnv()), host: uniqueHost('vs') };
    const hostWorker = await createHostWorker({ config, address: stackEnv().temporal.address });
    const { close } = hostWorker;
    const run = hostWorker.run();
    try {
      // recovery limited to one domain reads its disks through the worker's hypervisor, and nothing else
      expect(await recoverHostOverlays(stackEnv().temporal.address, config, { domain: running.name })).toEqual([]);
      expect((await sessionPids()).length).toBeGreaterThan(0);
    } finally {
      hostWorker.shutdown();
      await run;
      await close();
    }
    // an idle shell would only exit 10 s after its last query
    await waitFor("the worker's virsh shells to exit", async () => (await sessionPids()).length === 0, {
      timeoutMs: 3_000,
    });
  });

  test('libvirtd restart: while it is down the error is the one-shot sentence, after it the shell answers again', async () => {
    const hv = hypervisor();
    const s = sessions();
    expect(await hv.state(running.name)).toBe('running');
    expect((await s.run(['domstate', running.name], TIMEOUT_MS))?.stdout).toBe('running\n\n');
    const { stdout: pid } = await exec('cat', ['/run/libvirtd.pid']);
    try {
      await exec('kill', ['-9', pid.trim()]);
      await new Promise((r) => setTimeout(r, 500));
      const [viaSession, viaProcess] = await Promise.all([
        failure(hv.state(running.name)),
        failure(oneShotHypervisor.state(running.name)),
      ]);
      expect(viaSession.kind).toBe('unreachable');
      expect(sameError(viaSession)).toEqual(sameError(viaProcess));
      expect(viaSession.message).toMatch(/^cannot read the state of domain ".*": libvirt is not reachable at /);
      expect(await s.run(['domstate', running.name], TIMEOUT_MS)).toBeUndefined(); // no session can answer
    } finally {
      await stackScript('up', 'libvirt');
    }
    expect(await hv.state(running.name)).toBe('running');
    expect(await hv.domainXml(running.name)).toBe((await oneShot(['dumpxml', running.name])).stdout);
    expect((await s.run(['domstate', running.name], TIMEOUT_MS))?.stdout).toBe('running\n\n');
  });
});
