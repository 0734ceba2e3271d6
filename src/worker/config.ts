/**
 * Configuration, parsed once at the edge (CLI and worker start); the rest of the code gets
 * typed values and never reads process.env.
 */
import { closeSync, constants as fsConstants, fstatSync, openSync, readSync } from 'node:fs';
import { hostname, homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import { DEFAULT_CONTROL_TASK_QUEUE, HOST_NAME_RE, TASK_QUEUE_RE } from '../shared/names';
import { parseAllowNotify } from '../shared/webhook';
import { parseTargetUrl } from '../storage/registry';

const optionalText = z
  .string()
  .optional()
  .transform((v) => (v ? v : undefined));

const EnvSchema = z.object({
  VMBACKUP_STATE_DIR: z.string().min(1).optional(),
  VMBACKUP_HOST: z.string().regex(HOST_NAME_RE, 'VMBACKUP_HOST must be letters, digits, ".", "_" or "-"').optional(),
  TEMPORAL_ADDRESS: optionalText, // empty = unset, as bin/vmbackup.js reads it
  TEMPORAL_NAMESPACE: z.string().min(1).default('default'),
  LIBVIRT_DEFAULT_URI: z.string().min(1).default('qemu:///system'),
  VMBACKUP_POLL_MS: z.coerce.number().int().positive().optional(),
  VMBACKUP_VIRSH_SESSION: z
    .enum(['0', '1'], { message: 'VMBACKUP_VIRSH_SESSION must be 1 (default) or 0 (a virsh process per query)' })
    .default('1'),
  VMBACKUP_TEMPORAL_PORT: z.coerce.number().int().min(1).max(65535).default(7233),
  // How to reach a cluster, named as the Temporal CLI names them; an empty variable counts as unset.
  TEMPORAL_TLS: z
    .enum(['true', 'false', '1', '0', ''], { message: 'TEMPORAL_TLS must be true or false' })
    .optional()
    .transform((v) => (v ? v === 'true' || v === '1' : undefined)),
  TEMPORAL_TLS_CERT: optionalText,
  TEMPORAL_TLS_KEY: optionalText,
  TEMPORAL_TLS_CA: optionalText,
  TEMPORAL_TLS_SERVER_NAME: optionalText,
  TEMPORAL_API_KEY: optionalText,
  VMBACKUP_PAYLOAD_KEY_FILE: optionalText,
  VMBACKUP_MANIFEST_KEY_FILE: z.string().min(1).optional(),
  VMBACKUP_ALLOW_TARGETS: z.string().optional(),
  VMBACKUP_CONTROL_QUEUE: z
    .string()
    .regex(TASK_QUEUE_RE, 'VMBACKUP_CONTROL_QUEUE must be letters, digits, ".", "_" or "-"')
    .optional()
    .or(z.literal('').transform(() => undefined)),
  VMBACKUP_ALLOW_NOTIFY: z.string().optional(),
  VMBACKUP_PULL_WINDOW_MIB: z.coerce
    .number()
    .int()
    .positive()
    .refine((n) => n % 4 === 0, 'VMBACKUP_PULL_WINDOW_MIB must be a multiple of 4 (MiB)')
    .optional(),
});

export interface Config {
  stateDir: string;
  /**
   * a pull into an image tree flushes and heartbeats a resume offset after each this many bytes of a disk
   * (VMBACKUP_PULL_WINDOW_MIB, a multiple of 4 MiB; default 1 GiB)
   */
  pullWindowBytes?: number;
  /** this machine's name in task queues (`vmbackup-host-<host>`) */
  host: string;
  /** set: submit to that cluster only; unset: embedded local server + in-process worker */
  temporalAddress?: string;
  namespace: string;
  /** TLS and API key for every connection to a cluster (src/client/access.ts reads the files) */
  temporalAccess: TemporalAccessConfig;
  /** a 32-byte AES key: every payload to and from Temporal is encrypted with it (src/client/codec.ts) */
  payloadKeyFile?: ConfigFile;
  libvirtUri: string;
  pollIntervalMs?: number;
  /** answer libvirt queries from long-lived virsh shells (VMBACKUP_VIRSH_SESSION=0 turns it off, for debugging) */
  virshSessions: boolean;
  /** the embedded default's dev server (scripts/stack.sh honours VMBACKUP_TEMPORAL_PORT too) */
  localTemporalAddress: string;
  /**
   * the file holding the manifest signing key (VMBACKUP_MANIFEST_KEY_FILE); read with `readManifestKey` by the
   * worker at start and by the commands that read a target, not by every command
   */
  manifestKeyFile?: string;
  /**
   * `--password-file` of `vmbackup worker` or `vmbackup backup` (its in-process worker): the chunk repositories'
   * password; without it the worker reads VMBACKUP_PASSWORD_FILE, then VMBACKUP_PASSWORD, at its start
   */
  passwordFile?: string;
  /**
   * Target URL prefixes this host's worker ships to (VMBACKUP_ALLOW_TARGETS, `vmbackup worker --allow-target`);
   * undefined: every target. Anyone who can start a workflow on the cluster chooses a backup's targets.
   */
  allowTargets?: string[];
  /**
   * the task queue of scheduled runs (`scheduledBackups`): every worker serves it, `schedule create` starts runs
   * there (VMBACKUP_CONTROL_QUEUE; default vmbackup-control)
   */
  controlTaskQueue: string;
  /**
   * Webhook URL prefixes this host's worker POSTs events to (VMBACKUP_ALLOW_NOTIFY, `vmbackup worker
   * --allow-notify`); undefined: any http(s) URL a backup names.
   */
  allowNotify?: string[];
}

/** A file named in the configuration, with where it was named (a flag or a variable), for messages. */
export interface ConfigFile {
  path: string;
  from: string;
}

export interface TemporalAccessConfig {
  /** TLS on: TEMPORAL_TLS / --tls, else implied by any other TLS option or an API key (as the Temporal CLI does) */
  tls: boolean;
  /** what decided `tls`, for messages */
  tlsFrom: string;
  clientCert?: ConfigFile;
  clientKey?: ConfigFile;
  serverCa?: ConfigFile;
  serverName?: string;
  apiKey?: string;
  apiKeyFrom: string;
}

/** The connection flags of the commands that talk to Temporal; each wins over its variable. */
export interface TemporalFlags {
  tls?: boolean;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsServerName?: string;
  apiKey?: string;
  payloadKeyFile?: string;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env, flags: TemporalFlags = {}): Config {
  const parsed = EnvSchema.safeParse(env);
  if (!parsed.success) {
    throw new Error(parsed.error.issues.map((i) => i.message).join('; '));
  }
  const e = parsed.data;
  return {
    stateDir: resolve(e.VMBACKUP_STATE_DIR ?? join(homedir(), '.local', 'state', 'vmbackup')),
    host: e.VMBACKUP_HOST ?? defaultHost(),
    temporalAddress: e.TEMPORAL_ADDRESS,
    namespace: e.TEMPORAL_NAMESPACE,
    temporalAccess: temporalAccess(e, flags),
    payloadKeyFile: file(
      flags.payloadKeyFile,
      '--payload-key-file',
      e.VMBACKUP_PAYLOAD_KEY_FILE,
      'VMBACKUP_PAYLOAD_KEY_FILE',
    ),
    libvirtUri: e.LIBVIRT_DEFAULT_URI,
    pollIntervalMs: e.VMBACKUP_POLL_MS,
    virshSessions: e.VMBACKUP_VIRSH_SESSION === '1',
    localTemporalAddress: `127.0.0.1:${e.VMBACKUP_TEMPORAL_PORT}`,
    ...(e.VMBACKUP_MANIFEST_KEY_FILE ? { manifestKeyFile: resolve(e.VMBACKUP_MANIFEST_KEY_FILE) } : {}),
    ...(e.VMBACKUP_ALLOW_TARGETS !== undefined && e.VMBACKUP_ALLOW_TARGETS.trim() !== ''
      ? { allowTargets: parseAllowTargets(e.VMBACKUP_ALLOW_TARGETS.split(/[\s,]+/), 'VMBACKUP_ALLOW_TARGETS') }
      : {}),
    controlTaskQueue: e.VMBACKUP_CONTROL_QUEUE ?? DEFAULT_CONTROL_TASK_QUEUE,
    ...(e.VMBACKUP_ALLOW_NOTIFY !== undefined && e.VMBACKUP_ALLOW_NOTIFY.trim() !== ''
      ? { allowNotify: parseAllowNotify(e.VMBACKUP_ALLOW_NOTIFY.split(/[\s,]+/), 'VMBACKUP_ALLOW_NOTIFY') }
      : {}),
    ...(e.VMBACKUP_PULL_WINDOW_MIB ? { pullWindowBytes: e.VMBACKUP_PULL_WINDOW_MIB * (1 << 20) } : {}),
  };
}

function file(flag: string | undefined, flagName: string, variable: string | undefined, varName: string) {
  if (flag) return { path: resolve(flag), from: flagName };
  if (variable) return { path: resolve(variable), from: varName };
  return undefined;
}

function temporalAccess(e: z.infer<typeof EnvSchema>, flags: TemporalFlags): TemporalAccessConfig {
  const clientCert = file(flags.tlsCert, '--tls-cert', e.TEMPORAL_TLS_CERT, 'TEMPORAL_TLS_CERT');
  const clientKey = file(flags.tlsKey, '--tls-key', e.TEMPORAL_TLS_KEY, 'TEMPORAL_TLS_KEY');
  const serverCa = file(flags.tlsCa, '--tls-ca', e.TEMPORAL_TLS_CA, 'TEMPORAL_TLS_CA');
  const serverName = flags.tlsServerName || e.TEMPORAL_TLS_SERVER_NAME;
  const apiKey = flags.apiKey || e.TEMPORAL_API_KEY;
  const implied = !!(clientCert || clientKey || serverCa || serverName || apiKey);
  const explicit = flags.tls ? true : e.TEMPORAL_TLS;
  return {
    tls: explicit ?? implied,
    tlsFrom: flags.tls ? '--tls' : e.TEMPORAL_TLS !== undefined ? 'TEMPORAL_TLS' : 'the TLS options',
    ...(clientCert ? { clientCert } : {}),
    ...(clientKey ? { clientKey } : {}),
    ...(serverCa ? { serverCa } : {}),
    ...(serverName ? { serverName } : {}),
    ...(apiKey ? { apiKey } : {}),
    apiKeyFrom: flags.apiKey ? '--api-key' : 'TEMPORAL_API_KEY',
  };
}

/** At least 256 bits: an HMAC-SHA256 key shorter than that is weaker than the hash. */
export const MIN_MANIFEST_KEY_BYTES = 32;
const MAX_MANIFEST_KEY_FILE_BYTES = 4096;

/**
 * The manifest signing key: the bytes of `file`, without a trailing newline (so `openssl rand -base64 48 > key`
 * and a copy made with an editor give the same key). Refused, with one sentence, when the file is not a regular
 * file owned by this user (or root), is readable or writable by group or others, or holds fewer than 32 bytes.
 */
export function readManifestKey(file: string): Buffer {
  const name = `VMBACKUP_MANIFEST_KEY_FILE ${file}`;
  let fd: number;
  try {
    fd = openSync(file, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  } catch (err) {
    const code = (err as { code?: string }).code ?? 'error';
    throw new Error(
      `${name} cannot be read (${code}); create it with \`openssl rand -base64 48 > FILE; chmod 600 FILE\`.`,
    );
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new Error(`${name} is not a regular file.`);
    const uid = process.geteuid?.() ?? st.uid;
    if (st.uid !== uid && st.uid !== 0) {
      throw new Error(
        `${name} belongs to user ${st.uid}, not to you or root; a key someone else can replace is no key.`,
      );
    }
    if ((st.mode & 0o077) !== 0) {
      throw new Error(
        `${name} is readable or writable by group or others (mode ${(st.mode & 0o777).toString(8)}); run \`chmod 600 ${file}\`: anyone who reads the key can sign manifests.`,
      );
    }
    const buf = Buffer.alloc(MAX_MANIFEST_KEY_FILE_BYTES + 1);
    let n = 0;
    for (;;) {
      const got = readSync(fd, buf, n, buf.length - n, n);
      if (got === 0 || (n += got) >= buf.length) break;
    }
    if (n > MAX_MANIFEST_KEY_FILE_BYTES)
      throw new Error(`${name} is larger than ${MAX_MANIFEST_KEY_FILE_BYTES} bytes; it is not a key file.`);
    let end = n;
    while (end > 0 && (buf[end - 1] === 0x0a || buf[end - 1] === 0x0d)) end--;
    if (end < MIN_MANIFEST_KEY_BYTES) {
      throw new Error(
        `${name} holds ${end} bytes of key; it needs at least ${MIN_MANIFEST_KEY_BYTES} (\`openssl rand -base64 48 > ${file}\`).`,
      );
    }
    return Buffer.from(buf.subarray(0, end));
  } finally {
    closeSync(fd);
  }
}

/**
 * Target URL prefixes for an allow-list, each a valid target URL (`s3://bucket` allows the whole bucket).
 * Throws one sentence naming `source` for a bad one.
 */
export function parseAllowTargets(values: readonly string[], source: string): string[] {
  const prefixes = values.map((v) => v.trim()).filter((v) => v !== '');
  for (const p of prefixes) {
    try {
      parseTargetUrl(p);
    } catch (err) {
      throw new Error(`${source}: ${(err as Error).message}`);
    }
  }
  return prefixes;
}

function defaultHost(): string {
  const name = hostname().split('.')[0] ?? '';
  return HOST_NAME_RE.test(name) ? name : 'localhost';
}
