/**
 * The hypervisor port (src/hypervisor/port.ts) of a simulated host, for the scale simulation: every VM is a running
 * domain with one qcow2 disk, and a push backup is a job that "runs" for a set time and leaves a real (tiny) qcow2
 * image where libvirt would have written it. The activities and workflows above it are vmbackup's own, unchanged:
 * they still check paths, run `qemu-img check`/`info`, hash, rename into the target and write manifests.
 *
 * Only push mode is simulated (what a current host uses); the snapshot-method calls throw.
 */
import { copyFile } from 'node:fs/promises';
import { HypervisorError } from '../../src/hypervisor/errors';
import type {
  BackupTargetSpec,
  BlockJobInfo,
  Checkpoint,
  CheckpointBitmapState,
  Hypervisor,
  JobInfo,
  PushBackupOptions,
} from '../../src/hypervisor/port';
import type { DiskInfo, DomainInfo, DomainState } from '../../src/shared/types';

export interface FakeHostOptions {
  /** the domains of this host */
  domains: string[];
  /** a small qcow2 file every "backup image" is copied from */
  templateImage: string;
  /** bytes of that image's virtual disk */
  virtualSize: number;
  /** how long each backup job runs, ms (the caller's distribution; called once per job) */
  jobMs: (domain: string) => number;
}

interface Job {
  startedAt: number;
  endsAt: number;
  total: number;
  aborted: boolean;
}

const LIBVIRT = '9.0.0';
const QEMU = '7.2.0';

export interface FakeHypervisor extends Hypervisor {
  /** backup jobs begun so far (all domains) */
  jobsBegun(): number;
  /** jobs running now */
  jobsRunning(): number;
  close(): void;
}

export function createFakeHypervisor(opts: FakeHostOptions): FakeHypervisor {
  const known = new Set(opts.domains);
  const jobs = new Map<string, Job>();
  const completed = new Map<string, Job>();
  const checkpoints = new Map<string, Map<string, Checkpoint>>();
  let begun = 0;

  const notFound = (domain: string) => new HypervisorError('not-found', `failed to get domain '${domain}'`, { domain });
  const noCheckpoint = (domain: string, name: string) =>
    new HypervisorError('checkpoint-not-found', `no domain checkpoint with matching name '${name}'`, {
      domain,
      checkpoint: name,
    });
  const need = (domain: string) => {
    if (!known.has(domain)) throw notFound(domain);
  };
  const disk = (domain: string): DiskInfo => ({
    name: 'vda',
    source: `/var/lib/libvirt/images/${domain}.qcow2`,
    format: 'qcow2',
    device: 'disk',
    readonly: false,
    shareable: false,
    virtualSize: opts.virtualSize,
    allocation: opts.virtualSize,
    backingChain: [],
  });
  const cps = (domain: string) => {
    let m = checkpoints.get(domain);
    if (!m) checkpoints.set(domain, (m = new Map()));
    return m;
  };
  const running = (domain: string): Job | undefined => {
    const job = jobs.get(domain);
    if (job && !job.aborted && Date.now() >= job.endsAt) {
      jobs.delete(domain);
      completed.set(domain, job);
      return undefined;
    }
    return job?.aborted ? undefined : job;
  };
  const unsupported = (what: string) => async (): Promise<never> => {
    throw new Error(`the scale simulation simulates push backups only (${what})`);
  };

  return {
    jobsBegun: () => begun,
    jobsRunning: () => [...jobs.keys()].filter((d) => running(d)).length,
    close: () => undefined,

    versions: async () => ({ libvirt: LIBVIRT, qemu: QEMU }),
    // `--all --host H`: a scheduled run lists the host's domains first
    listDomains: async () => [...known].sort(),
    async inspect(domain: string): Promise<DomainInfo> {
      need(domain);
      return {
        domain,
        uuid: '00000000-0000-4000-8000-000000000000',
        state: 'running',
        disks: [disk(domain)],
        skipped: [],
        libvirtVersion: LIBVIRT,
        qemuVersion: QEMU,
        backupApi: true,
        hasGuestAgent: false,
      };
    },
    async state(domain: string): Promise<DomainState> {
      need(domain);
      return 'running';
    },
    async disks(domain: string) {
      need(domain);
      return [disk(domain)];
    },
    async domainXml(domain: string) {
      need(domain);
      return `<domain type='qemu'><name>${domain}</name></domain>`;
    },

    // a simulated VM is a definition only: no NVRAM, no TPM
    async vmState(domain: string) {
      need(domain);
      const xml = `<domain type='qemu'><name>${domain}</name><uuid>00000000-0000-4000-8000-000000000000</uuid></domain>`;
      return { xml, name: domain, uuid: '00000000-0000-4000-8000-000000000000' };
    },

    beginPullBackup(domain: string): Promise<void> {
      // the scale bench measures push backups only
      return Promise.reject(new HypervisorError('invalid', `pull backups are not simulated (${domain})`, { domain }));
    },
    async beginPushBackup(domain: string, targets: BackupTargetSpec[], o?: PushBackupOptions): Promise<void> {
      need(domain);
      if (running(domain)) throw new HypervisorError('busy', 'domain has active block job', { domain });
      // libvirt creates every target file when the job starts; QEMU fills it while it runs
      await Promise.all(targets.map((t) => copyFile(opts.templateImage, t.file)));
      if (o?.checkpoint) {
        const parent = [...cps(domain).values()].at(-1)?.name;
        cps(domain).set(o.checkpoint.name, {
          name: o.checkpoint.name,
          ...(parent ? { parent } : {}),
          creationTime: Math.floor(Date.now() / 1000),
          disks: [{ name: 'vda', checkpoint: 'bitmap', bitmap: o.checkpoint.name }],
        });
      }
      const now = Date.now();
      jobs.set(domain, { startedAt: now, endsAt: now + opts.jobMs(domain), total: opts.virtualSize, aborted: false });
      begun++;
    },
    async jobInfo(domain: string): Promise<JobInfo> {
      need(domain);
      const job = running(domain);
      if (!job) return { type: 'None' };
      const done = Math.min(1, (Date.now() - job.startedAt) / Math.max(1, job.endsAt - job.startedAt));
      return {
        type: 'Unbounded',
        operation: 'Backup',
        dataProcessed: Math.round(done * job.total),
        dataTotal: job.total,
        timeElapsedMs: Date.now() - job.startedAt,
      };
    },
    async completedJobInfo(domain: string): Promise<JobInfo> {
      need(domain);
      running(domain);
      const job = completed.get(domain);
      if (!job) return { type: 'None' };
      return {
        type: job.aborted ? 'Cancelled' : 'Completed',
        operation: 'Backup',
        dataProcessed: job.total,
        dataTotal: job.total,
        timeElapsedMs: job.endsAt - job.startedAt,
      };
    },
    async abortJob(domain: string): Promise<void> {
      need(domain);
      const job = jobs.get(domain);
      if (job) {
        job.aborted = true;
        jobs.delete(domain);
        completed.set(domain, job);
      }
    },
    // the fake's jobs write no files: recovery has nothing to attribute to a backup, and leaves them alone
    async backupJob(domain: string) {
      need(domain);
      return undefined;
    },

    createOverlays: unsupported('createOverlays'),
    defineDomain: unsupported('defineDomain'),
    startDomain: unsupported('startDomain'),
    undefineDomain: unsupported('undefineDomain'),
    startActiveCommit: unsupported('startActiveCommit'),
    async blockJobInfo(): Promise<BlockJobInfo> {
      return { cur: 0, end: 0, ready: false };
    },
    pivot: unsupported('pivot'),
    abortBlockJob: unsupported('abortBlockJob'),
    startBlockPull: unsupported('startBlockPull'),
    removeDomain: unsupported('removeDomain'),

    async listCheckpoints(domain: string): Promise<Checkpoint[]> {
      need(domain);
      return [...cps(domain).values()];
    },
    async checkpointXml(domain: string, name: string): Promise<string> {
      need(domain);
      const c = cps(domain).get(name);
      if (!c) throw noCheckpoint(domain, name);
      return (
        `<domaincheckpoint><name>${c.name}</name>${c.parent ? `<parent><name>${c.parent}</name></parent>` : ''}` +
        `<creationTime>${c.creationTime}</creationTime><disks><disk name='vda' checkpoint='bitmap' bitmap='${c.name}'/></disks></domaincheckpoint>`
      );
    },
    async checkpointBitmaps(domain: string, name: string): Promise<CheckpointBitmapState[]> {
      need(domain);
      if (!cps(domain).has(name)) throw noCheckpoint(domain, name);
      return [{ disk: 'vda', state: 'ok', changedBytes: Math.round(opts.virtualSize / 16) }];
    },
    async deleteCheckpoint(domain: string, name: string): Promise<boolean> {
      need(domain);
      return cps(domain).delete(name);
    },
    async redefineCheckpoint(domain: string, xml: string): Promise<Checkpoint> {
      need(domain);
      const name = /<name>([^<]+)<\/name>/.exec(xml)?.[1] ?? '';
      const c: Checkpoint = {
        name,
        creationTime: Math.floor(Date.now() / 1000),
        disks: [{ name: 'vda', checkpoint: 'bitmap', bitmap: name }],
      };
      cps(domain).set(name, c);
      return c;
    },
  };
}
