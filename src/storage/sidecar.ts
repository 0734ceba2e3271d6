/**
 * Object metadata for drivers backed by a directory tree (local, NFS), which have no user
 * metadata of their own. `dir/.name.meta.json` sits next to `dir/name`; it is written (atomically)
 * before the object is renamed into place, so a visible object always has its metadata.
 * The leading dot keeps it out of listings (keys never start a segment with '.').
 */
import { z } from 'zod';

/**
 * Most of a sidecar a driver reads (a real one is under 1 KiB). A bigger one, or one that is not a regular file
 * (someone else wrote the target), is ignored: the object simply has no metadata.
 */
export const SIDECAR_MAX_BYTES = 64 << 10;

const SidecarSchema = z.object({
  size: z.number().int().nonnegative(),
  sha256: z.string().optional(),
  metadata: z.record(z.string()).default({}),
});
export type Sidecar = z.infer<typeof SidecarSchema>;

export function sidecarName(basename: string): string {
  return `.${basename}.meta.json`;
}

export function tempName(basename: string, suffix: string): string {
  return `.${basename}.tmp-${suffix}`;
}

export function isTempFor(basename: string, name: string): boolean {
  return name.startsWith(`.${basename}.tmp-`);
}

/** The object a temp file (`.name.tmp-suffix`) was to become, or undefined for any other name. */
export function tempOwner(name: string): string | undefined {
  return /^\.(.+)\.tmp-[0-9a-f]+$/.exec(name)?.[1];
}

/** The object a sidecar (`.name.meta.json`) describes, or undefined for any other name. */
export function sidecarOwner(name: string): string | undefined {
  return /^\.(.+)\.meta\.json$/.exec(name)?.[1];
}

export function encodeSidecar(s: Sidecar): Buffer {
  return Buffer.from(JSON.stringify(s));
}

/** undefined when unreadable or not matching the object's size (a stale sidecar is ignored). */
export function decodeSidecar(body: Buffer, objectSize: number): Sidecar | undefined {
  try {
    const parsed = SidecarSchema.safeParse(JSON.parse(body.toString('utf8')));
    if (!parsed.success || parsed.data.size !== objectSize) return undefined;
    return parsed.data;
  } catch {
    return undefined;
  }
}

export function metadataOf(s: Sidecar | undefined): Record<string, string> | undefined {
  if (!s) return undefined;
  return { ...s.metadata, ...(s.sha256 ? { sha256: s.sha256 } : {}) };
}
