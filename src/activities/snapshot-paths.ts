/**
 * Where the snapshot method keeps its overlays: `${stateDir}/overlays/<backupId>/<domain>.<disk>.qcow2`.
 * The backup id in the path is what lets recovery tell an overlay of a dead backup from one of a
 * running backup, and the fixed root is what keeps vmbackup away from overlays it did not create.
 */
import { isAbsolute, join, relative, resolve, sep } from 'node:path';
import { BACKUP_ID_RE, DOMAIN_NAME_RE } from '../shared/names';

/** Disk target names: vda, sdb, hdc, ... */
const DISK_NAME_RE = /^[A-Za-z0-9_-]{1,32}$/;

/** True for a name that can be a backup id (and so a directory of one). */
export function isValidBackupId(backupId: string): boolean {
  return BACKUP_ID_RE.test(backupId) && backupId !== '.' && backupId !== '..';
}

export interface OverlayLocation {
  backupId: string;
  /** file name inside the backup's directory */
  file: string;
  /** parsed from `<domain>.<disk>.qcow2`; undefined for other file names */
  domain?: string;
  disk?: string;
}

export class OverlayPaths {
  readonly root: string;

  constructor(stateDir: string) {
    this.root = join(resolve(stateDir), 'overlays');
  }

  isValidBackupId(backupId: string): boolean {
    return isValidBackupId(backupId);
  }

  backupDir(backupId: string): string {
    if (!this.isValidBackupId(backupId)) throw new Error(`'${backupId}' is not a valid backup id`);
    return join(this.root, backupId);
  }

  overlay(backupId: string, domain: string, disk: string): string {
    if (!DOMAIN_NAME_RE.test(domain)) throw new Error(`'${domain}' is not a valid domain name`);
    if (!DISK_NAME_RE.test(disk)) throw new Error(`'${disk}' is not a valid disk name`);
    return join(this.backupDir(backupId), `${domain}.${disk}.qcow2`);
  }

  /** Small JSON next to the overlays recording how they were made (quiesced or not). */
  marker(backupId: string, domain: string): string {
    if (!DOMAIN_NAME_RE.test(domain)) throw new Error(`'${domain}' is not a valid domain name`);
    return join(this.backupDir(backupId), `${domain}.snapshot.json`);
  }

  /**
   * The backup id and file of a path exactly one directory below the root
   * (`root/<backupId>/<file>`); undefined for anything else, so nothing outside is ever ours.
   */
  locate(path: string): OverlayLocation | undefined {
    if (!isAbsolute(path)) return undefined;
    const rel = relative(this.root, resolve(path));
    if (rel === '' || rel.startsWith('..') || isAbsolute(rel)) return undefined;
    const parts = rel.split(sep);
    if (parts.length !== 2) return undefined;
    const [backupId, file] = parts as [string, string];
    if (!this.isValidBackupId(backupId)) return undefined;
    return { backupId, file, ...parseOverlayFile(file) };
  }
}

/** `<domain>.<disk>.qcow2` → {domain, disk}; the domain may itself contain dots, the disk does not. */
export function parseOverlayFile(file: string): { domain?: string; disk?: string } {
  const m = /^(.+)\.([^.]+)\.qcow2$/.exec(file);
  if (!m) return {};
  const [, domain, disk] = m as unknown as [string, string, string];
  if (!DOMAIN_NAME_RE.test(domain) || !DISK_NAME_RE.test(disk)) return {};
  return { domain, disk };
}
