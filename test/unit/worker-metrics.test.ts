/**
 * The worker's metrics as Prometheus reads them: what one ended backup of each kind adds, the domain cap, and a
 * strict parser that refuses what a scraper would refuse (so the integration test's parse can fail).
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import {
  createWorkerMetrics,
  MAX_DOMAIN_SERIES,
  OTHER_DOMAIN,
  parseBindAddress,
  serveMetrics,
} from '../../src/worker/metrics';
import type { BackupOutcome } from '../../src/shared/events';
import { parsePrometheusText, sumOf, valueOf } from '../helpers/prometheus';

function outcome(domain: string, result: BackupOutcome['result'], read = 0, stored = 0): BackupOutcome {
  return {
    domain,
    host: 'hv1',
    backupId: `${domain}-20260101T000000Z-0000`,
    result,
    bytesRead: read,
    bytesStored: stored,
  };
}

describe('worker metrics', () => {
  test('each ended backup counts once under its result; bytes, duration and last success follow', async () => {
    const m = createWorkerMetrics({ host: 'hv1' });
    const t0 = new Date('2026-01-01T00:00:00Z');
    m.record(outcome('vm1', 'success', 100, 200), t0, t0.getTime() + 42_000);
    m.record(outcome('vm1', 'partial', 10, 20), t0, t0.getTime() + 50_000);
    m.record(outcome('vm2', 'failure', 5, 0), t0, t0.getTime() + 3_000);
    m.record(outcome('vm2', 'cancelled'), t0, t0.getTime() + 1_000);
    const text = await m.registry.metrics();
    const f = parsePrometheusText(text);
    const vm1 = { domain: 'vm1', host: 'hv1' };
    const vm2 = { domain: 'vm2', host: 'hv1' };
    expect(valueOf(f, 'vmbackup_backup_success_total', vm1)).toBe(1);
    expect(valueOf(f, 'vmbackup_backup_partial_total', vm1)).toBe(1);
    expect(valueOf(f, 'vmbackup_backup_failure_total', vm1)).toBeUndefined();
    expect(valueOf(f, 'vmbackup_backup_failure_total', vm2)).toBe(1);
    expect(valueOf(f, 'vmbackup_backup_cancelled_total', vm2)).toBe(1);
    expect(valueOf(f, 'vmbackup_backup_bytes_read_total', vm1)).toBe(110);
    expect(valueOf(f, 'vmbackup_backup_bytes_stored_total', vm1)).toBe(220);
    expect(valueOf(f, 'vmbackup_backup_bytes_stored_total', vm2)).toBeUndefined();
    expect(valueOf(f, 'vmbackup_backup_duration_seconds_count', vm1)).toBe(2);
    expect(valueOf(f, 'vmbackup_backup_duration_seconds_sum', vm1)).toBe(92);
    expect(valueOf(f, 'vmbackup_backup_duration_seconds_bucket', { ...vm1, le: '60' })).toBe(2);
    expect(valueOf(f, 'vmbackup_backup_duration_seconds_bucket', { ...vm1, le: '30' })).toBe(0);
    expect(valueOf(f, 'vmbackup_backup_duration_seconds_count', vm2)).toBeUndefined();
    expect(valueOf(f, 'vmbackup_backup_last_successful_timestamp', vm1)).toBe(t0.getTime() / 1000 + 42);
    expect(valueOf(f, 'vmbackup_backup_last_successful_timestamp', vm2)).toBeUndefined();
    expect(f.get('vmbackup_backup_duration_seconds')?.type).toBe('histogram');
    expect(f.get('process_resident_memory_bytes')?.type).toBe('gauge');
  });

  test(`past ${MAX_DOMAIN_SERIES} domains, new ones are counted as ${OTHER_DOMAIN}`, async () => {
    const m = createWorkerMetrics({ host: 'hv1' });
    const t0 = new Date();
    for (let i = 0; i < MAX_DOMAIN_SERIES + 5; i++) m.record(outcome(`vm${i}`, 'failure'), t0);
    const f = parsePrometheusText(await m.registry.metrics());
    expect(f.get('vmbackup_backup_failure_total')?.samples).toHaveLength(MAX_DOMAIN_SERIES + 1);
    expect(valueOf(f, 'vmbackup_backup_failure_total', { domain: OTHER_DOMAIN })).toBe(5);
    expect(sumOf(f, 'vmbackup_backup_failure_total')).toBe(MAX_DOMAIN_SERIES + 5);
  });

  test('/metrics serves the registry, then the SDK part; an SDK part that cannot be read is a comment', async () => {
    const m = createWorkerMetrics({ host: 'hv1' });
    m.record(outcome('vm1', 'success', 1, 1), new Date());
    const sdk = createServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('# HELP temporal_request Count\n# TYPE temporal_request counter\ntemporal_request{operation="x"} 3\n');
    });
    await new Promise<void>((r) => sdk.listen(0, '127.0.0.1', r));
    const sdkUrl = `http://127.0.0.1:${(sdk.address() as AddressInfo).port}/metrics`;
    const server = await serveMetrics({ host: '127.0.0.1', port: 0 }, m, sdkUrl);
    try {
      const res = await fetch(`http://${server.address}/metrics`);
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
      const f = parsePrometheusText(await res.text());
      expect(valueOf(f, 'vmbackup_backup_success_total', { domain: 'vm1' })).toBe(1);
      expect(valueOf(f, 'temporal_request', { operation: 'x' })).toBe(3);
      expect((await fetch(`http://${server.address}/other`)).status).toBe(404);
      sdk.closeAllConnections();
      await new Promise((r) => sdk.close(r));
      const without = await (await fetch(`http://${server.address}/metrics`)).text();
      expect(without).toMatch(/^# the Temporal SDK's worker metrics could not be read: ECONNREFUSED$/m);
      expect(valueOf(parsePrometheusText(without), 'vmbackup_backup_success_total', { domain: 'vm1' })).toBe(1);
    } finally {
      await server.close();
    }
  });

  test.each([
    ['127.0.0.1:9464', { host: '127.0.0.1', port: 9464 }],
    ['[::1]:9464', { host: '::1', port: 9464 }],
    ['localhost:1', { host: 'localhost', port: 1 }],
  ])('--metrics %s listens on %j', (text, bind) => {
    expect(parseBindAddress(text)).toEqual(bind);
  });
  test.each(['9464', '127.0.0.1', '127.0.0.1:0', '127.0.0.1:70000', 'http://127.0.0.1:9464', '[zz]:1'])(
    '--metrics %s is refused with one sentence',
    (text) => {
      expect(() => parseBindAddress(text)).toThrow(
        `--metrics must be an address to listen on such as 127.0.0.1:9464 or [::1]:9464, not "${text}"`,
      );
    },
  );
});

describe('the strict exposition parser refuses what a scraper refuses', () => {
  test.each([
    ['no final newline', 'a 1'],
    ['a bad name', '1a 1\n'],
    ['a bad value', 'a one\n'],
    ['an unquoted label', 'a{x=1} 1\n'],
    ['a label twice', 'a{x="1",x="2"} 1\n'],
    ['a bad escape', 'a{x="\\q"} 1\n'],
    ['a series twice', 'a{x="1"} 1\na{x="1"} 2\n'],
    ['TYPE after samples', 'a 1\n# TYPE a counter\n'],
    ['two TYPEs', '# TYPE a counter\n# TYPE a gauge\na 1\n'],
    ['lines of a family apart', '# TYPE a gauge\na{x="1"} 1\nb 1\na{x="2"} 1\n'],
    ['a negative counter', '# TYPE a counter\na -1\n'],
    ['a histogram without +Inf', '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n'],
    [
      'a histogram whose count is not +Inf',
      '# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n',
    ],
    ['buckets going down', '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'],
  ])('%s', (_what, text) => {
    expect(() => parsePrometheusText(text)).toThrow();
  });
  test('and takes a valid one', () => {
    const f = parsePrometheusText(
      '# HELP h a histogram\n# TYPE h histogram\nh_bucket{le="1",x="a\\"b"} 1\nh_bucket{le="+Inf",x="a\\"b"} 2\n' +
        'h_sum{x="a\\"b"} 3.5\nh_count{x="a\\"b"} 2\n\n# a comment\ng NaN 1700000000000\n',
    );
    expect(valueOf(f, 'h_count', { x: 'a"b' })).toBe(2);
    expect(f.get('g')?.type).toBe('untyped');
  });
});
