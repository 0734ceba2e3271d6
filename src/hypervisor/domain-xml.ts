/**
 * PLACEHOLDER until the restore engineer's rewriter (branch vm-restore) is merged: same API, the minimum the
 * instant restore needs (name, uuid, disk sources, MACs, nvram, serial log dir), no security checks. The merge
 * takes vm-restore's file as it is.
 */
import { HypervisorError } from './errors';

export interface DomainRewrite {
  name: string;
  uuid: string;
  keepMacs: boolean;
  disks: Record<string, { path: string; format: 'qcow2' | 'raw' }>;
  nvramPath?: string;
  logDir?: string;
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/"/g, '&quot;').replace(/</g, '&lt;');
}

export function rewriteDomainXml(xml: string, expectDomain: string, rewrite: DomainRewrite): string {
  const name = /<name>([^<]*)<\/name>/.exec(xml)?.[1];
  if (name !== expectDomain) {
    throw new HypervisorError('invalid', `the stored domain XML is not the definition of ${expectDomain}`);
  }
  let out = xml.replace(/<name>[^<]*<\/name>/, `<name>${esc(rewrite.name)}</name>`);
  out = out.replace(/<uuid>[^<]*<\/uuid>/, `<uuid>${rewrite.uuid}</uuid>`);
  out = out.replace(/<disk\b[\s\S]*?<\/disk>/g, (disk) => {
    const dev = /<target\s+dev=['"]([^'"]+)['"]/.exec(disk)?.[1];
    const to = dev ? rewrite.disks[dev] : undefined;
    if (!to) return disk;
    return disk
      .replace(/<source\b[^>]*?\/>/, `<source file='${esc(to.path)}'/>`)
      .replace(/<driver\b([^>]*?)type=['"][^'"]*['"]/, `<driver$1type='${to.format}'`);
  });
  if (!rewrite.keepMacs) out = out.replace(/\s*<mac address=['"][^'"]*['"]\s*\/>/g, '');
  if (rewrite.nvramPath) out = out.replace(/(<nvram\b[^>]*>)[^<]*(<\/nvram>)/, `$1${esc(rewrite.nvramPath)}$2`);
  if (rewrite.logDir) {
    const dir = rewrite.logDir;
    out = out.replace(
      /(<serial type=['"]file['"]>\s*<source path=['"])([^'"]*)(['"])/g,
      (_m, a: string, _p: string, c: string) => `${a}${esc(`${dir}/serial.log`)}${c}`,
    );
  }
  return out;
}
