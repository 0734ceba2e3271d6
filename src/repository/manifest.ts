/**
 * The manifest: a self-describing record of one backup, stored as `<domain>/<backupId>/manifest.json`
 * next to its images. It is written LAST: a backup is committed exactly when its manifest exists,
 * so any reader (list, restore, prune, another tool) can tell finished backups from partial ones
 * without a database. Unknown fields are kept (passthrough) so newer writers' additions survive a copy.
 */
import { z } from 'zod';
import { DOMAIN_NAME_RE } from '../shared/names';
import { StorageError } from '../storage/errors';
import { imageKey, normaliseKey } from '../storage/keys';

export const MANIFEST_VERSION = 1;

const Sha256 = z.string().regex(/^[0-9a-f]{64}$/, 'must be a hex SHA-256');
const Segment = z.string().refine((s) => {
  try {
    return normaliseKey(s) === s && !s.includes('/');
  } catch {
    return false;
  }
}, 'must be a single key segment');

export const ManifestDiskSchema = z
  .object({
    /** target dev, e.g. vda */
    name: Segment,
    format: z.string().regex(/^[a-z0-9]+$/),
    virtualSize: z.number().int().nonnegative(),
    /** bytes stored */
    size: z.number().int().nonnegative(),
    sha256: Sha256,
    /** object key on the target, relative to the target URL */
    key: z.string(),
  })
  .passthrough();

export const ManifestSchema = z
  .object({
    version: z.literal(MANIFEST_VERSION),
    backupId: Segment,
    domain: z.string().regex(DOMAIN_NAME_RE),
    host: z.string().min(1),
    method: z.enum(['push', 'snapshot', 'offline']),
    startedAt: z.string().datetime({ offset: true }),
    finishedAt: z.string().datetime({ offset: true }),
    quiesced: z.boolean(),
    libvirtVersion: z.string(),
    qemuVersion: z.string(),
    disks: z.array(ManifestDiskSchema).min(1),
    /** room for incremental backups: which checkpoint this backup ends at and which backup it builds on */
    chain: z
      .object({ kind: z.literal('full'), checkpoint: z.string().optional(), parent: z.string().optional() })
      .passthrough()
      .default({ kind: 'full' }),
  })
  .passthrough()
  .superRefine((m, ctx) => {
    for (const [i, d] of m.disks.entries()) {
      if (d.key !== imageKey(m.domain, m.backupId, d.name, d.format)) {
        ctx.addIssue({
          code: z.ZodIssueCode.custom,
          path: ['disks', i, 'key'],
          message: `must be ${m.domain}/${m.backupId}/${d.name}.${d.format}`,
        });
      }
    }
    if (new Set(m.disks.map((d) => d.name)).size !== m.disks.length) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['disks'], message: 'disk names must be unique' });
    }
  });

export type Manifest = z.infer<typeof ManifestSchema>;
export type ManifestDisk = z.infer<typeof ManifestDiskSchema>;
/** What a writer supplies: version and chain are filled in. */
export type ManifestInput = Omit<z.input<typeof ManifestSchema>, 'version'> & { version?: 1 };

function describe(err: z.ZodError): string {
  return err.issues
    .slice(0, 3)
    .map((i) => `${i.path.join('.') || 'manifest'} ${i.message}`)
    .join('; ');
}

export function buildManifest(input: ManifestInput): Manifest {
  const parsed = ManifestSchema.safeParse({ ...input, version: MANIFEST_VERSION });
  if (!parsed.success) {
    throw new StorageError(
      'failed',
      `The manifest of backup ${input.backupId} is invalid: ${describe(parsed.error)}.`,
      {
        driver: 'catalog',
        permanent: true,
      },
    );
  }
  return parsed.data;
}

export function encodeManifest(m: Manifest): Buffer {
  return Buffer.from(`${JSON.stringify(m, null, 2)}\n`);
}

/** Parses a stored manifest; `where` names it in the error (one sentence). */
export function decodeManifest(body: Buffer, where: string): Manifest {
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch {
    throw new StorageError(
      'checksum',
      `The manifest ${where} is not valid JSON; the backup is damaged, run a new backup.`,
      { driver: 'catalog' },
    );
  }
  const version = (json as { version?: unknown } | null)?.version;
  if (typeof version === 'number' && version > MANIFEST_VERSION) {
    throw new StorageError('failed', `The manifest ${where} has version ${version}; upgrade vmbackup to read it.`, {
      driver: 'catalog',
      permanent: true,
    });
  }
  const parsed = ManifestSchema.safeParse(json);
  if (!parsed.success) {
    throw new StorageError(
      'checksum',
      `The manifest ${where} is invalid (${describe(parsed.error)}); the backup is damaged, run a new backup.`,
      {
        driver: 'catalog',
      },
    );
  }
  return parsed.data;
}
