/**
 * Certificates for TLS tests, made by `openssl` as an operator would: a CA, a server certificate for
 * 127.0.0.1/localhost and a client certificate signed by it. EC P-256 keys (quick to make); X.509 v3 extensions
 * as rustls (the worker's native connection) requires them: CA:TRUE on the CA, serverAuth/clientAuth on the leaves.
 */
import { execFile } from 'node:child_process';
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface Pem {
  cert: string;
  key: string;
}

export interface Ca extends Pem {
  name: string;
}

async function openssl(args: string[]): Promise<void> {
  try {
    await run('openssl', args);
  } catch (err) {
    throw new Error(`openssl ${args.join(' ')} failed: ${(err as { stderr?: string }).stderr ?? String(err)}`);
  }
}

async function ecKey(path: string): Promise<void> {
  await openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', path]);
  await chmod(path, 0o600);
}

/** A self-signed CA in `dir` (files `<name>.crt`, `<name>.key`). */
export async function makeCa(dir: string, name: string): Promise<Ca> {
  const key = join(dir, `${name}.key`);
  const cert = join(dir, `${name}.crt`);
  await ecKey(key);
  await openssl([
    'req', '-x509', '-new', '-key', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ]); // prettier-ignore
  return { name, cert, key };
}

/** A leaf certificate signed by `ca`: `server` for 127.0.0.1 and localhost, or `client` for mTLS. */
export async function makeLeaf(dir: string, ca: Ca, name: string, kind: 'server' | 'client'): Promise<Pem> {
  const key = join(dir, `${name}.key`);
  const csr = join(dir, `${name}.csr`);
  const cert = join(dir, `${name}.crt`);
  const ext = join(dir, `${name}.ext`);
  await ecKey(key);
  await openssl(['req', '-new', '-key', key, '-out', csr, '-subj', `/CN=${name}`]);
  await writeFile(
    ext,
    [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature',
      kind === 'server' ? 'extendedKeyUsage=serverAuth' : 'extendedKeyUsage=clientAuth',
      ...(kind === 'server' ? ['subjectAltName=IP:127.0.0.1,DNS:localhost'] : []),
      '',
    ].join('\n'),
  );
  await openssl([
    'x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial',
    '-out', cert, '-days', '2', '-extfile', ext,
  ]); // prettier-ignore
  return { cert, key };
}
