/** The pure part of a chunk repository's gc (src/repository/chunk-gc.ts): what the sweep chooses, and the grace rule. */
import { ChunkGcError, checkGrace, indexIdOfKey, sweepCandidates } from '../../src/repository/chunk-gc';
import { chunkKey, indexKey } from '../../src/repository/chunks';
import type { ObjectInfo } from '../../src/storage/contract';

const id = (n: number): string => n.toString(16).padStart(2, '0').repeat(32);
const NOW = Date.parse('2026-11-30T12:00:00Z');
const HOUR = 3600_000;
const obj = (key: string, hoursOld: number, size = 10): ObjectInfo => ({
  key,
  size,
  modified: new Date(NOW - hoursOld * HOUR),
});

test('the sweep takes only unmarked chunks and indexes older than the cutoff, never anything else', () => {
  const objects = [
    obj(chunkKey(id(1)), 48), // marked
    obj(chunkKey(id(2)), 48), // unmarked, old: removed
    obj(chunkKey(id(3)), 2), // unmarked, young: kept
    obj(indexKey(id(4)), 48), // marked index
    obj(indexKey(id(5)), 48), // unmarked index, old: removed
    obj(indexKey(id(6)), 23.9), // unmarked, just younger than grace
    obj(`@chunk-repo/chunks/ff/${id(7)}`, 48), // a chunk name in the wrong fan-out directory: not ours
    obj('@chunk-repo/indexes/not-an-id', 48),
    obj('@chunk-repo/config', 48),
    obj(`@chunk-repo/keys/${id(8)}`, 48),
    obj('web/web-1/manifest.json', 48),
  ];
  const mark = { chunks: new Set([id(1), id(4)]), indexes: new Set([id(4), id(1)]) };
  const { remove, young } = sweepCandidates(objects, mark, NOW - 24 * HOUR);
  expect(remove.map((o) => o.key)).toEqual([chunkKey(id(2)), indexKey(id(5))]);
  expect(young.map((o) => o.key)).toEqual([chunkKey(id(3)), indexKey(id(6))]);
  // a chunk id marked as an index (or the reverse) does not protect the other kind: ids are per kind
  const crossed = sweepCandidates([obj(chunkKey(id(9)), 48)], { chunks: new Set(), indexes: new Set([id(9)]) }, NOW);
  expect(crossed.remove).toHaveLength(1);
});

test('index keys: only 64 hex directly under indexes/', () => {
  expect(indexIdOfKey(indexKey(id(1)))).toBe(id(1));
  expect(indexIdOfKey(`${indexKey(id(1))}/x`)).toBeUndefined();
  expect(indexIdOfKey(chunkKey(id(1)))).toBeUndefined();
});

test('grace must be longer than twice the freshness window', () => {
  expect(() => checkGrace(2 * 3600 + 1)).not.toThrow();
  expect(() => checkGrace(86400)).not.toThrow();
  expect(() => checkGrace(2 * 3600)).toThrow(ChunkGcError);
  expect(() => checkGrace(3600)).toThrow(
    'The gc grace period must be longer than 2 h (twice the 1 h a running backup may rely on a chunk without touching it), not 1 h.',
  );
  expect(() => checkGrace(Number.NaN)).toThrow(ChunkGcError);
  expect(() => checkGrace(10, 5)).toThrow(/longer than 10 s/);
  expect(() => checkGrace(11, 5)).not.toThrow();
});
