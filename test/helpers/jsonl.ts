/** The records a crash-test child appended to a JSON-lines file so far (none while the file does not exist). */
import { readFile } from 'node:fs/promises';

export async function jsonLines(file: string): Promise<Array<Record<string, unknown>>> {
  const text = await readFile(file, 'utf8').catch(() => '');
  return text
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}
