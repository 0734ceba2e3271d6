/** The worker's systemd unit (src/worker/service-unit.ts) and the copy contrib/systemd/ ships. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  DEFAULT_ENV_FILE,
  INSTALLED_VMBACKUP_BIN,
  ServiceUnitError,
  WORKER_ENV_EXAMPLE,
  renderWorkerUnit,
  workerUnitName,
} from '../../src/worker/service-unit';
import type { WorkerUnitOptions } from '../../src/worker/service-unit';
import { parseUnit } from '../helpers/systemd-unit';

const REPO = join(__dirname, '..', '..');

const base: WorkerUnitOptions = {
  vmbackupBin: '/opt/vmbackup/bin/vmbackup',
  user: 'root',
  envFile: DEFAULT_ENV_FILE,
  nodeBin: '/usr/bin/node',
};

describe('the worker unit', () => {
  test('runs `vmbackup worker --host H` as the user, with the env file, restarted on failure', () => {
    const unit = parseUnit(renderWorkerUnit({ ...base, host: 'kvm1', envFile: '/etc/vmbackup/kvm1.env' }));
    expect(unit.Service).toEqual({
      Type: ['exec'],
      User: ['root'],
      EnvironmentFile: ['/etc/vmbackup/kvm1.env'],
      ExecStart: ['/opt/vmbackup/bin/vmbackup worker --host kvm1'],
      Restart: ['on-failure'],
      RestartSec: ['5s'],
      KillMode: ['mixed'],
      TimeoutStopSec: ['60s'],
    });
    expect(unit.Install).toEqual({ WantedBy: ['multi-user.target'] });
    expect(unit.Unit?.After?.[0]?.split(' ')).toEqual(
      expect.arrayContaining(['network-online.target', 'libvirtd.service']),
    );
  });

  test('without --host the worker decides its host name when it starts', () => {
    const unit = parseUnit(renderWorkerUnit(base));
    expect(unit.Service?.ExecStart).toEqual(['/opt/vmbackup/bin/vmbackup worker']);
    expect(workerUnitName()).toBe('vmbackup-worker.service');
    expect(workerUnitName('kvm1')).toBe('vmbackup-worker-kvm1.service');
  });

  test("puts node's directory on the service's PATH only when systemd would not search it", () => {
    expect(parseUnit(renderWorkerUnit(base)).Service?.Environment).toBeUndefined();
    const nvm = parseUnit(renderWorkerUnit({ ...base, nodeBin: '/root/.nvm/versions/node/v20.19.0/bin/node' }));
    expect(nvm.Service?.Environment).toEqual([
      'PATH=/root/.nvm/versions/node/v20.19.0/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    ]);
  });

  test.each([
    ['a newline in --env-file', { envFile: '/etc/vmbackup/w.env\nExecStartPre=/bin/rm -rf /' }, '--env-file'],
    ['a % specifier', { envFile: '/etc/vmbackup/%h.env' }, '--env-file'],
    ['a $VARIABLE in the command', { vmbackupBin: '/opt/$HOME/bin/vmbackup' }, 'the vmbackup command'],
    ['a space in the command', { vmbackupBin: '/opt/my vmbackup/bin/vmbackup' }, 'the vmbackup command'],
    ['a relative --env-file', { envFile: 'worker.env' }, '--env-file'],
    ['.. in --env-file', { envFile: '/etc/vmbackup/../shadow' }, '--env-file'],
    ['a user name with a newline', { user: 'root\nUser=nobody' }, '--user'],
    ['a host name with a space', { host: 'kvm1 --no-recover' }, '--host'],
  ])('refuses %s with one sentence naming the option', (_what, bad, option) => {
    expect(() => renderWorkerUnit({ ...base, ...bad })).toThrow(ServiceUnitError);
    expect(() => renderWorkerUnit({ ...base, ...bad })).toThrow(new RegExp(`^${option.replace(/[$]/g, '\\$')}`));
  });
});

describe('contrib/systemd', () => {
  test('vmbackup-worker.service is what install-service writes for the installed command and the defaults', () => {
    const shipped = readFileSync(join(REPO, 'contrib', 'systemd', 'vmbackup-worker.service'), 'utf8');
    expect(shipped).toBe(
      renderWorkerUnit({ vmbackupBin: INSTALLED_VMBACKUP_BIN, user: 'root', envFile: DEFAULT_ENV_FILE }),
    );
    expect(parseUnit(shipped).Service?.Restart).toEqual(['on-failure']);
  });

  test('worker.env.example is the file install-service creates, every line a comment', () => {
    const shipped = readFileSync(join(REPO, 'contrib', 'systemd', 'worker.env.example'), 'utf8');
    expect(shipped).toBe(WORKER_ENV_EXAMPLE);
    // nothing is set until the admin sets it: the worker's own defaults apply
    expect(shipped.split('\n').filter((l) => l !== '' && !l.startsWith('#'))).toEqual([]);
  });

  test('worker.env.example offers both allow-lists a worker on a shared cluster should set (targets, webhooks)', () => {
    // anyone who can start a workflow chooses a backup's targets and its --notify URL; the worker limits both
    expect(WORKER_ENV_EXAMPLE).toMatch(/^#VMBACKUP_ALLOW_TARGETS=\S/m);
    expect(WORKER_ENV_EXAMPLE).toMatch(/^#VMBACKUP_ALLOW_NOTIFY=\S/m);
  });
});
