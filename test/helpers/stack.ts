/**
 * The real local stack (scripts/stack.sh) as seen by integration tests: typed settings from the
 * environment, probes that FAIL a test with the command to run when a component is missing, and a
 * way to run the stack script itself (restart tests).
 */
import { execFile, spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { HeadBucketCommand, S3Client } from '@aws-sdk/client-s3';
import type { S3ClientConfig } from '@aws-sdk/client-s3';
import { Connection } from '@temporalio/client';

export interface StackEnv {
  stateDir: string;
  temporal: { address: string; namespace: string };
  s3: { endpoint: string; region: string; accessKeyId: string; secretAccessKey: string; bucket: string };
  nfs: { url: string; exportDir: string };
  libvirt: { uri: string };
}

/** Custom search attributes scripts/stack.sh registers (all Keyword). */
export const STACK_SEARCH_ATTRIBUTES = [
  'VmbackupDomain',
  'VmbackupHost',
  'VmbackupState',
  'VmbackupBackupId',
  'VmbackupMethod',
] as const;

const REPO_ROOT = resolve(__dirname, '..', '..');
const STACK_SCRIPT = join(REPO_ROOT, 'scripts', 'stack.sh');
const PROBE_TIMEOUT_MS = 10_000;

let parsed: StackEnv | undefined;

/** Settings of the local stack: the variables `npm run stack:env` prints, with the same defaults. Parsed once. */
export function stackEnv(): StackEnv {
  parsed ??= parseStackEnv(process.env);
  return parsed;
}

function parseStackEnv(env: NodeJS.ProcessEnv): StackEnv {
  // An empty variable counts as unset, as in the shell script's ${VAR:-default}.
  const get = (name: string, fallback: string): string => {
    const value = env[name]?.trim();
    return value ? value : fallback;
  };
  const stateDir = resolve(get('VMBACKUP_STATE_DIR', join(homedir(), '.local', 'state', 'vmbackup')));
  const temporalPort = get('VMBACKUP_TEMPORAL_PORT', '7233');
  if (!/^\d+$/.test(temporalPort))
    throw new Error(`VMBACKUP_TEMPORAL_PORT must be a port number, not '${temporalPort}'`);
  const settings: StackEnv = {
    stateDir,
    temporal: {
      address: get('TEMPORAL_ADDRESS', `127.0.0.1:${temporalPort}`),
      namespace: get('TEMPORAL_NAMESPACE', 'default'),
    },
    s3: {
      endpoint: get('AWS_ENDPOINT_URL', 'http://127.0.0.1:7480').replace(/\/+$/, ''),
      region: get('AWS_REGION', 'us-east-1'),
      accessKeyId: get('AWS_ACCESS_KEY_ID', 'BACKUPKEY'),
      secretAccessKey: get('AWS_SECRET_ACCESS_KEY', 'BACKUPSECRET'),
      bucket: get('VMBACKUP_TEST_BUCKET', 'vmbackup-test'),
    },
    nfs: {
      url: get('VMBACKUP_TEST_NFS_URL', 'nfs://127.0.0.1/export').replace(/\/+$/, ''),
      exportDir: resolve(get('VMBACKUP_NFS_EXPORT_DIR', join(stateDir, 'stack', 'nfs', 'export'))),
    },
    libvirt: { uri: get('LIBVIRT_DEFAULT_URI', 'qemu:///system') },
  };
  if (!/^https?:\/\//.test(settings.s3.endpoint)) {
    throw new Error(`AWS_ENDPOINT_URL must be an http(s) URL, not '${settings.s3.endpoint}'`);
  }
  if (!settings.nfs.url.startsWith('nfs://')) {
    throw new Error(`VMBACKUP_TEST_NFS_URL must be an nfs:// URL, not '${settings.nfs.url}'`);
  }
  return settings;
}

/** Client settings radosgw needs: path-style buckets, and no flexible checksums (else `411 MissingContentLength`). */
export function s3ClientConfig(env: StackEnv = stackEnv()): S3ClientConfig {
  return {
    endpoint: env.s3.endpoint,
    region: env.s3.region,
    credentials: { accessKeyId: env.s3.accessKeyId, secretAccessKey: env.s3.secretAccessKey },
    forcePathStyle: true,
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  };
}

function upHint(component: string): string {
  return `run \`npm run stack:up -- ${component}\``;
}

// Duck-typed: errors from Node internals (fetch, child_process) come from another realm under Jest, so
// `instanceof Error` is false for them.
function reason(err: unknown): string {
  if (typeof err !== 'object' || err === null) return String(err);
  const { name, message, code, cause } = err as { name?: unknown; message?: unknown; code?: unknown; cause?: unknown };
  // fetch() says only "fetch failed"; the cause says ECONNREFUSED
  if (cause !== undefined && cause !== null) return reason(cause);
  let text = (typeof message === 'string' && message.split('\n')[0]) || String(err);
  // the S3 SDK puts the answer in the name (`NotFound`) and little in the message (`UnknownError`)
  if (typeof name === 'string' && !['Error', 'TypeError'].includes(name) && !text.includes(name))
    text = `${name}: ${text}`;
  return typeof code === 'string' && !text.includes(code) ? `${code}: ${text}` : text;
}

interface ProcessResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(file: string, args: readonly string[], timeoutMs: number): Promise<ProcessResult> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, args, { timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err && typeof err.code !== 'number') {
        reject(err); // could not start (ENOENT) or killed by the timeout
        return;
      }
      resolvePromise({ code: err ? (err.code as number) : 0, stdout, stderr });
    });
  });
}

/** Throws unless the Temporal server answers and has the stack's search attributes. */
export async function requireTemporal(): Promise<void> {
  const { address, namespace } = stackEnv().temporal;
  let connection: Connection;
  try {
    connection = await Connection.connect({ address, connectTimeout: PROBE_TIMEOUT_MS });
  } catch (err) {
    throw new Error(`Temporal is not answering on ${address} (${reason(err)}): ${upHint('temporal')}`);
  }
  let registered: Record<string, unknown>;
  try {
    const response = await connection.operatorService.listSearchAttributes({ namespace });
    registered = response.customAttributes ?? {};
  } catch (err) {
    throw new Error(
      `Temporal on ${address} does not serve namespace '${namespace}' (${reason(err)}): ${upHint('temporal')}`,
    );
  } finally {
    await connection.close();
  }
  const missing = STACK_SEARCH_ATTRIBUTES.filter((name) => !(name in registered));
  if (missing.length > 0) {
    throw new Error(`Temporal on ${address} lacks the search attributes ${missing.join(', ')}: ${upHint('temporal')}`);
  }
}

/** Throws unless libvirtd answers on the stack's URI. */
export async function requireLibvirt(): Promise<void> {
  const { uri } = stackEnv().libvirt;
  let result: ProcessResult;
  try {
    result = await run('virsh', ['-c', uri, 'version'], PROBE_TIMEOUT_MS);
  } catch (err) {
    throw new Error(`libvirt cannot be reached on ${uri} (virsh: ${reason(err)}): ${upHint('libvirt')}`);
  }
  if (result.code !== 0) {
    const detail = result.stderr.trim().split('\n').pop() ?? '';
    throw new Error(`libvirt is not answering on ${uri} (${detail}): ${upHint('libvirt')}`);
  }
}

/** Throws unless radosgw answers and the test bucket exists and is ours. */
export async function requireS3(): Promise<void> {
  const env = stackEnv();
  const { endpoint, bucket } = env.s3;
  try {
    await fetch(`${endpoint}/`, { signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) });
  } catch (err) {
    throw new Error(`S3 (Ceph radosgw) is not answering on ${endpoint} (${reason(err)}): ${upHint('s3')}`);
  }
  const client = new S3Client({ ...s3ClientConfig(env), maxAttempts: 1 });
  try {
    await client.send(new HeadBucketCommand({ Bucket: bucket }), {
      abortSignal: AbortSignal.timeout(PROBE_TIMEOUT_MS),
    });
  } catch (err) {
    throw new Error(`S3 bucket '${bucket}' is not usable on ${endpoint} (${reason(err)}): ${upHint('s3')}`);
  } finally {
    client.destroy();
  }
}

/** Throws unless nfs-ganesha serves the test export and its backing directory exists. */
export async function requireNfs(): Promise<void> {
  const { url, exportDir } = stackEnv().nfs;
  let result: ProcessResult;
  try {
    result = await run('nfs-ls', [url], PROBE_TIMEOUT_MS);
  } catch (err) {
    const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
    throw new Error(
      missing
        ? `nfs-ls (libnfs-utils) is not installed: ${upHint('nfs')}`
        : `NFS (nfs-ganesha) is not answering on ${url} (${reason(err)}): ${upHint('nfs')}`,
    );
  }
  if (result.code !== 0) {
    const detail = result.stderr.trim().split('\n').pop() ?? '';
    throw new Error(`NFS (nfs-ganesha) is not serving ${url} (${detail}): ${upHint('nfs')}`);
  }
  const dir = await stat(exportDir).catch(() => undefined);
  if (!dir?.isDirectory()) {
    throw new Error(`the NFS export's backing directory ${exportDir} does not exist: ${upHint('nfs')}`);
  }
}

/**
 * Runs `bash scripts/stack.sh ...args` (e.g. `restart s3`) and resolves when it has exited 0; rejects
 * with the end of its progress output otherwise. Daemons it starts never hold our pipes.
 */
export function stackScript(...args: string[]): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn('bash', [STACK_SCRIPT, ...args], { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code === 0) {
        resolvePromise({ stdout, stderr });
        return;
      }
      const tail = stderr.trim().split('\n').slice(-30).join('\n');
      reject(new Error(`scripts/stack.sh ${args.join(' ')} failed (${signal ?? `exit ${code}`}):\n${tail}`));
    });
  });
}
