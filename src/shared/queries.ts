import { defineQuery, defineSignal } from '@temporalio/workflow';
import type { BackupProgress } from './types';

/** Where a backup is: phase, bytes, per-target state. Byte counts of a running activity come from its heartbeats. */
export const progressQuery = defineQuery<BackupProgress>('progress');

/**
 * Sent by the host's slot activity once it runs (it holds one of the host's backup slots): carries the token the
 * workflow gave that activity, so no other sender can let a backup past the queue by accident.
 */
export const slotGrantedSignal = defineSignal<[string]>('slotGranted');

/** What storeChunkImages reports of one target while it stores: the bytes of the staged images it has read so far. */
export interface StoreProgress {
  target: string;
  bytesDone: number;
}

/**
 * Sent by storeChunkImages to its own workflow while it stores (at most every few seconds): the progress query then
 * shows the bytes of a chunk target as they go, not only once the target is done. Display only: the workflow takes
 * it for a target it is storing to, clamped to that target's total, and never lets the count go back.
 */
export const storeProgressSignal = defineSignal<[StoreProgress]>('storeProgress');
