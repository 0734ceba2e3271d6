/** Reading systemd units in tests. */

/** A unit as systemd reads it: section -> key -> values (comments and blank lines dropped). */
export function parseUnit(text: string): Record<string, Record<string, string[]>> {
  const out: Record<string, Record<string, string[]>> = {};
  let section: Record<string, string[]> | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const head = /^\[(.+)\]$/.exec(line);
    if (head) {
      section = out[head[1]!] ??= {};
      continue;
    }
    const eq = line.indexOf('=');
    if (!section || eq < 1) throw new Error(`not a unit line: ${JSON.stringify(raw)}`);
    (section[line.slice(0, eq)] ??= []).push(line.slice(eq + 1));
  }
  return out;
}
