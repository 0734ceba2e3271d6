/**
 * The restore's domain-XML rewriter, on `virsh dumpxml --inactive` outputs of libvirt 9.0.0 (test/fixtures/virsh/:
 * dumpxml.inactive.xml, and dumpxml.uefi-tpm.inactive.xml, a q35 domain with OVMF, NVRAM, an emulated TPM and a
 * NIC defined and dumped on the test host) and on variants an attacker could store in a bucket.
 */
import { mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { HypervisorError } from '../../src/hypervisor/errors';
import { rewriteDomain, rewriteDomainXml } from '../../src/hypervisor/domain-xml';
import type { DomainRewrite } from '../../src/hypervisor/domain-xml';
import { parseDomainXml } from '../../src/hypervisor/xml';

const captured = (file: string): string => readFileSync(join(__dirname, '..', 'fixtures', 'virsh', file), 'utf8');
const BIOS = captured('dumpxml.inactive.xml');
/** OVMF's files in a directory of the test's own, so the test does not depend on the host's ovmf package */
const OVMF = mkdtempSync(join(tmpdir(), 'vmbt-res-ovmf-'));
writeFileSync(join(OVMF, 'OVMF_CODE_4M.fd'), 'code');
writeFileSync(join(OVMF, 'OVMF_VARS_4M.fd'), 'vars');
afterAll(() => rmSync(OVMF, { recursive: true, force: true }));
const UEFI = captured('dumpxml.uefi-tpm.inactive.xml').replace(/\/usr\/share\/OVMF/g, OVMF);
const NEW_UUID = '11111111-2222-4333-8444-555555555555';

/** vm1 (BIOS): vda and vdb restored (vdc, the nbd disk, is dropped from the XML by `withoutNbd`). */
function biosRewrite(over: Partial<DomainRewrite> = {}): DomainRewrite {
  return {
    name: 'vm1-restored',
    uuid: NEW_UUID,
    keepMacs: false,
    disks: {
      vda: { path: '/restore/vm1-restored/vda.qcow2', format: 'qcow2' },
      vdb: { path: '/restore/vm1-restored/vdb.raw', format: 'raw' },
    },
    logDir: '/restore/vm1-restored/logs',
    ...over,
  };
}

function uefiRewrite(over: Partial<DomainRewrite> = {}): DomainRewrite {
  return {
    name: 'vm2-restored',
    uuid: NEW_UUID,
    keepMacs: false,
    disks: { vda: { path: '/restore/vm2-restored/vda.qcow2', format: 'qcow2' } },
    nvramPath: '/var/lib/libvirt/qemu/nvram/vm2-restored_VARS.fd',
    logDir: '/restore/vm2-restored/logs',
    bootDirs: [OVMF],
    ...over,
  };
}

/** the BIOS fixture without its nbd disk (a network disk vmbackup does not back up) */
const withoutNbd = (xml: string): string => xml.replace(/<disk type='network'[\s\S]*?<\/disk>\s*/, '');

/** the UEFI fixture with `fragment` added to <devices> */
const withDevice = (fragment: string, xml = UEFI): string => xml.replace('</devices>', `${fragment}\n  </devices>`);

/** the one-sentence 'invalid' error a rewrite throws */
function refusal(fn: () => unknown): HypervisorError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(HypervisorError);
    const e = err as HypervisorError;
    expect(e.kind).toBe('invalid');
    expect(e.permanent).toBe(true);
    // one sentence: no line break, no stack, no trailing second sentence
    expect(e.message).not.toMatch(/\n/);
    expect(e.message).not.toMatch(/\.\s+[A-Z]/);
    return e;
  }
  throw new Error('the rewrite did not refuse the XML');
}

describe('rewriteDomainXml: what a restored definition gets', () => {
  test('new name and UUID; everything else of the domain is as it was', () => {
    const out = rewriteDomainXml(withoutNbd(BIOS), 'vm1', biosRewrite());
    const parsed = parseDomainXml(out);
    expect(parsed.name).toBe('vm1-restored');
    expect(parsed.uuid).toBe(NEW_UUID);
    expect(out).not.toContain('a262314e-2657-4e6c-bed3-f33410a978d0');
    // untouched parts are kept, in order
    for (const kept of [
      `<memory unit="KiB">131072</memory>`,
      `<type arch="x86_64" machine="pc-i440fx-7.2">hvm</type>`,
      `<model fallback="forbid">qemu64</model>`,
      `<address type="pci" domain="0x0000" bus="0x00" slot="0x04" function="0x0"/>`,
      `<label>+0:+0</label>`,
      `<target dev="sda" bus="sata"/>`,
    ]) {
      expect(out).toContain(kept);
    }
    expect(out.indexOf('<memory')).toBeLessThan(out.indexOf('<devices>'));
    expect(out.indexOf('<devices>')).toBeLessThan(out.indexOf('<seclabel'));
  });

  test("every backed-up disk's source and driver type are the restored file's; backing chains are dropped", () => {
    const live = withoutNbd(BIOS).replace(
      "<source file='/VM/vda.qcow2'/>",
      "<source file='/VM/vda.qcow2' index='2'/><backingStore type='file' index='3'><format type='qcow2'/><source file='/VM/base.qcow2'/><backingStore/></backingStore>",
    );
    const rewrite = biosRewrite({
      disks: {
        vda: { path: '/restore/x/vda.raw', format: 'raw' },
        vdb: { path: '/restore/x/vdb.qcow2', format: 'qcow2' },
      },
    });
    const parsed = parseDomainXml(rewriteDomainXml(live, 'vm1', rewrite));
    const byDev = Object.fromEntries(parsed.disks.map((d) => [d.target, d]));
    expect(byDev['vda']).toMatchObject({ type: 'file', source: '/restore/x/vda.raw', format: 'raw' });
    expect(byDev['vda']?.backingChain).toBeUndefined();
    expect(byDev['vdb']).toMatchObject({
      type: 'file',
      source: '/restore/x/vdb.qcow2',
      format: 'qcow2',
      shareable: true,
    });
    expect(rewriteDomainXml(live, 'vm1', rewrite)).not.toContain('/VM/');
  });

  test('a block disk that was backed up becomes a file disk; a disk without <driver> gets one', () => {
    const xml = withoutNbd(BIOS).replace(
      "<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='/VM/vda.qcow2'/>",
      "<disk type='block' device='disk'>\n      <source dev='/dev/vg0/vm1'/>",
    );
    expect(xml).toContain('/dev/vg0/vm1');
    const parsed = parseDomainXml(rewriteDomainXml(xml, 'vm1', biosRewrite()));
    expect(parsed.disks.find((d) => d.target === 'vda')).toMatchObject({
      type: 'file',
      source: '/restore/vm1-restored/vda.qcow2',
      format: 'qcow2',
    });
  });

  test('a cdrom that was not backed up stays, ejected', () => {
    const r = rewriteDomain(withoutNbd(BIOS), 'vm1', biosRewrite());
    const cdrom = parseDomainXml(r.xml).disks.find((d) => d.target === 'sda');
    expect(cdrom).toMatchObject({ device: 'cdrom', type: 'file', readonly: true });
    expect(cdrom?.source).toBeUndefined();
    expect(r.ejected).toEqual(['sda: /VM/cdrom.iso']);
  });

  test('MACs are left out (libvirt picks new ones) unless keepMacs', () => {
    const fresh = rewriteDomainXml(UEFI, 'vm2', uefiRewrite());
    expect(fresh).not.toContain('52:54:00:e0:05:41');
    expect(fresh).not.toContain('<mac');
    expect(fresh).toMatch(/<interface type="network">\s*<source network="default"\/>/);
    const kept = rewriteDomainXml(UEFI, 'vm2', uefiRewrite({ keepMacs: true }));
    expect(kept).toContain(`<mac address="52:54:00:e0:05:41"/>`);
  });

  test('the NVRAM is the restored file; loader and template are kept; the TPM stays an emulated one', () => {
    const r = rewriteDomain(UEFI, 'vm2', uefiRewrite());
    expect(r.xml).toContain(
      `<nvram template="${OVMF}/OVMF_VARS_4M.fd">/var/lib/libvirt/qemu/nvram/vm2-restored_VARS.fd</nvram>`,
    );
    expect(r.xml).not.toContain('/var/lib/libvirt/qemu/nvram/vm2_VARS.fd');
    expect(r.xml).toContain(`<loader readonly="yes" type="pflash">${OVMF}/OVMF_CODE_4M.fd</loader>`);
    expect(r.xml).toMatch(/<tpm model="tpm-crb">\s*<backend type="emulator" version="2.0"\/>/);
    expect(r.keptHostFiles).toEqual([`${OVMF}/OVMF_CODE_4M.fd`, `${OVMF}/OVMF_VARS_4M.fd`]);
    // the same firmware is refused without the operator's word for its directory
    expect(refusal(() => rewriteDomainXml(UEFI, 'vm2', uefiRewrite({ bootDirs: [] }))).message).toMatch(
      /keeps the firmware .* which is outside those directories: a restored definition may keep host files only from \/usr\/share, /,
    );
  });

  test('without a restored NVRAM the <nvram> names no file (libvirt makes one for the new name from the template)', () => {
    const out = rewriteDomainXml(UEFI, 'vm2', uefiRewrite({ nvramPath: undefined }));
    expect(out).toContain(`<nvram template="${OVMF}/OVMF_VARS_4M.fd"/>`);
    expect(out).not.toContain('vm2_VARS.fd');
  });

  test('file-backed serial and console logs move to logDir (the console mirrors serial 0: same file)', () => {
    const r = rewriteDomain(UEFI, 'vm2', uefiRewrite());
    expect(r.xml).not.toContain('/VM/serial.log');
    expect(r.xml.match(/<source path="\/restore\/vm2-restored\/logs\/serial0.log"\/>/g)).toHaveLength(2);
    expect(r.logFiles).toEqual(['/restore/vm2-restored/logs/serial0.log']);
  });

  test('the emulator path is left to libvirt; a virtio channel socket path too; genid and sysinfo UUID renewed', () => {
    const xml = UEFI.replace(
      "<channel type='unix'>",
      "<channel type='unix'>\n      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm2/org.qemu.guest_agent.0'/>",
    )
      .replace('<memory ', '<genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>\n  <memory ')
      .replace(
        '<os>',
        "<sysinfo type='smbios'><system><entry name='uuid'>d0a39262-0f0f-4df9-aae1-9d507ecf9cb2</entry><entry name='serial'>/S/1</entry></system></sysinfo>\n  <os>",
      );
    const out = rewriteDomainXml(xml, 'vm2', uefiRewrite());
    expect(out).not.toContain('<emulator>');
    expect(out).toContain(`<source mode="bind"/>`);
    expect(out).toContain('<genid/>');
    expect(out).toContain(`<entry name="uuid">${NEW_UUID}</entry>`);
    expect(out).toContain(`<entry name="serial">/S/1</entry>`);
  });

  test('comments, a description and XML escaping survive', () => {
    const xml = withoutNbd(BIOS)
      .replace(
        '<memory ',
        `<!-- kept as it was -->\n  <description>db &amp; "web" &lt;prod&gt; &#233;t&#xE9;</description>\n  <memory `,
      )
      .replace("<source file='/VM/cdrom.iso'/>", "<source file='/VM/a &amp; b&apos;s.iso'/>");
    const rewrite = biosRewrite({
      disks: { ...biosRewrite().disks, vda: { path: `/restore/it's & <x>/vda.qcow2`, format: 'qcow2' } },
    });
    const r = rewriteDomain(xml, 'vm1', rewrite);
    expect(r.xml).toContain('<!-- kept as it was -->');
    expect(r.xml).toContain('<description>db &amp; "web" &lt;prod&gt; été</description>');
    expect(r.ejected).toContain("sda: /VM/a & b's.iso");
    // what libvirt will parse back is the path given, character for character
    expect(parseDomainXml(r.xml).disks.find((d) => d.target === 'vda')?.source).toBe(`/restore/it's & <x>/vda.qcow2`);
  });

  test('a kernel and initrd kept from an operator-given boot directory (the test guest direct-boots from the state dir)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmbt-res-boot-'));
    try {
      writeFileSync(join(dir, 'vmlinuz'), 'k');
      writeFileSync(join(dir, 'initrd.gz'), 'i');
      const xml = withoutNbd(BIOS).replace(
        "<boot dev='hd'/>",
        `<kernel>${dir}/vmlinuz</kernel><initrd>${dir}/initrd.gz</initrd><cmdline>console=ttyS0 root=/dev/vda</cmdline>`,
      );
      const r = rewriteDomain(xml, 'vm1', biosRewrite({ bootDirs: [dir] }));
      expect(r.xml).toContain(`<kernel>${dir}/vmlinuz</kernel>`);
      expect(r.xml).toContain('<cmdline>console=ttyS0 root=/dev/vda</cmdline>');
      expect(r.keptHostFiles).toEqual([`${dir}/vmlinuz`, `${dir}/initrd.gz`]);
      // without the operator's word the same kernel is refused
      expect(refusal(() => rewriteDomainXml(xml, 'vm1', biosRewrite())).message).toMatch(/kernel .*vmlinuz.*outside/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('rewriteDomainXml: what it refuses, in one sentence', () => {
  const bios =
    (xml: string, over: Partial<DomainRewrite> = {}) =>
    () =>
      rewriteDomainXml(xml, 'vm1', biosRewrite(over));
  const uefi =
    (xml: string, over: Partial<DomainRewrite> = {}) =>
    () =>
      rewriteDomainXml(xml, 'vm2', uefiRewrite(over));

  test.each([
    ['truncated', withoutNbd(BIOS).slice(0, 400)],
    ['not XML', 'this is not XML'],
    ['an empty file', ''],
    ['two roots', `${withoutNbd(BIOS)}<domain/>`],
    ['a repeated attribute', withoutNbd(BIOS).replace("<domain type='qemu'>", "<domain type='qemu' type='kvm'>")],
    ['an unknown entity', withoutNbd(BIOS).replace('<name>vm1</name>', '<name>vm1&foo;</name>')],
  ])('malformed XML (%s)', (_what, xml) => {
    expect(refusal(bios(xml)).message).toMatch(/malformed|not one <domain>/);
  });

  test('a DOCTYPE (entities could expand to anything)', () => {
    const xml = `<!DOCTYPE domain [<!ENTITY e "/etc/shadow">]>\n${withoutNbd(BIOS).replace("<source file='/VM/cdrom.iso'/>", '<source file="&e;"/>')}`;
    expect(refusal(bios(xml)).message).toBe('the stored domain XML has a DOCTYPE, which libvirt never writes');
  });

  test('an XML whose <name> is another domain', () => {
    expect(refusal(() => rewriteDomainXml(withoutNbd(BIOS), 'vm9', biosRewrite())).message).toBe(
      'the stored domain XML is the definition of "vm1", not of vm9 whose backup it is in',
    );
  });

  test('qemu:commandline, under any prefix or as a default namespace', () => {
    const ns = `xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'`;
    const cmd = withoutNbd(BIOS)
      .replace("<domain type='qemu'>", `<domain type='qemu' ${ns}>`)
      .replace('</domain>', `  <qemu:commandline><qemu:arg value='-runas'/></qemu:commandline>\n</domain>`);
    expect(refusal(bios(cmd)).message).toMatch(/QEMU namespace/);
    const other = withoutNbd(BIOS).replace(
      '</domain>',
      `  <x:commandline xmlns:x='http://libvirt.org/schemas/domain/qemu/1.0'><x:arg value='-x'/></x:commandline>\n</domain>`,
    );
    expect(refusal(bios(other)).message).toMatch(/QEMU namespace/);
    const dflt = withoutNbd(BIOS).replace(
      '</domain>',
      `  <commandline xmlns='http://libvirt.org/schemas/domain/qemu/1.0'><arg value='-x'/></commandline>\n</domain>`,
    );
    expect(refusal(bios(dflt)).message).toMatch(/QEMU namespace/);
    const foreign = withoutNbd(BIOS).replace('</domain>', `  <lxc:namespace xmlns:lxc='urn:x'/>\n</domain>`);
    expect(refusal(bios(foreign)).message).toMatch(/<lxc:namespace>, an element of a hypervisor namespace/);
  });

  test('namespaced elements inside <metadata> are kept (libosinfo and others write them there)', () => {
    const xml = withoutNbd(BIOS).replace(
      '<memory ',
      `<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'><libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo></metadata>\n  <memory `,
    );
    expect(rewriteDomainXml(xml, 'vm1', biosRewrite())).toContain('<libosinfo:os id="http://debian.org/debian/12"/>');
  });

  test('an ethernet interface with a script', () => {
    const xml = withDevice(`<interface type='ethernet'><script path='/tmp/own.sh'/><model type='virtio'/></interface>`);
    expect(refusal(uefi(xml)).message).toBe(
      'the stored domain XML has an <interface> with a <script>, which libvirt would run as root on the host',
    );
  });

  test.each([
    [
      'a hostdev',
      `<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>`,
      /passes a host device through \(<hostdev>\)/,
    ],
    [
      'a filesystem passthrough',
      `<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>`,
      /shares a host directory/,
    ],
    [
      'a hostdev interface',
      `<interface type='hostdev'><source><address type='pci' domain='0' bus='1' slot='0' function='0'/></source></interface>`,
      /interface type="hostdev".*host device/,
    ],
    [
      'a vhost-user NIC',
      `<interface type='vhostuser'><source type='unix' path='/run/x.sock' mode='server'/></interface>`,
      /vhost-user socket/,
    ],
    [
      'a TPM passthrough',
      `<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>`,
      /TPM of backend type "passthrough"/,
    ],
    [
      'an rng reading a host file',
      `<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>`,
      /random number generator from "\/etc\/shadow"/,
    ],
    [
      'a serial on a host tty',
      `<serial type='dev'><source path='/dev/ttyS0'/><target port='1'/></serial>`,
      /<serial> of type "dev"/,
    ],
    [
      'a channel into libvirtd',
      `<channel type='unix'><source mode='connect' path='/run/libvirt/libvirt-sock'/><target type='virtio' name='x'/></channel>`,
      /connects a <channel> to the host socket/,
    ],
    [
      'a serial into a local TCP service',
      `<serial type='tcp'><source mode='connect' host='127.0.0.1' service='7233'/><target port='1'/></serial>`,
      /connects a <serial> to a tcp address/,
    ],
    [
      'an evdev input',
      `<input type='evdev'><source dev='/dev/input/event0'/></input>`,
      /host path "\/dev\/input\/event0"/,
    ],
    ['an audio file', `<audio id='2' type='file' path='/etc/cron.d/x'/>`, /host path "\/etc\/cron.d\/x"/],
    [
      'an nvdimm on a host file',
      `<memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>524288</size></target></memory>`,
      /host path "\/etc\/shadow"/,
    ],
    [
      'an option ROM from a host file',
      `<interface type='network'><source network='default'/><rom file='/etc/shadow'/></interface>`,
      /option ROM.*"\/etc\/shadow".*outside/,
    ],
    ['an unknown device', `<frobnicator path='x'/>`, /<frobnicator> device, which vmbackup does not restore/],
  ])('%s', (_what, fragment, message) => {
    expect(refusal(uefi(withDevice(fragment))).message).toMatch(message);
  });

  test('a block or network disk that was not restored', () => {
    expect(refusal(bios(BIOS)).message).toBe(
      'the stored domain XML has disk vdc (network export) that was not restored: a restored definition keeps only the disks it restored and empty cdrom or floppy drives',
    );
    const block = withDevice(
      `<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdz' bus='virtio'/></disk>`,
    );
    expect(refusal(uefi(block)).message).toMatch(
      /^the stored domain XML has disk vdz \(block \/dev\/sdz\) that was not restored/,
    );
    // a file disk left out of the backup would be shared by two domains
    expect(refusal(bios(withoutNbd(BIOS), { disks: { vda: biosRewrite().disks['vda']! } })).message).toMatch(
      /disk vdb \(file \/VM\/vdb.raw\) that was not restored/,
    );
  });

  test('a disk the backup holds that the XML does not have', () => {
    const disks = { ...uefiRewrite().disks, vdq: { path: '/restore/vdq.qcow2', format: 'qcow2' as const } };
    expect(refusal(uefi(UEFI, { disks })).message).toBe(
      'the stored domain XML has no disk vdq, which the backup holds',
    );
  });

  test('a kernel, loader or template from outside the boot directories, or missing', () => {
    expect(refusal(uefi(UEFI.replace(`${OVMF}/OVMF_CODE_4M.fd`, '/etc/shadow'))).message).toMatch(
      /^the stored domain XML keeps the firmware "\/etc\/shadow", which is outside those directories: /,
    );
    expect(refusal(uefi(UEFI.replace(`${OVMF}/OVMF_VARS_4M.fd`, `${OVMF}/../../etc/shadow`))).message).toMatch(
      /NVRAM template .* is not a plain absolute path/,
    );
    expect(refusal(uefi(UEFI.replace(`${OVMF}/OVMF_CODE_4M.fd`, `${OVMF}/nope.fd`))).message).toBe(
      `the stored domain XML keeps the firmware "${OVMF}/nope.fd", which does not exist on this host`,
    );
    expect(refusal(uefi(UEFI.replace("readonly='yes' ", ''))).message).toMatch(/writable firmware/);
    const dir = mkdtempSync(join(tmpdir(), 'vmbt-res-boot-'));
    try {
      symlinkSync('/etc/passwd', join(dir, 'vmlinuz'));
      const xml = UEFI.replace("<boot dev='hd'/>", `<kernel>${dir}/vmlinuz</kernel>`);
      expect(refusal(uefi(xml, { bootDirs: [OVMF, dir] })).message).toMatch(/leads to \/etc\/passwd, outside/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a kernel that is a file this restore writes', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vmbt-res-boot-'));
    try {
      writeFileSync(join(dir, 'vda.qcow2'), 'x');
      const xml = UEFI.replace("<boot dev='hd'/>", `<kernel>${dir}/vda.qcow2</kernel>`);
      const over = {
        bootDirs: [OVMF, dir],
        disks: { vda: { path: join(dir, 'vda.qcow2'), format: 'qcow2' as const } },
      };
      expect(refusal(uefi(xml, over)).message).toMatch(/is a file this restore writes/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('any other host path the rules do not know', () => {
    const xml = UEFI.replace('<on_poweroff>', '<bootloader>/usr/bin/pygrub</bootloader>\n  <on_poweroff>');
    expect(refusal(uefi(xml)).message).toBe(
      'the stored domain XML names the host path "/usr/bin/pygrub" in <domain><bootloader>, which a restore does not keep',
    );
  });

  test('a file-backed serial with no log directory given', () => {
    expect(refusal(uefi(UEFI, { logDir: undefined })).message).toBe(
      'the stored domain XML has a file-backed <serial> and no directory was given for its new log',
    );
  });

  test('a backup with an NVRAM file whose XML has no <nvram>', () => {
    expect(refusal(bios(withoutNbd(BIOS), { nvramPath: '/var/lib/libvirt/qemu/nvram/x_VARS.fd' })).message).toBe(
      'the backup holds an NVRAM file but its stored domain XML has no <nvram>',
    );
  });

  test('a bad new name or UUID', () => {
    expect(refusal(bios(withoutNbd(BIOS), { name: '../x' })).message).toBe('"../x" is not a domain name');
    expect(refusal(bios(withoutNbd(BIOS), { uuid: 'x' })).message).toBe('"x" is not a UUID');
  });
});
