/**
 * `notify`: POST a backup event (src/shared/events.ts) to a webhook as JSON. One attempt per activity attempt:
 * a network error, a timeout, 408, 429 or a 5xx is retryable and Temporal's retry policy tries again; any other
 * answer outside 2xx (a 4xx, a redirect) is permanent, since the same request gets the same answer.
 *
 * Nothing secret leaves: the event carries no environment, target URLs are redacted, and every string of it is
 * scrubbed of the secrets the worker holds (its S3 secret key, its Temporal API key) before it is sent, in case an
 * error sentence from a library ever quoted one. The webhook URL itself (its token) is printed only redacted.
 */
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { ErrorType } from '../shared/errors';
import type { BackupEvent, BackupEventTarget, NotifyInput, NotifyResult } from '../shared/events';
import { redactTargetUrl, redactWebhookUrl } from '../shared/events';
import { parseWebhookUrl, WebhookError, webhookAllowed } from '../shared/webhook';

export { parseAllowNotify, parseWebhookUrl, WebhookError, webhookAllowed } from '../shared/webhook';

export interface NotifyDeps {
  /** values that must never appear in an event (the worker's S3 secret key, API key, ...) */
  secrets?: string[];
  /** per POST; default 10 s */
  timeoutMs?: number;
  /**
   * webhook URL prefixes this worker POSTs to (`--allow-notify`, VMBACKUP_ALLOW_NOTIFY); undefined: any http(s) URL.
   * Anyone who can start a workflow chooses a backup's notify URL.
   */
  allowUrls?: readonly string[];
}

export interface NotifyActivities {
  notify(input: NotifyInput): Promise<NotifyResult>;
}

export const DEFAULT_NOTIFY_TIMEOUT_MS = 10_000;
/** Secrets shorter than this are not scrubbed: replacing every "1" of an event would make it unreadable. */
const MIN_SECRET_LENGTH = 6;
const MAX_TEXT = 2000;
const MAX_TARGETS = 64;

export function createNotifyActivities(deps: NotifyDeps = {}): NotifyActivities {
  return {
    async notify(input: NotifyInput): Promise<NotifyResult> {
      const signal = Context.current().cancellationSignal;
      try {
        if (deps.allowUrls && !webhookAllowed(input.url, deps.allowUrls)) {
          throw new WebhookError(
            `the notify URL ${redactWebhookUrl(input.url)} is not within this worker's --allow-notify (VMBACKUP_ALLOW_NOTIFY): nothing was sent`,
            false,
          );
        }
        return await postEvent(input.url, input.event, { ...deps, signal });
      } catch (err) {
        if (!(err instanceof WebhookError)) throw err;
        throw ApplicationFailure.create({
          message: err.message,
          type: ErrorType.NotifyFailed,
          nonRetryable: !err.retryable,
        });
      }
    },
  };
}

/** The event as it is sent: every string scrubbed and bounded, target URLs redacted, unknown fields dropped. */
export function sanitizeEvent(event: BackupEvent, secrets: readonly string[] = []): BackupEvent {
  const usable = secrets.filter((s) => s.length >= MIN_SECRET_LENGTH).sort((a, b) => b.length - a.length);
  const text = (s: string): string => {
    let out = String(s);
    for (const secret of usable) out = out.split(secret).join('***');
    return out.length > MAX_TEXT ? `${out.slice(0, MAX_TEXT)}…` : out;
  };
  const targets: BackupEventTarget[] = (Array.isArray(event.targets) ? event.targets : [])
    .slice(0, MAX_TARGETS)
    .map((t) => ({
      target: text(redactTargetUrl(String(t.target))),
      ok: t.ok === true,
      ...(t.error !== undefined ? { error: text(t.error) } : {}),
    }));
  return {
    kind: event.kind,
    domain: text(event.domain),
    host: text(event.host),
    ...(event.backupId !== undefined ? { backupId: text(event.backupId) } : {}),
    ...(event.level !== undefined ? { level: event.level } : {}),
    targets,
    ...(event.error !== undefined ? { error: text(event.error) } : {}),
    ...(event.lastGoodAt !== undefined ? { lastGoodAt: text(event.lastGoodAt) } : {}),
    at: text(event.at),
  };
}

/**
 * One POST of the event. Resolves with the receiver's 2xx status; throws a WebhookError saying whether a retry
 * may help. Redirects are not followed (a webhook that moved is a configuration to fix, and following one would
 * let a receiver send the worker's POST elsewhere).
 */
export async function postEvent(
  url: string,
  event: BackupEvent,
  opts: NotifyDeps & { signal?: AbortSignal } = {},
): Promise<NotifyResult> {
  const parsed = parseWebhookUrl(url);
  const shown = redactWebhookUrl(url);
  const body = JSON.stringify(sanitizeEvent(event, opts.secrets));
  const timeoutMs = opts.timeoutMs ?? DEFAULT_NOTIFY_TIMEOUT_MS;
  const signals = [AbortSignal.timeout(timeoutMs), ...(opts.signal ? [opts.signal] : [])];
  let res: Response;
  try {
    res = await fetch(parsed, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'user-agent': 'vmbackup' },
      body,
      redirect: 'manual',
      signal: AbortSignal.any(signals),
    });
  } catch (err) {
    const why =
      (err as { name?: string }).name === 'TimeoutError' ? `no answer in ${timeoutMs / 1000} s` : causeOf(err);
    throw new WebhookError(`the webhook at ${shown} could not be reached (${why})`, true);
  }
  // the answer's body is not read: a receiver cannot make the worker hold anything
  await res.body?.cancel().catch(() => undefined);
  const { status } = res;
  if (status >= 200 && status < 300) return { status };
  const retryable = status === 408 || status === 429 || status >= 500;
  const redirect =
    status >= 300 && status < 400 ? ' (a redirect, which vmbackup does not follow: give the final URL)' : '';
  throw new WebhookError(`the webhook at ${shown} answered ${status}${redirect}`, retryable, status);
}

function causeOf(err: unknown): string {
  let cur: unknown = err;
  let text = String(err);
  for (let i = 0; i < 5 && typeof cur === 'object' && cur !== null; i++) {
    const { message, code } = cur as { message?: unknown; code?: unknown };
    if (typeof code === 'string') return code;
    if (typeof message === 'string' && message) text = message;
    cur = (cur as { cause?: unknown }).cause;
  }
  return text;
}
