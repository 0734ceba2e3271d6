/** The chunk format's core (docs/chunk-format.md): config and keys, ids and codec, disk index, ChunkStore. */
export * from './errors';
export * from './config';
export * from './keys';
export * from './codec';
export * from './disk-index';
export * from './zstd';
export * from './repository';
export * from './store';
export * from './password';
export * from './files';
export * from './ingest';
export * from './lock';
export * from './codec-pool';
