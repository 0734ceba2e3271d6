/**
 * A chunk repository's password at the CLI: `--password-file`, VMBACKUP_PASSWORD_FILE, VMBACKUP_PASSWORD (see
 * repository/chunks/password.ts), else a prompt without echo when stdin is a terminal, else one sentence saying how
 * to give it. The password stays in this process: it is never put in a workflow's or an activity's input.
 */
import { isChunkFormatError, passwordFrom, readPasswordFile } from '../repository/chunks';
import type { PasswordSource } from '../repository';
import { CliError } from './output';

export const NEW_PASSWORD_ENV = 'VMBACKUP_NEW_PASSWORD';

const HOW =
  'give it with --password-file FILE, VMBACKUP_PASSWORD_FILE or VMBACKUP_PASSWORD (stdin is not a terminal, so it cannot be asked for)';

function configured(passwordFile: string | undefined): string | undefined {
  try {
    return passwordFrom(passwordFile ? { passwordFile } : {});
  } catch (err) {
    if (isChunkFormatError(err)) throw new CliError(err.message);
    throw err;
  }
}

/**
 * The password for a repository `where` (a URL): the configured one, else asked for when `needed` (twice when
 * `confirm`: a new repository's password must be typed the same twice).
 */
export async function cliPassword(
  where: string,
  opts: { passwordFile?: string; needed: boolean; confirm?: boolean },
): Promise<string | undefined> {
  const given = configured(opts.passwordFile);
  if (given !== undefined || !opts.needed) return given;
  if (!process.stdin.isTTY) throw new CliError(`The chunk repository on ${where} needs a password: ${HOW}.`);
  return ask(`Password for the chunk repository on ${where}: `, opts.confirm ?? false);
}

/**
 * A PasswordSource for restore and verify: asks only when the repository turns out to be encrypted, and once (a
 * whole-VM restore opens the repository for its files and again for its disks).
 */
export function cliPasswordSource(where: string, passwordFile: string | undefined): PasswordSource {
  let asked: Promise<string | undefined> | undefined;
  return (needed) => {
    if (!needed) return cliPassword(where, { ...(passwordFile ? { passwordFile } : {}), needed });
    asked ??= cliPassword(where, { ...(passwordFile ? { passwordFile } : {}), needed });
    return asked;
  };
}

export const TO_PASSWORD_ENV = 'VMBACKUP_TO_PASSWORD';
export const TO_PASSWORD_FILE_ENV = 'VMBACKUP_TO_PASSWORD_FILE';

/**
 * The destination repository's password for `copy`: `--to-password-file`, VMBACKUP_TO_PASSWORD_FILE,
 * VMBACKUP_TO_PASSWORD, else asked for (once) when stdin is a terminal. Never the source's password: two repositories
 * are two secrets, and a copy into the wrong one must not open it by accident.
 */
export function cliToPasswordSource(where: string, toPasswordFile: string | undefined): PasswordSource {
  let asked: Promise<string | undefined> | undefined;
  return (needed) => {
    const file = toPasswordFile ?? process.env[TO_PASSWORD_FILE_ENV];
    let given: string | undefined;
    try {
      given = file ? readPasswordFile(file) : process.env[TO_PASSWORD_ENV] || undefined;
    } catch (err) {
      if (isChunkFormatError(err)) return Promise.reject(new CliError(err.message));
      throw err;
    }
    if (given !== undefined || !needed) return Promise.resolve(given);
    if (!process.stdin.isTTY)
      return Promise.reject(
        new CliError(
          `The chunk repository on ${where} (the destination) needs a password: give it with --to-password-file FILE, ${TO_PASSWORD_FILE_ENV} or ${TO_PASSWORD_ENV} (stdin is not a terminal, so it cannot be asked for).`,
        ),
      );
    asked ??= ask(`Password for the chunk repository on ${where} (the destination): `, false);
    return asked;
  };
}

/** A new password (key add, key change): `--new-password-file`, VMBACKUP_NEW_PASSWORD, or asked for twice. */
export async function cliNewPassword(where: string, newPasswordFile: string | undefined): Promise<string> {
  if (newPasswordFile) {
    try {
      return readPasswordFile(newPasswordFile);
    } catch (err) {
      if (isChunkFormatError(err)) throw new CliError(err.message);
      throw err;
    }
  }
  const env = process.env[NEW_PASSWORD_ENV];
  if (env) return env;
  if (!process.stdin.isTTY)
    throw new CliError(
      `The new password for the chunk repository on ${where} is missing: give it with --new-password-file FILE or ${NEW_PASSWORD_ENV} (stdin is not a terminal, so it cannot be asked for).`,
    );
  return ask(`New password for the chunk repository on ${where}: `, true);
}

async function ask(prompt: string, confirm: boolean): Promise<string> {
  const first = await readHidden(prompt);
  if (first === '') throw new CliError('No password was entered.');
  if (confirm && (await readHidden('The same password again: ')) !== first)
    throw new CliError('The two passwords differ; nothing was changed.');
  return first;
}

/** One line from the terminal, not echoed: raw mode, Enter ends it, Backspace edits it, Ctrl-C / Ctrl-D stop. */
function readHidden(prompt: string): Promise<string> {
  const stdin = process.stdin;
  return new Promise((resolve, reject) => {
    let value = '';
    const finish = (err?: Error): void => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(value);
    };
    const onData = (text: string): void => {
      for (const ch of text) {
        if (ch === '\r' || ch === '\n') return finish();
        if (ch === '\u0003') return finish(new CliError('Interrupted; nothing was changed.', 130));
        if (ch === '\u0004') return finish(value === '' ? new CliError('No password was entered.') : undefined);
        if (ch === '\u007f' || ch === '\b') value = [...value].slice(0, -1).join('');
        else value += ch;
      }
    };
    stdin.setEncoding('utf8');
    // echo off before the prompt shows: an answer typed as soon as the prompt appears is never echoed
    stdin.setRawMode(true);
    process.stderr.write(prompt);
    stdin.on('data', onData);
    stdin.resume();
  });
}
