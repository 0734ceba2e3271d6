/**
 * zstd for Node 20 and 22 (docs/chunk-format.md, "zstd implementation"): Node's own zlib zstd when it exists
 * (22.15+) and passes a round trip, else @bokuweb/zstd-wasm. Both write and read standard zstd frames.
 * Decompression is always bounded: a frame that claims or yields more than `maxOutput` bytes is refused.
 */
import * as zlib from 'node:zlib';

export interface Zstd {
  /** 'node' (zlib's built-in) or 'wasm' */
  readonly implementation: 'node' | 'wasm';
  compress(data: Uint8Array, level: number): Buffer;
  /** throws when the frame is malformed or its content is larger than maxOutput */
  decompress(frame: Uint8Array, maxOutput: number): Buffer;
}

interface NodeZstdZlib {
  zstdCompressSync(data: Uint8Array, opts: { params: Record<number, number> }): Buffer;
  zstdDecompressSync(data: Uint8Array, opts: { maxOutputLength: number }): Buffer;
  constants: Record<string, number>;
}

const ZSTD_MAGIC = 0xfd2fb528;

/**
 * The content size a zstd frame header declares, undefined when the header does not declare one; throws on a
 * header that is not a zstd frame. (RFC 8878 section 3.1.1.1)
 */
export function frameContentSize(frame: Uint8Array): number | undefined {
  const b = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  if (b.length < 6 || b.readUInt32LE(0) !== ZSTD_MAGIC) throw new Error('not a zstd frame');
  const fhd = b[4] as number;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const dictIdFlag = fhd & 3;
  let pos = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictIdFlag]!;
  const fcsSize = fcsFlag === 0 ? (singleSegment ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!;
  if (fcsSize === 0) return undefined;
  if (b.length < pos + fcsSize) throw new Error('truncated zstd frame header');
  switch (fcsSize) {
    case 1:
      return b[pos] as number;
    case 2:
      return b.readUInt16LE(pos) + 256;
    case 4:
      return b.readUInt32LE(pos);
    default: {
      const v = b.readBigUInt64LE(pos);
      pos += 8;
      return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
    }
  }
}

function nodeZstd(): Zstd | undefined {
  const z = zlib as unknown as Partial<NodeZstdZlib>;
  if (typeof z.zstdCompressSync !== 'function' || typeof z.zstdDecompressSync !== 'function' || !z.constants)
    return undefined;
  const levelParam = z.constants.ZSTD_c_compressionLevel;
  if (levelParam === undefined) return undefined;
  const impl: Zstd = {
    implementation: 'node',
    compress: (data, level) => z.zstdCompressSync!(data, { params: { [levelParam]: level } }),
    decompress: (frame, maxOutput) => {
      const declared = frameContentSize(frame);
      if (declared !== undefined && declared > maxOutput) throw new Error(`zstd frame declares ${declared} bytes`);
      return z.zstdDecompressSync!(frame, { maxOutputLength: maxOutput });
    },
  };
  try {
    const sample = Buffer.from('vmbackup zstd self-test '.repeat(64));
    if (!impl.decompress(impl.compress(sample, 1), sample.length).equals(sample)) return undefined;
  } catch {
    return undefined;
  }
  return impl;
}

async function wasmZstd(): Promise<Zstd> {
  const wasm = await import('@bokuweb/zstd-wasm');
  await wasm.init();
  return {
    implementation: 'wasm',
    compress: (data, level) => {
      const out = wasm.compress(data, level);
      return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
    },
    decompress: (frame, maxOutput) => {
      // the WASM build allocates what the header declares: check it first; without a declared size it decodes into
      // a buffer of maxOutput bytes and fails if the content does not fit
      const declared = frameContentSize(frame);
      if (declared !== undefined && declared > maxOutput) throw new Error(`zstd frame declares ${declared} bytes`);
      const out = wasm.decompress(frame, { defaultHeapSize: maxOutput });
      return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
    },
  };
}

let loaded: Promise<Zstd> | undefined;

/** The zstd to use in this process (loaded once). `prefer` forces one implementation (bench, tests). */
export function loadZstd(prefer?: 'node' | 'wasm'): Promise<Zstd> {
  if (prefer === 'wasm') return wasmZstd();
  if (prefer === 'node') {
    const n = nodeZstd();
    return n ? Promise.resolve(n) : Promise.reject(new Error(`Node ${process.version} has no built-in zstd`));
  }
  loaded ??= (async () => nodeZstd() ?? (await wasmZstd()))();
  return loaded;
}
