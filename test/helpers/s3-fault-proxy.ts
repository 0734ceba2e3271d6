/**
 * An HTTP proxy in front of the real radosgw that forwards every request unchanged (the Host header too, so SigV4
 * signatures still match) and, when told to, answers some requests itself with a server error first. It records what
 * the client sent, so a test can assert on the headers of one request (the manifest PUT's storage class).
 */
import { createServer, request } from 'node:http';
import type { IncomingHttpHeaders, Server } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface SeenRequest {
  method: string;
  /** path and query, as the client sent them */
  url: string;
  headers: IncomingHttpHeaders;
  /** what the client got: the injected status, or radosgw's */
  status: number;
  injected: boolean;
}

export interface Fault {
  /** which requests to fail */
  match: (method: string, url: string) => boolean;
  /** how many of them, from now */
  times: number;
  status: number;
}

/** Requests held back until released: a test's way to keep a backup mid-upload (no timing involved). */
export interface Hold {
  /** requests waiting */
  held(): number;
  /** forwards every waiting request and holds no more */
  release(): void;
  /** forwards the request that has waited longest and keeps holding the others; false when none waits */
  releaseOldest(): boolean;
}

export interface S3FaultProxy {
  /** http://127.0.0.1:<port>: use as AWS_ENDPOINT_URL */
  url: string;
  seen: SeenRequest[];
  fail(fault: Fault): void;
  /** holds the matching requests after the first `after` of them (default 0) until released */
  hold(match: (method: string, url: string) => boolean, opts?: { after?: number }): Hold;
  /** releases every hold (a test that failed before its own release must not hold the next test's requests) */
  releaseAll(): void;
  close(): Promise<void>;
}

export async function startS3FaultProxy(upstream: string): Promise<S3FaultProxy> {
  const up = new URL(upstream);
  const seen: SeenRequest[] = [];
  const faults: Fault[] = [];
  const holds: Array<{
    match: (m: string, u: string) => boolean;
    pass: number;
    waiting: Array<() => void>;
    on: boolean;
  }> = [];
  const server: Server = createServer((req, res) => {
    const method = req.method ?? 'GET';
    const url = req.url ?? '/';
    const hold = holds.find((h) => h.on && h.match(method, url));
    if (hold) {
      if (hold.pass > 0) hold.pass -= 1;
      else {
        req.pause();
        hold.waiting.push(() => {
          req.resume();
          forward();
        });
        return;
      }
    }
    forward();
    function forward(): void {
      const fault = faults.find((f) => f.times > 0 && f.match(method, url));
      if (fault) {
        fault.times -= 1;
        seen.push({ method, url, headers: req.headers, status: fault.status, injected: true });
        // drain the body first: the SDK may still be sending it
        req.resume();
        req.on('end', () => {
          res.writeHead(fault.status, { 'content-type': 'application/xml' });
          res.end(
            `<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code><Message>injected by the test proxy</Message></Error>`,
          );
        });
        return;
      }
      const out = request(
        { host: up.hostname, port: Number(up.port || 80), method, path: url, headers: req.headers },
        (answer) => {
          seen.push({ method, url, headers: req.headers, status: answer.statusCode ?? 0, injected: false });
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(res);
        },
      );
      out.on('error', () => res.destroy());
      req.on('aborted', () => out.destroy());
      req.pipe(out);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    seen,
    fail: (fault) => faults.push(fault),
    hold: (match, opts = {}) => {
      const h = { match, pass: opts.after ?? 0, waiting: [] as Array<() => void>, on: true };
      holds.push(h);
      return {
        held: () => h.waiting.length,
        release: () => {
          h.on = false;
          for (const go of h.waiting.splice(0)) go();
        },
        releaseOldest: () => {
          const go = h.waiting.shift();
          go?.();
          return go !== undefined;
        },
      };
    },
    releaseAll: () => {
      for (const h of holds.splice(0)) {
        h.on = false;
        for (const go of h.waiting.splice(0)) go();
      }
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
