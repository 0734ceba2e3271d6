/**
 * Connecting to Temporal. With TEMPORAL_ADDRESS set we only talk to that cluster (workers on
 * each host do the work). Without it we are the embedded default: use the local dev server
 * on 127.0.0.1:7233, starting it (SQLite under the state dir) through the project's stack
 * script when nothing answers.
 */
import { spawn } from 'node:child_process';
import { createConnection } from 'node:net';
import { resolve } from 'node:path';
import { Client, Connection } from '@temporalio/client';
import type { Config } from '../worker/config';

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
  if (embedded && (opts.startLocalServer ?? true) && !(await answers(address))) {
    opts.log?.(`starting the local Temporal dev server on ${address} (state in ${config.stateDir})`);
    await startLocalServer(config);
  }
  let connection: Connection;
  try {
    connection = await Connection.connect({ address, connectTimeout: '10s' });
  } catch (err) {
    throw new Error(
      `cannot reach the Temporal server at ${address}: ${(err as Error).message}` +
        (embedded ? '; run `npm run stack:up -- temporal`' : '; check TEMPORAL_ADDRESS'),
    );
  }
  const client = new Client({ connection, namespace: config.namespace });
  return { client, address, embedded, close: () => connection.close() };
}

async function startLocalServer(config: Config): Promise<void> {
  const script = resolve(PACKAGE_ROOT, 'scripts', 'stack.sh');
  const code = await new Promise<number>((resolveExit, reject) => {
    const child = spawn('bash', [script, 'up', 'temporal'], {
      env: { ...process.env, VMBACKUP_STATE_DIR: config.stateDir },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    child.on('error', reject);
    child.on('exit', (c) => resolveExit(c ?? 1));
  });
  if (code !== 0) throw new Error(`could not start the local Temporal server (${script} up temporal exited ${code})`);
}

function answers(address: string, timeoutMs = 1000): Promise<boolean> {
  const [host, port] = address.split(':');
  return new Promise((res) => {
    const sock = createConnection({ host, port: Number(port) });
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
