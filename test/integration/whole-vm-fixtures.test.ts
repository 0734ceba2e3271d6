/**
 * The fixtures whole-VM tests stand on (issue #14): the tiny guest's boot marker (written on a fresh disk,
 * found again on the next boot from the same disk), and a UEFI + TPM domain running under TCG with its NVRAM
 * file and swtpm state, both removed by the fixture's cleanup.
 */
import { open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { execTool } from '../../src/hypervisor/exec';
import { GUEST_MARKER_OFFSET_MIB } from '../fixtures/guest';
import { OVMF_CODE, OVMF_VARS_TEMPLATE, createFixtureDomain, useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, stackEnv } from '../helpers/stack';

const MiB = 1 << 20;

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** The first line of the marker sector of a raw disk image. */
async function markerSector(rawImage: string): Promise<string> {
  const fh = await open(rawImage, 'r');
  try {
    const buf = Buffer.alloc(512);
    await fh.read(buf, 0, 512, GUEST_MARKER_OFFSET_MIB * MiB);
    return buf.toString('latin1').split('\n')[0]!;
  } finally {
    await fh.close();
  }
}

/** The command line of the domain's running QEMU (libvirt's pid file). */
async function qemuCommandLine(name: string): Promise<string> {
  const pid = (await readFile(`/run/libvirt/qemu/${name}.pid`, 'utf8')).trim();
  return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').join(' ');
}

describe('whole-VM fixtures', () => {
  const newDomain = useFixtureDomains();

  test('the guest writes its boot marker on a fresh disk and finds the same one on the next boot', async () => {
    const dom = await newDomain({ prefix: 'capmark', guest: true, disks: [{ format: 'raw', sizeMiB: 64 }] });
    const first = await dom.waitForMarker();
    expect(first.kind).toBe('written');
    expect(first.id).toMatch(/^[0-9a-f]{16}$/);
    await dom.waitForGuestWrites(1); // the marker was written (fsync) before the first chunk
    expect(await markerSector(dom.disks[0]!.path)).toBe(`VMBT-MARK ${first.id}`);

    await dom.destroy();
    await dom.start();
    const again = await dom.waitForMarker(); // the marker line of this boot
    expect(again).toEqual({ kind: 'found', id: first.id });
    expect(await markerSector(dom.disks[0]!.path)).toBe(`VMBT-MARK ${first.id}`);
  });

  test('a UEFI + TPM guest boots under TCG with its NVRAM and swtpm state; cleanup removes both', async () => {
    await requireLibvirt();
    const dom = await createFixtureDomain({
      prefix: 'capuefi',
      guest: true,
      uefi: true,
      tpm: true,
      disks: [{ format: 'qcow2', sizeMiB: 64 }],
    });
    let cleaned = false;
    try {
      expect(await dom.state()).toBe('running');
      const live = (await execTool('virsh', ['-c', stackEnv().libvirt.uri, 'dumpxml', dom.name])).stdout;
      expect(live).toContain(`<loader readonly='yes' type='pflash'>${OVMF_CODE}</loader>`);
      expect(live).toContain(`<nvram template='${OVMF_VARS_TEMPLATE}'>${dom.nvramPath}</nvram>`);
      expect(live).toMatch(/<tpm model='tpm-crb'>\s*<backend type='emulator' version='2.0'/);

      expect(dom.nvramPath).toBe(join(dom.dir, 'nvram.fd'));
      expect((await stat(dom.nvramPath!)).size).toBe((await stat(OVMF_VARS_TEMPLATE)).size);
      expect(dom.tpmStateDir).toBe(`/var/lib/libvirt/swtpm/${dom.uuid}`);
      expect((await stat(join(dom.tpmStateDir!, 'tpm2', 'tpm2-00.permall'))).size).toBeGreaterThan(0);

      // OVMF boots the guest's kernel (its EFI stub)
      expect((await dom.waitForMarker()).kind).toBe('written');
      // QEMU is given the firmware, the NVRAM and swtpm's socket
      const cmdline = await qemuCommandLine(dom.name);
      expect(cmdline).toContain(OVMF_CODE);
      expect(cmdline).toContain(dom.nvramPath!);
      expect(cmdline).toMatch(/-tpmdev emulator/);
      expect(cmdline).toMatch(/tpm-crb/);
      // OVMF wrote its variables (boot entries) into the domain's own NVRAM file, not the template
      expect((await readFile(dom.nvramPath!)).equals(await readFile(OVMF_VARS_TEMPLATE))).toBe(false);

      await dom.cleanup();
      cleaned = true;
      expect(await exists(dom.tpmStateDir!)).toBe(false);
      expect(await exists(dom.dir)).toBe(false);
      const list = await execTool('virsh', ['-c', stackEnv().libvirt.uri, 'list', '--all', '--name']);
      expect(list.stdout.split('\n')).not.toContain(dom.name);
    } finally {
      if (!cleaned) await dom.cleanup();
    }
  });
});
