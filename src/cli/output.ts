/**
 * Printing for the CLI: one clear sentence on failure, JSON for scripts, nothing else on stdout.
 *
 * Whatever a target holds was written by someone (a manifest's host, versions, unknown fields, object keys): it
 * may carry terminal escape sequences that retitle the window, recolour or hide text, or fake a line. Everything
 * printed here goes through `safeText` (tables, error sentences) or has those characters escaped (JSON), so such
 * text reaches the terminal as visible escapes (`\x1b]0;…`), never as control codes.
 */
import type { Command } from 'commander';

/**
 * C0 controls (with ESC, which starts every escape sequence), DEL, C1 controls (8-bit CSI, OSC, ...), the Unicode
 * line and paragraph separators, and the bidirectional overrides and isolates that reorder what a reader sees.
 */
// eslint-disable-next-line no-control-regex -- finding control characters is the point
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;
/** what JSON.stringify leaves as it is (it escapes C0 itself; its own newlines are layout) */
const UNSAFE_IN_JSON = /[\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;
// eslint-disable-next-line no-control-regex -- finding control characters is the point
const UNSAFE_BUT_NEWLINE = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

function escapeChar(c: string): string {
  const code = c.charCodeAt(0);
  return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
}

/**
 * Text read from a target (or anything else someone else wrote), made safe to print: every control character is
 * shown as a visible escape (`\x1b`, `\x07`, `\u202e`). `keepNewlines` leaves `\n` alone, for multi-line messages.
 */
export function safeText(text: string, opts: { keepNewlines?: boolean } = {}): string {
  return text.replace(opts.keepNewlines ? UNSAFE_BUT_NEWLINE : UNSAFE, escapeChar);
}

export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
  ) {
    super(message);
  }
}

/**
 * JSON on stdout. JSON.stringify already escapes C0 controls; DEL, C1 and the separators and bidi controls are
 * escaped too (`\u009b`), which leaves the same JSON value for a script and nothing a terminal would act on.
 */
export function printJson(value: unknown): void {
  const text = JSON.stringify(value, null, 2).replace(
    UNSAFE_IN_JSON,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
  process.stdout.write(`${text}\n`);
}

/** A table on stdout: columns padded to their widest cell, every cell made safe first. */
export function printTable(header: string[], rows: string[][]): void {
  const safeRows = rows.map((r) => r.map((c) => safeText(c)));
  const widths = header.map((h, i) => Math.max(h.length, ...safeRows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => c.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd();
  process.stdout.write(`${[line(header), ...safeRows.map(line)].join('\n')}\n`);
}

/** One warning line on stderr (`vmbackup: ...`), made safe. */
export function printWarning(message: string): void {
  process.stderr.write(`vmbackup: ${safeText(message.replace(/\s+$/, ''))}\n`);
}

/** Runs a command action; expected failures print one sentence, no stack trace. */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      await fn(...args);
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      // an error sentence may quote what a target holds (a key, a manifest field)
      process.stderr.write(`vmbackup: ${safeText(message.replace(/\s+$/, ''), { keepNewlines: true })}\n`);
      if (process.env.VMBACKUP_DEBUG && err instanceof Error && err.stack) {
        process.stderr.write(`${safeText(err.stack, { keepNewlines: true })}\n`);
      }
      process.exitCode = err instanceof CliError ? err.exitCode : 1;
    }
  };
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(u === 0 ? 0 : 1)} ${units[u]}`;
}

export type { Command };
