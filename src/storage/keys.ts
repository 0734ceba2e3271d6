/**
 * Object keys: relative, '/'-separated, normalised. Checked before any I/O so a bad key can
 * never escape a target's directory or prefix.
 *
 * Layout: `<domain>/<backupId>/<disk>.<format>` and `<domain>/<backupId>/manifest.json`.
 * Segments starting with '.' are reserved for the drivers (temp files, `.staging`, `.meta`),
 * which also rules out '.' and '..'.
 */
import { StorageError, adviceFor } from './errors';

const SEGMENT_RE = /^[A-Za-z0-9_+@=,:-][A-Za-z0-9_.+@=,:-]*$/;
const MAX_KEY_LENGTH = 1024;

function invalid(key: string, why: string): StorageError {
  return new StorageError(
    'invalid-key',
    `Object key ${JSON.stringify(key)} is invalid: ${why}; ${adviceFor('invalid-key')}.`,
    {
      driver: 'keys',
    },
  );
}

/** Returns the normalised key or throws StorageError 'invalid-key'. A trailing '/' is not allowed. */
export function normaliseKey(key: string): string {
  if (typeof key !== 'string' || key.length === 0) throw invalid(String(key), 'it is empty');
  if (key.includes('\0')) throw invalid(key, 'it contains a NUL byte');
  if (key.includes('\\')) throw invalid(key, 'it contains a backslash');
  if (key.startsWith('/')) throw invalid(key, 'it is absolute');
  if (key.length > MAX_KEY_LENGTH) throw invalid(key, `it is longer than ${MAX_KEY_LENGTH} characters`);
  const segments = key.split('/');
  for (const segment of segments) {
    if (segment === '') throw invalid(key, 'it has an empty segment');
    if (segment === '..' || segment === '.') throw invalid(key, `it contains "${segment}"`);
    if (segment.startsWith('.')) throw invalid(key, 'a segment starts with "." (reserved for temporary files)');
    if (!SEGMENT_RE.test(segment))
      throw invalid(key, `segment ${JSON.stringify(segment)} has characters outside A-Z a-z 0-9 _ . + @ = , : -`);
  }
  return segments.join('/');
}

/**
 * A listing prefix: '' (everything) or a normalised key-ish string, optionally ending in '/'.
 * The part before the last '/' must be a valid key.
 */
export function normalisePrefix(prefix: string): string {
  if (prefix === '') return '';
  const trailing = prefix.endsWith('/');
  const body = trailing ? prefix.slice(0, -1) : prefix;
  return normaliseKey(body) + (trailing ? '/' : '');
}

/** Whether the directory `dirKey` may hold keys that start with `prefix` (it is above, at or below the prefix). */
export function dirMayHold(dirKey: string, prefix: string): boolean {
  return prefix.startsWith(`${dirKey}/`) || dirKey.startsWith(prefix) || `${dirKey}/`.startsWith(prefix);
}

/** True when `name` is a name one key segment can have (a file someone else put there may not be). */
export function isKeySegment(name: string): boolean {
  try {
    return normaliseKey(name) === name;
  } catch {
    return false;
  }
}

/** True when `name` is a driver-internal file or directory that must never be listed. */
export function isReservedName(name: string): boolean {
  return name.startsWith('.');
}

export function backupPrefix(domain: string, backupId: string): string {
  return `${normaliseKey(`${domain}/${backupId}`)}/`;
}

export function imageKey(domain: string, backupId: string, disk: string, format: string): string {
  return normaliseKey(`${domain}/${backupId}/${disk}.${format}`);
}

export const MANIFEST_NAME = 'manifest.json';

/** The whole-VM files a backup stores beside its images (see the manifest's `vm`). */
export const VM_XML_NAME = 'domain.xml';
export const VM_NVRAM_NAME = 'nvram.fd';
/** a TPM state file is stored as `tpm.<its file name>` */
export const VM_TPM_PREFIX = 'tpm.';

/** The key of a whole-VM file (`domain.xml`, `nvram.fd`, `tpm.<name>`) of a backup. */
export function vmFileKey(domain: string, backupId: string, name: string): string {
  return normaliseKey(`${domain}/${backupId}/${name}`);
}

export function manifestKey(domain: string, backupId: string): string {
  return normaliseKey(`${domain}/${backupId}/${MANIFEST_NAME}`);
}

/** Splits `<domain>/<backupId>/manifest.json`; undefined for any other key. */
export function parseManifestKey(key: string): { domain: string; backupId: string } | undefined {
  const parts = key.split('/');
  if (parts.length !== 3 || parts[2] !== MANIFEST_NAME) return undefined;
  return { domain: parts[0] as string, backupId: parts[1] as string };
}
