export { backupDomain } from './backup';
export { recoverHost } from './recover';
export { scheduledBackups } from './scheduled';
export type { RecoverHostInput } from './recover';
export { finishInstantRestore } from './finish-instant';
export type { FinishInstantWorkflowInput } from './finish-instant';
export { gcChunkRepository } from './chunk-gc';
