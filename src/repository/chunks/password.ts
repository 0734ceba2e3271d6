/**
 * Where a chunk repository's password comes from. Never from a workflow's input: Temporal stores inputs in its
 * history, readable by anyone on the cluster. The CLI and the worker each read it from their own environment:
 * `VMBACKUP_PASSWORD`, or the first line of the file `VMBACKUP_PASSWORD_FILE` (or `--password-file`) names.
 */
import { readFileSync, statSync } from 'node:fs';
import { ChunkFormatError } from './errors';

export const PASSWORD_ENV = 'VMBACKUP_PASSWORD';
export const PASSWORD_FILE_ENV = 'VMBACKUP_PASSWORD_FILE';
/** A password file is a line or two; anything bigger is the wrong file. */
const PASSWORD_FILE_MAX_BYTES = 4096;

export interface PasswordSources {
  /** `--password-file`: wins over the environment */
  passwordFile?: string;
  env?: NodeJS.ProcessEnv;
}

/** The first line of a password file, without its line ending; one sentence when it cannot be used. */
export function readPasswordFile(path: string): string {
  let size: number;
  try {
    size = statSync(path).size;
  } catch (err) {
    throw new ChunkFormatError(
      'invalid-argument',
      `The password file ${path} cannot be read: ${(err as Error).message}.`,
    );
  }
  if (size > PASSWORD_FILE_MAX_BYTES)
    throw new ChunkFormatError('invalid-argument', `The password file ${path} is larger than a password file can be.`);
  const text = readFileSync(path, 'utf8');
  const line = text.split(/\r?\n/, 1)[0] ?? '';
  if (line === '') throw new ChunkFormatError('invalid-argument', `The password file ${path} has an empty first line.`);
  return line;
}

/** The password from `--password-file`, VMBACKUP_PASSWORD_FILE or VMBACKUP_PASSWORD (in that order), if any. */
export function passwordFrom(sources: PasswordSources = {}): string | undefined {
  const env = sources.env ?? process.env;
  if (sources.passwordFile) return readPasswordFile(sources.passwordFile);
  const file = env[PASSWORD_FILE_ENV];
  if (file) return readPasswordFile(file);
  const pw = env[PASSWORD_ENV];
  return pw ? pw : undefined;
}
