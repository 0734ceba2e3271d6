/**
 * What a pull backup writes into an image, from the export's extents (pure): for a full, the allocated data extents
 * of `base:allocation`; for an increment, the dirty ranges of the bitmap context widened to whole clusters of the new
 * image, split by allocation into data to copy and zeros to write over the backing file.
 *
 * Widening matters: a write that covers part of a qcow2 cluster makes QEMU fill the rest of the cluster from the
 * backing file, so the increment's clusters would hold bytes the writer never saw. Writing whole clusters, read from
 * the point-in-time export, keeps every allocated cluster equal to the guest's data at the backup point.
 */
import type { BlockExtent } from '../nbd';
import { STATE_DIRTY, STATE_HOLE, STATE_ZERO } from '../nbd';

export interface PullOp {
  offset: number;
  length: number;
  /** copy: read from the export, write into the image; zero: WRITE_ZEROES (the guest reads zeros there) */
  kind: 'copy' | 'zero';
}

export interface Range {
  offset: number;
  length: number;
}

/** The ranges of EXTENTS whose flags satisfy WANT, adjacent ones joined. */
export function rangesOf(extents: readonly BlockExtent[], want: (flags: number) => boolean): Range[] {
  const out: Range[] = [];
  for (const e of extents) {
    if (e.length <= 0 || !want(e.flags)) continue;
    const last = out.at(-1);
    if (last && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ offset: e.offset, length: e.length });
  }
  return out;
}

/** RANGES (sorted, not overlapping) widened to multiples of UNIT and clipped to [start, end); overlaps joined. */
export function widenRanges(ranges: readonly Range[], unit: number, start: number, end: number): Range[] {
  const out: Range[] = [];
  for (const r of ranges) {
    const a = Math.max(start, Math.floor(r.offset / unit) * unit);
    const b = Math.min(end, Math.ceil((r.offset + r.length) / unit) * unit);
    if (b <= a) continue;
    const last = out.at(-1);
    if (last && last.offset + last.length >= a) last.length = Math.max(last.offset + last.length, b) - last.offset;
    else out.push({ offset: a, length: b - a });
  }
  return out;
}

/** The parts of EXTENTS inside RANGES (both sorted), each with its extent's flags. */
export function intersectExtents(ranges: readonly Range[], extents: readonly BlockExtent[]): BlockExtent[] {
  const out: BlockExtent[] = [];
  let j = 0;
  for (const r of ranges) {
    const rEnd = r.offset + r.length;
    while (j < extents.length && extents[j]!.offset + extents[j]!.length <= r.offset) j++;
    for (let k = j; k < extents.length; k++) {
      const e = extents[k]!;
      if (e.offset >= rEnd) break;
      const a = Math.max(r.offset, e.offset);
      const b = Math.min(rEnd, e.offset + e.length);
      if (b > a) out.push({ offset: a, length: b - a, flags: e.flags });
    }
  }
  return out;
}

const reads = (flags: number): boolean => (flags & (STATE_HOLE | STATE_ZERO)) === 0;

/**
 * The operations for the window [start, end): ALLOCATION is the export's `base:allocation` over it; DIRTY, for an
 * increment, the bitmap context's extents over it (bit 0 = dirty). CLUSTER is the new image's cluster size (start
 * and end are multiples of it, or end is the disk's end).
 */
export function planPullWindow(input: {
  start: number;
  end: number;
  allocation: readonly BlockExtent[];
  dirty?: readonly BlockExtent[];
  cluster: number;
}): PullOp[] {
  const { start, end, allocation, dirty, cluster } = input;
  const ops: PullOp[] = [];
  const push = (offset: number, length: number, kind: PullOp['kind']) => {
    const last = ops.at(-1);
    if (last && last.kind === kind && last.offset + last.length === offset) last.length += length;
    else ops.push({ offset, length, kind });
  };
  if (!dirty) {
    for (const r of rangesOf(allocation, reads)) {
      const a = Math.max(start, r.offset);
      const b = Math.min(end, r.offset + r.length);
      if (b > a) push(a, b - a, 'copy');
    }
    return ops;
  }
  const changed = widenRanges(
    rangesOf(dirty, (f) => (f & STATE_DIRTY) !== 0),
    cluster,
    start,
    end,
  );
  for (const e of intersectExtents(changed, allocation)) push(e.offset, e.length, reads(e.flags) ? 'copy' : 'zero');
  return ops;
}
