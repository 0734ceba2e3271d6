/** Domain XML parsing against `virsh dumpxml` outputs captured from libvirt 9.0.0 (test/fixtures/virsh/). */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { HypervisorError } from '../../src/hypervisor/errors';
import {
  checkpointCreateXml,
  checkpointRedefineXml,
  escapeXmlAttr,
  parseCheckpointXml,
  parseBackupJobXml,
  parseCheckpointXmls,
  parseDomainXml,
  parseVmStateXml,
  pullBackupXml,
  pushBackupXml,
  vmStateOf,
} from '../../src/hypervisor/xml';

const captured = (file: string): string => readFileSync(join(__dirname, '..', 'fixtures', 'virsh', file), 'utf8');

describe('parseDomainXml', () => {
  test('live XML: disks with sources, aliases, backing chains; the guest agent channel', () => {
    const xml = parseDomainXml(captured('dumpxml.live.xml'));
    expect(xml).toMatchObject({ name: 'vm1', type: 'qemu', id: 88, hasGuestAgentChannel: true });
    expect(xml.uuid).toMatch(/^[0-9a-f-]{36}$/);
    expect(xml.disks).toEqual([
      {
        target: 'vda',
        bus: 'virtio',
        type: 'file',
        device: 'disk',
        format: 'qcow2',
        source: '/VM/vda.qcow2',
        protocol: undefined,
        readonly: false,
        shareable: false,
        alias: 'virtio-disk0',
        backingChain: [{ type: 'file', path: '/VM/template.qcow2', format: 'qcow2' }],
        mirror: undefined,
        iothread: false,
      },
      expect.objectContaining({
        target: 'vdb',
        format: 'raw',
        source: '/VM/vdb.raw',
        shareable: true,
        alias: 'virtio-disk1',
        backingChain: [],
      }),
      expect.objectContaining({
        target: 'sda',
        bus: 'sata',
        device: 'cdrom',
        source: '/VM/cdrom.iso',
        readonly: true,
        alias: 'sata0-0-0',
        backingChain: [],
      }),
    ]);
    expect(xml.channels).toEqual([{ type: 'unix', targetType: 'virtio', targetName: 'org.qemu.guest_agent.0' }]);
  });

  test('inactive XML: no id, no aliases, backing chain unknown, a network disk', () => {
    const xml = parseDomainXml(captured('dumpxml.inactive.xml'));
    expect(xml.id).toBeUndefined();
    expect(xml.disks.map((d) => d.target)).toEqual(['vda', 'vdb', 'vdc', 'sda']);
    expect(xml.disks[0]).toMatchObject({ source: '/VM/vda.qcow2', alias: undefined, backingChain: undefined });
    expect(xml.disks[2]).toMatchObject({
      target: 'vdc',
      type: 'network',
      device: 'disk',
      protocol: 'nbd',
      source: 'nbd:export',
      readonly: false,
    });
  });

  test('active commit: the mirror, not ready, then ready for pivot', () => {
    const running = parseDomainXml(captured('dumpxml.commit-running.xml'));
    const vda = running.disks.find((d) => d.target === 'vda');
    expect(vda?.mirror).toEqual({ job: 'active-commit', ready: false, path: '/VM/vda.qcow2', format: 'qcow2' });
    expect(vda?.source).toBe('/VM/overlay.qcow2');
    expect(vda?.backingChain?.map((b) => b.path)).toEqual(['/VM/vda.qcow2', '/VM/template.qcow2']);

    const ready = parseDomainXml(captured('dumpxml.commit-ready.xml'));
    expect(ready.disks.find((d) => d.target === 'vda')?.mirror?.ready).toBe(true);
    expect(ready.disks.find((d) => d.target === 'vdb')?.mirror).toBeUndefined();
  });

  test('a domain without disks or channels', () => {
    const xml = parseDomainXml("<domain type='kvm'><name>empty</name><uuid>u</uuid><devices/></domain>");
    expect(xml).toEqual({
      name: 'empty',
      uuid: 'u',
      type: 'kvm',
      id: undefined,
      disks: [],
      channels: [],
      hasGuestAgentChannel: false,
    });
  });

  test('block and volume sources', () => {
    const xml = parseDomainXml(`<domain type='kvm'><name>b</name><devices>
      <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/><target dev='vda'/></disk>
      <disk type='volume' device='disk'><source pool='default' volume='v.qcow2'/><target dev='vdb'/></disk>
      <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    </devices></domain>`);
    expect(xml.disks.map((d) => [d.target, d.type, d.source])).toEqual([
      ['vda', 'block', '/dev/vg/lv'],
      ['vdb', 'volume', 'default/v.qcow2'],
      ['hdc', 'file', undefined],
    ]);
  });

  test('disks in an IOThread: driver iothread, an <iothreads> mapping, a virtio-scsi controller with one', () => {
    const xml = parseDomainXml(`<domain type='kvm'><name>t</name><iothreads>2</iothreads><devices>
      <controller type='scsi' index='0' model='virtio-scsi'><driver iothread='2'/></controller>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2' iothread='1'/><source file='/a'/><target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'><iothreads><iothread id='1'/></iothreads></driver><source file='/b'/><target dev='vdb' bus='virtio'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/c'/><target dev='sda' bus='scsi'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d'/><target dev='vdc' bus='virtio'/></disk>
    </devices></domain>`);
    expect(xml.disks.map((d) => [d.target, d.iothread])).toEqual([
      ['vda', true],
      ['vdb', true],
      ['sda', true],
      ['vdc', false],
    ]);
    const plain = parseDomainXml(`<domain type='kvm'><name>p</name><devices>
      <controller type='scsi' index='0' model='virtio-scsi'/>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/c'/><target dev='sda' bus='scsi'/></disk>
    </devices></domain>`);
    expect(plain.disks[0]!.iothread).toBe(false);
  });

  test('not a domain', () => {
    expect(() => parseDomainXml('<network><name>default</name></network>')).toThrow(HypervisorError);
    expect(() => parseDomainXml('')).toThrow(/not a domain/);
  });
});

describe('pullBackupXml', () => {
  test('a Unix socket server, a scratch file per disk, every other disk excluded; attributes escaped', () => {
    expect(
      pullBackupXml(
        '/st/b1/nbd/backup.sock',
        [
          { dev: 'vda', scratch: '/st/b1/vda.scratch.qcow2' },
          { dev: 'vdb', scratch: "/st/b'1/vdb.scratch.qcow2" },
        ],
        ['vda', 'vdb', 'sda'],
        { incremental: 'vmbackup.b0', fullDisks: ['vdb'] },
      ),
    ).toBe(
      `<domainbackup mode='pull'>
  <incremental>vmbackup.b0</incremental>
  <server transport='unix' socket='/st/b1/nbd/backup.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file'><scratch file='/st/b1/vda.scratch.qcow2'/><driver type='qcow2'/></disk>
    <disk name='vdb' backup='yes' backupmode='full' type='file'><scratch file='/st/b&apos;1/vdb.scratch.qcow2'/><driver type='qcow2'/></disk>
    <disk name='sda' backup='no'/>
  </disks>
</domainbackup>
`,
    );
  });
});

describe('pushBackupXml', () => {
  test('lists the targets and excludes every other disk explicitly', () => {
    expect(pushBackupXml([{ disk: 'vda', file: '/backups/vm1/vda.qcow2' }], ['vda', 'vdb', 'sda'])).toBe(
      `<domainbackup mode='push'>
  <disks>
    <disk name='vda' backup='yes' type='file'><target file='/backups/vm1/vda.qcow2'/><driver type='qcow2'/></disk>
    <disk name='vdb' backup='no'/>
    <disk name='sda' backup='no'/>
  </disks>
</domainbackup>
`,
    );
  });

  test('escapes file names', () => {
    expect(escapeXmlAttr(`/b/it's <&> "x"`)).toBe('/b/it&apos;s &lt;&amp;&gt; &quot;x&quot;');
    const xml = pushBackupXml([{ disk: 'vda', file: "/b/a'b.qcow2" }], ['vda']);
    expect(xml).toContain(`<target file='/b/a&apos;b.qcow2'/>`);
  });
});

describe('pushBackupXml: incremental', () => {
  const targets = [
    { disk: 'vda', file: '/s/vda.qcow2' },
    { disk: 'vdb', file: '/s/vdb.qcow2' },
  ];

  test('<incremental> names the parent; a disk new to the chain is copied whole with backupmode=full', () => {
    expect(pushBackupXml(targets, ['vda', 'vdb', 'sda'], { incremental: 'c1', fullDisks: ['vdb'] })).toBe(
      `<domainbackup mode='push'>
  <incremental>c1</incremental>
  <disks>
    <disk name='vda' backup='yes' type='file'><target file='/s/vda.qcow2'/><driver type='qcow2'/></disk>
    <disk name='vdb' backup='yes' backupmode='full' type='file'><target file='/s/vdb.qcow2'/><driver type='qcow2'/></disk>
    <disk name='sda' backup='no'/>
  </disks>
</domainbackup>
`,
    );
  });

  test('a full backup has no <incremental> and no per-disk mode, whatever fullDisks says', () => {
    const xml = pushBackupXml(targets, ['vda', 'vdb'], { fullDisks: ['vdb'] });
    expect(xml).toBe(pushBackupXml(targets, ['vda', 'vdb']));
    expect(xml).not.toMatch(/incremental|backupmode/);
  });
});

describe('checkpointCreateXml', () => {
  test("bitmap for the listed disks, an explicit 'no' for every other disk", () => {
    expect(checkpointCreateXml('vmbackup-1', ['vda'], ['vda', 'vdb', 'sda'])).toBe(
      `<domaincheckpoint>
  <name>vmbackup-1</name>
  <disks>
    <disk name='vda' checkpoint='bitmap'/>
    <disk name='vdb' checkpoint='no'/>
    <disk name='sda' checkpoint='no'/>
  </disks>
</domaincheckpoint>
`,
    );
  });
});

describe('parseCheckpointXml', () => {
  test('a root checkpoint (checkpoint-dumpxml --no-domain)', () => {
    expect(parseCheckpointXml(captured('checkpoint-dumpxml.c0.xml'))).toEqual({
      name: 'c0',
      creationTime: 1795998904,
      disks: [
        { name: 'vda', checkpoint: 'bitmap', bitmap: 'c0' },
        { name: 'vdb', checkpoint: 'no' },
      ],
    });
  });

  test('a child: its parent', () => {
    expect(parseCheckpointXml(captured('checkpoint-dumpxml.c1.xml'))).toMatchObject({ name: 'c1', parent: 'c0' });
  });

  test('--size: the changed bytes of a good bitmap; none for a bitmap broken by kill -9', () => {
    expect(parseCheckpointXml(captured('checkpoint-dumpxml.c1-size.xml')).disks).toEqual([
      { name: 'vda', checkpoint: 'bitmap', bitmap: 'c1', size: 1 << 20 },
      { name: 'vdb', checkpoint: 'no' },
    ]);
    expect(parseCheckpointXml(captured('checkpoint-dumpxml.c1-size-broken.xml')).disks[0]).toEqual({
      name: 'vda',
      checkpoint: 'bitmap',
      bitmap: 'c1',
    });
  });

  test('the <domain> copy checkpoint-dumpxml adds without --no-domain is ignored', () => {
    const withDomain = captured('checkpoint-dumpxml.c1.xml').replace(
      '</disks>',
      "</disks>\n  <domain type='qemu'><name>vm1</name><devices><disk type='file'><target dev='vdz'/></disk></devices></domain>",
    );
    expect(parseCheckpointXml(withDomain)).toEqual(parseCheckpointXml(captured('checkpoint-dumpxml.c1.xml')));
  });

  test('several documents printed one after the other (one virsh run)', () => {
    expect(parseCheckpointXmls(captured('checkpoint-dumpxml.batch.txt')).map((c) => [c.name, c.parent])).toEqual([
      ['c0', undefined],
      ['c1', 'c0'],
    ]);
    expect(parseCheckpointXmls('')).toEqual([]);
  });

  // A checkpoint XML comes back from a manifest on a target someone else may write.
  const hostile: Array<[string, string, RegExp]> = [
    ['not a checkpoint', '<domain><name>vm1</name></domain>', /not a checkpoint/],
    ['not XML', '<<<', /checkpoint XML/],
    [
      'a name libvirt would not take',
      '<domaincheckpoint><name>../x</name><creationTime>1</creationTime></domaincheckpoint>',
      /not a checkpoint name/,
    ],
    [
      'a parent with a slash',
      '<domaincheckpoint><name>c1</name><parent><name>a/b</name></parent><creationTime>1</creationTime></domaincheckpoint>',
      /parent "a\/b"/,
    ],
    ['no creation time', '<domaincheckpoint><name>c1</name></domaincheckpoint>', /no valid <creationTime>/],
    [
      'a creation time that is not a number',
      '<domaincheckpoint><name>c1</name><creationTime>1e9</creationTime></domaincheckpoint>',
      /no valid <creationTime>/,
    ],
    [
      'a disk named by path',
      "<domaincheckpoint><name>c1</name><creationTime>1</creationTime><disks><disk name='/etc/passwd'/></disks></domaincheckpoint>",
      /names a disk "\/etc\/passwd"/,
    ],
    [
      'a disk twice',
      "<domaincheckpoint><name>c1</name><creationTime>1</creationTime><disks><disk name='vda'/><disk name='vda' checkpoint='no'/></disks></domaincheckpoint>",
      /lists disk vda twice/,
    ],
    [
      'a bitmap name with quotes',
      "<domaincheckpoint><name>c1</name><creationTime>1</creationTime><disks><disk name='vda' bitmap=\"x' y\"/></disks></domaincheckpoint>",
      /names a bitmap/,
    ],
    [
      'an unknown checkpoint mode',
      "<domaincheckpoint><name>c1</name><creationTime>1</creationTime><disks><disk name='vda' checkpoint='all'/></disks></domaincheckpoint>",
      /checkpoint="all"/,
    ],
    [
      'two checkpoints',
      '<domaincheckpoint><name>a</name></domaincheckpoint><domaincheckpoint><name>b</name></domaincheckpoint>',
      /more than one/,
    ],
  ];
  test.each(hostile)('refuses %s', (_what, xml, message) => {
    let caught: unknown;
    try {
      parseCheckpointXml(xml);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(HypervisorError);
    expect(caught).toMatchObject({ kind: 'invalid', message });
  });
});

describe('checkpointRedefineXml', () => {
  test('name, parent, creation time and disks, nothing else; parses back to the same checkpoint', () => {
    const c1 = parseCheckpointXml(captured('checkpoint-dumpxml.c1.xml'));
    const xml = checkpointRedefineXml(c1);
    expect(xml).toBe(
      `<domaincheckpoint>
  <name>c1</name>
  <parent>
    <name>c0</name>
  </parent>
  <creationTime>1795998905</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='c1'/>
    <disk name='vdb' checkpoint='no'/>
  </disks>
</domaincheckpoint>
`,
    );
    expect(parseCheckpointXml(xml)).toEqual(c1);
  });

  test('a root: no <parent>', () => {
    const c0 = parseCheckpointXml(captured('checkpoint-dumpxml.c0.xml'));
    expect(checkpointRedefineXml(c0)).not.toContain('<parent>');
  });
});

describe('whole-VM state from the inactive XML', () => {
  const uuid = '0a11db1e-3da8-4327-b810-0c4e3d32c888';

  test('libvirt 9.0 UEFI + TPM domain: the NVRAM file and the swtpm state directory libvirt uses', () => {
    const xml = captured('dumpxml.uefi-tpm-vmstate.inactive.xml');
    expect(vmStateOf(xml)).toEqual({
      xml,
      name: 'vm-uefi',
      uuid,
      nvram: { path: '/tmp/vmcaptry/nvram.fd' },
      tpm: { version: '2.0', stateDir: `/var/lib/libvirt/swtpm/${uuid}` },
    });
  });

  test('a BIOS domain without a TPM has neither', () => {
    const state = vmStateOf(captured('dumpxml.inactive.xml'));
    expect(state.nvram).toBeUndefined();
    expect(state.tpm).toBeUndefined();
    expect(state.unsupportedTpm).toBeUndefined();
  });

  const domain = (os: string, devices: string): string =>
    `<domain type='qemu'><name>vm1</name><uuid>${uuid}</uuid><os><type>hvm</type>${os}</os><devices>${devices}</devices></domain>`;

  test('the newer <nvram type="file"><source file> form', () => {
    expect(parseVmStateXml(domain(`<nvram type='file'><source file='/var/lib/nv/vm1.fd'/></nvram>`, '')).nvram).toEqual(
      {
        path: '/var/lib/nv/vm1.fd',
      },
    );
    // a network-backed NVRAM is no file to read
    expect(
      parseVmStateXml(domain(`<nvram type='network'><source protocol='nbd' name='x'/></nvram>`, '')).nvram,
    ).toBeUndefined();
  });

  test('TPM: version 1.2 by default, a <source type="dir"> state directory, unsupported backends said why', () => {
    expect(vmStateOf(domain('', `<tpm model='tpm-tis'><backend type='emulator'/></tpm>`)).tpm).toEqual({
      version: '1.2',
      stateDir: `/var/lib/libvirt/swtpm/${uuid}`,
    });
    expect(
      vmStateOf(
        domain(
          '',
          `<tpm><backend type='emulator' version='2.0'><source type='dir' path='/srv/tpm/vm1'/></backend></tpm>`,
        ),
      ).tpm,
    ).toEqual({ version: '2.0', stateDir: '/srv/tpm/vm1' });
    const passthrough = vmStateOf(
      domain('', `<tpm><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>`),
    );
    expect(passthrough.tpm).toBeUndefined();
    expect(passthrough.unsupportedTpm).toMatch(/passthrough backend/);
    const oneFile = vmStateOf(
      domain('', `<tpm><backend type='emulator' version='2.0'><source type='file' path='/x'/></backend></tpm>`),
    );
    expect(oneFile.tpm).toBeUndefined();
    expect(oneFile.unsupportedTpm).toMatch(/file source/);
  });

  test('not a domain: the same error as parseDomainXml', () => {
    expect(() => parseVmStateXml('<network><name>x</name></network>')).toThrow(HypervisorError);
  });
});

describe('parseBackupJobXml (backup-dumpxml of a running job, read by recovery)', () => {
  const staging = '/var/lib/vmbackup/staging/vm1-20261130T150000Z-0a1b';

  test('a pull job: its unix socket and the scratch file of each backed-up disk', () => {
    expect(parseBackupJobXml(captured('backup-dumpxml.pull.xml'))).toEqual({
      mode: 'pull',
      transport: 'unix',
      socket: `${staging}/nbd/backup.sock`,
      disks: [{ name: 'vda', file: `${staging}/vda.scratch.qcow2` }],
    });
  });

  test('a push job: the target file of each backed-up disk', () => {
    expect(parseBackupJobXml(captured('backup-dumpxml.push.xml'))).toEqual({
      mode: 'push',
      disks: [{ name: 'vda', file: `${staging}/vda.qcow2` }],
    });
  });

  test('a TCP export has no socket; a relative or control-character path is left out, so no staging dir claims it', () => {
    const xml =
      "<domainbackup mode='pull'><server transport='tcp' name='0.0.0.0' port='10809'/><disks>" +
      "<disk name='vda'><scratch file='rel/vda.scratch.qcow2'/></disk>" +
      "<disk name='vdb'><scratch file='/s/vdb\u0007.scratch.qcow2'/></disk>" +
      "<disk name='vdc' type='block'><scratch dev='/dev/sdz'/></disk></disks></domainbackup>";
    expect(parseBackupJobXml(xml)).toEqual({
      mode: 'pull',
      transport: 'tcp',
      disks: [{ name: 'vda' }, { name: 'vdb' }, { name: 'vdc', file: '/dev/sdz' }],
    });
  });

  test('not one backup description: invalid, with one sentence', () => {
    const invalid = (xml: string) => {
      try {
        parseBackupJobXml(xml);
      } catch (err) {
        return err instanceof HypervisorError ? `${err.kind}: ${err.message}` : String(err);
      }
      return 'parsed';
    };
    expect(invalid('<domain><name>x</name></domain>')).toBe(
      'invalid: backup job XML without <domainbackup>: not a backup job',
    );
    expect(invalid("<domainbackup mode='copy'/>")).toBe('invalid: backup job XML has mode "copy"');
    expect(invalid("<domainbackup><disks><disk name='../x'/></disks></domainbackup>")).toBe(
      'invalid: backup job XML names a disk "../x": not a disk target such as vda',
    );
    expect(invalid("<domainbackup><disks><disk name='vda'/><disk name='vda'/></disks></domainbackup>")).toBe(
      'invalid: backup job XML lists disk vda twice',
    );
  });
});
