/**
 * Whole-VM restore (issue #14) as an operator runs it (the built bin/vmbackup) against the real stack: a guest is
 * backed up (push, snapshot, offline; a chain; UEFI + TPM), its domain destroyed and undefined, and
 * `restore --define NEW --start` brings it back as a new domain that boots from the restored disk and prints the
 * boot marker it wrote before the backup. The refusals (a running domain for --replace, an existing name, a stored
 * XML that is malformed or another domain's) say one sentence and leave no file and no domain behind. The restore
 * runs with TEMPORAL_ADDRESS pointing at a closed port: it needs the target only.
 *
 * Restored domains are `vmbt-res-<hex>`, removed after each test (destroy, undefine --nvram --tpm, files).
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { cp, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { decodeManifest, encodeManifest, signManifest } from '../../src/repository/manifest';
import { guestDir } from '../fixtures/guest';
import { useFixtureDomains, waitForGuestMarker, type FixtureDomain } from '../fixtures/domains';
import { holds } from '../helpers/images';
import { requireLibvirt, requireTemporal, stackEnv } from '../helpers/stack';
import { cliEnv, runCli, startWorkerProcess, uniqueHost, type WorkerProcess } from '../helpers/vmbackup';

const run = promisify(execFile);

interface VmRestoreJson {
  backupId: string;
  from: string;
  domain: string;
  uuid: string;
  mode: string;
  dryRun: boolean;
  started: boolean;
  xml: string;
  disks: Array<{ name: string; path: string; format: string }>;
  nvram?: string;
  tpm?: { dir: string; files: string[] };
  logFiles: string[];
}

interface StoredManifest {
  backupId: string;
  domain: string;
  vm?: {
    xml: { key: string; size: number; sha256: string };
    nvram?: { key: string; size: number; sha256: string; path: string };
    tpm?: { version: string; files: Array<{ path: string; key: string; size: number; sha256: string }> };
  };
  [field: string]: unknown;
}

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

async function virsh(...args: string[]): Promise<string> {
  return (await run('virsh', ['-c', stackEnv().libvirt.uri, ...args])).stdout;
}

async function domainExists(name: string): Promise<boolean> {
  return (await virsh('list', '--all', '--name')).split('\n').some((l) => l.trim() === name);
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** The command line of a running domain's QEMU (libvirt's pid file). */
async function qemuCommandLine(name: string): Promise<string> {
  const pid = (await readFile(`/run/libvirt/qemu/${name}.pid`, 'utf8')).trim();
  return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').join(' ');
}

/** The command lines of every running swtpm. */
async function swtpmCommandLines(): Promise<string[]> {
  const lines: string[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.split('\0')[0]?.endsWith('swtpm')) lines.push(cmd.split('\0').join(' '));
  }
  return lines;
}

describe('vmbackup restore --define / --replace (whole VM)', () => {
  const newDomain = useFixtureDomains();
  const host = uniqueHost('res');
  let work: string;
  let worker: WorkerProcess;
  /** restored domains and their directories, removed after each test */
  let restored: Array<{ name?: string; dirs: string[] }> = [];
  /** the CLI's environment for restores: Temporal on a port nothing listens on (a new host has no Temporal) */
  let restoreEnv: NodeJS.ProcessEnv;

  beforeAll(async () => {
    await requireTemporal();
    await requireLibvirt();
    work = await mkdtemp(join(stackEnv().stateDir, 'test-restore-vm-'));
    worker = await startWorkerProcess(host);
    restoreEnv = cliEnv({ TEMPORAL_ADDRESS: '127.0.0.1:1' });
  });

  afterEach(async () => {
    for (const r of restored) {
      if (r.name !== undefined) {
        const uuid = (await virsh('domuuid', r.name).catch(() => '')).trim();
        await virsh('destroy', r.name).catch(() => undefined);
        await virsh('undefine', r.name, '--nvram', '--tpm', '--checkpoints-metadata', '--snapshots-metadata').catch(
          () => undefined,
        );
        await rm(`/var/lib/libvirt/qemu/nvram/${r.name}_VARS.fd`, { force: true });
        // undefine --tpm removes only the state libvirt expects there (a failed test may have written other files)
        if (/^[0-9a-f-]{36}$/.test(uuid)) await rm(`/var/lib/libvirt/swtpm/${uuid}`, { recursive: true, force: true });
      }
      for (const d of r.dirs) await rm(d, { recursive: true, force: true });
    }
    restored = [];
  });

  afterAll(async () => {
    await worker?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  /** A name for a restored domain, cleaned up after the test whatever happens. */
  function restoredName(): string {
    const name = `vmbt-res-${randomBytes(3).toString('hex')}`;
    restored.push({ name, dirs: [join(stackEnv().stateDir, 'restored', name)] });
    return name;
  }

  function targetDir(name: string): string {
    return join(work, name);
  }

  /** A backup of `dom` to the local target `tdir` (method auto for a shut-off domain: offline). */
  async function backup(
    dom: FixtureDomain,
    tdir: string,
    opts: { method?: 'push' | 'snapshot'; level?: 'full' | 'inc' } = {},
  ): Promise<string> {
    const args = ['backup', dom.name, '--host', host, '--target', pathToFileURL(tdir).href, '--wait', '--json'];
    if (opts.method) args.push('--method', opts.method);
    if (opts.level) args.push('--level', opts.level);
    const res = await runCli(args);
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const out = JSON.parse(res.stdout) as { backupId: string; status: string };
    expect(out.status).toBe('completed');
    const manifest = await readManifest(tdir, dom.name, out.backupId);
    // every backup stores the domain's definition beside its images (vm-capture)
    expect(manifest.vm?.xml.key).toBe(`${dom.name}/${out.backupId}/domain.xml`);
    return out.backupId;
  }

  async function readManifest(tdir: string, domain: string, id: string): Promise<StoredManifest> {
    return JSON.parse(await readFile(join(tdir, domain, id, 'manifest.json'), 'utf8')) as StoredManifest;
  }

  async function restore(tdir: string, id: string, args: string[]) {
    return runCli(['restore', id, '--target', pathToFileURL(tdir).href, ...args], { env: restoreEnv });
  }

  /** The guest's boot marker from a restored domain's serial log. */
  async function restoredMarker(r: VmRestoreJson) {
    const log = r.logFiles[0];
    if (!log) throw new Error(`the restored ${r.domain} names no serial log`);
    return waitForGuestMarker(r.domain, () => readFile(log, 'utf8').catch(() => ''), {
      state: async () => (await virsh('domstate', r.domain)).trim(),
    });
  }

  /** A copy of a local target in which the stored domain.xml of `id` is `xml` (size and hash fixed up). */
  async function withStoredXml(tdir: string, domain: string, id: string, xml: string): Promise<string> {
    const copy = `${tdir}-edited-${randomBytes(3).toString('hex')}`;
    await cp(tdir, copy, { recursive: true });
    const manifest = await readManifest(copy, domain, id);
    const data = Buffer.from(xml);
    await writeFile(join(copy, domain, id, 'domain.xml'), data);
    manifest.vm = { ...manifest.vm!, xml: { ...manifest.vm!.xml, size: data.length, sha256: sha256(data) } };
    await writeFile(join(copy, domain, id, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
    return copy;
  }

  test.each([
    ['push', 'push'],
    ['snapshot', 'snapshot'],
    ['offline', undefined],
  ] as const)(
    'a %s backup of the tiny guest, its domain gone: --define NEW --start boots it with its marker',
    async (_name, method) => {
      const dom = await newDomain({ prefix: 'res', guest: true, disks: [{ format: 'qcow2', sizeMiB: 64 }] });
      const marker = await dom.waitForMarker();
      expect(marker.kind).toBe('written');
      await dom.waitForGuestWrites(1); // the marker is on the disk (fsync) before the first chunk
      if (!method) await dom.destroy();
      const tdir = targetDir(`t-${_name}`);
      const id = await backup(dom, tdir, method ? { method } : {});
      await dom.cleanup(); // destroyed and undefined, its files gone: like a lost host

      const name = restoredName();
      const res = await restore(tdir, id, ['--define', name, '--start', '--boot-dir', guestDir(), '--json']);
      expect(res.code).toBe(0);
      const r = JSON.parse(res.stdout) as VmRestoreJson;
      expect(r).toMatchObject({ domain: name, from: dom.name, mode: 'define', started: true, dryRun: false });
      // the original's directory is gone: the disks go under the state dir
      expect(r.disks).toEqual([
        { name: 'vda', path: join(stackEnv().stateDir, 'restored', name, 'vda.qcow2'), format: 'qcow2' },
      ]);
      expect((await virsh('domstate', name)).trim()).toBe('running');
      expect(await restoredMarker(r)).toEqual({ kind: 'found', id: marker.id });
    },
  );

  test('a UEFI + TPM domain: the NVRAM and TPM state are restored with their hashes and QEMU and swtpm get them', async () => {
    const dom = await newDomain({
      prefix: 'res',
      guest: true,
      uefi: true,
      tpm: true,
      disks: [{ format: 'qcow2', sizeMiB: 64 }],
    });
    const marker = await dom.waitForMarker();
    await dom.waitForGuestWrites(1);
    const tdir = targetDir('t-uefi');
    const id = await backup(dom, tdir, { method: 'push' });
    const manifest = await readManifest(tdir, dom.name, id);
    expect(manifest.vm?.nvram).toBeDefined();
    expect(manifest.vm?.tpm?.files.length).toBeGreaterThan(0);
    await dom.cleanup();

    const name = restoredName();
    const res = await restore(tdir, id, ['--define', name, '--boot-dir', guestDir(), '--json']);
    expect(res.code).toBe(0);
    const r = JSON.parse(res.stdout) as VmRestoreJson;
    expect(r.nvram).toBe(`/var/lib/libvirt/qemu/nvram/${name}_VARS.fd`);
    expect(r.tpm?.dir).toBe(`/var/lib/libvirt/swtpm/${r.uuid}`);
    // defined, not started yet: the files are exactly the backup's
    expect(sha256(await readFile(r.nvram!))).toBe(manifest.vm!.nvram!.sha256);
    for (const f of manifest.vm!.tpm!.files) {
      expect(sha256(await readFile(join(r.tpm!.dir, f.path)))).toBe(f.sha256);
    }
    expect(await virsh('dumpxml', '--inactive', name)).toContain(`>${r.nvram}</nvram>`);

    await virsh('start', name);
    expect(await qemuCommandLine(name)).toContain(`"filename":"${r.nvram}"`);
    const swtpm = (await swtpmCommandLines()).filter((c) => c.includes(`${r.tpm!.dir}/`));
    expect(swtpm).toHaveLength(1);
    expect(swtpm[0]).toContain(`--tpmstate dir=${r.tpm!.dir}/tpm2`);
    expect(await restoredMarker(r)).toEqual({ kind: 'found', id: marker.id });
  });

  test('an incremental chain: the newest point boots with the data written before the increment', async () => {
    const dom = await newDomain({ prefix: 'res', guest: true, disks: [{ format: 'qcow2', sizeMiB: 64 }] });
    const marker = await dom.waitForMarker();
    await dom.waitForGuestWrites(1);
    const tdir = targetDir('t-chain');
    const full = await backup(dom, tdir, { method: 'push', level: 'full' });
    // after the full: a write the guest never touches (MiB 60, past its 8..55 and the marker at 4)
    await dom.writeThroughDevice('vda', 0x5a, 60, 1);
    const inc = await backup(dom, tdir, { method: 'push', level: 'inc' });
    const incManifest = await readManifest(tdir, dom.name, inc);
    expect(incManifest['chain']).toMatchObject({ level: 'inc', parent: full });
    await dom.cleanup();

    const name = restoredName();
    const res = await restore(tdir, inc, ['--define', name, '--start', '--boot-dir', guestDir(), '--json']);
    expect(res.code).toBe(0);
    const r = JSON.parse(res.stdout) as VmRestoreJson;
    expect(await holds(r.disks[0]!.path, 0x5a, 60, 1)).toBe(true);
    expect(await restoredMarker(r)).toEqual({ kind: 'found', id: marker.id });
  });

  describe('refusals: one sentence, nothing left behind', () => {
    let dom: FixtureDomain;
    let tdir: string;
    let id: string;

    beforeAll(async () => {
      // a BIOS domain that keeps running: enough for what is refused before anything is written
      dom = await newDomain({ prefix: 'res', disks: [{ format: 'qcow2', sizeMiB: 16 }] });
      tdir = targetDir('t-refusals');
      id = await backup(dom, tdir, { method: 'push' });
    });

    /** one sentence on stderr, no domain `name`, no restored directory, no NVRAM file */
    async function expectNothingLeft(res: { code: number; stdout: string; stderr: string }, name: string) {
      expect(res.code).not.toBe(0);
      expect(res.stdout).toBe('');
      expect(res.stderr.trim().split('\n')).toHaveLength(1);
      expect(await domainExists(name)).toBe(false);
      expect(await exists(join(stackEnv().stateDir, 'restored', name))).toBe(false);
      expect(await exists(`/var/lib/libvirt/qemu/nvram/${name}_VARS.fd`)).toBe(false);
    }

    test('--replace refuses a running domain and changes nothing', async () => {
      const before = await virsh('dumpxml', '--inactive', dom.name);
      const res = await restore(tdir, id, ['--replace', '--yes']);
      expect(res.code).not.toBe(0);
      expect(res.stderr.trim()).toBe(
        `vmbackup: Cannot restore backup ${id} over its domain: domain ${dom.name} is running; shut it down first (virsh shutdown ${dom.name}), nothing was changed.`,
      );
      expect((await virsh('domstate', dom.name)).trim()).toBe('running');
      expect(await virsh('dumpxml', '--inactive', dom.name)).toBe(before);
      expect((await readdir(dom.dir)).filter((f) => f.includes('vmbackup'))).toEqual([]);
    });

    test('--replace without --yes (the domain shut off) changes nothing', async () => {
      await dom.destroy();
      try {
        const sum = sha256(await readFile(dom.disks[0]!.path));
        const res = await restore(tdir, id, ['--replace']);
        expect(res.code).not.toBe(0);
        expect(res.stderr.trim()).toMatch(
          /^vmbackup: Cannot restore backup .*: --replace overwrites the disks .* add --yes to confirm \(nothing was changed\)\.$/,
        );
        expect(sha256(await readFile(dom.disks[0]!.path))).toBe(sum);
      } finally {
        await dom.start();
      }
    });

    test('--define refuses the name of an existing domain', async () => {
      const res = await restore(tdir, id, ['--define', dom.name]);
      expect(res.code).not.toBe(0);
      expect(res.stderr.trim()).toBe(
        `vmbackup: Cannot restore backup ${id} as ${dom.name}: a domain named ${dom.name} already exists on this host; pick another name with --define, or use --replace to restore over ${dom.name} when it is shut off.`,
      );
      expect(await exists(join(stackEnv().stateDir, 'restored', dom.name))).toBe(false);
      expect((await virsh('domstate', dom.name)).trim()).toBe('running');
    });

    test('a stored XML that is malformed', async () => {
      const edited = await withStoredXml(tdir, dom.name, id, `<domain type='qemu'><name>${dom.name}</name><devices>`);
      const name = restoredName();
      const res = await restore(edited, id, ['--define', name]);
      await expectNothingLeft(res, name);
      expect(res.stderr.trim()).toBe(
        `vmbackup: Cannot restore backup ${id} as ${name}: the stored domain XML is malformed (it ends with <domain>, <devices> not closed).`,
      );
    });

    test('a stored XML that names another domain', async () => {
      const xml = await readFile(join(tdir, dom.name, id, 'domain.xml'), 'utf8');
      const edited = await withStoredXml(
        tdir,
        dom.name,
        id,
        xml.replace(`<name>${dom.name}</name>`, '<name>other-vm</name>'),
      );
      const name = restoredName();
      const res = await restore(edited, id, ['--define', name]);
      await expectNothingLeft(res, name);
      expect(res.stderr.trim()).toBe(
        `vmbackup: Cannot restore backup ${id} as ${name}: the stored domain XML is the definition of "other-vm", not of ${dom.name} whose backup it is in.`,
      );
    });

    test('a stored XML that would run a host command', async () => {
      const xml = await readFile(join(tdir, dom.name, id, 'domain.xml'), 'utf8');
      const evil = xml
        .replace('<domain ', `<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0' `)
        .replace('</domain>', `<qemu:commandline><qemu:arg value='-runas'/></qemu:commandline></domain>`);
      const edited = await withStoredXml(tdir, dom.name, id, evil);
      const name = restoredName();
      const res = await restore(edited, id, ['--define', name, '--start']);
      await expectNothingLeft(res, name);
      expect(res.stderr).toMatch(/QEMU namespace/);
    });

    test('a backup without a domain definition', async () => {
      const copy = `${tdir}-novm-${randomBytes(3).toString('hex')}`;
      await cp(tdir, copy, { recursive: true });
      const manifest = await readManifest(copy, dom.name, id);
      delete manifest.vm;
      await writeFile(join(copy, dom.name, id, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
      const name = restoredName();
      const res = await restore(copy, id, ['--define', name]);
      await expectNothingLeft(res, name);
      expect(res.stderr.trim()).toBe(
        `vmbackup: Cannot restore backup ${id} as ${name}: backup ${id} has no domain definition (made before vmbackup stored it); restore the disks with restore --to and define the VM by hand.`,
      );
    });

    test('TPM state outside the directory its version keeps it in', async () => {
      const copy = `${tdir}-tpm-${randomBytes(3).toString('hex')}`;
      await cp(tdir, copy, { recursive: true });
      const manifest = await readManifest(copy, dom.name, id);
      const data = Buffer.from('not a TPM 2.0 state');
      await writeFile(join(copy, dom.name, id, 'tpm.permall'), data);
      const file = {
        path: 'tpm1_2/permall',
        key: `${dom.name}/${id}/tpm.permall`,
        size: data.length,
        sha256: sha256(data),
      };
      manifest.vm = { ...manifest.vm!, tpm: { version: '2.0', files: [file] } };
      await writeFile(join(copy, dom.name, id, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
      const name = restoredName();
      const res = await restore(copy, id, ['--define', name]);
      await expectNothingLeft(res, name);
      expect(res.stderr.trim()).toBe(
        `vmbackup: Cannot restore backup ${id} as ${name}: its TPM 2.0 state names tpm1_2/permall, outside tpm2/ where swtpm keeps it.`,
      );
    });

    test('a stored domain.xml that is not what its manifest says', async () => {
      const copy = `${tdir}-badhash-${randomBytes(3).toString('hex')}`;
      await cp(tdir, copy, { recursive: true });
      await writeFile(join(copy, dom.name, id, 'domain.xml'), '<domain/>');
      const name = restoredName();
      const res = await restore(copy, id, ['--define', name]);
      await expectNothingLeft(res, name);
      expect(res.stderr).toMatch(/its domain XML on .* is corrupt \(SHA-256 /);
    });

    test('with a manifest key: a signed backup restores, a definition changed after signing is refused', async () => {
      const keyFile = join(work, 'manifest.key');
      await writeFile(keyFile, randomBytes(48).toString('base64'), { mode: 0o600 });
      const key = (await readFile(keyFile)).toString('utf8').replace(/\n$/, '');
      // the backup as a worker with that key would have written it: signed
      const signedDir = `${tdir}-signed-${randomBytes(3).toString('hex')}`;
      await cp(tdir, signedDir, { recursive: true });
      const manifestPath = join(signedDir, dom.name, id, 'manifest.json');
      const signed = signManifest(decodeManifest(await readFile(manifestPath), manifestPath), Buffer.from(key));
      await writeFile(manifestPath, encodeManifest(signed));
      const keyEnv = { ...restoreEnv, VMBACKUP_MANIFEST_KEY_FILE: keyFile };
      const name = restoredName();
      const ok = await runCli(
        ['restore', id, '--target', pathToFileURL(signedDir).href, '--define', name, '--dry-run'],
        { env: keyEnv },
      );
      expect(ok.stderr).toMatch(/^dry run: nothing was written/);
      expect(ok.code).toBe(0);

      // someone who can write the target swaps the definition and fixes its hash, but cannot sign
      const xml = await readFile(join(signedDir, dom.name, id, 'domain.xml'), 'utf8');
      const swapped = await withStoredXml(signedDir, dom.name, id, xml.replace('<vcpu', '<!-- changed --><vcpu'));
      const res = await runCli(['restore', id, '--target', pathToFileURL(swapped).href, '--define', name], {
        env: keyEnv,
      });
      await expectNothingLeft(res, name);
      expect(res.stderr).toMatch(/is not signed with your key/);
    });

    test('usage mistakes get one sentence', async () => {
      const cases: Array<[string[], string]> = [
        [
          ['--define', 'a', '--replace'],
          '--define NAME makes a new domain and --replace restores over the original one: pick one.',
        ],
        [
          ['--define', 'a', '--disk', 'vda'],
          '--disk restores disk images only; it does not go with --define or --replace.',
        ],
        [
          ['--replace', '--to', '/tmp/x'],
          "--replace restores over the domain's own files; --to goes with --define only.",
        ],
        [['--to', '/tmp/x', '--start'], '--start goes with --define NAME or --replace (a whole-VM restore).'],
        [
          ['--define', '../evil'],
          `Cannot restore backup ${id} as ../evil: "../evil" is not a domain name (letters, digits, '.', '_', '+', '-', at most 64, starting with a letter or digit).`,
        ],
      ];
      for (const [args, sentence] of cases) {
        const res = await restore(tdir, id, args);
        expect(res.code).not.toBe(0);
        expect(res.stderr.trim()).toBe(`vmbackup: ${sentence}`);
      }
    });

    test('--dry-run prints the definition with the new name and no original MAC, and writes nothing', async () => {
      // the original's directory is on this host: the disks would go into <it>/<new name>;
      // the fixture has no NIC: give the stored definition one with a known MAC
      const xml = await readFile(join(tdir, dom.name, id, 'domain.xml'), 'utf8');
      const mac = '52:54:00:aa:bb:cc';
      const withNic = xml.replace(
        '</devices>',
        `<interface type='user'><mac address='${mac}'/><model type='virtio'/></interface></devices>`,
      );
      expect(withNic).toContain(mac);
      const edited = await withStoredXml(tdir, dom.name, id, withNic);
      const name = restoredName();
      const res = await restore(edited, id, ['--define', name, '--dry-run']);
      expect(res.code).toBe(0);
      expect(res.stdout).toContain(`<name>${name}</name>`);
      expect(res.stdout).not.toContain(`<name>${dom.name}</name>`);
      expect(res.stdout).toContain(`<interface type="user">`);
      expect(res.stdout).not.toContain(mac);
      expect(res.stderr).toContain(`would write disk vda -> ${join(dom.dir, name, 'vda.qcow2')}`);
      expect(await domainExists(name)).toBe(false);
      expect(await exists(join(dom.dir, name))).toBe(false);

      const keep = await restore(edited, id, ['--define', name, '--dry-run', '--keep-macs']);
      expect(keep.code).toBe(0);
      expect(keep.stdout).toContain(`<mac address="${mac}"/>`);
    });
  });

  test('a start that fails (a network this host does not have) removes the disks, NVRAM, TPM state and definition', async () => {
    // UEFI + TPM without the guest: OVMF makes the NVRAM and swtpm its state at the first start
    const dom = await newDomain({ prefix: 'res', uefi: true, tpm: true, disks: [{ format: 'qcow2', sizeMiB: 16 }] });
    const tdir = targetDir('t-nonet');
    const id = await backup(dom, tdir, { method: 'push' });
    const xml = await readFile(join(tdir, dom.name, id, 'domain.xml'), 'utf8');
    const edited = await withStoredXml(
      tdir,
      dom.name,
      id,
      xml.replace('</devices>', `<interface type='network'><source network='vmbt-res-nonet'/></interface></devices>`),
    );
    const name = restoredName();
    const res = await restore(edited, id, ['--define', name, '--start']);
    expect(res.code).not.toBe(0);
    const lines = res.stderr.trim().split('\n');
    // progress lines for the steps done, then the one sentence
    expect(lines.at(-1)).toMatch(
      new RegExp(
        `^vmbackup: Cannot restore backup ${id} as ${name}: could not start it \\(.*vmbt-res-nonet.*\\); what it had written was removed\\.$`,
      ),
    );
    expect(lines.filter((l) => l.startsWith('vmbackup:'))).toHaveLength(1);
    expect(res.stderr).toContain(`defined domain ${name}`); // it got that far
    expect(await domainExists(name)).toBe(false);
    expect(await exists(join(dom.dir, name))).toBe(false);
    expect(await exists(`/var/lib/libvirt/qemu/nvram/${name}_VARS.fd`)).toBe(false);
    // the progress lines name the TPM state directory it wrote (its UUID was new): gone again
    const tpmDir = /^TPM state -> (\/var\/lib\/libvirt\/swtpm\/[0-9a-f-]{36})$/m.exec(res.stderr)?.[1];
    expect(tpmDir).toBeDefined();
    expect(await exists(tpmDir!)).toBe(false);
  });

  test('--replace of a shut-off domain: its own disk, UUID and name get the backup back', async () => {
    const dom = await newDomain({
      prefix: 'res',
      disks: [{ format: 'qcow2', sizeMiB: 16, patterns: [{ byte: 0x11, offsetMiB: 0, lengthMiB: 2 }] }],
    });
    const uuid = (await virsh('domuuid', dom.name)).trim();
    const tdir = targetDir('t-replace');
    const id = await backup(dom, tdir, { method: 'push' });
    await dom.writeThroughDevice('vda', 0x22, 0, 2); // after the backup
    await dom.destroy();
    expect(await holds(dom.disks[0]!.path, 0x22, 0, 2)).toBe(true);

    const res = await restore(tdir, id, ['--replace', '--yes', '--json']);
    expect(res.code).toBe(0);
    const r = JSON.parse(res.stdout) as VmRestoreJson;
    expect(r).toMatchObject({ mode: 'replace', domain: dom.name, uuid });
    expect(r.disks).toEqual([{ name: 'vda', path: dom.disks[0]!.path, format: 'qcow2' }]);
    expect(await holds(dom.disks[0]!.path, 0x11, 0, 2)).toBe(true);
    expect((await virsh('domuuid', dom.name)).trim()).toBe(uuid);
    expect((await readdir(dom.dir)).filter((f) => f.includes('vmbackup'))).toEqual([]);
    restored.push({ dirs: [join(stackEnv().stateDir, 'restored', dom.name)] }); // its new serial log
    await dom.start();
    expect((await virsh('domstate', dom.name)).trim()).toBe('running');
  });
});
