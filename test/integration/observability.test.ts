/**
 * Observability on the real stack (issue 13, tests 4 and 5): one `vmbackup worker --metrics` process runs a good
 * backup, a partial one and a failed one (a target in a bucket that does not exist); a webhook receiver in this
 * test gets the failure and partial events with the VM, the target and the sentence, and no secret; `/metrics` is
 * valid Prometheus text whose counters match those backups; `vmbackup report` marks the VM stale once its backups
 * are backdated on the target, exits 1, and posts a stale event.
 */
import { createServer } from 'node:http';
import type { IncomingMessage, Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { useFixtureDomains } from '../fixtures/domains';
import type { FixtureDomain } from '../fixtures/domains';
import { parsePrometheusText, sumOf, valueOf } from '../helpers/prometheus';
import { deleteSchedule, scheduleCli, scheduleEnv, uniqueScheduleName } from '../helpers/schedules';
import { requireLibvirt, requireS3, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost, waitFor } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';
import type { BackupEvent } from '../../src/shared/events';

interface BackupJson {
  backupId: string;
  status: string;
  finishedAt?: string;
  error?: string;
  targets?: Array<{ target: string; ok: boolean; error?: string }>;
}

/** A canary: the worker's S3 secret key, which must appear in no event. */
const CANARY = `canary-${randomBytes(12).toString('hex')}`;

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address() as AddressInfo;
  await new Promise((r) => s.close(r));
  return port;
}

describe('events, metrics and report', () => {
  const newDomain = useFixtureDomains();
  const host = uniqueHost('obs');
  const tag = randomBytes(3).toString('hex');
  const received: Array<{ path: string; contentType: string | undefined; body: string }> = [];
  let receiver: Server;
  let hook: string;
  let worker: WorkerProcess;
  let metricsUrl: string;
  let work: string;
  let local: string;
  let good: FixtureDomain;
  let bad: FixtureDomain;
  const missingBucket = `s3://vmbackup-no-such-bucket-${tag}/obs`;
  const backups: { earlier?: BackupJson; good?: BackupJson; partial?: BackupJson; failed?: BackupJson } = {};

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    await requireS3();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-observability-'));
    local = pathToFileURL(join(work, 'target')).href;
    receiver = createServer((req: IncomingMessage, res) => {
      let body = '';
      req.on('data', (d: Buffer) => (body += d.toString()));
      req.on('end', () => {
        received.push({ path: req.url ?? '', contentType: req.headers['content-type'], body });
        res.writeHead(204);
        res.end();
      });
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
    hook = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hooks/T0/secret-token`;
    const port = await freePort();
    metricsUrl = `http://127.0.0.1:${port}/metrics`;
    worker = await startWorkerProcess(host, {
      env: cliEnv({ AWS_SECRET_ACCESS_KEY: CANARY }),
      args: ['--metrics', `127.0.0.1:${port}`],
    });
    [good, bad] = await Promise.all([
      newDomain({
        prefix: 'obs',
        disks: [{ format: 'qcow2', sizeMiB: 16, patterns: [{ byte: 0x5a, offsetMiB: 0, lengthMiB: 2 }] }],
      }),
      newDomain({
        prefix: 'obs',
        disks: [{ format: 'qcow2', sizeMiB: 16, patterns: [{ byte: 0x5b, offsetMiB: 0, lengthMiB: 2 }] }],
      }),
    ]);
  });
  afterAll(async () => {
    await worker?.stop();
    receiver?.closeAllConnections();
    await new Promise((r) => receiver?.close(r));
    if (work) await rm(work, { recursive: true, force: true });
  });

  const backup = async (
    domain: string,
    targets: string[],
    extra: string[] = [],
  ): Promise<{ code: number; out: BackupJson }> => {
    const res = await runCli([
      'backup',
      domain,
      '--host',
      host,
      ...targets.flatMap((t) => ['--target', t]),
      '--notify',
      hook,
      ...extra,
      '--wait',
      '--json',
    ]);
    return { code: res.code, out: JSON.parse(res.stdout) as BackupJson };
  };
  const eventsOf = (backupId: string): BackupEvent[] =>
    received.map((r) => JSON.parse(r.body) as BackupEvent).filter((e) => e.backupId === backupId);

  test('a backup whose only target is unreachable: the webhook gets the failure with the VM, target and sentence, no secret', async () => {
    const { code, out } = await backup(bad.name, [missingBucket]);
    expect(code).toBe(1);
    expect(out.status).toBe('failed');
    backups.failed = out;
    // the workflow posts before it closes: by the time --wait returns the event is there
    const events = eventsOf(out.backupId);
    expect(events).toHaveLength(1);
    const event = events[0]!;
    expect(event).toMatchObject({ kind: 'failure', domain: bad.name, host, backupId: out.backupId });
    expect(event.error).toBe(out.error);
    expect(event.error).toMatch(new RegExp(`^backup ${out.backupId} of ${bad.name} reached no target: .+`));
    expect(event.targets).toHaveLength(1);
    expect(event.targets[0]).toMatchObject({ target: missingBucket, ok: false });
    expect(event.targets[0]!.error).toEqual(expect.any(String));
    expect(event.error).toContain(event.targets[0]!.error);
    expect(Date.parse(event.at)).toBeGreaterThan(Date.now() - 600_000);
    const raw = received.find((r) => r.body.includes(out.backupId))!;
    expect(raw.path).toBe('/hooks/T0/secret-token');
    expect(raw.contentType).toBe('application/json');
    expect(raw.body).not.toContain(CANARY);
    expect(raw.body).not.toContain(stackEnv().s3.secretAccessKey);
    expect(raw.body).not.toContain(stackEnv().s3.accessKeyId);
  });

  test('a good backup sends nothing without --notify-success, a success event with it; a partial one sends partial', async () => {
    const first = await backup(good.name, [local]);
    expect(first.code).toBe(0);
    expect(eventsOf(first.out.backupId)).toEqual([]);

    const second = await backup(good.name, [local], ['--notify-success']);
    expect(second.code).toBe(0);
    backups.good = second.out;
    backups.earlier = first.out;
    expect(eventsOf(second.out.backupId)).toEqual([
      {
        kind: 'success',
        domain: good.name,
        host,
        backupId: second.out.backupId,
        level: 'inc',
        targets: [{ target: local, ok: true }],
        at: expect.any(String),
      },
    ]);

    const partial = await backup(good.name, [local, missingBucket], ['--notify-success']);
    expect(partial.code).toBe(1);
    expect(partial.out.status).toBe('partial');
    backups.partial = partial.out;
    const events = eventsOf(partial.out.backupId);
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({
      kind: 'partial',
      domain: good.name,
      host,
      targets: [
        { target: local, ok: true },
        { target: missingBucket, ok: false },
      ],
    });
    expect(events[0]!.error).toBe(`${missingBucket}: ${events[0]!.targets[1]!.error}`);
    expect(JSON.stringify(events)).not.toContain(CANARY);
  });

  test('/metrics is valid Prometheus text and its counters match the backups this worker ran', async () => {
    expect(backups.good && backups.partial && backups.failed).toBeTruthy();
    const res = await fetch(metricsUrl);
    expect(res.status).toBe(200);
    const families = parsePrometheusText(await res.text());
    const g = { domain: good.name, host };
    const b = { domain: bad.name, host };
    expect(valueOf(families, 'vmbackup_backup_success_total', g)).toBe(2);
    expect(valueOf(families, 'vmbackup_backup_partial_total', g)).toBe(1);
    expect(valueOf(families, 'vmbackup_backup_failure_total', g)).toBeUndefined();
    expect(valueOf(families, 'vmbackup_backup_failure_total', b)).toBe(1);
    // only our backups ran on this worker's host
    expect(sumOf(families, 'vmbackup_backup_success_total', { host })).toBe(2);
    expect(sumOf(families, 'vmbackup_backup_partial_total', { host })).toBe(1);
    expect(sumOf(families, 'vmbackup_backup_failure_total', { host })).toBe(1);
    expect(valueOf(families, 'vmbackup_backup_duration_seconds_count', g)).toBe(3);
    expect(valueOf(families, 'vmbackup_backup_duration_seconds_count', b)).toBeUndefined();

    // bytes stored: the images of the three backups on the local target, as its catalog lists them
    const list = await runCli(['list', '--target', local, '--domain', good.name, '--json']);
    const sizes = (JSON.parse(list.stdout) as { backups: Array<{ backupId: string; size: number }> }).backups;
    expect(sizes.map((s) => s.backupId).sort()).toEqual(
      [backups.earlier!.backupId, backups.good!.backupId, backups.partial!.backupId].sort(),
    );
    expect(valueOf(families, 'vmbackup_backup_bytes_stored_total', g)).toBe(sizes.reduce((n, s) => n + s.size, 0));
    expect(valueOf(families, 'vmbackup_backup_bytes_read_total', g)).toBeGreaterThan(0);

    const last = valueOf(families, 'vmbackup_backup_last_successful_timestamp', g);
    expect(last).toBeGreaterThan(Date.now() / 1000 - 900);
    expect(last).toBeLessThanOrEqual(Date.now() / 1000 + 1);
    expect(valueOf(families, 'vmbackup_backup_last_successful_timestamp', b)).toBeUndefined();
    expect(valueOf(families, 'vmbackup_backups_running', { host })).toBe(0);
    expect(valueOf(families, 'vmbackup_backups_queued', { host })).toBe(0);
    // the Temporal SDK's own worker metrics, in the same exposition
    expect(sumOf(families, 'temporal_workflow_completed', { task_queue: `vmbackup-host-${host}` })).toBeGreaterThan(0);
    expect(families.get('temporal_request_latency')?.type).toBe('histogram');
  });

  test('report: a VM whose good backups are older than --stale is STALE, exit 1, with its last failure; a stale event is posted', async () => {
    // backdate every backup of the good VM on the local target by three days (no manifest key: no signature)
    const dir = join(work, 'target', good.name);
    // one shift for all of them, so their order (and which one is newest) stays as it was
    const shift = 3 * 86_400_000;
    for (const id of await readdir(dir)) {
      const file = join(dir, id, 'manifest.json');
      const m = JSON.parse(await readFile(file, 'utf8')) as { startedAt: string; finishedAt: string };
      m.startedAt = new Date(Date.parse(m.startedAt) - shift).toISOString();
      m.finishedAt = new Date(Date.parse(m.finishedAt) - shift).toISOString();
      await writeFile(file, JSON.stringify(m));
    }

    const stale = await runCli([
      'report',
      '--host',
      host,
      '--target',
      local,
      '--stale',
      '36h',
      '--json',
      '--notify',
      hook,
    ]);
    expect(stale.code).toBe(1);
    const report = JSON.parse(stale.stdout) as {
      vms: Array<{
        domain: string;
        host: string;
        status: string;
        lastGood: { backupId: string; startedAt: string; level: string; targets: string[]; size: number } | null;
        lastFailure: { backupId?: string; status: string; error: string } | null;
      }>;
      stale: number;
      notified: { url: string; sent: number; failed: number };
    };
    expect(report.vms.map((v) => [v.domain, v.host, v.status])).toEqual([[good.name, host, 'stale']]);
    const vm = report.vms[0]!;
    expect(vm.lastGood).toMatchObject({ backupId: backups.partial!.backupId, targets: [local] });
    expect(Date.parse(vm.lastGood!.startedAt)).toBeLessThan(Date.now() - 2 * 86_400_000);
    expect(vm.lastFailure).toMatchObject({ backupId: backups.partial!.backupId, status: 'partial' });
    expect(vm.lastFailure!.error).toContain(missingBucket);
    // the webhook's token (its path) is never printed
    expect(report.notified).toEqual({ url: `${new URL(hook).origin}/…`, sent: 1, failed: 0 });
    expect(stale.stdout + stale.stderr).not.toContain('secret-token');
    const staleEvents = received.map((r) => JSON.parse(r.body) as BackupEvent).filter((e) => e.kind === 'stale');
    expect(staleEvents).toHaveLength(1);
    expect(staleEvents[0]).toMatchObject({
      kind: 'stale',
      domain: good.name,
      host,
      backupId: backups.partial!.backupId,
      lastGoodAt: vm.lastGood!.startedAt,
    });

    // the table a person reads says the same
    const human = await runCli(['report', '--host', host, '--target', local, '--stale', '36h']);
    expect(human.code).toBe(1);
    expect(human.stdout).toMatch(new RegExp(`^${good.name}\\s+${host}\\s+STALE\\s`, 'm'));
    expect(human.stdout).toContain(`${good.name} on ${host}, last failure: ${vm.lastFailure!.error}`);
    expect(human.stderr).toContain('1 of 1 VM(s) have no good backup newer than 36h.');

    // with a threshold above their age the VM is fine: exit 0
    const fresh = await runCli(['report', '--host', host, '--target', local, '--stale', '7d']);
    expect(fresh.code).toBe(0);
    expect(fresh.stdout).toMatch(new RegExp(`^${good.name}\\s+${host}\\s+ok\\s`, 'm'));
  });

  test("report: a VM named by a schedule but never backed up is STALE (never), and the schedule's targets are read", async () => {
    // a paused schedule in the shape `vmbackup schedule create` gives its runs (it never runs here)
    const { client, close } = await temporalClient();
    const name = `obs-${tag}`;
    const never = `vmbt-obs-never-${tag}`;
    const handle = await client.schedule.create({
      scheduleId: `vmbackup-schedule-${name}`,
      spec: { intervals: [{ every: '1d' }] },
      action: {
        type: 'startWorkflow',
        workflowType: 'scheduledBackups',
        taskQueue: 'vmbackup-control',
        args: [
          {
            schedule: name,
            group: { domains: [{ host, domain: never }], allOn: [] },
            method: 'auto',
            targets: [local],
            options: {},
            waitSeconds: 86_400,
          },
        ],
      },
      state: { paused: true, note: 'vmbackup observability test' },
    });
    try {
      const res = await runCli(['report', '--host', host, '--stale', '7d', '--json']);
      expect(res.code).toBe(1);
      const out = JSON.parse(res.stdout) as {
        vms: Array<{ domain: string; status: string; schedules: string[]; lastGood: unknown }>;
        targets: Array<{ target: string; ok: boolean }>;
      };
      // no --target: the schedule's target is read, so the backed-up VM is there too
      expect(out.targets).toEqual([{ target: local, ok: true }]);
      expect(out.vms.map((v) => [v.domain, v.status, v.schedules, v.lastGood === null])).toEqual(
        [
          [good.name, 'ok', [], false],
          [never, 'stale', [name], true],
        ].sort((a, b) => String(a[0]).localeCompare(String(b[0]))),
      );
    } finally {
      await handle.delete();
      await close();
    }
  });

  test('report reads the schedules `vmbackup schedule create` makes: `--all --host H --match GLOB` covers only the domains the glob takes', async () => {
    // paused, on a control queue of this test's own: they never run
    const env = scheduleEnv();
    const takesGood = uniqueScheduleName('obs-good');
    const takesNone = uniqueScheduleName('obs-none');
    const { client, close } = await temporalClient();
    try {
      for (const [name, glob] of [
        [takesGood, good.name],
        [takesNone, `vmbt-obs-none-${tag}-*`],
      ] as const) {
        await scheduleCli(
          ['create', name, '--all', '--host', host, '--match', glob, '--every', '1d', '--target', local, '--paused'],
          env,
        );
      }
      const res = await runCli(['report', '--host', host, '--stale', '7d', '--json'], { env });
      const out = JSON.parse(res.stdout) as { vms: Array<{ domain: string; host: string; schedules: string[] }> };
      // `good` is on the target and taken by one glob; `bad` (its one backup failed: on no target, in Temporal's
      // visibility) is taken by neither, so no schedule makes it a VM the report must watch
      expect(out.vms.map((v) => [v.domain, v.host, v.schedules])).toEqual([[good.name, host, [takesGood]]]);
    } finally {
      await deleteSchedule(client, takesGood);
      await deleteSchedule(client, takesNone);
      await close();
    }
  });

  test("a restarted worker's last-success gauge comes from Temporal's visibility; its counters start at zero", async () => {
    await worker.stop();
    const port = await freePort();
    worker = await startWorkerProcess(host, {
      env: cliEnv({ AWS_SECRET_ACCESS_KEY: CANARY }),
      args: ['--metrics', `127.0.0.1:${port}`],
    });
    const g = { domain: good.name, host };
    const finished = Date.parse(backups.good!.finishedAt!) / 1000;
    // loaded in the background once the worker is connected
    const families = await waitFor('the last-success gauge after the restart', async () => {
      const f = parsePrometheusText(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
      return valueOf(f, 'vmbackup_backup_last_successful_timestamp', g) !== undefined ? f : undefined;
    });
    const last = valueOf(families, 'vmbackup_backup_last_successful_timestamp', g)!;
    expect(last).toBeGreaterThanOrEqual(Math.floor(finished) - 1);
    expect(last).toBeLessThanOrEqual(Date.now() / 1000);
    expect(valueOf(families, 'vmbackup_backup_last_successful_timestamp', { domain: bad.name, host })).toBeUndefined();
    expect(valueOf(families, 'vmbackup_backup_success_total', g)).toBeUndefined();
  });

  test('report of a target that does not exist fails (exit 1) with one sentence', async () => {
    const res = await runCli([
      'report',
      '--host',
      host,
      '--target',
      pathToFileURL(join(work, 'nowhere')).href,
      '--json',
    ]);
    expect(res.code).toBe(1);
    const out = JSON.parse(res.stdout) as { targets: Array<{ ok: boolean; error?: string }> };
    expect(out.targets).toHaveLength(1);
    expect(out.targets[0]!.ok).toBe(false);
    expect(out.targets[0]!.error).toEqual(expect.any(String));
  });

  test('--notify refuses a URL that is not http(s) with one sentence, before anything starts', async () => {
    const notify = await runCli(['backup', good.name, '--host', host, '--notify', 'ftp://example.org/x']);
    expect(notify.code).toBe(1);
    expect(notify.stderr).toBe('vmbackup: the notify URL ftp://example.org/… is not http:// or https:// (ftp)\n');
  });
});
