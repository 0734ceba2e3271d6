import { defineQuery } from '@temporalio/workflow';
import type { BackupProgress } from './types';

/** Where a backup is: phase, bytes, per-target state. Byte counts of a running activity come from its heartbeats. */
export const progressQuery = defineQuery<BackupProgress>('progress');
