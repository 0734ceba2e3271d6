/**
 * The worker as a systemd service: the unit `vmbackup install-service` writes (and contrib/systemd/ ships, rendered
 * with the defaults), and the example environment file it starts from. Pure text; the command writes the files.
 *
 * Every value that reaches the unit is checked against a plain character set first: a unit is parsed line by line
 * and expands `%` specifiers and `$VARIABLES` in ExecStart=, so a newline, `%` or `$` in a path or name would change
 * what systemd runs as root.
 */
import { dirname } from 'node:path';
import { HOST_NAME_RE } from '../shared/names';

export interface WorkerUnitOptions {
  /** absolute path of the vmbackup command the service runs */
  vmbackupBin: string;
  /** `worker --host H`; undefined: the worker's own default (VMBACKUP_HOST, else the short host name) */
  host?: string;
  /** the user the worker runs as (default root: it reads every VM's disks and talks to qemu:///system) */
  user: string;
  /** absolute path of the EnvironmentFile= (TEMPORAL_ADDRESS, TLS, VMBACKUP_*, AWS_*) */
  envFile: string;
  /** absolute path of the node binary; its directory is put on the service's PATH when systemd would not search it */
  nodeBin?: string;
}

/** The first line of every unit this writes: how `install-service` knows a unit it may replace. */
export const UNIT_MARKER = '# Written by `vmbackup install-service`';

export const DEFAULT_ENV_FILE = '/etc/vmbackup/worker.env';
export const DEFAULT_UNIT_DIR = '/etc/systemd/system';
/** what contrib/systemd/vmbackup-worker.service runs: the link scripts/install.sh makes */
export const INSTALLED_VMBACKUP_BIN = '/usr/local/bin/vmbackup';

/** Directories systemd searches for ExecStart= commands and gives services as PATH (systemd.exec(5), split /usr). */
const SYSTEMD_PATH = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];

/** letters, digits and `._+-@:/`: nothing systemd or a shell would read as anything but a path */
const PLAIN_PATH_RE = /^\/[A-Za-z0-9._+@:/-]*$/;
/** useradd's (NAME_REGEX) default */
const USER_NAME_RE = /^[a-z_][a-z0-9_-]{0,31}$/;

export class ServiceUnitError extends Error {}

/** The unit file name for a host: one unit per host name this machine serves (normally one). */
export function workerUnitName(host?: string): string {
  if (host !== undefined) checkHost(host);
  return host === undefined ? 'vmbackup-worker.service' : `vmbackup-worker-${host}.service`;
}

export function checkWorkerUnitOptions(o: WorkerUnitOptions): void {
  checkPath('the vmbackup command', o.vmbackupBin);
  checkPath('--env-file', o.envFile);
  if (o.nodeBin !== undefined) checkPath('the node binary', o.nodeBin);
  if (o.host !== undefined) checkHost(o.host);
  if (!USER_NAME_RE.test(o.user)) {
    throw new ServiceUnitError(
      `--user "${o.user}" is not a user name (lower-case letters, digits, "_" and "-", starting with a letter or "_")`,
    );
  }
}

function checkHost(host: string): void {
  if (!HOST_NAME_RE.test(host)) {
    throw new ServiceUnitError(`--host "${host}" is not a valid host name (letters, digits, ".", "_" or "-")`);
  }
}

function checkPath(what: string, path: string): void {
  if (!PLAIN_PATH_RE.test(path) || path.split('/').includes('..')) {
    throw new ServiceUnitError(
      `${what} must be an absolute path of letters, digits and "._+-@:/" (a unit file would read anything else differently), not ${JSON.stringify(path)}`,
    );
  }
}

export function renderWorkerUnit(o: WorkerUnitOptions): string {
  checkWorkerUnitOptions(o);
  const exec = [o.vmbackupBin, 'worker', ...(o.host !== undefined ? ['--host', o.host] : [])].join(' ');
  const nodeDir = o.nodeBin !== undefined ? dirname(o.nodeBin) : undefined;
  const path =
    nodeDir !== undefined && !SYSTEMD_PATH.includes(nodeDir)
      ? [
          `# bin/vmbackup runs \`node\`, which is in ${nodeDir}`,
          `Environment=PATH=${[nodeDir, ...SYSTEMD_PATH].join(':')}`,
        ]
      : [];
  return [
    UNIT_MARKER,
    '# (running it again with other options replaces this file). README: "Many hosts".',
    '[Unit]',
    `Description=vmbackup worker: backups of this host's VMs (task queue vmbackup-host-${o.host ?? '<host name>'})`,
    // libvirtd on Debian 12, virtqemud where libvirt runs modular daemons; an After= on a unit that is not
    // installed is ignored.
    'After=network-online.target libvirtd.service virtqemud.service',
    'Wants=network-online.target',
    '',
    '[Service]',
    'Type=exec',
    `User=${o.user}`,
    `EnvironmentFile=${o.envFile}`,
    ...path,
    `ExecStart=${exec}`,
    '# Exits with an error (Temporal unreachable at start, a crash): started again 5 s later, for as long as it',
    '# takes. A stop by systemctl is not restarted.',
    'Restart=on-failure',
    'RestartSec=5s',
    '# SIGTERM to the worker only: it stops polling and cancels its running steps, which end their own virsh and',
    '# qemu-img children (each step resumes from its last heartbeat on the next start); systemd kills whatever is',
    '# left after TimeoutStopSec. The VMs themselves belong to libvirtd, not to this service.',
    'KillMode=mixed',
    'TimeoutStopSec=60s',
    '',
    '[Install]',
    'WantedBy=multi-user.target',
    '',
  ].join('\n');
}

/** contrib/systemd/worker.env.example, and what install-service creates when the env file does not exist. */
export const WORKER_ENV_EXAMPLE = `# Environment of the vmbackup worker service (systemd EnvironmentFile=: KEY=value lines, no \`export\`).
# Keep it mode 0600, owned by root: it may hold an API key and S3 credentials. After a change:
#   systemctl restart vmbackup-worker.service
#
# The Temporal cluster. Unset: the local dev server on 127.0.0.1:7233, which serves this host only.
#TEMPORAL_ADDRESS=temporal.example.net:7233
#TEMPORAL_NAMESPACE=default
# TLS to the cluster (README, "Connecting securely"; the temporal CLI reads the same variables): a client
# certificate and its key for mTLS, the CA that signed the server's certificate, the name it carries.
#TEMPORAL_TLS_CERT=/etc/vmbackup/tls/worker.pem
#TEMPORAL_TLS_KEY=/etc/vmbackup/tls/worker.key
#TEMPORAL_TLS_CA=/etc/vmbackup/tls/ca.pem
#TEMPORAL_TLS_SERVER_NAME=temporal.example.net
#TEMPORAL_API_KEY=
# Encrypt every workflow payload (the same key on every worker and client; openssl rand -base64 32, mode 0600).
#VMBACKUP_PAYLOAD_KEY_FILE=/etc/vmbackup/payload.key
#
# This host's name in task queues (vmbackup-host-<name>); default: the short host name.
#VMBACKUP_HOST=kvm1
# Where this worker may write backups (URL prefixes, whitespace- or comma-separated); unset: anywhere.
#VMBACKUP_ALLOW_TARGETS=s3://backups/ file:///srv/backups
# Where this worker may POST --notify events (URL prefixes, as above); unset: any http(s) URL a backup names.
#VMBACKUP_ALLOW_NOTIFY=https://hooks.example.net/vmbackup/
#LIBVIRT_DEFAULT_URI=qemu:///system
# Where staging, overlays and recovery state live; the CLI on this host must use the same one.
#VMBACKUP_STATE_DIR=/root/.local/state/vmbackup
# Sign manifests (the CLI that verifies and restores needs the same key).
#VMBACKUP_MANIFEST_KEY_FILE=/etc/vmbackup/manifest.key
#
# S3 targets: the standard AWS variables (or an instance role).
#AWS_REGION=us-east-1
#AWS_ENDPOINT_URL=https://s3.example.net
#AWS_ACCESS_KEY_ID=
#AWS_SECRET_ACCESS_KEY=
`;
