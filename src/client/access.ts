/**
 * How every connection to Temporal is made (the CLI's client, the worker's native connection, the worker's own
 * client): TLS with an optional client certificate, an optional API key, from the config parsed at the edge. The
 * files are read and checked once per process, so a missing file, a key that is not the certificate's or a CA
 * that is not PEM each fail with one sentence before anything connects. Secrets (the API key, the private key)
 * never appear in a message.
 *
 * A connection that fails is explained the same way for both kinds of connection: the gRPC status says whether
 * an API key was refused, and a TLS probe with the same settings (node:tls, a few ms) says what the handshake
 * refused, which neither grpc-js ("Failed to connect before the deadline") nor the native core (a rustls debug
 * string) says in words.
 */
import { readFileSync } from 'node:fs';
import { checkServerIdentity, connect as tlsConnect } from 'node:tls';
import type { ConnectionOptions as TlsConnectOptions } from 'node:tls';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import type { TLSConfig } from '@temporalio/client';
import type { Config, ConfigFile, TemporalAccessConfig } from '../worker/config';

/** What `Connection.connect` and `NativeConnection.connect` take besides the address. */
export interface TemporalConnectOptions {
  tls?: TLSConfig;
  apiKey?: string;
}

const resolved = new WeakMap<TemporalAccessConfig, TemporalConnectOptions>();

/** TLS and API key for connections to `config`'s server; reads and checks the files on first use only. */
export function temporalConnectOptions(config: Config): TemporalConnectOptions {
  const access = config.temporalAccess;
  let options = resolved.get(access);
  if (!options) {
    options = resolve(access, !config.temporalAddress);
    resolved.set(access, options);
  }
  return options;
}

function resolve(access: TemporalAccessConfig, embedded: boolean): TemporalConnectOptions {
  const given = [access.clientCert, access.clientKey, access.serverCa].filter((f): f is ConfigFile => !!f);
  if (embedded && (access.tls || access.apiKey !== undefined || given.length > 0)) {
    const what = [...given.map((f) => f.from), ...(access.apiKey !== undefined ? [access.apiKeyFrom] : [])];
    throw new Error(
      `${what.join(', ') || access.tlsFrom} ${what.length > 1 ? 'are' : 'is'} for a Temporal cluster, and TEMPORAL_ADDRESS is not set: ` +
        'the embedded dev server listens on 127.0.0.1 without TLS or API keys; set TEMPORAL_ADDRESS to use them',
    );
  }
  if (!access.tls) {
    if (given.length > 0) {
      throw new Error(`${given[0]!.from} needs TLS, which ${access.tlsFrom} turns off: drop one of them`);
    }
    return access.apiKey !== undefined ? { apiKey: access.apiKey } : {};
  }
  if (!!access.clientCert !== !!access.clientKey) {
    const [has, lacks] = access.clientCert ? ['certificate', 'key'] : ['key', 'certificate'];
    const from = (access.clientCert ?? access.clientKey)!.from;
    throw new Error(
      `a TLS client ${has} was given (${from}) without its ${lacks}: give both --tls-cert and --tls-key (or TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY)`,
    );
  }
  const tls: TLSConfig = {};
  if (access.serverCa) {
    const ca = readConfigFile(access.serverCa, 'TLS CA certificate');
    certificateOf(ca, access.serverCa, 'TLS CA certificate');
    tls.serverRootCACertificate = ca;
  }
  if (access.clientCert && access.clientKey) {
    const crt = readConfigFile(access.clientCert, 'TLS client certificate');
    const key = readConfigFile(access.clientKey, 'TLS client key');
    const cert = certificateOf(crt, access.clientCert, 'TLS client certificate');
    let privateKey;
    try {
      privateKey = createPrivateKey(key);
    } catch (err) {
      // Node says ERR_MISSING_PASSPHRASE or (OpenSSL 3) "interrupted or cancelled" for a key that needs a passphrase
      const encrypted =
        (err as NodeJS.ErrnoException).code === 'ERR_MISSING_PASSPHRASE' ||
        /-----BEGIN (ENCRYPTED PRIVATE KEY|[A-Z ]*PRIVATE KEY-----\s+Proc-Type: 4,ENCRYPTED)/.test(
          key.toString('latin1'),
        );
      throw new Error(
        encrypted
          ? `the TLS client key ${access.clientKey.path} (${access.clientKey.from}) is encrypted: vmbackup needs it without a passphrase (openssl pkey -in KEY -out KEY.plain)`
          : `the TLS client key ${access.clientKey.path} (${access.clientKey.from}) is not a PEM private key`,
      );
    }
    if (!cert.checkPrivateKey(privateKey)) {
      throw new Error(
        `the TLS client certificate ${access.clientCert.path} and the key ${access.clientKey.path} do not belong together: give the key the certificate was issued for`,
      );
    }
    tls.clientCertPair = { crt, key };
  }
  if (access.serverName) tls.serverNameOverride = access.serverName;
  quietIpServerNameWarning();
  return { tls, ...(access.apiKey !== undefined ? { apiKey: access.apiKey } : {}) };
}

function readConfigFile(file: ConfigFile, what: string): Buffer {
  try {
    return readFileSync(file.path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === 'ENOENT'
        ? 'no such file'
        : code === 'EACCES'
          ? 'permission denied'
          : code === 'EISDIR'
            ? 'it is a directory'
            : (code ?? 'unreadable');
    throw new Error(`cannot read the ${what} ${file.path} (${file.from}): ${why}`);
  }
}

function certificateOf(pem: Buffer, file: ConfigFile, what: string): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch {
    throw new Error(`the ${what} ${file.path} (${file.from}) is not a PEM certificate`);
  }
}

let ipWarningQuiet = false;

/**
 * grpc-js passes an IP address as the TLS server name, and Node then prints "[DEP0123] Setting the TLS ServerName
 * to an IP address is not permitted by RFC 6066" on every command that connects to a cluster by IP; the
 * certificate is still checked against the IP. Only that one warning is dropped.
 */
function quietIpServerNameWarning(): void {
  if (ipWarningQuiet) return;
  ipWarningQuiet = true;
  const emit = process.emitWarning.bind(process) as (...args: unknown[]) => void;
  process.emitWarning = ((warning: string | Error, ...rest: unknown[]) => {
    const code = typeof rest[0] === 'object' && rest[0] !== null ? (rest[0] as { code?: string }).code : rest[1];
    if (code === 'DEP0123') return;
    emit(warning, ...rest);
  }) as typeof process.emitWarning;
}

// ------------------------------------------------------------------------------------------- failures

export interface ConnectFailureContext {
  address: string;
  /** the embedded default's local dev server (no TEMPORAL_ADDRESS) */
  embedded: boolean;
  config: Config;
  /** a client-side sentence for "nothing answers", chosen by the caller (embedded: who starts the server) */
  unreachable: (reason: string) => string;
}

/** One sentence for a failed connection: the API key or the TLS handshake refused, or nothing answering. */
export async function explainConnectFailure(err: unknown, ctx: ConnectFailureContext): Promise<Error> {
  const text = errorText(err);
  const access = ctx.config.temporalAccess;
  const server = `the Temporal server at ${ctx.address}`;
  if (/\bUNAUTHENTICATED\b|does not have valid authentication credentials|\b16 UNAUTHENTICATED/.test(text)) {
    return new Error(
      access.apiKey !== undefined
        ? `${server} refused the API key from ${access.apiKeyFrom} (UNAUTHENTICATED): check the key`
        : `${server} wants an API key (UNAUTHENTICATED): give it in TEMPORAL_API_KEY (or --api-key)`,
    );
  }
  if (/\bPERMISSION_DENIED\b|caller does not have permission/i.test(text)) {
    return new Error(
      `${server} refused access to namespace ${ctx.config.namespace} (PERMISSION_DENIED): the API key or client certificate lacks the permission`,
    );
  }
  const tls = temporalConnectOptions(ctx.config).tls;
  const probe = await probeTls(ctx.address, tls);
  switch (probe.kind) {
    case 'untrusted-server':
      return new Error(
        `${server} presented a certificate this client does not trust (${probe.reason}): give the CA that issued it with --tls-ca or TEMPORAL_TLS_CA` +
          (probe.name ? ', and the name in it with --tls-server-name or TEMPORAL_TLS_SERVER_NAME' : ''),
      );
    case 'certificate-required':
      return new Error(
        `${server} requires a TLS client certificate: give --tls-cert and --tls-key (or TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY)`,
      );
    case 'certificate-refused':
      return new Error(
        `${server} refused the TLS client certificate ${access.clientCert?.path ?? ''} (${probe.reason}): it must be issued by a CA the server trusts`,
      );
    case 'not-tls':
      return new Error(
        `${server} does not speak TLS: drop the TLS options (TEMPORAL_TLS*, --tls*) or give the address of its TLS port`,
      );
    case 'tls-expected':
      return new Error(
        `${server} expects TLS: give its CA with --tls-ca or TEMPORAL_TLS_CA (or set TEMPORAL_TLS=true for a publicly trusted certificate)`,
      );
    case 'unreachable':
      return new Error(ctx.unreachable(probe.reason));
    default:
      return new Error(ctx.unreachable(shortReason(text)));
  }
}

function errorText(err: unknown): string {
  const parts: string[] = [];
  for (let cur: unknown = err; cur; cur = (cur as { cause?: unknown }).cause) {
    if (cur instanceof Error || (typeof cur === 'object' && cur !== null && 'message' in cur)) {
      parts.push(String((cur as Error).message));
    } else {
      parts.push(String(cur));
      break;
    }
    if (parts.length > 5) break;
  }
  return parts.join(' | ');
}

function shortReason(text: string): string {
  return (text.split(' | ').pop() ?? text).replace(/\s+/g, ' ').slice(0, 200);
}

type Probe =
  | { kind: 'ok' }
  | { kind: 'untrusted-server'; reason: string; name: boolean }
  | { kind: 'certificate-required' }
  | { kind: 'certificate-refused'; reason: string }
  | { kind: 'not-tls' }
  | { kind: 'tls-expected' }
  | { kind: 'unreachable'; reason: string };

const UNREACHABLE: Record<string, string> = {
  ECONNREFUSED: 'connection refused',
  ENOTFOUND: 'no such host',
  EAI_AGAIN: 'the host name does not resolve now',
  EHOSTUNREACH: 'no route to the host',
  ENETUNREACH: 'no route to the network',
  ETIMEDOUT: 'no answer',
};

const VERIFY_CODES =
  /^(UNABLE_TO_|SELF_SIGNED_CERT|DEPTH_ZERO_SELF_SIGNED|CERT_|ERR_TLS_CERT_ALTNAME_INVALID|HOSTNAME_MISMATCH)/;

/**
 * A TLS handshake with the connection's settings (or, for a plaintext connection, without verification: does the
 * server speak TLS at all?). TLS 1.3 servers refuse a client certificate after the handshake, with an alert: the
 * probe sends the HTTP/2 preface and waits a moment for it.
 */
function probeTls(address: string, tls: TLSConfig | undefined, waitMs = 1000): Promise<Probe> {
  const { host, port } = splitAddress(address);
  const options: TlsConnectOptions = { host, port, ALPNProtocols: ['h2'] };
  if (tls) {
    if (tls.serverRootCACertificate) options.ca = Buffer.from(tls.serverRootCACertificate);
    if (tls.clientCertPair) {
      options.cert = Buffer.from(tls.clientCertPair.crt);
      options.key = Buffer.from(tls.clientCertPair.key);
    }
    const name = tls.serverNameOverride ?? host;
    if (!isIP(name)) options.servername = name;
    if (tls.serverNameOverride) options.checkServerIdentity = checkAgainst(tls.serverNameOverride);
  } else {
    options.rejectUnauthorized = false;
  }
  return new Promise((done) => {
    let handshaken = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (p: Probe) => {
      clearTimeout(timer);
      socket.destroy();
      done(p);
    };
    const socket = tlsConnect(options);
    socket.setTimeout(5000, () => finish({ kind: 'unreachable', reason: 'no answer in 5 s' }));
    socket.on('secureConnect', () => {
      handshaken = true;
      if (!tls) {
        finish({ kind: 'tls-expected' });
        return;
      }
      socket.write('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
      timer = setTimeout(() => finish({ kind: 'ok' }), waitMs);
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      const code = err.code ?? '';
      if (VERIFY_CODES.test(code)) {
        if (!tls) finish({ kind: 'tls-expected' });
        else finish({ kind: 'untrusted-server', reason: err.message, name: /ALTNAME|HOSTNAME/.test(code) });
      } else if (code === 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED' || /HANDSHAKE_FAILURE/.test(code)) {
        finish(
          tls?.clientCertPair
            ? { kind: 'certificate-refused', reason: 'handshake failure' }
            : { kind: 'certificate-required' },
        );
      } else if (
        /ALERT_(UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_UNKNOWN|UNSUPPORTED_CERTIFICATE|CERTIFICATE_EXPIRED|CERTIFICATE_REVOKED|ACCESS_DENIED)/.test(
          code,
        )
      ) {
        finish({
          kind: 'certificate-refused',
          reason: code
            .replace(/^ERR_SSL_(TLSV13_|TLSV1_|SSLV3_)?ALERT_/, '')
            .toLowerCase()
            .replace(/_/g, ' '),
        });
      } else if (code === 'ERR_SSL_WRONG_VERSION_NUMBER' || code === 'ERR_SSL_PACKET_LENGTH_TOO_LONG') {
        finish(tls ? { kind: 'not-tls' } : { kind: 'unreachable', reason: 'the server answers, but not as expected' });
      } else if (handshaken && tls?.clientCertPair) {
        finish({ kind: 'certificate-refused', reason: err.message });
      } else if (UNREACHABLE[code]) {
        finish({ kind: 'unreachable', reason: UNREACHABLE[code] });
      } else if (!handshaken && !tls) {
        // a plaintext server (the usual case without TLS) resets a TLS hello: nothing the probe can add
        finish({ kind: 'ok' });
      } else {
        finish({ kind: 'unreachable', reason: err.message });
      }
    });
    socket.on('close', () => {
      if (handshaken && tls?.clientCertPair)
        finish({ kind: 'certificate-refused', reason: 'the server closed the connection after the handshake' });
      else if (handshaken) finish({ kind: 'certificate-required' });
      else finish({ kind: 'ok' });
    });
  });
}

function checkAgainst(name: string): TlsConnectOptions['checkServerIdentity'] {
  return (_host, cert) => checkServerIdentity(name, cert);
}

export function splitAddress(address: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(address) ?? /^([^:]+):(\d+)$/.exec(address);
  if (m) return { host: m[1]!, port: Number(m[2]) };
  return { host: address, port: 7233 };
}
