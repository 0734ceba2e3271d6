/** Durations on the command line: `90s`, `30m`, `12h`, `7d`, `2w` (whole numbers, one unit). */
const UNIT_SECONDS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86_400, w: 604_800 };

/** Seconds, or undefined when `text` is not a duration. */
export function parseDuration(text: string): number | undefined {
  const m = /^(\d{1,9})([smhdw])$/.exec(text.trim());
  if (!m) return undefined;
  const seconds = Number(m[1]) * (UNIT_SECONDS[m[2] as string] ?? 0);
  return Number.isSafeInteger(seconds) ? seconds : undefined;
}
