/**
 * src/nbd: a reader/writer of NBD exports (pull-mode backups read QEMU's export of a disk's point-in-time view).
 * A low-level library like src/hypervisor: it imports nothing from activities, workflows, storage or repository.
 */
export { NbdClient } from './client';
export type { BlockExtent, NbdConnectOptions, NbdExportInfo } from './client';
export { NbdError, isNbdError, nbdErrnoName } from './errors';
export type { NbdErrorKind } from './errors';
export { STATE_DIRTY, STATE_HOLE, STATE_ZERO } from './protocol';
export type { BlockSizes } from './protocol';
export { READ_REQUEST_BYTES, extents, pooledReads, rangesWhere, readRanges } from './ranges';
export type { ByteRange, ExtentsOptions, RangeData, ReadRangesOptions } from './ranges';
