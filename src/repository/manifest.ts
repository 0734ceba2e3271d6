/**
 * The manifest: a self-describing record of one backup, stored as `<domain>/<backupId>/manifest.json`
 * next to its images. It is written LAST: a backup is committed exactly when its manifest exists,
 * so any reader (list, restore, prune, another tool) can tell finished backups from partial ones
 * without a database. Unknown fields are kept (passthrough) so newer writers' additions survive a copy.
 *
 * Version 2 (written from now on) describes chains: a backup is a full, an incremental (`inc`: changes since
 * the previous link) or a differential (`diff`: changes since the chain's full), and a disk image holding only
 * changed clusters names the image it reads the rest from (`backing`). Version 1 (read only) is always a full
 * backup. An older vmbackup refuses version 2 ("upgrade vmbackup"), so it never restores an increment as if it
 * were a whole disk.
 *
 * A manifest may carry `signature`: an HMAC-SHA256 with a key the user keeps, over the canonical form (see
 * `canonicalManifestJson`). It lets a reader with the key tell a manifest the worker wrote from one written by
 * anyone else who can write the target (docs/security.md).
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { z } from 'zod';
import { DOMAIN_NAME_RE } from '../shared/names';
import { StorageError } from '../storage/errors';
import { ID_RE as CHUNK_ID_RE, indexKey } from './chunks/config';
import {
  MANIFEST_NAME,
  VM_NVRAM_NAME,
  VM_TPM_PREFIX,
  VM_XML_NAME,
  imageKey,
  normaliseKey,
  vmFileKey,
} from '../storage/keys';

/** The version this vmbackup writes for an image-tree backup. */
export const MANIFEST_VERSION = 2;
/**
 * The version of a backup stored in a chunk repository (docs/chunk-format.md, "Backups"): its disks are indexes of
 * chunks, not images. A vmbackup that reads only versions 1 and 2 refuses it ("upgrade vmbackup") instead of taking
 * an index for an image.
 */
export const CHUNK_MANIFEST_VERSION = 3;
/**
 * An image-tree backup with a disk whose `sha256` is a content digest (`content` set: a pull backup,
 * docs/nbd.md "Pull into an image tree"), not the SHA-256 of the stored file. A vmbackup that reads only versions
 * 1-3 would hash the file, find another value and call a good backup corrupt: it refuses version 4 instead.
 */
export const CONTENT_MANIFEST_VERSION = 4;
/** The versions this vmbackup reads; a version-1 manifest reads as a full backup. */
export const READABLE_MANIFEST_VERSIONS: readonly number[] = [1, 2, 3, 4];
/** A disk (or whole-VM file) stored in a chunk repository has this format; its key is its index's key. */
export const CHUNKS_FORMAT = 'chunks';

const Sha256 = z.string().regex(/^[0-9a-f]{64}$/, 'must be a hex SHA-256');
const Segment = z.string().refine((s) => {
  try {
    return normaliseKey(s) === s && !s.includes('/');
  } catch {
    return false;
  }
}, 'must be a single key segment');
/** libvirt checkpoint names reach virsh: the key-segment alphabet, nothing a shell or an XML parser would read */
const CheckpointName = z
  .string()
  .regex(/^[A-Za-z0-9_+@=,:-][A-Za-z0-9_.+@=,:-]{0,199}$/, 'must be a checkpoint name (letters, digits, _.+@=,:-)');
const SIGNATURE_PREFIX = 'hmac-sha256:';
const Signature = z
  .string()
  .regex(/^hmac-sha256:[0-9a-f]{64}$/, 'must be "hmac-sha256:" and 64 hex digits')
  .optional();

export const ChainLevel = z.enum(['full', 'inc', 'diff']);
export type ChainLevel = z.infer<typeof ChainLevel>;

export const ManifestChainSchema = z
  .object({
    level: ChainLevel,
    /** the libvirt checkpoint this backup ends at (push mode with checkpoints) */
    checkpoint: CheckpointName.optional(),
    /** what `checkpoint-create --redefine` needs if libvirt lost the checkpoint */
    checkpointXml: z
      .string()
      .max(1 << 20)
      .optional(),
    /** inc: the previous link; diff: the chain's full; absent for a full */
    parent: Segment.optional(),
    /** the chain's full (its own id for a full; filled in when a full leaves it out) */
    base: Segment.optional(),
    /** inc/diff: the increments since the chain's full, this one included (recorded since chains in chunk repositories) */
    depth: z.number().int().min(1).max(100_000).optional(),
    /** inc/diff: when the chain's full started (--full-every), for when prune removed the full's own manifest */
    baseStartedAt: z.string().datetime({ offset: true }).optional(),
    /** what the user asked for */
    requested: z.enum(['auto', 'full', 'inc', 'diff']).optional(),
    /** one sentence: why the level differs from the one asked for */
    reason: z.string().max(1000).optional(),
  })
  .passthrough();

export const ManifestBackingSchema = z
  .object({
    /** the backup whose image this disk's unallocated clusters read from */
    backupId: Segment,
    /** that image's key: `<domain>/<backupId>/<disk>.qcow2` */
    key: z.string(),
    sha256: Sha256,
  })
  .passthrough();

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
    /**
     * present when this image holds only changed clusters. The qcow2 header names the same file relatively,
     * so `qemu-img convert` of the newest link restores without vmbackup; vmbackup itself never trusts the
     * header: it builds the chain from the manifests and opens it with explicit backing.
     */
    backing: ManifestBackingSchema.optional(),
    /**
     * format `chunks` only: the disk is the index `sha256` (its id) at `key` = `@chunk-repo/indexes/<id>`. `size` is
     * the bytes of the chunks this disk references that this backup uploaded (the rest were already stored).
     */
    /**
     * a pulled image: `sha256` is the content digest of the image's own guest data (content-digest.ts, read with no
     * backing file), not the SHA-256 of the file; verify and restore recompute it from the image
     */
    content: z
      .object({
        scheme: z.literal('content-v1'),
        chunkSize: z.number().int().positive(),
        chunks: z.number().int().nonnegative(),
        zeroChunks: z.number().int().nonnegative(),
      })
      .passthrough()
      .optional(),
    chunks: z
      .object({
        chunkSize: z.number().int().positive(),
        /** entries of the index: ceil(virtualSize / chunkSize) */
        count: z.number().int().nonnegative(),
        zeroChunks: z.number().int().nonnegative(),
        /** chunks this backup stored (the others were in the repository already) */
        uploadedChunks: z.number().int().nonnegative(),
      })
      .passthrough()
      .optional(),
  })
  .passthrough();

/**
 * S3 Object Lock (`--s3-object-lock`): the mode and date every object of the backup was written with (its start +
 * the lock's days). Informative: the object's own retention on the server is what holds; prune asks the server.
 */
export const ManifestObjectLockSchema = z.object({
  mode: z.enum(['governance', 'compliance']),
  retainUntil: z.string().datetime({ offset: true }),
});

/** Which chunk repository a version-3 manifest's indexes are in, and how it stores them. */
export const ManifestRepositorySchema = z
  .object({
    id: z.string().regex(CHUNK_ID_RE, 'must be a repository id (64 hex)'),
    chunkSize: z.number().int().positive(),
    encryption: z.enum(['aes-256-gcm', 'none']),
    compression: z.enum(['zstd', 'none']),
  })
  .passthrough();
export type ManifestRepository = z.infer<typeof ManifestRepositorySchema>;

/**
 * The digest a target's object metadata holds for DISK, to compare with the manifest's `sha256`: for a pulled image
 * (`content`) the content digest of its guest data (its sidecar may hold no file SHA-256 at all: the writer never
 * read the file again; a copy adds the file's), else the file's SHA-256. Undefined when the target keeps none.
 */
export function storedDigest(
  disk: { content?: unknown },
  metadata: Readonly<Record<string, string>> | undefined,
): string | undefined {
  return disk.content ? metadata?.content : metadata?.sha256;
}

/** Most a reader takes of each whole-VM file (they are small: a definition, a variable store, a TPM's state). */
export const VM_FILE_MAX_BYTES = { xml: 4 << 20, nvram: 64 << 20, tpm: 16 << 20 } as const;

const VmFileSchema = z
  .object({
    /**
     * object key on the target: `<domain>/<backupId>/<name>` (see storage/keys.ts); in a chunk repository the file
     * is stored like a disk, as an index: `@chunk-repo/indexes/<sha256>`, and `sha256` is that index's id
     */
    key: z.string(),
    size: z.number().int().nonnegative(),
    sha256: Sha256,
  })
  .passthrough();
export type ManifestVmFile = z.infer<typeof VmFileSchema>;

/** A TPM state file's path under the domain's swtpm state directory, e.g. `tpm2/tpm2-00.permall`. */
const TpmRelativePath = z
  .string()
  .regex(/^(tpm2|tpm1_2)\/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$/, 'must be tpm2/<file> or tpm1_2/<file>');

/**
 * Whole-VM state at the backup point, stored whole in every backup (full or link of a chain): the inactive domain
 * XML, the UEFI variable store (NVRAM) when the domain has one, and the swtpm state when it has an emulated TPM.
 * Absent in backups made before vmbackup stored them.
 */
export const ManifestVmSchema = z
  .object({
    /** `virsh dumpxml --inactive` at the backup point, key `<domain>/<backupId>/domain.xml` */
    xml: VmFileSchema.refine((f) => f.size <= VM_FILE_MAX_BYTES.xml, 'is larger than a domain XML can be'),
    /** the NVRAM file, key `<domain>/<backupId>/nvram.fd`; `path`: where it was on the host */
    nvram: VmFileSchema.extend({ path: z.string().startsWith('/').max(4096) })
      .refine((f) => f.size <= VM_FILE_MAX_BYTES.nvram, 'is larger than an NVRAM file can be')
      .optional(),
    /** the swtpm state directory's files, each key `<domain>/<backupId>/tpm.<file name>` */
    tpm: z
      .object({
        version: z.enum(['1.2', '2.0']),
        files: z
          .array(
            VmFileSchema.extend({ path: TpmRelativePath }).refine(
              (f) => f.size <= VM_FILE_MAX_BYTES.tpm,
              'is larger than a TPM state file can be',
            ),
          )
          .min(1)
          .max(16),
      })
      .passthrough()
      .optional(),
  })
  .passthrough();
export type ManifestVm = z.infer<typeof ManifestVmSchema>;

/** One whole-VM file a manifest names: what it is (`domain.xml`, `nvram.fd`, `tpm2/tpm2-00.permall`) and its cap. */
export interface ManifestVmEntry {
  /** the file's name in sentences: domain.xml, nvram.fd, or the TPM state file's path */
  name: string;
  kind: 'xml' | 'nvram' | 'tpm';
  key: string;
  size: number;
  sha256: string;
  /** most a reader takes of it (VM_FILE_MAX_BYTES) */
  maxBytes: number;
}

/** Every whole-VM file of a manifest (none for a backup from before vmbackup stored them). */
export function manifestVmFiles(m: { vm?: ManifestVm }): ManifestVmEntry[] {
  const vm = m.vm;
  if (!vm) return [];
  const base = (f: ManifestVmFile) => ({ key: f.key, size: f.size, sha256: f.sha256 });
  return [
    { name: 'domain.xml', kind: 'xml', maxBytes: VM_FILE_MAX_BYTES.xml, ...base(vm.xml) },
    ...(vm.nvram
      ? [{ name: 'nvram.fd', kind: 'nvram' as const, maxBytes: VM_FILE_MAX_BYTES.nvram, ...base(vm.nvram) }]
      : []),
    ...(vm.tpm?.files ?? []).map((f) => ({
      name: `TPM state ${f.path}`,
      kind: 'tpm' as const,
      maxBytes: VM_FILE_MAX_BYTES.tpm,
      ...base(f),
    })),
  ];
}

const ManifestObject = z
  .object({
    version: z.union([
      z.literal(1),
      z.literal(2),
      z.literal(CHUNK_MANIFEST_VERSION),
      z.literal(CONTENT_MANIFEST_VERSION),
    ]),
    backupId: Segment,
    domain: z.string().regex(DOMAIN_NAME_RE),
    host: z.string().min(1),
    method: z.enum(['push', 'snapshot', 'offline', 'pull']),
    startedAt: z.string().datetime({ offset: true }),
    finishedAt: z.string().datetime({ offset: true }),
    quiesced: z.boolean(),
    libvirtVersion: z.string(),
    qemuVersion: z.string(),
    chain: ManifestChainSchema,
    disks: z.array(ManifestDiskSchema).min(1),
    vm: ManifestVmSchema.optional(),
    /** version 3: the chunk repository holding the indexes */
    repository: ManifestRepositorySchema.optional(),
    /** written with S3 Object Lock: every object of the backup is retained until this date */
    objectLock: ManifestObjectLockSchema.optional(),
    signature: Signature,
    /**
     * version 3 in an encrypted repository: HMAC-SHA256 with the repository's authentication key (in its master keys)
     * over the canonical form without either signature; checked by every reader that opened the repository
     */
    repositorySignature: Signature,
  })
  .passthrough();

type ManifestObject = z.infer<typeof ManifestObject>;

function issue(ctx: z.RefinementCtx, path: Array<string | number>, message: string): void {
  ctx.addIssue({ code: z.ZodIssueCode.custom, path, message });
}

/** What no field schema can say alone: the layout of keys, and what each chain level allows. */
function checkManifest(m: ManifestObject, ctx: z.RefinementCtx): void {
  if (m.version === CHUNK_MANIFEST_VERSION || m.repository) {
    checkChunkManifest(m, ctx);
    return;
  }
  const hasContent = m.disks.some((d) => d.content);
  if (hasContent !== (m.version === CONTENT_MANIFEST_VERSION)) {
    issue(ctx, ['version'], `must be ${CONTENT_MANIFEST_VERSION} exactly when a disk has a content digest`);
  }
  for (const [i, d] of m.disks.entries()) {
    if (d.format === CHUNKS_FORMAT) issue(ctx, ['disks', i, 'format'], 'is chunks only in a version-3 manifest');
    if (d.content && d.format !== 'qcow2') issue(ctx, ['disks', i, 'content'], 'is for qcow2 images only');
    if (d.key !== imageKey(m.domain, m.backupId, d.name, d.format)) {
      issue(ctx, ['disks', i, 'key'], `must be ${m.domain}/${m.backupId}/${d.name}.${d.format}`);
    }
  }
  if (new Set(m.disks.map((d) => d.name)).size !== m.disks.length) {
    issue(ctx, ['disks'], 'disk names must be unique');
  }
  if (m.vm) checkVmKeys(m, m.vm, ctx);
  const { chain } = m;
  if (chain.level === 'full') {
    if (chain.parent !== undefined) issue(ctx, ['chain', 'parent'], 'must be absent for a full backup');
    if (chain.base !== undefined && chain.base !== m.backupId) {
      issue(ctx, ['chain', 'base'], `must be the backup's own id ${m.backupId} for a full backup`);
    }
    for (const [i, d] of m.disks.entries()) {
      if (d.backing) issue(ctx, ['disks', i, 'backing'], 'must be absent in a full backup');
    }
    return;
  }
  // inc / diff: a link of a chain, whose images are all qcow2
  if (chain.parent === undefined) issue(ctx, ['chain', 'parent'], `is required for an ${chain.level} backup`);
  if (chain.base === undefined) issue(ctx, ['chain', 'base'], `is required for an ${chain.level} backup`);
  if (chain.parent === m.backupId) issue(ctx, ['chain', 'parent'], 'must not be the backup itself');
  if (chain.base === m.backupId) issue(ctx, ['chain', 'base'], 'must not be the backup itself');
  if (chain.level === 'diff' && chain.parent !== undefined && chain.parent !== chain.base) {
    issue(ctx, ['chain', 'parent'], "must be the chain's full (chain.base) for a diff backup");
  }
  for (const [i, d] of m.disks.entries()) {
    if (d.format !== 'qcow2') issue(ctx, ['disks', i, 'format'], `must be qcow2 in an ${chain.level} backup`);
    if (!d.backing) continue; // a disk new to the chain: its image is whole
    if (d.backing.backupId !== chain.parent) {
      issue(ctx, ['disks', i, 'backing', 'backupId'], `must be the chain's parent ${String(chain.parent)}`);
    }
    let expected: string | undefined;
    try {
      expected = imageKey(m.domain, d.backing.backupId, d.name, 'qcow2');
    } catch {
      expected = undefined; // reported on backing.backupId or name already
    }
    if (expected !== undefined && d.backing.key !== expected) {
      issue(ctx, ['disks', i, 'backing', 'key'], `must be ${expected}`);
    }
  }
}

/**
 * A backup in a chunk repository (version 3): a full (every backup is a complete point; dedup, not a chain, saves
 * the space), each disk and whole-VM file an index whose key is `@chunk-repo/indexes/<sha256>`. Two disks (or files)
 * with the same data share an index, so keys need not differ.
 */
function checkChunkManifest(m: ManifestObject, ctx: z.RefinementCtx): void {
  if (m.version !== CHUNK_MANIFEST_VERSION)
    issue(ctx, ['version'], `must be ${CHUNK_MANIFEST_VERSION} with a repository`);
  if (!m.repository) issue(ctx, ['repository'], 'is required in a version-3 manifest');
  // Every backup in a repository is whole. A pull increment (level inc) records the backup whose checkpoint it read
  // the changes since, and whose index gave it the unchanged chunks: `parent`, for the checkpoint chain only.
  if (m.chain.level === 'full') {
    if (m.chain.parent !== undefined) issue(ctx, ['chain', 'parent'], 'must be absent for a full backup');
    if (m.chain.base !== undefined && m.chain.base !== m.backupId)
      issue(ctx, ['chain', 'base'], `must be the backup's own id ${m.backupId}`);
  } else {
    if (m.chain.level !== 'inc' || m.method !== 'pull')
      issue(ctx, ['chain', 'level'], 'must be full in a chunk repository, or inc for a pull backup');
    if (m.chain.parent === undefined || m.chain.parent === m.backupId)
      issue(ctx, ['chain', 'parent'], 'must name the backup an increment read its changes since');
  }
  const indexed = (path: Array<string | number>, f: { key: string; sha256: string }) => {
    if (f.key !== indexKey(f.sha256)) issue(ctx, path, `must be ${indexKey(f.sha256)}`);
  };
  for (const [i, d] of m.disks.entries()) {
    if (d.format !== CHUNKS_FORMAT)
      issue(ctx, ['disks', i, 'format'], `must be ${CHUNKS_FORMAT} in a chunk repository`);
    if (d.backing) issue(ctx, ['disks', i, 'backing'], 'must be absent in a chunk repository');
    if (!d.chunks) issue(ctx, ['disks', i, 'chunks'], 'is required in a chunk repository');
    else if (m.repository && d.chunks.chunkSize !== m.repository.chunkSize)
      issue(ctx, ['disks', i, 'chunks', 'chunkSize'], "must be the repository's chunk size");
    indexed(['disks', i, 'key'], d);
  }
  if (new Set(m.disks.map((d) => d.name)).size !== m.disks.length) issue(ctx, ['disks'], 'disk names must be unique');
  const vm = m.vm;
  if (!vm) return;
  indexed(['vm', 'xml', 'key'], vm.xml);
  if (vm.nvram) indexed(['vm', 'nvram', 'key'], vm.nvram);
  for (const [i, f] of (vm.tpm?.files ?? []).entries()) indexed(['vm', 'tpm', 'files', i, 'key'], f);
  const tpmPaths = (vm.tpm?.files ?? []).map((f) => f.path);
  if (new Set(tpmPaths).size !== tpmPaths.length) issue(ctx, ['vm', 'tpm', 'files'], 'paths must be unique');
}

/** Each whole-VM file has its fixed key, and no object of the backup shares a key with another. */
function checkVmKeys(m: ManifestObject, vm: ManifestVm, ctx: z.RefinementCtx): void {
  const expect = (path: Array<string | number>, key: string, name: string) => {
    let expected: string | undefined;
    try {
      expected = vmFileKey(m.domain, m.backupId, name);
    } catch {
      return; // reported on domain or backupId already
    }
    if (key !== expected) issue(ctx, path, `must be ${expected}`);
  };
  expect(['vm', 'xml', 'key'], vm.xml.key, VM_XML_NAME);
  if (vm.nvram) expect(['vm', 'nvram', 'key'], vm.nvram.key, VM_NVRAM_NAME);
  for (const [i, f] of (vm.tpm?.files ?? []).entries()) {
    const file = f.path.slice(f.path.indexOf('/') + 1);
    expect(['vm', 'tpm', 'files', i, 'key'], f.key, `${VM_TPM_PREFIX}${file}`);
  }
  const tpmPaths = (vm.tpm?.files ?? []).map((f) => f.path);
  if (new Set(tpmPaths).size !== tpmPaths.length) issue(ctx, ['vm', 'tpm', 'files'], 'paths must be unique');
  const keys = [
    `${m.domain}/${m.backupId}/${MANIFEST_NAME}`,
    ...m.disks.map((d) => d.key),
    vm.xml.key,
    ...(vm.nvram ? [vm.nvram.key] : []),
    ...(vm.tpm?.files ?? []).map((f) => f.key),
  ];
  if (new Set(keys).size !== keys.length) issue(ctx, ['vm'], 'keys must differ from each other and from the images');
}

/**
 * A version-1 manifest is a full backup: `chain: {kind: 'full'}` (or no chain) reads as `{level: 'full'}`. Any
 * other version-1 chain is left as it is, and the schema refuses it.
 */
function upgradeVersion1(json: unknown): unknown {
  if (!isPlainObject(json) || json.version !== 1) return json;
  const chain = json.chain;
  if (chain === undefined) return { ...json, chain: { level: 'full' } };
  if (!isPlainObject(chain) || chain.kind !== 'full' || 'level' in chain) return json;
  const { kind: _kind, ...rest } = chain;
  return { ...json, chain: { ...rest, level: 'full' } };
}

/** The manifest as readers see it: version 1 or 2, always with a version-2 chain whose `base` is set. */
export const ManifestSchema = z
  .preprocess(upgradeVersion1, ManifestObject.superRefine(checkManifest))
  .transform((m) => ({ ...m, chain: { ...m.chain, base: m.chain.base ?? m.backupId } }));

export type Manifest = z.output<typeof ManifestSchema>;
export type ManifestDisk = z.infer<typeof ManifestDiskSchema>;
export type ManifestChain = Manifest['chain'];
export type ManifestBacking = z.infer<typeof ManifestBackingSchema>;
/** What a writer supplies: the version is filled in, and a missing chain means a full backup. */
export type ManifestInput = Omit<
  z.input<typeof ManifestObject>,
  'version' | 'chain' | 'signature' | 'repositorySignature'
> & {
  chain?: z.input<typeof ManifestChainSchema>;
};

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function describe(err: z.ZodError): string {
  return err.issues
    .slice(0, 3)
    .map((i) => `${i.path.join('.') || 'manifest'} ${i.message}`)
    .join('; ');
}

/**
 * A manifest from what the worker knows (version 2, or 3 when `repository` is set); throws one sentence when it would
 * not be valid.
 */
export function buildManifest(input: ManifestInput): Manifest {
  const {
    signature: _dropped,
    repositorySignature: _dropped2,
    ...rest
  } = input as ManifestInput & { signature?: unknown; repositorySignature?: unknown };
  const parsed = ManifestSchema.safeParse({
    ...rest,
    version: input.repository
      ? CHUNK_MANIFEST_VERSION
      : (input.disks as ReadonlyArray<{ content?: unknown }>).some((d) => d.content !== undefined)
        ? CONTENT_MANIFEST_VERSION
        : MANIFEST_VERSION,
    chain: input.chain ?? { level: 'full', base: input.backupId },
  });
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

/** A stored manifest, parsed; `signed` is set only when a key was given (true: the signature is ours). */
export interface DecodedManifest {
  manifest: Manifest;
  signed?: boolean;
}

/**
 * Parses a stored manifest; `where` names it in the error (one sentence). With `manifestKey`, also says whether
 * its signature was made with that key (checked over the stored JSON, so fields this version does not know are
 * covered too).
 */
export function readManifest(body: Buffer, where: string, opts: { manifestKey?: Buffer } = {}): DecodedManifest {
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
  const version = isPlainObject(json) ? json.version : undefined;
  if (typeof version === 'number' && version > CONTENT_MANIFEST_VERSION) {
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
  return {
    manifest: parsed.data,
    ...(opts.manifestKey ? { signed: hasSignatureOf(json as Record<string, unknown>, opts.manifestKey) } : {}),
  };
}

/** Parses a stored manifest; `where` names it in the error (one sentence). */
export function decodeManifest(body: Buffer, where: string): Manifest {
  return readManifest(body, where).manifest;
}

/**
 * The bytes a signature covers: the manifest's JSON without its top-level `signature`, object keys sorted (by
 * UTF-16 code units, JavaScript's default order) at every level, no whitespace, strings and numbers as
 * JSON.stringify writes them. Anyone can recompute it from the stored file with `jq -cS 'del(.signature)'`.
 */
export function canonicalManifestJson(json: Record<string, unknown>): string {
  const { signature: _signature, ...rest } = json;
  return canonical(rest);
}

function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map((x) => canonical(x === undefined ? null : x)).join(',')}]`;
  if (isPlainObject(v)) {
    // built as text, never as an object: a "__proto__" key from the file stays a plain key
    const keys = Object.keys(v)
      .filter((k) => v[k] !== undefined)
      .sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(',')}}`;
  }
  return JSON.stringify(v);
}

function hmac(json: Record<string, unknown>, key: Buffer): Buffer {
  return createHmac('sha256', key).update(canonicalManifestJson(json), 'utf8').digest();
}

/** The manifest with `signature` set: HMAC-SHA256 with `key` over its canonical form. */
export function signManifest(m: Manifest, key: Buffer): Manifest {
  // sign what a reader will parse back: the JSON of the manifest, not the in-memory object
  const json = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  return { ...m, signature: `${SIGNATURE_PREFIX}${hmac(json, key).toString('hex')}` };
}

/**
 * The bytes a repository signature covers: the canonical form (as above) without `signature` and
 * `repositorySignature`. The user's signature, made after it, covers the repository signature.
 */
function repositoryHmac(json: Record<string, unknown>, authKey: Buffer): Buffer {
  const { repositorySignature: _r, ...rest } = json;
  return hmac(rest, authKey);
}

/** The chunk-repository manifest with `repositorySignature` set (with the repository's authentication key). */
export function signRepositoryManifest(m: Manifest, authKey: Buffer): Manifest {
  const json = JSON.parse(JSON.stringify(m)) as Record<string, unknown>;
  return { ...m, repositorySignature: `${SIGNATURE_PREFIX}${repositoryHmac(json, authKey).toString('hex')}` };
}

/**
 * Whether the stored manifest bytes carry a repository signature made with `authKey` (checked over the stored JSON,
 * so fields this version does not know are covered too).
 */
export function hasRepositorySignature(body: Buffer, authKey: Buffer): boolean {
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch {
    return false;
  }
  if (!isPlainObject(json)) return false;
  const sig = json.repositorySignature;
  if (typeof sig !== 'string' || !sig.startsWith(SIGNATURE_PREFIX)) return false;
  const given = Buffer.from(sig.slice(SIGNATURE_PREFIX.length), 'hex');
  const expected = repositoryHmac(json, authKey);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

/** True when the stored JSON carries a signature made with `key` over exactly these fields. */
function hasSignatureOf(json: Record<string, unknown>, key: Buffer): boolean {
  const sig = json.signature;
  if (typeof sig !== 'string' || !sig.startsWith(SIGNATURE_PREFIX)) return false;
  const given = Buffer.from(sig.slice(SIGNATURE_PREFIX.length), 'hex');
  const expected = hmac(json, key);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

/** True for a backup stored in a chunk repository (version 3): its disks and whole-VM files are indexes. */
export function isChunkManifest(m: Pick<Manifest, 'repository'>): m is Manifest & { repository: ManifestRepository } {
  return m.repository !== undefined;
}
