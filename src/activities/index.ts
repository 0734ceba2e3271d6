/** All host activities, built over injected ports (samples-typescript activities-dependency-injection). */
import type { Hypervisor } from '../hypervisor/port';
import type { HostActivities } from '../shared/activities';
import { createImageActivities } from './images';
import { createPushActivities } from './push';
import { createSnapshotActivities } from './snapshot';
import { createStorageActivities } from './storage';
import type { StorageActivityDeps } from './storage';

export interface ActivityDeps {
  hypervisor: Hypervisor;
  stateDir: string;
  /** a state dir QEMU can reach, for files QEMU opens itself (snapshot overlays); default stateDir */
  qemuStateDir?: string;
  pollIntervalMs?: number;
  openTarget: StorageActivityDeps['openTarget'];
  manifestKey?: Buffer;
}

export function createActivities(deps: ActivityDeps): HostActivities {
  return {
    ...createPushActivities(deps),
    ...createImageActivities(deps),
    ...createSnapshotActivities({ ...deps, stateDir: deps.qemuStateDir ?? deps.stateDir }),
    ...createStorageActivities({ openTarget: deps.openTarget, manifestKey: deps.manifestKey }),
  } satisfies HostActivities;
}
