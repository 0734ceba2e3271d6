/**
 * Configuration, parsed once at the edge (CLI and worker start); the rest of the code gets
 * typed values and never reads process.env.
 */
import { hostname, homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import { HOST_NAME_RE } from '../shared/names';

const EnvSchema = z.object({
  VMBACKUP_STATE_DIR: z.string().min(1).optional(),
  VMBACKUP_HOST: z.string().regex(HOST_NAME_RE, 'VMBACKUP_HOST must be letters, digits, ".", "_" or "-"').optional(),
  TEMPORAL_ADDRESS: z.string().min(1).optional(),
  TEMPORAL_NAMESPACE: z.string().min(1).default('default'),
  LIBVIRT_DEFAULT_URI: z.string().min(1).default('qemu:///system'),
  VMBACKUP_POLL_MS: z.coerce.number().int().positive().optional(),
  VMBACKUP_VIRSH_SESSION: z
    .enum(['0', '1'], { message: 'VMBACKUP_VIRSH_SESSION must be 1 (default) or 0 (a virsh process per query)' })
    .default('1'),
  VMBACKUP_TEMPORAL_PORT: z.coerce.number().int().min(1).max(65535).default(7233),
});

export interface Config {
  stateDir: string;
  /** this machine's name in task queues (`vmbackup-host-<host>`) */
  host: string;
  /** set: submit to that cluster only; unset: embedded local server + in-process worker */
  temporalAddress?: string;
  namespace: string;
  libvirtUri: string;
  pollIntervalMs?: number;
  /** answer libvirt queries from long-lived virsh shells (VMBACKUP_VIRSH_SESSION=0 turns it off, for debugging) */
  virshSessions: boolean;
  /** the embedded default's dev server (scripts/stack.sh honours VMBACKUP_TEMPORAL_PORT too) */
  localTemporalAddress: string;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const parsed = EnvSchema.safeParse(env);
  if (!parsed.success) {
    throw new Error(parsed.error.issues.map((i) => i.message).join('; '));
  }
  const e = parsed.data;
  return {
    stateDir: resolve(e.VMBACKUP_STATE_DIR ?? join(homedir(), '.local', 'state', 'vmbackup')),
    host: e.VMBACKUP_HOST ?? defaultHost(),
    temporalAddress: e.TEMPORAL_ADDRESS,
    namespace: e.TEMPORAL_NAMESPACE,
    libvirtUri: e.LIBVIRT_DEFAULT_URI,
    pollIntervalMs: e.VMBACKUP_POLL_MS,
    virshSessions: e.VMBACKUP_VIRSH_SESSION === '1',
    localTemporalAddress: `127.0.0.1:${e.VMBACKUP_TEMPORAL_PORT}`,
  };
}

function defaultHost(): string {
  const name = hostname().split('.')[0] ?? '';
  return HOST_NAME_RE.test(name) ? name : 'localhost';
}
