/**
 * A private `qemu-nbd` of one image file on a Unix socket in a fresh 0700 directory (only this user, root for the
 * worker, can reach it). Pull mode uses it to write the new qcow2 of a pulled disk, and verify/restore to read a
 * stored image's guest data. The image is opened as an ImageSpec: format given, backing chain named by us (or
 * none), never what the header says.
 */
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { constants } from 'node:fs';
import { access, mkdtemp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HypervisorError } from './errors';
import { toolEnv } from './exec';
import { imageSpecFilename } from './qemu-img';
import type { ImageSpec } from './qemu-img';

export interface QemuNbdOptions {
  readOnly: boolean;
  /** qemu-nbd --cache (default writeback: FLUSH before close makes it durable) */
  cache?: 'none' | 'writeback' | 'writethrough';
  /** where the private socket directory is made (default the OS temp dir) */
  runDir?: string;
  /** the export's name (default 'disk') */
  exportName?: string;
  /** the server must be accepting connections within this (default 30 s) */
  startTimeoutMs?: number;
}

export interface QemuNbdServer {
  socketPath: string;
  exportName: string;
  /**
   * Ends qemu-nbd cleanly (SIGTERM: it closes the image, qcow2 metadata written) once the caller's clients have
   * disconnected, waits for it, removes the socket directory; a failed exit is a HypervisorError.
   */
  close(): Promise<void>;
  /** Ends it now (SIGTERM, SIGKILL after 5 s) and removes the socket directory; never throws. */
  stop(): Promise<void>;
}

const QEMU_NBD = 'qemu-nbd';

/**
 * glibc's malloc for qemu-nbd: keep the request buffers (up to 32 MiB each) in the heap and the freed heap mapped, so
 * that each request reuses memory instead of mapping fresh pages. By default a 4 MiB buffer freed at the top of the
 * heap is returned to the system and the next request faults 1,024 new pages in (measured with `perf` on a 2 GiB pull
 * into an image tree: page faults, zeroing and unmapping were about a third of qemu-nbd's CPU). What it keeps is about
 * its requests in flight (a few 4 MiB buffers), for the life of one backup's export.
 */
const QEMU_NBD_MALLOC = { MALLOC_MMAP_THRESHOLD_: String(32 << 20), MALLOC_TRIM_THRESHOLD_: String(512 << 20) };

export async function startQemuNbd(image: ImageSpec, opts: QemuNbdOptions): Promise<QemuNbdServer> {
  const dir = await mkdtemp(join(opts.runDir ?? tmpdir(), 'vmbackup-nbd-')); // mkdtemp makes it 0700
  const socketPath = join(dir, 'nbd.sock');
  const exportName = opts.exportName ?? 'disk';
  const args = [
    '--socket',
    socketPath,
    '--export-name',
    exportName,
    // persistent: the readiness probe below is a connection too, and a non-persistent qemu-nbd exits after it
    '--persistent',
    `--cache=${opts.cache ?? 'writeback'}`,
    '--aio=threads',
    ...(opts.readOnly ? ['--read-only'] : []),
    '--',
    imageSpecFilename(image),
  ];
  // It dies with the worker: a qemu-nbd left behind by a worker killed mid-write would keep the image's write lock
  // (the retried step could not reopen it) and, closed later, write its stale qcow2 metadata cache over the image.
  const deathSig = await parentDeathSignal();
  const env = toolEnv(QEMU_NBD_MALLOC);
  const child = deathSig
    ? spawn(deathSig, ['--pdeathsig', 'KILL', '--', QEMU_NBD, ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(QEMU_NBD, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (s: string) => {
    stderr = (stderr + s).slice(-4000);
  });
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: Error }>((resolve) => {
    child.once('error', (error) => resolve({ code: null, signal: null, error }));
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  const what = `serve ${image.path} over NBD`;
  const cleanup = () => rm(dir, { recursive: true, force: true });
  const failed = (r: { code: number | null; signal: NodeJS.Signals | null; error?: Error }) => {
    const missing =
      (r.error as NodeJS.ErrnoException | undefined)?.code === 'ENOENT' ||
      (r.code === 127 && /failed to execute qemu-nbd/.test(stderr));
    const said = missing
      ? 'qemu-nbd is not installed (apt-get install qemu-utils)'
      : (stderr.trim().split('\n').at(-1) ?? '') || `qemu-nbd exited with ${r.signal ?? `code ${String(r.code)}`}`;
    return new HypervisorError(missing ? 'unsupported' : 'failed', `cannot ${what}: ${said}`, {
      stderr,
      command: [QEMU_NBD, ...args],
      cause: r.error,
    });
  };
  const deadline = Date.now() + (opts.startTimeoutMs ?? 30_000);
  let exited: { code: number | null; signal: NodeJS.Signals | null; error?: Error } | undefined;
  void exit.then((r) => (exited = r));
  for (;;) {
    if (exited) {
      await cleanup();
      throw failed(exited);
    }
    if (await canConnect(socketPath)) break;
    if (Date.now() > deadline) {
      await kill(child, exit);
      await cleanup();
      throw new HypervisorError('failed', `cannot ${what}: qemu-nbd did not open its socket within the deadline`, {
        stderr,
      });
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    socketPath,
    exportName,
    async close() {
      if (!exited) child.kill('SIGTERM');
      const r = await exit;
      await cleanup();
      if (r.code !== 0) throw failed(r);
    },
    async stop() {
      await kill(child, exit);
      await cleanup();
    },
  };
}

let setpriv: Promise<string | undefined> | undefined;
/** util-linux `setpriv`, which sets PR_SET_PDEATHSIG and execs qemu-nbd in the same process; undefined without it. */
function parentDeathSignal(): Promise<string | undefined> {
  setpriv ??= (async () => {
    for (const p of ['/usr/bin/setpriv', '/bin/setpriv']) {
      if (
        await access(p, constants.X_OK).then(
          () => true,
          () => false,
        )
      )
        return p;
    }
    return undefined;
  })();
  return setpriv;
}

async function kill(child: ChildProcess, exit: Promise<unknown>): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
  await exit;
  clearTimeout(timer);
}

function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ path });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
