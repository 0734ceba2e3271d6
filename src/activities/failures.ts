/**
 * The boundary between typed port errors and Temporal: permanent failures become
 * non-retryable ApplicationFailures with a type the workflow and CLI understand; transient
 * ones stay retryable so Temporal's retry policy (not a loop of ours) retries them.
 */
import { ApplicationFailure } from '@temporalio/common';
import { HypervisorError } from '../hypervisor/errors';
import { ErrorType } from '../shared/errors';
import type { ErrorTypeName } from '../shared/errors';

const HYPERVISOR_TYPES: Record<string, ErrorTypeName> = {
  'not-found': ErrorType.DomainNotFound,
  invalid: ErrorType.InvalidInput,
  unsupported: ErrorType.UnsupportedDisk,
  quiesce: ErrorType.QuiesceFailed,
  unreachable: ErrorType.HypervisorUnreachable,
  'checkpoint-inconsistent': ErrorType.CheckpointUnusable,
  'checkpoint-not-found': ErrorType.CheckpointUnusable,
  'checkpoint-exists': ErrorType.CheckpointUnusable,
  'bitmap-exists': ErrorType.CheckpointUnusable,
  'checkpoint-unsupported': ErrorType.CheckpointUnusable,
};

/** Rethrow `err` as what Temporal should do with it. Never returns. */
export function hypervisorFailure(err: unknown): never {
  if (err instanceof HypervisorError) {
    const type = HYPERVISOR_TYPES[err.kind] ?? 'HypervisorFailed';
    if (err.permanent) throw ApplicationFailure.create({ message: err.message, type, nonRetryable: true, cause: err });
    throw ApplicationFailure.create({ message: err.message, type, nonRetryable: false, cause: err });
  }
  throw err;
}

export function permanent(message: string, type: ErrorTypeName): ApplicationFailure {
  return ApplicationFailure.create({ message, type, nonRetryable: true });
}
