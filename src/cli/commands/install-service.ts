/**
 * `vmbackup install-service [--host H] [--user root] [--env-file FILE] [--unit-dir DIR] [--dry-run]`: writes the
 * systemd unit of this host's worker (Restart=on-failure) and, when it does not exist yet, its environment file from
 * the example (mode 0600). Enables and starts nothing: it prints the systemctl commands to run.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import {
  DEFAULT_ENV_FILE,
  DEFAULT_UNIT_DIR,
  ServiceUnitError,
  UNIT_MARKER,
  WORKER_ENV_EXAMPLE,
  renderWorkerUnit,
  workerUnitName,
} from '../../worker/service-unit';
import { action, CliError } from '../output';

interface InstallServiceFlags {
  host?: string;
  user: string;
  envFile: string;
  unitDir: string;
  dryRun?: boolean;
}

export function register(program: Command): void {
  program
    .command('install-service')
    .description("write the systemd unit of this host's worker (restart on failure); enables nothing")
    .option('--host <name>', 'the host name the worker serves (worker --host); default: the worker decides at start')
    .option('--user <name>', 'the user the worker runs as', 'root')
    .option(
      '--env-file <path>',
      'the environment file the unit reads (created from the example if missing)',
      DEFAULT_ENV_FILE,
    )
    .option('--unit-dir <dir>', 'where to write the unit', DEFAULT_UNIT_DIR)
    .option('--dry-run', 'print the unit and what would be written; write nothing')
    .action(action(installService));
}

async function installService(flags: InstallServiceFlags): Promise<void> {
  let unit: string;
  let unitName: string;
  try {
    unit = renderWorkerUnit({
      vmbackupBin: vmbackupCommand(),
      ...(flags.host !== undefined ? { host: flags.host } : {}),
      user: flags.user,
      envFile: flags.envFile,
      nodeBin: process.execPath,
    });
    unitName = workerUnitName(flags.host);
  } catch (err) {
    if (err instanceof ServiceUnitError) throw new CliError(err.message);
    throw err;
  }
  if (!(await userExists(flags.user))) {
    throw new CliError(`there is no user "${flags.user}" on this machine: create it or pass --user root`);
  }
  const unitPath = join(resolve(flags.unitDir), unitName);
  const envExists = existsSync(flags.envFile);
  const say = (line: string) => process.stderr.write(`${line}\n`);

  if (flags.dryRun) {
    process.stdout.write(unit);
    say(`would write ${unitPath}`);
    say(
      envExists
        ? `would leave ${flags.envFile} as it is`
        : `would create ${flags.envFile} from the example (mode 0600)`,
    );
    return;
  }

  const written = await writeUnit(unitPath, unit);
  say(`${written} ${unitPath}`);
  if (envExists) {
    const mode = (await stat(flags.envFile)).mode & 0o777;
    if (mode & 0o077) {
      say(
        `warning: ${flags.envFile} is readable by group or others (mode ${mode.toString(8)}) and may hold credentials: chmod 600 ${flags.envFile}`,
      );
    }
  } else {
    await createEnvFile(flags.envFile);
    say(`created ${flags.envFile} (mode 0600) from the example: set TEMPORAL_ADDRESS and the rest there`);
  }
  if (flags.user !== 'root') {
    say(
      `the worker runs as ${flags.user}: that user must reach qemu:///system (group libvirt) and read and write every VM's disks and the state dir`,
    );
  }
  say(`next: systemctl daemon-reload && systemctl enable --now ${unitName}`);
  say(`logs: journalctl -u ${unitName} -f`);
}

/** This checkout's bin/vmbackup (the unit runs it by absolute path; the service's PATH may not have it). */
function vmbackupCommand(): string {
  // dist/cli/commands (unbundled) or dist/cli (the CLI bundle): walk up to the package root
  for (let dir = __dirname; dir !== dirname(dir); dir = dirname(dir)) {
    const bin = join(dir, 'bin', 'vmbackup');
    if (existsSync(bin) && existsSync(join(dir, 'package.json'))) return bin;
  }
  throw new CliError(`cannot find bin/vmbackup above ${__dirname}: run install-service from a vmbackup checkout`);
}

function userExists(user: string): Promise<boolean> {
  return new Promise((res) => {
    execFile('getent', ['passwd', user], (err) => res(!err));
  });
}

/**
 * Atomic (a temp file renamed over it). Replaces only a unit this command wrote (its first line says so): an admin's
 * own unit of that name is left alone.
 */
async function writeUnit(path: string, unit: string): Promise<'wrote' | 'unchanged' | 'replaced'> {
  let current: string | undefined;
  try {
    current = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw cannotWrite(path, err);
  }
  if (current === unit) return 'unchanged';
  if (current !== undefined && !current.startsWith(UNIT_MARKER)) {
    throw new CliError(
      `${path} exists and was not written by vmbackup install-service: move it away first, or write elsewhere with --unit-dir`,
    );
  }
  const tmp = `${path}.vmbackup-${process.pid}`;
  try {
    await mkdir(dirname(path), { recursive: true });
    const fh = await open(tmp, 'w', 0o644);
    try {
      await fh.writeFile(unit);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await chmod(tmp, 0o644); // systemd's own units are 0644; the CLI's umask is 077
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw cannotWrite(path, err);
  }
  return current === undefined ? 'wrote' : 'replaced';
}

/** Never overwrites: `wx` fails if someone created the file meanwhile. */
async function createEnvFile(path: string): Promise<void> {
  try {
    await mkdir(dirname(path), { recursive: true, mode: 0o755 });
    const fh = await open(path, 'wx', 0o600);
    try {
      await fh.writeFile(WORKER_ENV_EXAMPLE);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await chmod(path, 0o600); // whatever the umask
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return;
    throw cannotWrite(path, err);
  }
}

function cannotWrite(path: string, err: unknown): CliError {
  const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
  return new CliError(
    `cannot write ${path} (${code})${code === 'EACCES' || code === 'EPERM' ? ': run install-service as root' : ''}`,
  );
}
