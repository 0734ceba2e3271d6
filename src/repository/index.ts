/**
 * The repository layer (restic's backend -> repository -> commands): what a backup is on a target. Built on
 * the storage contract (src/storage: backends only); used by the activities and the CLI, which never talk to
 * a driver for anything but opening a target.
 */
export * from './catalog';
export * from './chain';
export * from './chunk-read';
export * from './copy';
export * from './gc';
export * from './chunk-gc';
export * from './manifest';
export * from './prune';
export * from './restore';
export * from './verify';
export * from './vm-restore';
