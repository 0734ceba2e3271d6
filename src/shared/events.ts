/**
 * What vmbackup tells the outside world about a backup: the webhook event (`--notify URL`) and the metrics sink the
 * workflows call when a backup ends. Sandbox-safe: workflows import these types and the redaction helpers.
 */
import type { Sinks } from '@temporalio/workflow';
import type { BackupLevel } from './types';

export type BackupEventKind = 'failure' | 'partial' | 'success' | 'stale';

/** One target of a backup as an event shows it: the URL redacted (no user info, query or fragment). */
export interface BackupEventTarget {
  target: string;
  ok: boolean;
  error?: string;
}

/**
 * The JSON body POSTed to a webhook. It carries what a user needs to act (which VM, which host, which target
 * failed and the one sentence why) and never a secret: no environment, no credentials, target URLs redacted.
 */
export interface BackupEvent {
  kind: BackupEventKind;
  domain: string;
  host: string;
  /** absent for `stale` events of a VM that was never backed up */
  backupId?: string;
  level?: BackupLevel;
  targets: BackupEventTarget[];
  /** the one sentence of a failure (for `partial`, the failing targets' sentences joined) */
  error?: string;
  /** `stale`: when the newest good backup started (absent: none was found) */
  lastGoodAt?: string;
  /** ISO time of the event */
  at: string;
}

/** Input of the `notify` activity. */
export interface NotifyInput {
  url: string;
  event: BackupEvent;
}

/** What one POST got: the status the receiver answered. */
export interface NotifyResult {
  status: number;
}

/** The name of the notify activity's patch in `backupDomain` (histories recorded before it replay without it). */
export const NOTIFY_PATCH = 'notify-on-backup-end';

/** How a backup ended, as the metrics count it. */
export type BackupOutcomeResult = 'success' | 'partial' | 'failure' | 'cancelled';

/** What the workflow tells the worker's metrics when a backup ends (a sink: no history event, no replay). */
export interface BackupOutcome {
  domain: string;
  host: string;
  backupId: string;
  result: BackupOutcomeResult;
  level?: BackupLevel;
  /** bytes read from the VM's disks (the push job's count, or the images made) */
  bytesRead: number;
  /** bytes written to targets, summed over the targets that took the backup */
  bytesStored: number;
}

/**
 * The workflow sinks vmbackup's workers implement (src/worker/metrics.ts). Calls are not recorded in the history and
 * are not made during replay, so the worker that runs the end of a backup counts it, once.
 */
export interface VmbackupSinks extends Sinks {
  metrics: {
    backupEnded(outcome: BackupOutcome): void;
  };
}

/**
 * A URL as it may be printed or sent: scheme, host and path; user info, query and fragment removed (`s3://` and
 * `nfs://` URLs carry no secret in their path). Text that is no URL is returned without anything after '?' or '#'.
 */
export function redactTargetUrl(url: string): string {
  const m = /^([a-z][a-z0-9+.-]*:\/\/)([^/?#]*)([^?#]*)/i.exec(url);
  if (!m) return url.replace(/[?#].*$/, '');
  const authority = (m[2] ?? '').replace(/^.*@/, '');
  return `${m[1] ?? ''}${authority}${m[3] ?? ''}`;
}

/**
 * A webhook URL as it may be printed: scheme, host and port only. Webhook services put their token in the path
 * (`/services/T0/B0/XXXX`) or the query, so both are shown as `…`.
 */
export function redactWebhookUrl(url: string): string {
  const m = /^([a-z][a-z0-9+.-]*:\/\/)([^/?#]*)(.*)$/i.exec(url);
  if (!m) return '(not a URL)';
  const authority = (m[2] ?? '').replace(/^.*@/, '');
  const rest = m[3] ?? '';
  return `${m[1] ?? ''}${authority}${rest && rest !== '/' ? '/…' : ''}`;
}
