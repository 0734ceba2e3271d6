/**
 * A TLS front for the plaintext Temporal dev server (which has no TLS flags): a real gRPC-over-HTTP/2 reverse
 * proxy with node:http2. It requires a client certificate signed by its CA (requestCert + rejectUnauthorized,
 * ALPN h2), checks `authorization: Bearer <key>` on every call (gRPC status UNAUTHENTICATED otherwise) and
 * forwards each stream to the upstream server as it is: headers, messages, trailers. It records what it saw, so a
 * test can assert that the enforcement really happened here.
 */
import { connect, constants, createSecureServer } from 'node:http2';
import type {
  ClientHttp2Session,
  Http2SecureServer,
  IncomingHttpHeaders,
  OutgoingHttpHeaders,
  ServerHttp2Session,
  ServerHttp2Stream,
} from 'node:http2';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';

export interface ProxyCall {
  path: string;
  /** CN of the client certificate the TLS handshake verified */
  clientCert: string | undefined;
  /** the API key the call carried (after "Bearer "), undefined without an authorization header */
  apiKey: string | undefined;
  /** forwarded upstream, or answered UNAUTHENTICATED */
  outcome: 'forwarded' | 'unauthenticated';
}

export interface GrpcTlsProxy {
  /** host:port to give clients as TEMPORAL_ADDRESS */
  address: string;
  calls: ProxyCall[];
  /** TLS handshakes the server refused (no client certificate, one from another CA, ...) */
  handshakeErrors: string[];
  close(): Promise<void>;
}

// Hop-by-hop and pseudo headers the http2 module sets itself on the other leg.
const DROP_REQUEST = new Set([':scheme', ':authority', 'authorization', 'connection', 'keep-alive', 'host']);
const DROP_RESPONSE = new Set(['connection', 'keep-alive']);

function pick(headers: IncomingHttpHeaders, drop: Set<string>): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(headers)) if (!drop.has(k) && v !== undefined) out[k] = v;
  return out;
}

export async function startGrpcTlsProxy(opts: {
  upstream: string;
  cert: string;
  key: string;
  /** CA that client certificates must chain to */
  clientCa: string;
  apiKey: string;
}): Promise<GrpcTlsProxy> {
  const calls: ProxyCall[] = [];
  const handshakeErrors: string[] = [];
  let upstream: ClientHttp2Session | undefined;
  const upstreamSession = (): ClientHttp2Session => {
    if (!upstream || upstream.closed || upstream.destroyed) {
      upstream = connect(`http://${opts.upstream}`);
      upstream.on('error', () => undefined); // the streams on it fail and say so
    }
    return upstream;
  };

  const server: Http2SecureServer = createSecureServer({
    cert: opts.cert,
    key: opts.key,
    ca: opts.clientCa,
    requestCert: true,
    rejectUnauthorized: true,
    ALPNProtocols: ['h2'],
    allowHTTP1: false,
  });
  const sessions = new Set<ServerHttp2Session>();
  server.on('session', (s: ServerHttp2Session) => {
    sessions.add(s);
    s.on('close', () => sessions.delete(s));
  });
  server.on('tlsClientError', (err) => handshakeErrors.push(err.message));
  server.on('sessionError', () => undefined);
  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    const socket = stream.session?.socket as TLSSocket | undefined;
    const peer = socket?.getPeerCertificate();
    const auth = headers.authorization;
    const call: ProxyCall = {
      path: String(headers[':path'] ?? ''),
      clientCert: peer && typeof peer.subject?.CN === 'string' ? peer.subject.CN : undefined,
      apiKey: typeof auth === 'string' ? auth.replace(/^Bearer /, '') : undefined,
      outcome: 'forwarded',
    };
    calls.push(call);
    stream.on('error', () => undefined);
    if (auth !== `Bearer ${opts.apiKey}`) {
      call.outcome = 'unauthenticated';
      stream.respond(
        {
          ':status': 200,
          'content-type': 'application/grpc',
          'grpc-status': String(16), // UNAUTHENTICATED
          'grpc-message': 'the API key is not valid',
        },
        { endStream: true },
      );
      return;
    }
    let req;
    try {
      req = upstreamSession().request(pick(headers, DROP_REQUEST));
    } catch {
      stream.close(constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    let trailers: OutgoingHttpHeaders = {};
    req.on('response', (h, flags) => {
      const response = pick(h, DROP_RESPONSE);
      // A trailers-only response (an error status and no message) ends with its headers.
      if (flags & constants.NGHTTP2_FLAG_END_STREAM) stream.respond(response, { endStream: true });
      else stream.respond(response, { waitForTrailers: true });
    });
    req.on('trailers', (t) => (trailers = pick(t, DROP_RESPONSE)));
    stream.on('wantTrailers', () => stream.sendTrailers(trailers));
    req.on('error', () => {
      if (!stream.closed) stream.close(constants.NGHTTP2_INTERNAL_ERROR);
    });
    stream.on('close', () => {
      if (!req.closed) req.close(constants.NGHTTP2_CANCEL);
    });
    stream.pipe(req);
    req.pipe(stream);
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    address: `127.0.0.1:${port}`,
    calls,
    handshakeErrors,
    close: async () => {
      upstream?.destroy();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        // open client sessions (a worker's long polls) would keep close() waiting
        for (const s of sessions) s.destroy();
      });
    },
  };
}
