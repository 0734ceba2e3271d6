/**
 * `vmbackup repo init|info URL` and `vmbackup repo key list|add|remove|change URL`: a chunk repository on a target
 * (docs/chunk-format.md). The password comes from --password-file, VMBACKUP_PASSWORD_FILE, VMBACKUP_PASSWORD or a
 * prompt (src/cli/password.ts); a new one from --new-password-file, VMBACKUP_NEW_PASSWORD or a prompt.
 */
import type { Command } from 'commander';
import {
  CHUNKS_PREFIX,
  CONFIG_KEY,
  INDEXES_PREFIX,
  KEYS_PREFIX,
  SMALL_OBJECT_MAX_BYTES,
  addKey,
  changePassword,
  chunkIdOfKey,
  initRepository,
  listKeys,
  openRepository,
  parseRepositoryConfig,
  removeKey,
  type OpenRepository,
} from '../../repository/chunks';
import type { StorageTarget } from '../../storage/contract';
import { StorageError } from '../../storage/errors';
import { action, CliError, formatBytes, printJson, safeText } from '../output';
import { cliNewPassword, cliPassword } from '../password';
import { addS3Options } from './s3-options';
import { withCliTarget } from './target-options';

interface RepoFlags {
  passwordFile?: string;
  json?: boolean;
  [flag: string]: unknown;
}

interface InitFlags extends RepoFlags {
  encryption: string;
  compression: string;
}

interface KeyFlags extends RepoFlags {
  newPasswordFile?: string;
}

const ENCRYPTIONS = { repokey: 'aes-256-gcm', none: 'none' } as const;
const COMPRESSIONS = ['zstd', 'none'] as const;

function common(cmd: Command, opts: { json?: boolean } = {}): Command {
  cmd.option('--password-file <file>', "the repository's password: the file's first line");
  if (opts.json !== false) cmd.option('--json', 'print one JSON object');
  return addS3Options(cmd);
}

export function register(program: Command): void {
  const repo = program
    .command('repo')
    .description('a chunk repository on a target: deduplicated, compressed and (with a password) encrypted backups');
  common(
    repo
      .command('init')
      .description('create a chunk repository on a target (refused where one exists)')
      .argument('<url>', 'file:///abs/dir, nfs://host/export/path or s3://bucket/prefix')
      .option(
        '--encryption <mode>',
        'repokey: AES-256-GCM, the master key stored in the repository wrapped with the password; none',
        'repokey',
      )
      .option('--compression <algorithm>', 'zstd or none', 'zstd'),
  ).action(action(async (url: string, flags: InitFlags) => runInit(url, flags)));
  common(
    repo
      .command('info')
      .description(
        "a repository's config, keys and size (the password, when given, checks the config against its keys)",
      )
      .argument('<url>', 'the target URL'),
  ).action(action(async (url: string, flags: RepoFlags) => runInfo(url, flags)));

  const key = repo.command('key').description("manage the repository's passwords (key objects)");
  common(key.command('list').description('the key objects; marks the one the password opens').argument('<url>')).action(
    action(async (url: string, flags: RepoFlags) => withOpened(url, flags, (r) => runKeyList(r, flags))),
  );
  common(
    key
      .command('add')
      .description('add a password (a key object wrapping the same master key)')
      .argument('<url>')
      .option('--new-password-file <file>', 'the new password: the first line of this file'),
  ).action(
    action(async (url: string, flags: KeyFlags) =>
      withOpened(url, flags, async (r) => {
        const id = await addKey(r, await cliNewPassword(r.where, flags.newPasswordFile));
        report(flags, { target: r.where, added: id }, `Added key ${id} to the chunk repository on ${r.where}.`);
      }),
    ),
  );
  common(
    key
      .command('remove')
      .description('remove a key object (never the one the password opens, never the last one)')
      .argument('<url>')
      .argument('<id>', 'the key id (`repo key list`)'),
  ).action(
    action(async (url: string, id: string, flags: RepoFlags) =>
      withOpened(url, flags, async (r) => {
        const had = (await listKeys(r)).includes(id);
        await removeKey(r, id);
        if (!had)
          throw new CliError(`The chunk repository on ${r.where} has no key ${id}; \`repo key list\` shows them.`);
        report(flags, { target: r.where, removed: id }, `Removed key ${id} from the chunk repository on ${r.where}.`);
      }),
    ),
  );
  common(
    key
      .command('change')
      .description('change the password: a new key object, then the old one removed')
      .argument('<url>')
      .option('--new-password-file <file>', 'the new password: the first line of this file'),
  ).action(
    action(async (url: string, flags: KeyFlags) =>
      withOpened(url, flags, async (r) => {
        const old = r.keyId;
        const changed = await changePassword(r, await cliNewPassword(r.where, flags.newPasswordFile));
        report(
          flags,
          { target: r.where, removed: old, added: changed.keyId },
          `Changed the password of the chunk repository on ${r.where}: key ${String(changed.keyId)} replaces ${String(old)}.`,
        );
      }),
    ),
  );
}

function report(flags: RepoFlags, json: Record<string, unknown>, sentence: string): void {
  if (flags.json) printJson(json);
  else process.stdout.write(`${safeText(sentence)}\n`);
}

async function runInit(url: string, flags: InitFlags): Promise<void> {
  const encryption = ENCRYPTIONS[flags.encryption as keyof typeof ENCRYPTIONS];
  if (!Object.hasOwn(ENCRYPTIONS, flags.encryption))
    throw new CliError(
      `--encryption must be repokey or none, not "${flags.encryption}" (keyfile, a key kept outside the repository, is not offered yet).`,
    );
  if (!(COMPRESSIONS as readonly string[]).includes(flags.compression))
    throw new CliError(`--compression must be zstd or none, not "${flags.compression}".`);
  const compression = flags.compression as (typeof COMPRESSIONS)[number];
  await withCliTarget(url, flags, async (target) => {
    if ((await target.stat(CONFIG_KEY)) !== undefined)
      throw new CliError(`${target.displayUrl} already holds a chunk repository; nothing was changed.`);
    if (flags.s3ObjectLock !== undefined) {
      if (!target.objectLock)
        throw new CliError(
          `--s3-object-lock needs an s3:// target, and ${target.displayUrl} is not one; nothing was written.`,
        );
      if (!(await target.objectLock.enabled()))
        throw new CliError(
          `${target.displayUrl} cannot hold a locked chunk repository: its bucket does not have Object Lock enabled, and it can only be enabled when a bucket is created; create one with \`aws s3api create-bucket --bucket NAME --object-lock-enabled-for-bucket\`. Nothing was written.`,
        );
    }
    let password: string | undefined;
    if (encryption === 'none') {
      if (flags.passwordFile)
        throw new CliError('--encryption none takes no password; leave out --password-file or choose repokey.');
    } else
      password = await cliPassword(target.displayUrl, {
        passwordFile: flags.passwordFile,
        needed: true,
        confirm: true,
      });
    const repo = await initRepository(target, { encryption, compression, ...(password ? { password } : {}) });
    const { config } = repo;
    if (flags.json) {
      printJson({ target: repo.where, ...config, keyId: repo.keyId ?? null });
      return;
    }
    process.stdout.write(
      `${safeText(
        `Created ${encryption === 'none' ? 'an unencrypted' : 'an encrypted'} chunk repository on ${repo.where} (id ${config.repositoryId}, ${formatBytes(config.chunkSize)} chunks, compression ${config.compression}, encryption ${config.encryption}).`,
      )}\n`,
    );
    if (password)
      process.stderr.write(
        'Keep the password safe: without it (or another key added with `vmbackup repo key add`) no backup in this repository can be read.\n',
      );
  });
}

async function runInfo(url: string, flags: RepoFlags): Promise<void> {
  await withCliTarget(url, flags, async (target) => {
    const config = parseRepositoryConfig(await readConfigObject(target), target.displayUrl);
    // the config is plaintext: only a password that opens a key proves it is the one the keys were made for
    const password = await cliPassword(target.displayUrl, { passwordFile: flags.passwordFile, needed: false });
    const opened = password !== undefined ? await openRepository(target, password) : undefined;
    const counts = await countObjects(target);
    const info = {
      target: target.displayUrl,
      ...config,
      keys: counts.keys,
      chunks: counts.chunks,
      chunkBytes: counts.chunkBytes,
      indexes: counts.indexes,
      checkedWithPassword: opened !== undefined,
      keyId: opened?.keyId ?? null,
    };
    if (flags.json) {
      printJson(info);
      return;
    }
    const lines = [
      `chunk repository  ${target.displayUrl}`,
      `id                ${config.repositoryId}`,
      `format            ${config.format} version ${config.version}`,
      `chunk size        ${formatBytes(config.chunkSize)}`,
      `encryption        ${config.encryption}${config.encryption === 'none' ? '' : ` (${counts.keys} key${counts.keys === 1 ? '' : 's'})`}`,
      `compression       ${config.compression}`,
      `chunks            ${counts.chunks} (${formatBytes(counts.chunkBytes)} stored)`,
      `indexes           ${counts.indexes}`,
      `config            ${opened ? `checked against key ${String(opened.keyId ?? '(unencrypted)')}` : 'not checked (give the password to check it against the keys)'}`,
    ];
    process.stdout.write(`${lines.map((l) => safeText(l)).join('\n')}\n`);
  });
}

/** The config object's bytes; one sentence when the target holds no repository. */
async function readConfigObject(target: StorageTarget): Promise<Buffer> {
  try {
    return await target.getBuffer(CONFIG_KEY, { maxBytes: SMALL_OBJECT_MAX_BYTES });
  } catch (err) {
    if (err instanceof StorageError && err.kind === 'not-found')
      throw new CliError(
        `${target.displayUrl} holds no chunk repository (no ${CONFIG_KEY}); create one with \`vmbackup repo init ${target.displayUrl}\`.`,
      );
    throw err;
  }
}

async function countObjects(
  target: StorageTarget,
): Promise<{ keys: number; chunks: number; chunkBytes: number; indexes: number }> {
  const out = { keys: 0, chunks: 0, chunkBytes: 0, indexes: 0 };
  for await (const o of target.list(KEYS_PREFIX)) if (o.key.length > KEYS_PREFIX.length) out.keys++;
  for await (const o of target.list(CHUNKS_PREFIX)) {
    if (!chunkIdOfKey(o.key)) continue;
    out.chunks++;
    out.chunkBytes += o.size;
  }
  for await (const o of target.list(INDEXES_PREFIX)) if (o.key.length > INDEXES_PREFIX.length) out.indexes++;
  return out;
}

async function withOpened(url: string, flags: RepoFlags, fn: (repo: OpenRepository) => Promise<void>): Promise<void> {
  await withCliTarget(url, flags, async (target) => {
    // an unencrypted repository has no keys: say so instead of asking for a password it cannot use
    const config = parseRepositoryConfig(await readConfigObject(target), target.displayUrl);
    if (config.encryption === 'none')
      throw new CliError(
        `The chunk repository on ${target.displayUrl} is not encrypted: it has no keys (no password).`,
      );
    const password = await cliPassword(target.displayUrl, { passwordFile: flags.passwordFile, needed: true });
    const repo = await openRepository(target, password);
    if (!repo.keys)
      throw new CliError(`The chunk repository on ${repo.where} is not encrypted: it has no keys (no password).`);
    await fn(repo);
  });
}

async function runKeyList(repo: OpenRepository, flags: RepoFlags): Promise<void> {
  const ids = await listKeys(repo);
  if (flags.json) {
    printJson({ target: repo.where, keys: ids.map((id) => ({ id, current: id === repo.keyId })) });
    return;
  }
  for (const id of ids) process.stdout.write(`${id}${id === repo.keyId ? '  (this password)' : ''}\n`);
}
