/**
 * Typed failures of the chunk format. `message` is one sentence for a person; `kind` says what a caller may do:
 * 'wrong-password' and 'bad-config' need a person, 'corrupt' names damaged or foreign data (never retried),
 * 'missing' is a chunk or object the repository should hold and does not.
 */
export type ChunkFormatErrorKind = 'wrong-password' | 'bad-config' | 'corrupt' | 'missing' | 'invalid-argument';

export class ChunkFormatError extends Error {
  override readonly name = 'ChunkFormatError';
  readonly kind: ChunkFormatErrorKind;
  /** the chunk or index id (hex) the failure is about, when there is one */
  readonly objectId?: string;
  readonly permanent = true;

  constructor(kind: ChunkFormatErrorKind, message: string, options: { objectId?: string; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.kind = kind;
    if (options.objectId !== undefined) this.objectId = options.objectId;
  }
}

export function isChunkFormatError(err: unknown): err is ChunkFormatError {
  return err instanceof ChunkFormatError;
}
