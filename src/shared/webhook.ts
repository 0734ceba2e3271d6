/**
 * Webhook URLs (`--notify`, `--allow-notify`): checked once, the same way by the CLI and the notify activity, and
 * printed only redacted. No Temporal or Node imports: the CLI loads this at start.
 */
import { redactWebhookUrl } from './events';

/** A webhook that could not take an event; `retryable` says whether the same POST may succeed later. */
export class WebhookError extends Error {
  constructor(
    message: string,
    readonly retryable: boolean,
    readonly status?: number,
  ) {
    super(message);
  }
}

/**
 * Checks a webhook URL: http or https, a host, no user info (fetch refuses it, and it would be printed). Returns
 * the parsed URL; throws one sentence naming the URL only redacted.
 */
export function parseWebhookUrl(url: string): URL {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new WebhookError(`the notify URL ${redactWebhookUrl(url)} is not a URL`, false);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new WebhookError(
      `the notify URL ${redactWebhookUrl(url)} is not http:// or https:// (${parsed.protocol.replace(/:$/, '')})`,
      false,
    );
  }
  if (!parsed.hostname) throw new WebhookError(`the notify URL ${redactWebhookUrl(url)} names no host`, false);
  if (parsed.username || parsed.password) {
    throw new WebhookError(
      `the notify URL ${redactWebhookUrl(url)} carries a user name or password: put the receiver's token in its path or query instead`,
      false,
    );
  }
  return parsed;
}

/**
 * Whether a webhook URL lies within one of the prefixes: same scheme, host and port, and a path that is the prefix's
 * or below it segment by segment (`https://h/hooks` allows `https://h/hooks/a`, not `https://h/hooks-evil`).
 */
export function webhookAllowed(url: string, prefixes: readonly string[]): boolean {
  let u: URL;
  try {
    u = parseWebhookUrl(url);
  } catch {
    return false;
  }
  return prefixes.some((prefix) => {
    let p: URL;
    try {
      p = new URL(prefix);
    } catch {
      return false;
    }
    if (p.protocol !== u.protocol || p.host !== u.host) return false;
    const base = p.pathname.replace(/\/+$/, '');
    return u.pathname === base || u.pathname.startsWith(`${base}/`) || (base === '' && u.pathname === '/');
  });
}

/** Checks `--allow-notify` / VMBACKUP_ALLOW_NOTIFY values: each an http(s) URL; throws one sentence. */
export function parseAllowNotify(values: readonly string[], source: string): string[] {
  const prefixes = values.map((v) => v.trim()).filter((v) => v !== '');
  for (const p of prefixes) {
    try {
      parseWebhookUrl(p);
    } catch (err) {
      throw new Error(`${source}: ${(err as Error).message}`);
    }
  }
  return prefixes;
}
