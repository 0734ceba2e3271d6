/** `ino:size:mtimeMs`, as PutImageOptions.sourceStamp records it: a file whose stamp is unchanged was not rewritten. */
export function fileStamp(s: { ino: number; size: number; mtimeMs: number }): string {
  return `${s.ino}:${s.size}:${s.mtimeMs}`;
}
