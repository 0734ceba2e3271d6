/**
 * The libvirt push-backup path end to end on the real stack: a running domain, an explicit qcow2
 * target, the completed job's statistics, and the image equal to the source (qemu-img compare -U).
 * Fails (not skips) when libvirt is not reachable.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { compareImages } from '../../src/hypervisor/qemu-img';
import { createVirshHypervisor } from '../../src/hypervisor/virsh';
import type { JobInfo } from '../../src/hypervisor/port';
import { useFixtureDomains } from '../fixtures/domains';
import { requireLibvirt, stackEnv } from '../helpers/stack';

const FINAL = new Set(['Completed', 'Failed', 'Cancelled']);

describe('libvirt push backup (smoke)', () => {
  const newDomain = useFixtureDomains();
  const hv = createVirshHypervisor({ uri: stackEnv().libvirt.uri });
  afterAll(() => hv.close()); // its virsh shells would outlive this file inside jest's process

  beforeAll(async () => {
    await requireLibvirt();
  });

  test('backs up a running domain to an explicit target equal to its disk', async () => {
    const dom = await newDomain({
      prefix: 'smoke',
      disks: [{ format: 'qcow2', sizeMiB: 64, patterns: [{ byte: 0xab, offsetMiB: 0, lengthMiB: 8 }] }],
    });
    const vda = dom.disks[0]!;
    const target = join(dom.dir, 'backup-vda.qcow2'); // removed with the domain

    await hv.beginPushBackup(dom.name, [{ disk: 'vda', file: target }]);

    let done: JobInfo = { type: 'None' };
    for (let i = 0; i < 600 && !FINAL.has(done.type); i++) {
      if ((await hv.jobInfo(dom.name)).type === 'None') done = await hv.completedJobInfo(dom.name);
      if (!FINAL.has(done.type)) await new Promise((r) => setTimeout(r, 100));
    }
    expect(done).toMatchObject({ type: 'Completed', operation: 'Backup', dataTotal: 64 << 20 });
    expect(done.dataProcessed).toBe(done.dataTotal);

    expect((await stat(target)).isFile()).toBe(true);
    expect(await compareImages(vda.path, target)).toBe(true);
    expect(await dom.state()).toBe('running');
  });
});
