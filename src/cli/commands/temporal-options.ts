/**
 * How a command reaches Temporal: the flags of every command that connects (backup, status, cancel, recover,
 * worker). Each flag wins over the environment variable the Temporal CLI uses for it; src/worker/config.ts
 * parses both, src/client/access.ts reads the files.
 */
import type { Command } from 'commander';
import type { TemporalFlags } from '../../worker/config';

export function addTemporalOptions(cmd: Command): Command {
  return cmd
    .option('--tls', 'connect to TEMPORAL_ADDRESS with TLS (implied by the options below; env TEMPORAL_TLS)')
    .option('--tls-cert <file>', 'TLS client certificate (PEM) for mTLS (env TEMPORAL_TLS_CERT)')
    .option('--tls-key <file>', 'private key of --tls-cert (PEM, no passphrase; env TEMPORAL_TLS_KEY)')
    .option('--tls-ca <file>', "CA certificate (PEM) that issued the server's certificate (env TEMPORAL_TLS_CA)")
    .option('--tls-server-name <name>', "name to check in the server's certificate (env TEMPORAL_TLS_SERVER_NAME)")
    .option(
      '--api-key <key>',
      'API key, sent as "authorization: Bearer"; prefer env TEMPORAL_API_KEY, which other users cannot see in ps',
    )
    .option(
      '--payload-key-file <file>',
      'encrypt every workflow payload with the 32-byte key (base64 or hex) in this file, mode 0600; ' +
        'workers and clients need the same key (env VMBACKUP_PAYLOAD_KEY_FILE)',
    );
}

/** The connection flags of a command's parsed options (commander names them tlsCert, apiKey, ...). */
export function temporalFlagsFrom(flags: object): TemporalFlags {
  const f = flags as Record<string, unknown>;
  const text = (name: string) => (typeof f[name] === 'string' ? (f[name] as string) : undefined);
  return {
    tls: f.tls === true ? true : undefined,
    tlsCert: text('tlsCert'),
    tlsKey: text('tlsKey'),
    tlsCa: text('tlsCa'),
    tlsServerName: text('tlsServerName'),
    apiKey: text('apiKey'),
    payloadKeyFile: text('payloadKeyFile'),
  };
}
