/** Opening the target a storage command names (or the default one), with the S3 flags. */
import type { Command } from 'commander';
import type { StorageTarget } from '../../storage/contract';
import { defaultTargetUrl, openTarget, targetEnvironmentFrom } from '../../storage/registry';
import { loadConfig, readManifestKey } from '../../worker/config';
import { addS3Options, s3OptionsFrom } from './s3-options';

export interface TargetFlags {
  target?: string;
  json?: boolean;
  [flag: string]: unknown;
}

export function addTargetOptions(cmd: Command, opts: { required?: boolean } = {}): Command {
  const help = 'file:///abs/dir, nfs://host/export/path or s3://bucket/prefix';
  if (opts.required) cmd.requiredOption('--target <url>', help);
  else cmd.option('--target <url>', `${help} (default: file://$VMBACKUP_STATE_DIR/backups)`);
  return addS3Options(cmd);
}

/** The CLI is the edge: the environment is read here, once, and passed down typed. */
export function openCliTarget(url: string | undefined, flags: Record<string, unknown>): StorageTarget {
  const resolved = url ?? defaultTargetUrl(loadConfig().stateDir);
  return openTarget(resolved, { s3: s3OptionsFrom(flags), env: targetEnvironmentFrom(process.env) });
}

/** Runs `fn` with an open target and always closes it. */
export async function withCliTarget<T>(
  url: string | undefined,
  flags: Record<string, unknown>,
  fn: (t: StorageTarget) => Promise<T>,
): Promise<T> {
  const target = openCliTarget(url, flags);
  try {
    return await fn(target);
  } finally {
    await target.close();
  }
}

let manifestKey: { key: Buffer | undefined } | undefined;

/**
 * The manifest signing key from VMBACKUP_MANIFEST_KEY_FILE, read once; undefined when none is configured. With a
 * key, `verify`, `restore` and `copy` refuse a manifest not signed with it and `list` marks such manifests.
 */
export function cliManifestKey(): Buffer | undefined {
  if (!manifestKey) {
    const file = loadConfig().manifestKeyFile;
    manifestKey = { key: file ? readManifestKey(file) : undefined };
  }
  return manifestKey.key;
}
