/**
 * Which user a domain's QEMU process will run as (libvirt's DAC driver), and whether that user can reach a path.
 *
 * libvirt runs QEMU as the domain's static DAC label when it has one (`<seclabel type='static' model='dac'>` with
 * `<label>USER:GROUP</label>`), otherwise as qemu.conf's `user`/`group` (Debian's built-in default: libvirt-qemu).
 * The check runs `test -x` as that user (`setpriv`, with the user's supplementary groups as libvirt gives them), so
 * ACLs and group bits count as they will for QEMU.
 */
import { readFile } from 'node:fs/promises';
import { HypervisorError } from './errors';
import { execTool } from './exec';

export const QEMU_CONF = '/etc/libvirt/qemu.conf';
/** Debian's compiled-in default of qemu.conf's `user` and `group` */
const DEFAULT_QEMU_USER = 'libvirt-qemu';

/** A user as libvirt names it: a name, or `+<uid>`. */
export interface QemuIdentity {
  user: string;
  group: string;
}

/** true when `spec` ("root", "+0", "0") is uid/gid 0 */
function isRoot(spec: string): boolean {
  return spec === 'root' || /^\+?0+$/.test(spec);
}

/** The domain-level static DAC label of a definition, when it has one. */
export function staticDacLabel(xml: string): QemuIdentity | undefined {
  // the domain's own <seclabel> elements are children of <domain>; a disk's carry no type='static'
  for (const m of xml.matchAll(/<seclabel\b([^>]*)>([\s\S]*?)<\/seclabel>/g)) {
    const attrs = m[1] ?? '';
    if (!/\bmodel=['"]dac['"]/.test(attrs) || !/\btype=['"]static['"]/.test(attrs)) continue;
    const label = /<label>\s*([^<:\s]+):([^<:\s]+)\s*<\/label>/.exec(m[2] ?? '');
    if (label) return { user: label[1]!, group: label[2]! };
  }
  return undefined;
}

/** qemu.conf's `user` and `group` (their defaults when unset or the file is missing). */
export async function qemuConfIdentity(path = QEMU_CONF): Promise<QemuIdentity> {
  const text = await readFile(path, 'utf8').catch(() => '');
  const value = (key: string): string | undefined =>
    new RegExp(`^\\s*${key}\\s*=\\s*"([^"]*)"`, 'm').exec(text)?.[1]?.trim() || undefined;
  return { user: value('user') ?? DEFAULT_QEMU_USER, group: value('group') ?? DEFAULT_QEMU_USER };
}

/** The user the domain defined by `xml` runs QEMU as, or undefined when that is root. */
export async function qemuUserOf(xml: string, qemuConf = QEMU_CONF): Promise<QemuIdentity | undefined> {
  const id = staticDacLabel(xml) ?? (await qemuConfIdentity(qemuConf));
  return isRoot(id.user) ? undefined : id;
}

function setprivArgs(id: QemuIdentity): string[] {
  const num = (s: string) => s.replace(/^\+/, '');
  // a name gets its supplementary groups (libvirt gives QEMU those of its configured user); a bare uid gets none
  const groups = id.user.startsWith('+') ? ['--clear-groups'] : ['--init-groups'];
  return [`--reuid=${num(id.user)}`, `--regid=${num(id.group)}`, ...groups];
}

/** Whether `id` may search (traverse) directory `dir`, and every directory above it. */
export async function canTraverse(id: QemuIdentity, dir: string): Promise<boolean> {
  const r = await execTool('setpriv', [...setprivArgs(id), '--', 'test', '-x', dir], { timeoutMs: 30_000 });
  if (r.code === 0) return true;
  // `test` says nothing; setpriv exits 1 too when it cannot become the user ("failed to parse reuid")
  if (r.code === 1 && r.stderr.trim() === '') return false;
  throw new HypervisorError(
    'failed',
    `cannot check whether QEMU's user ${id.user}:${id.group} (libvirt's DAC label or qemu.conf) can reach ${dir}: ${r.stderr.trim().replace(/\.$/, '') || `setpriv exit ${r.code}`}`,
  );
}
