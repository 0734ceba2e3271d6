/**
 * The command line's side of untrusted input: flags checked before anything starts, a target named twice
 * written to once, `vmbackup worker` and its allow-list (a warning without one, one sentence for a bad
 * one, umask 077), and the embedded default's worker writing to its own command's targets only.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { WorkflowFailedError } from '@temporalio/client';
import { backupTargets, startBackup } from '../../src/client/backups';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, temporalClient, uniqueHost } from '../helpers/vmbackup';
import type { WorkerProcess } from '../helpers/vmbackup';

const ALLOW_WARNING =
  /^vmbackup worker: warning: every target is allowed: .*--allow-target or VMBACKUP_ALLOW_TARGETS$/m;

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

describe('command line inputs', () => {
  const newDomain = useFixtureDomains();
  let work: string;
  const workers: WorkerProcess[] = [];

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-cli-inputs-'));
  });
  afterAll(async () => {
    await Promise.all(workers.map((w) => w.stop()));
    if (work) await rm(work, { recursive: true, force: true });
  });

  test.each([['abc'], ['-5'], ['1.5'], ['0'], ['4'], ['3601'], [''], ['30s']])(
    '--heartbeat-timeout %j is refused with one sentence before anything starts',
    async (value) => {
      const res = await runCli(['backup', 'vm1', '--host', uniqueHost('hb'), '--heartbeat-timeout', value], {
        timeoutMs: 60_000,
      });
      expect(res.code).toBe(1);
      expect(res.stdout).toBe('');
      expect(res.stderr).toBe(
        `vmbackup: --heartbeat-timeout ${JSON.stringify(value)} is not a number of seconds from 5 to 3600\n`,
      );
    },
  );

  test('a target named twice (file:///a/b and file:///a//b/) is written to once, and the CLI says so', async () => {
    const host = uniqueHost('dup');
    workers.push(await startWorkerProcess(host));
    const dom = await newDomain({ prefix: 'dup', disks: [{ format: 'qcow2', sizeMiB: 8 }] });
    const target = join(work, 'dup');
    const a = pathToFileURL(target).href;
    const b = `file://${work}//dup/`;
    const res = await runCli(['backup', dom.name, '--host', host, '--target', a, '--target', b, '--wait', '--json']);
    expect(res.stderr).toBe(`vmbackup: --target ${b} is the same target as ${a}; writing to it once\n`);
    expect(res.code).toBe(0);
    const out = JSON.parse(res.stdout) as { status: string; targets: Array<{ target: string; ok: boolean }> };
    expect(out.status).toBe('completed');
    expect(out.targets).toEqual([expect.objectContaining({ target: a, ok: true })]);
  });

  test('vmbackup worker without an allow-list warns in one line; with one it does not; a bad prefix is one sentence', async () => {
    const open = await startWorkerProcess(uniqueHost('warn'));
    workers.push(open);
    expect(open.output()).toMatch(ALLOW_WARNING);
    const closed = await startWorkerProcess(uniqueHost('warn'), {
      env: cliEnv({ VMBACKUP_ALLOW_TARGETS: `${pathToFileURL(work).href}, s3://bucket/p` }),
    });
    workers.push(closed);
    expect(closed.output()).not.toMatch(/warning/);

    const bad = await runCli(['worker', '--host', uniqueHost('warn'), '--allow-target', 's3://b/../x'], {
      timeoutMs: 60_000,
    });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe(
      'vmbackup: --allow-target: "s3://b/../x" is not a valid target URL: the path contains "." or ".."; use file:///abs/dir, nfs://host/export/path or s3://bucket/prefix.\n',
    );
    const badEnv = await runCli(['worker', '--host', uniqueHost('warn')], {
      env: cliEnv({ VMBACKUP_ALLOW_TARGETS: 'file:///ok ftp://x' }),
      timeoutMs: 60_000,
    });
    expect(badEnv.code).toBe(1);
    expect(badEnv.stderr).toMatch(/^vmbackup: VMBACKUP_ALLOW_TARGETS: "ftp:\/\/x" is not a supported target URL/);
  });

  test('the CLI and its worker run with umask 077, whatever umask they were started with', async () => {
    const w = await startWorkerProcess(uniqueHost('umask'), {
      env: cliEnv({ VMBACKUP_ALLOW_TARGETS: 's3://bucket/p' }),
    });
    workers.push(w);
    const status = await readFile(`/proc/${w.child.pid}/status`, 'utf8');
    expect(status).toMatch(/^Umask:\s+0077$/m);
  });

  test("the targets of a backup nobody runs yet are read from its history (what the embedded cancel's worker allows)", async () => {
    const host = uniqueHost('cnl');
    const targets = [pathToFileURL(join(work, 'cancel-a')).href, 's3://vmbackup-test/cancel-b/'];
    const { client, close } = await temporalClient();
    try {
      const { handle } = await startBackup(client, {
        domain: 'vmbt-cnl-x',
        host,
        method: 'auto',
        targets,
        options: {},
      });
      expect(await backupTargets(client, handle)).toEqual(targets);
      await handle.terminate('test over');
    } finally {
      await close();
    }
  });

  test("the embedded default's worker writes to its own command's targets only", async () => {
    // Queued before the command starts (nobody serves this host yet): another local user's backup of
    // another VM to a target of theirs. The command's in-process worker picks it up and must refuse it.
    const host = uniqueHost('emb');
    const [mine, theirs] = await Promise.all([
      newDomain({ prefix: 'emb', disks: [{ format: 'qcow2', sizeMiB: 8 }] }),
      newDomain({ prefix: 'emb', disks: [{ format: 'qcow2', sizeMiB: 8 }] }),
    ]);
    const evil = pathToFileURL(join(work, `evil-${randomBytes(2).toString('hex')}`)).href;
    const { client, close } = await temporalClient();
    try {
      const attack = await startBackup(client, {
        domain: theirs.name,
        host,
        method: 'auto',
        targets: [evil],
        options: {},
      });
      const env = cliEnv({ VMBACKUP_HOST: host, VMBACKUP_STATE_DIR: join(work, 'embedded-state') });
      delete env.TEMPORAL_ADDRESS; // the embedded default: the local dev server and an in-process worker
      const own = pathToFileURL(join(work, 'own')).href;
      const outcome = attack.handle.result().then(
        () => undefined,
        (e: unknown) => e,
      );
      let err: unknown = 'still running after the command ended';
      // each command's worker serves the host while its own backup runs; on a loaded machine one short backup may
      // end before the queued one is picked up, so a few commands, each of which must refuse it
      for (let i = 0; i < 3 && err === 'still running after the command ended'; i++) {
        const res = await runCli(['backup', mine.name, '--target', own, '--json'], { env });
        expect(res.code).toBe(0);
        expect((JSON.parse(res.stdout) as { status: string }).status).toBe('completed');
        err = await Promise.race([
          outcome,
          new Promise((r) => setTimeout(() => r('still running after the command ended'), 10_000)),
        ]);
      }
      expect(err).toBeInstanceOf(WorkflowFailedError);
      let cause = err as { cause?: unknown; message?: string };
      while (cause.cause) cause = cause.cause as { cause?: unknown; message?: string };
      expect(cause.message).toMatch(
        /^(planBackup|prepareStaging): this worker does not write to file:\/\/\/.*\/evil-[0-9a-f]{4}: it is outside the targets it allows/,
      );
      expect(await exists(new URL(evil).pathname)).toBe(false);
    } finally {
      await client.workflow
        .getHandle(`vmbackup-backup-${host}-${theirs.name}`)
        .terminate('test over')
        .catch(() => undefined);
      await close();
    }
  });
});
