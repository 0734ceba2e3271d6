/** Domain XML parsing against `virsh dumpxml` outputs captured from libvirt 9.0.0 (test/fixtures/virsh/). */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { HypervisorError } from '../../src/hypervisor/errors';
import { escapeXmlAttr, parseDomainXml, pushBackupXml } from '../../src/hypervisor/xml';

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

  test('not a domain', () => {
    expect(() => parseDomainXml('<network><name>default</name></network>')).toThrow(HypervisorError);
    expect(() => parseDomainXml('')).toThrow(/not a domain/);
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
