/** The hypervisor port and its virsh/qemu-img implementation. */
export type { BackupTargetSpec, BlockJobInfo, Hypervisor, JobInfo, JobType, OverlaySpec } from './port';
export { HypervisorError, classifyHypervisorError, isPermanentKind } from './errors';
export type { HypervisorErrorKind } from './errors';
export { VirshHypervisor, createVirshHypervisor, DEFAULT_URI } from './virsh';
export type { VirshHypervisorOptions } from './virsh';
export { checkImage, compareImages, convertImage, imageInfo } from './qemu-img';
export type { ImageCheck, ImageInfo } from './qemu-img';
export { parseDomainXml } from './xml';
export type { DomainXml, XmlDisk } from './xml';
