/**
 * VirshHypervisor's checkpoint calls (incremental backup-begin, list, check, delete, redefine) over a fake virsh
 * that replays outputs captured from libvirt 9.0.0 (test/fixtures/virsh/, `capture.sh DIR checkpoints`) and logs
 * its arguments and the XML files it is given.
 */
import { chmod, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HypervisorError } from '../../src/hypervisor/errors';
import { VirshHypervisor } from '../../src/hypervisor/virsh';

const FIXTURES = join(__dirname, '..', 'fixtures', 'virsh');

let dir: string;
let fake: string;

/**
 * $FAKE_LIST: the checkpoint names checkpoint-list prints (a file); checkpoint-dumpxml prints c1's capture
 * (c1-size or c1-size-broken with --size, $FAKE_SIZE); checkpoint-delete fails as $FAKE_DELETE says
 * (`missing`: no such checkpoint; `bitmap-missing`: vda's bitmap is gone until the checkpoint is redefined);
 * checkpoint-create --redefine keeps a copy of its XML and fails with the kill -9 text under
 * --redefine-validate when $FAKE_BROKEN is set. The settings are read from $FAKE_DIR/settings (tools get no
 * environment of ours but PATH, HOME and the like).
 */
const script = (fakeDir: string): string => `#!/bin/bash
F=${FIXTURES}
FAKE_DIR=${fakeDir}
. "$FAKE_DIR/settings"
echo "$*" >>"$FAKE_DIR/calls.log"
shift 2 # -c URI
case "$1" in
  *' ; '*) cat "$F/checkpoint-dumpxml.batch.txt"; cat "$F/checkpoint-dumpxml.batch.stderr.txt" >&2; [[ $1 == *"'gone' --no-domain" ]] && exit 1; exit 0 ;;
  dumpxml) cat "$F/dumpxml.live.xml" ;;
  checkpoint-list) cat "$FAKE_LIST" ;;
  checkpoint-dumpxml)
    if [[ " $* " == *" --size "* ]]; then cat "$F/checkpoint-dumpxml.c1-$FAKE_SIZE.xml"; else cat "$F/checkpoint-dumpxml.c1.xml"; fi ;;
  checkpoint-delete)
    case "$FAKE_DELETE" in
      missing) cat "$F/stderr.checkpoint-not-found.txt" >&2; exit 1 ;;
      bitmap-missing) if [[ ! -e "$FAKE_DIR/redefine-1.xml" ]]; then sed "s/c2/c1/g" "$F/stderr.checkpoint-bitmap-missing.txt" >&2; exit 1; fi ;;
    esac
    echo 'Domain checkpoint c1 deleted' ;;
  checkpoint-create)
    n=$(ls "$FAKE_DIR" | grep -c '^redefine-'); cp "$3" "$FAKE_DIR/redefine-$((n + 1)).xml"
    if [[ -n "$FAKE_BROKEN" && " $* " == *" --redefine-validate "* ]]; then cat "$F/stderr.checkpoint-validate.txt" >&2; exit 1; fi
    echo "Domain checkpoint created" ;;
  backup-begin)
    cp "$3" "$FAKE_DIR/backup.xml"; [[ -n "$4" ]] && cp "$4" "$FAKE_DIR/checkpoint.xml"
    if [[ -n "$FAKE_BROKEN" ]]; then cat "$F/stderr.checkpoint-inconsistent.txt" >&2; exit 1; fi
    echo 'Backup started' ;;
  *) echo "error: fake virsh: unexpected $1" >&2; exit 1 ;;
esac
`;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-fake-virsh-ck-'));
  fake = join(dir, 'virsh');
  await writeFile(fake, script(dir));
  await chmod(fake, 0o755);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const settings: Record<string, string> = {};
/** Sets one of the fake's settings ($FAKE_LIST, $FAKE_SIZE, $FAKE_DELETE, $FAKE_BROKEN) from now on. */
async function fakeSetting(name: string, value: string): Promise<void> {
  settings[name] = value;
  const lines = Object.entries(settings).map(([k, v]) => `${k}='${v}'`);
  await writeFile(join(dir, 'settings'), `${lines.join('\n')}\n`);
}

beforeEach(async () => {
  for (const f of await readdir(dir)) if (f !== 'virsh') await rm(join(dir, f), { force: true });
  await writeFile(join(dir, 'list.txt'), await readFile(join(FIXTURES, 'checkpoint-list.name.txt')));
  await fakeSetting('FAKE_LIST', join(dir, 'list.txt'));
  await fakeSetting('FAKE_SIZE', 'size');
  await fakeSetting('FAKE_DELETE', '');
  await fakeSetting('FAKE_BROKEN', '');
});

const calls = async (): Promise<string[]> =>
  (await readFile(join(dir, 'calls.log'), 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);

function hv(): VirshHypervisor {
  return new VirshHypervisor({ uri: 'qemu:///fake', virsh: fake, sessions: false });
}

async function rejection(p: Promise<unknown>): Promise<HypervisorError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof HypervisorError)) throw new Error(`expected a HypervisorError, got ${String(err)}`);
  return err;
}

describe('beginPushBackup: incremental and checkpoints', () => {
  const targets = [
    { disk: 'vda', file: '/s/vda.qcow2' },
    { disk: 'vdb', file: '/s/vdb.qcow2' },
  ];

  test('callers of today: one XML file, no checkpoint', async () => {
    await hv().beginPushBackup('vm1', [targets[0]!], { disks: ['vda', 'vdb', 'sda'] });
    expect(await calls()).toEqual([expect.stringMatching(/^-c qemu:\/\/\/fake backup-begin vm1 \/\S+\/backup\.xml$/)]);
    const xml = await readFile(join(dir, 'backup.xml'), 'utf8');
    expect(xml).not.toMatch(/incremental|backupmode/);
  });

  test('incremental from c1 creating c2: the backup XML, then the checkpoint XML', async () => {
    await hv().beginPushBackup('vm1', targets, {
      disks: ['vda', 'vdb', 'sda'],
      incremental: 'c1',
      checkpoint: { name: 'c2', disks: ['vda', 'vdb'] },
      fullDisks: ['vdb'],
    });
    expect(await calls()).toEqual([
      expect.stringMatching(/^-c qemu:\/\/\/fake backup-begin vm1 (\/\S+)\/backup\.xml \1\/checkpoint\.xml$/),
    ]);
    const backup = await readFile(join(dir, 'backup.xml'), 'utf8');
    expect(backup).toContain('<incremental>c1</incremental>');
    expect(backup).toContain(`<disk name='vda' backup='yes' type='file'>`);
    expect(backup).toContain(`<disk name='vdb' backup='yes' backupmode='full' type='file'>`);
    expect(backup).toContain(`<disk name='sda' backup='no'/>`);
    const checkpoint = await readFile(join(dir, 'checkpoint.xml'), 'utf8');
    expect(checkpoint).toContain('<name>c2</name>');
    expect(checkpoint).toContain(`<disk name='vda' checkpoint='bitmap'/>`);
    expect(checkpoint).toContain(`<disk name='vdb' checkpoint='bitmap'/>`);
    expect(checkpoint).toContain(`<disk name='sda' checkpoint='no'/>`);
  });

  test('a full backup creating the first checkpoint: the domain XML is read when the caller has no disk list', async () => {
    await hv().beginPushBackup('vm1', [targets[0]!], { checkpoint: { name: 'c0', disks: ['vda'] } });
    expect((await calls()).map((c) => c.split(' ')[2])).toEqual(['dumpxml', 'backup-begin']);
    expect(await readFile(join(dir, 'checkpoint.xml'), 'utf8')).toContain(`<disk name='vdb' checkpoint='no'/>`);
  });

  test('bad input is refused before libvirt is asked', async () => {
    const cases: Array<[Parameters<VirshHypervisor['beginPushBackup']>[2], string, RegExp]> = [
      [{ incremental: '.c1' }, 'invalid', /"\.c1" is not a valid parent checkpoint name for domain "vm1"/],
      [
        { incremental: 'c1', checkpoint: { name: 'a/b', disks: ['vda'] } },
        'invalid',
        /"a\/b" is not a valid checkpoint/,
      ],
      [
        { checkpoint: { name: 'c2', disks: ['vdz'] } },
        'not-found',
        /domain "vm1" has no disk vdz \(it has vda, vdb, sda\)/,
      ],
      [{ checkpoint: { name: 'c2', disks: ["vda' x"] } }, 'invalid', /is not a valid disk name/],
      [
        { incremental: 'c1', fullDisks: ['sda'] },
        'invalid',
        /disk sda .* cannot be copied whole .* not one of the disks backed up/,
      ],
    ];
    for (const [opts, kind, message] of cases) {
      const err = await rejection(hv().beginPushBackup('vm1', targets, { disks: ['vda', 'vdb', 'sda'], ...opts }));
      expect(err).toMatchObject({ kind, permanent: true });
      expect(err.message).toMatch(message);
    }
    expect(await calls()).toEqual([]);
  });

  test('an incremental from a bitmap broken by kill -9: checkpoint-inconsistent, naming checkpoint and disk', async () => {
    await fakeSetting('FAKE_BROKEN', '1');
    const err = await rejection(
      hv().beginPushBackup('vm1', targets, {
        disks: ['vda', 'vdb'],
        incremental: 'c1',
        checkpoint: { name: 'c4', disks: ['vda'] },
      }),
    );
    expect(err).toMatchObject({
      kind: 'checkpoint-inconsistent',
      permanent: true,
      domain: 'vm1',
      disk: 'vda',
      checkpoint: 'c1',
    });
    expect(err.message).toBe(
      'cannot start the incremental push backup from checkpoint c1 of domain "vm1" (vda, vdb): the dirty bitmap of ' +
        'checkpoint c1 on disk vda is missing or inconsistent: QEMU stopped without saving it, or the disk was not in ' +
        "that checkpoint (virsh: checkpoint inconsistent: missing or broken bitmap 'c1' for disk 'vda')",
    );
  });
});

describe('listCheckpoints', () => {
  test('names in topological order, then every XML from ONE more virsh run', async () => {
    expect(await hv().listCheckpoints('vm1')).toEqual([
      {
        name: 'c0',
        creationTime: 1795998904,
        disks: [
          { name: 'vda', checkpoint: 'bitmap', bitmap: 'c0' },
          { name: 'vdb', checkpoint: 'no' },
        ],
      },
      {
        name: 'c1',
        parent: 'c0',
        creationTime: 1795998905,
        disks: [
          { name: 'vda', checkpoint: 'bitmap', bitmap: 'c1' },
          { name: 'vdb', checkpoint: 'no' },
        ],
      },
    ]);
    expect(await calls()).toEqual([
      '-c qemu:///fake checkpoint-list vm1 --name --topological',
      "-c qemu:///fake checkpoint-dumpxml --domain 'vm1' --checkpointname 'c0' --no-domain ; " +
        "checkpoint-dumpxml --domain 'vm1' --checkpointname 'c1' --no-domain",
    ]);
  });

  test('a checkpoint deleted between the two runs is left out, even when its command ran last', async () => {
    await writeFile(join(dir, 'list.txt'), 'c0\nc1\ngone\n');
    expect((await hv().listCheckpoints('vm1')).map((c) => c.name)).toEqual(['c0', 'c1']);
  });

  test('no checkpoints: one call', async () => {
    await writeFile(join(dir, 'list.txt'), '\n');
    expect(await hv().listCheckpoints('vm1')).toEqual([]);
    expect(await calls()).toHaveLength(1);
  });
});

describe('checkpointXml and checkpointBitmaps', () => {
  test('checkpointXml: --no-domain, the name given as an option value', async () => {
    expect(await hv().checkpointXml('vm1', 'c1')).toBe(
      await readFile(join(FIXTURES, 'checkpoint-dumpxml.c1.xml'), 'utf8'),
    );
    expect(await calls()).toEqual(['-c qemu:///fake checkpoint-dumpxml --domain vm1 --checkpointname c1 --no-domain']);
  });

  test('a good bitmap: ok with the changed bytes; a disk without bitmap: no-bitmap', async () => {
    expect(await hv().checkpointBitmaps('vm1', 'c1', { disks: ['vda', 'vdb'] })).toEqual([
      { disk: 'vda', state: 'ok', changedBytes: 1 << 20 },
      { disk: 'vdb', state: 'no-bitmap' },
    ]);
    expect(await calls()).toEqual([
      '-c qemu:///fake checkpoint-dumpxml --domain vm1 --checkpointname c1 --no-domain --size',
    ]);
  });

  test('after kill -9: broken, before any job is started', async () => {
    await fakeSetting('FAKE_SIZE', 'size-broken');
    expect(await hv().checkpointBitmaps('vm1', 'c1', { disks: ['vda', 'vdb'] })).toEqual([
      { disk: 'vda', state: 'broken' },
      { disk: 'vdb', state: 'no-bitmap' },
    ]);
  });

  test('a disk the domain no longer has: no-disk (the domain XML is read when no disk list is given)', async () => {
    await fakeSetting('FAKE_SIZE', 'size-broken');
    const states = await hv().checkpointBitmaps('vm1', 'c1', { disks: ['vdb'] });
    expect(states[0]).toEqual({ disk: 'vda', state: 'no-disk' });
    await hv().checkpointBitmaps('vm1', 'c1');
    expect((await calls()).at(-1)).toBe('-c qemu:///fake dumpxml vm1');
  });
});

describe('deleteCheckpoint', () => {
  test('deletes with the bitmaps; --metadata with metadataOnly', async () => {
    expect(await hv().deleteCheckpoint('vm1', 'c1')).toBe(true);
    expect(await hv().deleteCheckpoint('vm1', 'c1', { metadataOnly: true })).toBe(true);
    expect(await calls()).toEqual([
      '-c qemu:///fake checkpoint-delete --domain vm1 --checkpointname c1',
      '-c qemu:///fake checkpoint-delete --domain vm1 --checkpointname c1 --metadata',
    ]);
  });

  test('idempotent: a checkpoint that is not there resolves false', async () => {
    await fakeSetting('FAKE_DELETE', 'missing');
    expect(await hv().deleteCheckpoint('vm1', 'nosuch')).toBe(false);
    expect(await hv().deleteCheckpoint('vm1', 'nosuch', { metadataOnly: true })).toBe(false);
  });

  test("a bitmap QEMU never stored (kill -9): that disk is redefined as checkpoint='no', then the rest is deleted", async () => {
    await fakeSetting('FAKE_DELETE', 'bitmap-missing');
    expect(await hv().deleteCheckpoint('vm1', 'c1')).toBe(true);
    const log = await calls();
    expect(log.map((c) => c.split(' ')[2])).toEqual([
      'checkpoint-delete',
      'checkpoint-dumpxml',
      'checkpoint-create',
      'checkpoint-delete',
    ]);
    expect(log[2]).toMatch(/ checkpoint-create vm1 \/\S+\.xml --redefine$/);
    const redefined = await readFile(join(dir, 'redefine-1.xml'), 'utf8');
    expect(redefined).toContain(`<disk name='vda' checkpoint='no'/>`);
    expect(redefined).not.toContain("bitmap='c1'");
  });

  test('metadataOnly never redefines', async () => {
    await fakeSetting('FAKE_DELETE', 'bitmap-missing');
    const err = await rejection(hv().deleteCheckpoint('vm1', 'c1', { metadataOnly: true }));
    expect(err).toMatchObject({ kind: 'checkpoint-inconsistent', checkpoint: 'c1', disk: 'vda' });
    expect(await calls()).toHaveLength(1);
  });

  test('names that are not checkpoint names are refused', async () => {
    await expect(hv().deleteCheckpoint('vm1', '--children')).rejects.toMatchObject({ kind: 'invalid' });
    await expect(hv().deleteCheckpoint('vm1', '')).rejects.toMatchObject({ kind: 'invalid' });
    expect(await calls()).toEqual([]);
  });
});

describe('redefineCheckpoint', () => {
  const saved = (): Promise<string> => readFile(join(FIXTURES, 'checkpoint-dumpxml.c1.xml'), 'utf8');

  test('--redefine --redefine-validate of the XML as vmbackup writes it again', async () => {
    const xml = (await saved()).replace(
      '</disks>',
      "</disks>\n  <description>from a manifest</description>\n  <domain type='qemu'><name>other</name></domain>",
    );
    expect(await hv().redefineCheckpoint('vm1', xml, { validate: true })).toEqual({
      name: 'c1',
      parent: 'c0',
      creationTime: 1795998905,
      disks: [
        { name: 'vda', checkpoint: 'bitmap', bitmap: 'c1' },
        { name: 'vdb', checkpoint: 'no' },
      ],
    });
    expect((await calls())[0]).toMatch(
      /^-c qemu:\/\/\/fake checkpoint-create vm1 \/\S+\.xml --redefine --redefine-validate$/,
    );
    const given = await readFile(join(dir, 'redefine-1.xml'), 'utf8');
    expect(given).toBe((await saved()).trimEnd() + '\n');
    expect(given).not.toMatch(/description|<domain[ >]/);
  });

  test('dropParent: a checkpoint whose parent is gone becomes a root', async () => {
    await hv().redefineCheckpoint('vm1', await saved(), { validate: false, dropParent: true });
    expect((await calls())[0]).toMatch(/ --redefine$/);
    expect(await readFile(join(dir, 'redefine-1.xml'), 'utf8')).not.toContain('<parent>');
  });

  test('a broken bitmap fails validation with checkpoint-inconsistent', async () => {
    await fakeSetting('FAKE_BROKEN', '1');
    const err = await rejection(hv().redefineCheckpoint('vm1', await saved(), { validate: true }));
    expect(err).toMatchObject({ kind: 'checkpoint-inconsistent', checkpoint: 'c1', disk: 'vda' });
    expect(err.message).toMatch(
      /^cannot redefine checkpoint c1 of domain "vm1": the dirty bitmap of checkpoint c1 on disk vda/,
    );
  });

  test('a checkpoint pointed at another bitmap (not what libvirt writes) is refused', async () => {
    const err = await rejection(
      hv().redefineCheckpoint('vm1', (await saved()).replace("bitmap='c1'", "bitmap='c0'"), { validate: true }),
    );
    expect(err).toMatchObject({ kind: 'invalid', disk: 'vda', checkpoint: 'c1' });
    expect(err.message).toBe(
      'cannot redefine checkpoint c1 of domain "vm1": its XML gives disk vda the bitmap c0, not c1',
    );
    expect(await calls()).toEqual([]);
  });

  test('XML that is not a sane checkpoint never reaches libvirt', async () => {
    const err = await rejection(
      hv().redefineCheckpoint('vm1', (await saved()).replace("name='vda'", "name='/dev/sda'"), { validate: true }),
    );
    expect(err).toMatchObject({ kind: 'invalid', permanent: true });
    expect(await calls()).toEqual([]);
  });
});
