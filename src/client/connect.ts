/**
 * Connecting to Temporal. With TEMPORAL_ADDRESS set we only talk to that cluster (workers on
 * each host do the work), with its TLS and API key (access.ts). Without it we are the embedded default: use the
 * local dev server on 127.0.0.1:7233, starting it (SQLite under the state dir) through the project's stack
 * script when nothing answers. Every connection carries the payload codec when a payload key is configured.
 */
import { spawn } from 'node:child_process';
import { createConnection } from 'node:net';
import { join, resolve } from 'node:path';
import { Client, Connection } from '@temporalio/client';
import type { Config } from '../worker/config';
import { explainConnectFailure, splitAddress, temporalConnectOptions } from './access';
import { payloadCodecs } from './codec';

export interface Session {
  client: Client;
  address: string;
  /** true when no cluster was configured: the caller runs an in-process worker */
  embedded: boolean;
  close(): Promise<void>;
}

/** package root: dist/client or src/client -> .. -> .. */
export const PACKAGE_ROOT = resolve(__dirname, '..', '..');

export async function openSession(
  config: Config,
  opts: { log?: (line: string) => void; startLocalServer?: boolean } = {},
): Promise<Session> {
  const embedded = !config.temporalAddress;
  const address = config.temporalAddress ?? config.localTemporalAddress;
  // Files are read and checked before anything starts: a bad certificate path fails with its own sentence.
  const access = temporalConnectOptions(config);
  const dataConverter = payloadCodecs(config, 'client');
  let started = false;
  if (embedded && !(await answers(address))) {
    // status and cancel only read what exists: no server, no backup to read
    if (!(opts.startLocalServer ?? true)) throw new Error(unreachableSentence(config, address, 'connection refused'));
    opts.log?.(`starting the local Temporal dev server on ${address} (state in ${config.stateDir})`);
    await startLocalServer(config);
    started = true;
  }
  let connection: Connection;
  try {
    connection = await Connection.connect({ address, connectTimeout: '10s', ...access });
  } catch (err) {
    throw await explainConnectFailure(err, {
      address,
      embedded,
      config,
      unreachable: (reason) =>
        embedded && !started
          ? // something took the port: our TCP probe got an answer, gRPC did not
            `something answers on ${address}, but not as a Temporal server (${reason}): another program uses the ` +
            `port of vmbackup's local dev server; give the dev server another one with VMBACKUP_TEMPORAL_PORT`
          : unreachableSentence(config, address, reason, started),
    });
  }
  const client = new Client({ connection, namespace: config.namespace, dataConverter });
  return { client, address, embedded, close: () => connection.close() };
}

/**
 * "Nothing answers", with what was tried and the fix that applies: the cluster's address, or the local dev
 * server that only `vmbackup backup` starts.
 */
export function unreachableSentence(config: Config, address: string, reason: string, started = false): string {
  if (config.temporalAddress) {
    return `cannot reach the Temporal cluster at ${address} (TEMPORAL_ADDRESS): ${reason}; check the address and that the server is up`;
  }
  if (started) {
    return `the local Temporal dev server vmbackup started does not answer on ${address} (${reason}): see ${join(config.stateDir, 'stack', 'temporal', 'temporal.log')}`;
  }
  return (
    `no Temporal server answers on ${address} (${reason}): without TEMPORAL_ADDRESS vmbackup uses its local dev server ` +
    `(port VMBACKUP_TEMPORAL_PORT, default 7233), which only \`vmbackup backup\` starts; ` +
    `to use a Temporal cluster instead, set TEMPORAL_ADDRESS`
  );
}

/**
 * Runs `scripts/stack.sh up temporal`, which leaves the dev server running after we exit. The server and the
 * script get only what they need from our environment: no AWS credentials, no Temporal API key, no key files.
 */
async function startLocalServer(config: Config): Promise<void> {
  const script = resolve(PACKAGE_ROOT, 'scripts', 'stack.sh');
  const code = await new Promise<number>((resolveExit, reject) => {
    const child = spawn('bash', [script, 'up', 'temporal'], {
      env: localServerEnv(process.env, config),
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    child.on('error', reject);
    child.on('exit', (c) => resolveExit(c ?? 1));
  });
  if (code !== 0) throw new Error(`could not start the local Temporal server (${script} up temporal exited ${code})`);
}

/** What `stack.sh up temporal` needs to find, install and start the server; nothing else of ours. */
const LOCAL_SERVER_ENV = [
  'PATH',
  'HOME',
  'USER',
  'LOGNAME',
  'LANG',
  'LC_ALL',
  'TMPDIR',
  'TZ',
  // a first start installs the Temporal CLI with pip (or go) and maybe apt
  'http_proxy',
  'https_proxy',
  'no_proxy',
  'HTTP_PROXY',
  'HTTPS_PROXY',
  'NO_PROXY',
  'PIP_INDEX_URL',
  'PIP_EXTRA_INDEX_URL',
  'PIP_CERT',
  'SSL_CERT_FILE',
  'SSL_CERT_DIR',
  'VMBACKUP_TEMPORAL_UI_PORT',
] as const;

export function localServerEnv(env: NodeJS.ProcessEnv, config: Config): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = {};
  for (const name of LOCAL_SERVER_ENV) if (env[name] !== undefined) out[name] = env[name];
  out.VMBACKUP_STATE_DIR = config.stateDir;
  out.VMBACKUP_TEMPORAL_PORT = String(splitAddress(config.localTemporalAddress).port);
  return out;
}

function answers(address: string, timeoutMs = 1000): Promise<boolean> {
  const { host, port } = splitAddress(address);
  return new Promise((res) => {
    const sock = createConnection({ host, port });
    const done = (ok: boolean) => {
      sock.destroy();
      res(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/** For commands that read what exists (status, cancel): never start a server, use the local one if no cluster. */
export function openExistingSession(config: Config): Promise<Session> {
  return openSession(config, { startLocalServer: false });
}
