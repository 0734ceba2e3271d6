/**
 * Real NBD servers for the client's tests: qemu-nbd and nbdkit on a Unix socket in a temporary directory, and the
 * libnbd tools (nbdinfo, nbdcopy) as an independent reading of the same export. A missing binary FAILS the test with
 * the command that installs it.
 */
import { execFile, spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { access } from 'node:fs/promises';
import { connect } from 'node:net';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

const TOOLS: Record<string, string> = {
  'qemu-nbd': 'qemu-utils',
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  nbdkit: 'nbdkit',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
};

/** Throws (fails the test) when one of the NBD tools is not installed. */
export async function requireNbdTools(): Promise<void> {
  const missing: string[] = [];
  for (const tool of Object.keys(TOOLS)) {
    const found = await execFileP('sh', ['-c', `command -v ${tool}`]).then(
      () => true,
      () => false,
    );
    if (!found) missing.push(tool);
  }
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((t) => TOOLS[t]))].join(' ');
    throw new Error(`${missing.join(', ')} missing: run \`bash scripts/stack.sh up\` (or apt-get install ${pkgs})`);
  }
}

export interface NbdServer {
  socket: string;
  /** the export's NBD URI, for nbdinfo / nbdcopy / qemu-io */
  uri: string;
  process: ChildProcess;
  stop(): Promise<void>;
}

async function canConnect(path: string): Promise<boolean> {
  if (
    !(await access(path).then(
      () => true,
      () => false,
    ))
  )
    return false;
  return new Promise((resolve) => {
    const s = connect({ path });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function startServer(file: string, args: string[], socket: string, exportName: string): Promise<NbdServer> {
  const child = spawn(file, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  let exited: number | null | undefined;
  const exit = new Promise<void>((resolve) =>
    child.once('exit', (code) => {
      exited = code;
      resolve();
    }),
  );
  // a deadline for the server to come up, not a timing assertion
  const deadline = Date.now() + 30_000;
  while (!(await canConnect(socket))) {
    if (exited !== undefined) throw new Error(`${file} ${args.join(' ')} exited ${exited}: ${stderr.trim()}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${file} did not listen on ${socket} within 30 s: ${stderr.trim()}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    socket,
    uri: `nbd+unix:///${exportName}?socket=${socket}`,
    process: child,
    async stop() {
      if (exited === undefined) {
        child.kill('SIGTERM');
        await exit;
      }
    },
  };
}

/** `qemu-nbd` of IMAGE on SOCKET (persistent, up to 8 clients); -A exports qemu:allocation-depth. */
export function startQemuNbd(
  image: string,
  socket: string,
  opts: { format?: string; readOnly?: boolean; bitmap?: string; exportName?: string } = {},
): Promise<NbdServer> {
  const exportName = opts.exportName ?? 'vda';
  const args = ['-k', socket, '--persistent', '--shared=8', '-x', exportName, '-f', opts.format ?? 'qcow2', '-A'];
  // a writable export passes TRIM on to the image (qemu-nbd ignores it by default)
  if (opts.readOnly !== false) args.push('--read-only');
  else args.push('--discard=unmap');
  if (opts.bitmap) args.push('-B', opts.bitmap);
  args.push(image);
  return startServer('qemu-nbd', args, socket, exportName);
}

/** `nbdkit -f -U SOCKET ARGS` (plugin, filters and parameters in ARGS); its export is the default one (''). */
export function startNbdkit(socket: string, args: string[]): Promise<NbdServer> {
  return startServer('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], socket, '');
}

export async function tool(file: string, args: string[]): Promise<string> {
  return (await execFileP(file, args, { maxBuffer: 256 << 20 })).stdout;
}

export interface MapEntry {
  offset: number;
  length: number;
  flags: number;
}

/** Joins adjacent entries with equal flags (two tools may split one run differently). */
export function mergeMap(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const e of entries) {
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** `qemu-img map --output=json` of an image as base:allocation would say it: hole = no data, zero = reads as zeros. */
export async function qemuImgMap(image: string, format = 'qcow2'): Promise<MapEntry[]> {
  const rows = JSON.parse(await tool('qemu-img', ['map', '-U', '-f', format, '--output=json', image])) as Array<{
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }>;
  return mergeMap(rows.map((r) => ({ offset: r.start, length: r.length, flags: (r.data ? 0 : 1) | (r.zero ? 2 : 0) })));
}

/** `nbdinfo --map=CONTEXT --json URI`: libnbd's reading of the same export's extents. */
export async function nbdinfoMap(uri: string, context = 'base:allocation'): Promise<MapEntry[]> {
  const rows = JSON.parse(await tool('nbdinfo', [`--map=${context}`, '--json', uri])) as Array<{
    offset: number;
    length: number;
    type: number;
  }>;
  return mergeMap(rows.map((r) => ({ offset: r.offset, length: r.length, flags: r.type })));
}
