/**
 * The repository config object (`@chunk-repo/config`, docs/chunk-format.md) and the object layout below the
 * repository prefix.
 */
import { z } from 'zod';
import { ChunkFormatError } from './errors';

export const FORMAT_NAME = 'vmbackup-chunks';
export const FORMAT_VERSION = 1;
export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;
/** Below this a chunk repository would be mostly per-object overhead; above it one chunk no longer fits a small PUT. */
export const MIN_CHUNK_SIZE = 64 * 1024;
export const MAX_CHUNK_SIZE = 64 * 1024 * 1024;

/** The top-level prefix of a chunk repository: `@` is never in a domain name, so no image tree lands here. */
export const REPOSITORY_ROOT = '@chunk-repo';
export const CONFIG_KEY = `${REPOSITORY_ROOT}/config`;
export const KEYS_PREFIX = `${REPOSITORY_ROOT}/keys/`;
export const CHUNKS_PREFIX = `${REPOSITORY_ROOT}/chunks/`;
export const INDEXES_PREFIX = `${REPOSITORY_ROOT}/indexes/`;
/** config and key objects are read with this cap (written by us they are a few hundred bytes) */
export const SMALL_OBJECT_MAX_BYTES = 64 * 1024;

export const ID_RE = /^[0-9a-f]{64}$/;

export function chunkKey(id: string): string {
  return `${CHUNKS_PREFIX}${id.slice(0, 2)}/${id}`;
}

export function indexKey(id: string): string {
  return `${INDEXES_PREFIX}${id}`;
}

/** The chunk id of a key below `chunks/`, undefined for anything else (someone else's file). */
export function chunkIdOfKey(key: string): string | undefined {
  if (!key.startsWith(CHUNKS_PREFIX)) return undefined;
  const rest = key.slice(CHUNKS_PREFIX.length).split('/');
  if (rest.length !== 2) return undefined;
  const [fan, id] = rest as [string, string];
  return ID_RE.test(id) && id.startsWith(fan) ? id : undefined;
}

export const repositoryConfigSchema = z
  .object({
    format: z.literal(FORMAT_NAME),
    version: z.literal(FORMAT_VERSION),
    repositoryId: z.string().regex(ID_RE),
    chunkSize: z.number().int().min(MIN_CHUNK_SIZE).max(MAX_CHUNK_SIZE),
    idAlgorithm: z.enum(['hmac-sha256', 'sha256']),
    compression: z.enum(['zstd', 'none']),
    encryption: z.enum(['aes-256-gcm', 'none']),
  })
  .strict()
  .refine((c) => (c.encryption === 'none') === (c.idAlgorithm === 'sha256'), {
    message: 'idAlgorithm must be hmac-sha256 exactly when the repository is encrypted',
  });

export type RepositoryConfig = z.infer<typeof repositoryConfigSchema>;

/** Parses the config object's bytes; anything else is one sentence naming the target. */
export function parseRepositoryConfig(body: Buffer, where: string): RepositoryConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(body.toString('utf8'));
  } catch (cause) {
    throw new ChunkFormatError('bad-config', `The chunk repository config on ${where} is not JSON.`, { cause });
  }
  const parsed = repositoryConfigSchema.safeParse(raw);
  if (!parsed.success) {
    const first = parsed.error.issues[0];
    const what = first ? `${first.path.join('.') || 'config'}: ${first.message}` : 'invalid';
    throw new ChunkFormatError(
      'bad-config',
      `The chunk repository config on ${where} is not one this vmbackup reads (${what}).`,
    );
  }
  return parsed.data;
}

export function sameConfig(a: RepositoryConfig, b: RepositoryConfig): boolean {
  return (
    a.format === b.format &&
    a.version === b.version &&
    a.repositoryId === b.repositoryId &&
    a.chunkSize === b.chunkSize &&
    a.idAlgorithm === b.idAlgorithm &&
    a.compression === b.compression &&
    a.encryption === b.encryption
  );
}
