export { backupDomain } from './backup';
export { recoverHost } from './recover';
export type { RecoverHostInput } from './recover';
