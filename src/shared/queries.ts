import { defineQuery, defineSignal } from '@temporalio/workflow';
import type { BackupProgress } from './types';

/** Where a backup is: phase, bytes, per-target state. Byte counts of a running activity come from its heartbeats. */
export const progressQuery = defineQuery<BackupProgress>('progress');

/**
 * Sent by the host's slot activity once it runs (it holds one of the host's backup slots): carries the token the
 * workflow gave that activity, so no other sender can let a backup past the queue by accident.
 */
export const slotGrantedSignal = defineSignal<[string]>('slotGranted');
