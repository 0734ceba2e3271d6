/**
 * `vmbackup worker --metrics ADDR`: Prometheus metrics of the backups this worker ran, in Velero's naming
 * (`vmbackup_backup_success_total`, `vmbackup_backup_last_successful_timestamp`, ...), plus the Temporal SDK's own
 * worker metrics (`temporal_*`, exported by the SDK's core on a private loopback port and served here in the same
 * `/metrics`).
 *
 * Backups report their end through a workflow sink (src/shared/events.ts): the worker that runs the end of a backup
 * counts it, once (sinks are not called during replay). The running and queued gauges come from Temporal's
 * visibility when Prometheus scrapes, so they stay right across worker restarts.
 */
import { createServer } from 'node:http';
import type { Server } from 'node:http';
import { isIP } from 'node:net';
import type { AddressInfo } from 'node:net';
import type { Client } from '@temporalio/client';
import { decodeSearchAttributes } from '@temporalio/common/lib/converter/payload-search-attributes';
import type { InjectedSinks } from '@temporalio/worker';
import type { WorkflowInfo } from '@temporalio/workflow';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { BackupOutcome, VmbackupSinks } from '../shared/events';
import { SEARCH_ATTRIBUTES } from '../shared/names';

/**
 * Distinct domains a worker keeps series for. Anyone who can start workflows could start backups of a million
 * made-up domains (each fails at once): past this many, new domains are counted as `domain="(other)"`.
 */
export const MAX_DOMAIN_SERIES = 1000;
export const OTHER_DOMAIN = '(other)';

/** Buckets of the duration histogram, in seconds: a small VM takes seconds, a large one hours. */
const DURATION_BUCKETS = [5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400];

export interface WorkerMetrics {
  registry: Registry;
  sinks: InjectedSinks<VmbackupSinks>;
  /** count one ended backup (what the sink does; `now` in ms) */
  record(outcome: BackupOutcome, startedAt: Date, now?: number): void;
  /**
   * Set the last-success gauges from Temporal's visibility (after a worker restart, before this worker ran any
   * backup); never moves a gauge back.
   */
  loadLastSuccesses(client: Client): Promise<void>;
}

export interface WorkerMetricsOptions {
  host: string;
  /** the client the running and queued gauges ask at each scrape (none yet: they are left out) */
  visibility?: () => Client | undefined;
}

export function createWorkerMetrics(opts: WorkerMetricsOptions): WorkerMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const labelNames = ['domain', 'host'] as const;
  const counter = (name: string, help: string) => new Counter({ name, help, labelNames, registers: [registry] });
  const success = counter('vmbackup_backup_success_total', 'Backups stored on every target.');
  const partial = counter('vmbackup_backup_partial_total', 'Backups stored on some of their targets only.');
  const failure = counter('vmbackup_backup_failure_total', 'Backups that failed (stored on no target).');
  const cancelled = counter('vmbackup_backup_cancelled_total', 'Backups cancelled before they were stored.');
  const bytesRead = counter('vmbackup_backup_bytes_read_total', "Bytes backups read from the VMs' disks.");
  const bytesStored = counter(
    'vmbackup_backup_bytes_stored_total',
    'Bytes backups wrote to targets, counted once per target that took them.',
  );
  const duration = new Histogram({
    name: 'vmbackup_backup_duration_seconds',
    help: 'Time from the start of a backup to its end, for backups stored on at least one target.',
    labelNames,
    buckets: DURATION_BUCKETS,
    registers: [registry],
  });
  const lastSuccess = new Gauge({
    name: 'vmbackup_backup_last_successful_timestamp',
    help: 'Unix time (seconds) at which the newest backup stored on every target ended.',
    labelNames,
    registers: [registry],
  });
  const lastSuccessSeconds = new Map<string, number>();
  const setLastSuccess = (domain: string, host: string, seconds: number) => {
    const key = `${domain}\u0000${host}`;
    if ((lastSuccessSeconds.get(key) ?? 0) >= seconds) return;
    lastSuccessSeconds.set(key, seconds);
    lastSuccess.set({ domain, host }, seconds);
  };

  const { visibility, host } = opts;
  if (visibility) {
    const countOf = async (query: string): Promise<number> => {
      const client = visibility();
      if (!client) throw new Error('the worker is not connected to Temporal yet');
      return (await client.workflow.count(query)).count;
    };
    const ofHost = `WorkflowType = 'backupDomain' AND ExecutionStatus = 'Running' AND ${SEARCH_ATTRIBUTES.host} = '${host}'`;
    const queuedQuery = `${ofHost} AND ${SEARCH_ATTRIBUTES.state} = 'queued'`;
    new Gauge({
      name: 'vmbackup_backups_running',
      help: "Backups of this worker's host that run now (from Temporal's visibility, at each scrape).",
      labelNames: ['host'],
      registers: [registry],
      async collect() {
        // a visibility that does not answer leaves the gauge without a sample rather than failing the scrape
        this.reset();
        const counts = await Promise.all([countOf(ofHost), countOf(queuedQuery)]).catch(() => undefined);
        if (counts) this.set({ host }, counts[0] - counts[1]);
      },
    });
    new Gauge({
      name: 'vmbackup_backups_queued',
      help: "Backups of this worker's host that wait for a slot (from Temporal's visibility, at each scrape).",
      labelNames: ['host'],
      registers: [registry],
      async collect() {
        this.reset();
        const queued = await countOf(queuedQuery).catch(() => undefined);
        if (queued !== undefined) this.set({ host }, queued);
      },
    });
  }

  const domains = new Set<string>();
  const domainLabel = (domain: string): string => {
    if (domains.has(domain)) return domain;
    if (domains.size >= MAX_DOMAIN_SERIES) return OTHER_DOMAIN;
    domains.add(domain);
    return domain;
  };

  const record = (outcome: BackupOutcome, startedAt: Date, now = Date.now()): void => {
    // this worker's own host, not the one a workflow input names: anyone who can start workflows chooses that
    const labels = { domain: domainLabel(String(outcome.domain)), host };
    const byResult = { success, partial, failure, cancelled } as const;
    const which = byResult[outcome.result];
    if (!which) return;
    which.inc(labels);
    if (outcome.bytesRead > 0) bytesRead.inc(labels, outcome.bytesRead);
    if (outcome.bytesStored > 0) bytesStored.inc(labels, outcome.bytesStored);
    if (outcome.result === 'success' || outcome.result === 'partial') {
      duration.observe(labels, Math.max(0, (now - startedAt.getTime()) / 1000));
    }
    if (outcome.result === 'success') setLastSuccess(labels.domain, labels.host, Math.floor(now / 1000));
  };

  const loadLastSuccesses = async (c: Client): Promise<void> => {
    const query =
      `WorkflowType = 'backupDomain' AND ExecutionStatus = 'Completed' AND ${SEARCH_ATTRIBUTES.host} = '${host}'` +
      ` AND ${SEARCH_ATTRIBUTES.state} = 'completed'`;
    let nextPageToken: Uint8Array | undefined;
    let seen = 0;
    do {
      // raw: no memo decoding (a workflow started with a payload key this worker lacks must not stop it)
      const page = await c.workflowService.listWorkflowExecutions({
        namespace: c.options.namespace,
        query,
        pageSize: 1000,
        nextPageToken,
      });
      for (const e of page.executions ?? []) {
        const attrs = decodeSearchAttributes(e.searchAttributes?.indexedFields);
        const domain = (attrs[SEARCH_ATTRIBUTES.domain] as unknown[] | undefined)?.[0];
        const closed = e.closeTime?.seconds;
        if (typeof domain !== 'string' || closed === undefined || closed === null) continue;
        setLastSuccess(domainLabel(domain), host, Number(closed));
      }
      seen += page.executions?.length ?? 0;
      nextPageToken = page.nextPageToken?.length ? page.nextPageToken : undefined;
    } while (nextPageToken && seen < 100_000);
  };

  const sinks: InjectedSinks<VmbackupSinks> = {
    metrics: {
      backupEnded: {
        fn: (info: WorkflowInfo, outcome: BackupOutcome) => record(outcome, info.startTime),
        callDuringReplay: false,
      },
    },
  };
  return { registry, sinks, record, loadLastSuccesses };
}

export interface BindAddress {
  host: string;
  port: number;
}

/** `127.0.0.1:9464`, `[::1]:9464`, `0.0.0.0:9464`, `localhost:9464`; throws one sentence for anything else. */
export function parseBindAddress(text: string): BindAddress {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(text);
  const port = Number(m?.[3]);
  const host = m?.[1] ?? m?.[2];
  if (!m || !host || !(port >= 1 && port <= 65535) || (m[1] !== undefined && isIP(m[1]) !== 6)) {
    throw new Error(`--metrics must be an address to listen on such as 127.0.0.1:9464 or [::1]:9464, not "${text}"`);
  }
  return { host, port };
}

export interface MetricsServer {
  /** host:port it listens on */
  address: string;
  close(): Promise<void>;
}

/**
 * Serves GET /metrics: vmbackup's registry, then the SDK core's exposition read from `sdkMetricsUrl` (a loopback
 * address only this process knows). When the SDK's part cannot be read, the answer says so in a comment line and
 * still carries vmbackup's metrics.
 */
export async function serveMetrics(
  bind: BindAddress,
  metrics: WorkerMetrics,
  sdkMetricsUrl?: string,
): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/metrics' || (req.method !== 'GET' && req.method !== 'HEAD')) {
      res.writeHead(path === '/metrics' ? 405 : 404, { 'content-type': 'text/plain' });
      res.end(path === '/metrics' ? 'GET only\n' : 'metrics are at /metrics\n');
      return;
    }
    exposition(metrics.registry, sdkMetricsUrl).then(
      (text) => {
        res.writeHead(200, { 'content-type': metrics.registry.contentType });
        res.end(req.method === 'HEAD' ? undefined : text);
      },
      (err: unknown) => {
        res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(`metrics could not be collected: ${(err as Error).message}\n`);
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      const shown = bind.host.includes(':') ? `[${bind.host}]:${bind.port}` : `${bind.host}:${bind.port}`;
      reject(new Error(`cannot serve metrics on ${shown}: ${err.code ?? err.message}`));
    });
    server.listen(bind.port, bind.host, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  return {
    address: addr.family === 'IPv6' ? `[${addr.address}]:${addr.port}` : `${addr.address}:${addr.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

async function exposition(registry: Registry, sdkMetricsUrl: string | undefined): Promise<string> {
  const own = await registry.metrics();
  if (!sdkMetricsUrl) return own;
  try {
    const res = await fetch(sdkMetricsUrl, { signal: AbortSignal.timeout(5_000) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const sdk = await res.text();
    return `${own.replace(/\n*$/, '\n')}${sdk.replace(/\n*$/, '\n')}`;
  } catch (err) {
    const why = String((err as { cause?: { code?: string } }).cause?.code ?? (err as Error).message);
    return `${own.replace(/\n*$/, '\n')}# the Temporal SDK's worker metrics could not be read: ${why.replace(/\s+/g, ' ')}\n`;
  }
}

/** A TCP port on 127.0.0.1 that nothing listens on now, for the SDK core's own exporter. */
export async function freeLoopbackPort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((resolve, reject) => {
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = probe.address() as AddressInfo;
  await new Promise((resolve) => probe.close(resolve));
  return port;
}
