import { COPY_BLOCK, dataRuns, matchingPrefix, SourcePieces } from '../../src/activities/single-pass-copy';

/** A buffer of `blocks` blocks of 8 bytes; the listed blocks hold data (one non-zero byte at `at`). */
function blocks(n: number, data: number[], at = 3): Buffer {
  const buf = Buffer.alloc(n * 8);
  for (const b of data) buf[b * 8 + at] = 0x5a;
  return buf;
}

describe('dataRuns: the blocks of a chunk that must be written (the rest become holes)', () => {
  it('uses whole file-system blocks by default', () => {
    expect(COPY_BLOCK).toBe(4096);
  });

  it('writes nothing for an all-zero chunk', () => {
    expect(dataRuns(Buffer.alloc(64), 64, 8)).toEqual([]);
  });

  it('writes a chunk full of data in one piece', () => {
    expect(dataRuns(Buffer.alloc(64, 1), 64, 8)).toEqual([[0, 64]]);
  });

  it('merges adjacent data blocks and skips zero blocks between them', () => {
    expect(dataRuns(blocks(8, [0, 1, 4, 7]), 64, 8)).toEqual([
      [0, 16],
      [32, 40],
      [56, 64],
    ]);
  });

  it('finds a single non-zero byte in the middle of a block (not only the first and last bytes)', () => {
    expect(dataRuns(blocks(4, [2], 4), 32, 8)).toEqual([[16, 24]]);
    expect(dataRuns(blocks(4, [1], 0), 32, 8)).toEqual([[8, 16]]);
    expect(dataRuns(blocks(4, [3], 7), 32, 8)).toEqual([[24, 32]]);
  });

  it('looks only at the first len bytes and handles a short last block', () => {
    const buf = blocks(4, [0, 3]);
    expect(dataRuns(buf, 20, 8)).toEqual([[0, 8]]); // block 3 lies beyond len
    buf[18] = 1;
    expect(dataRuns(buf, 20, 8)).toEqual([
      [0, 8],
      [16, 20],
    ]);
  });
});

describe('matchingPrefix: how much of a partial copy equals the base', () => {
  it('is the whole length when the two are equal, even when not a whole number of blocks', () => {
    const a = Buffer.alloc(20, 7);
    expect(matchingPrefix(a, Buffer.from(a), 20, 8)).toBe(20);
  });

  it('stops at the block that holds the first difference', () => {
    const a = Buffer.alloc(64, 7);
    const b = Buffer.from(a);
    b[43] = 8;
    expect(matchingPrefix(a, b, 64, 8)).toBe(40);
    b[0] = 9;
    expect(matchingPrefix(a, b, 64, 8)).toBe(0);
  });

  it('keeps no partial block: a difference in a short last block drops that block', () => {
    const a = Buffer.alloc(20, 7);
    const b = Buffer.from(a);
    b[19] = 0;
    expect(matchingPrefix(a, b, 20, 8)).toBe(16);
  });

  it('compares only the first len bytes', () => {
    const a = Buffer.alloc(32, 1);
    const b = Buffer.alloc(32, 1);
    b[30] = 2;
    expect(matchingPrefix(a, b, 24, 8)).toBe(24);
  });
});

describe('SourcePieces: holes are skipped whole, data is read in chunks that stop at a hole', () => {
  /** pieces from `from` to the end: [start, end, hole] */
  const walk = (p: SourcePieces, from: number, size: number) => {
    const out: Array<[number, number, boolean]> = [];
    for (let pos = from; pos < size;) {
      const { end, hole } = p.from(pos);
      out.push([pos, end, hole]);
      pos = end;
    }
    return out;
  };
  const pieces = (size: number, holes: Array<[number, number]>) => {
    const p = new SourcePieces(size, 10, 15, 4); // chunks of 10, hole pieces of 15, holes from 4
    p.addHoles(holes);
    return p;
  };

  it('reads everything in chunks when there are no holes', () => {
    expect(walk(new SourcePieces(25, 10, 15, 4), 0, 25)).toEqual([
      [0, 10, false],
      [10, 20, false],
      [20, 25, false],
    ]);
  });

  it('stops a data piece where a hole starts and cuts a long hole into hole pieces', () => {
    expect(walk(pieces(60, [[14, 50]]), 0, 60)).toEqual([
      [0, 10, false],
      [10, 14, false],
      [14, 29, true],
      [29, 44, true],
      [44, 50, true],
      [50, 60, false],
    ]);
  });

  it('reads holes shorter than the minimum, clips holes at the end of the file, resumes inside a hole', () => {
    expect(
      walk(
        pieces(40, [
          [30, 60],
          [2, 5],
        ]),
        0,
        40,
      ),
    ).toEqual([
      [0, 10, false],
      [10, 20, false],
      [20, 30, false],
      [30, 40, true],
    ]);
    expect(walk(pieces(40, [[30, 60]]), 33, 40)).toEqual([[33, 40, true]]);
  });

  it('uses holes that arrive during the walk from where the walk is', () => {
    const p = new SourcePieces(60, 10, 15, 4);
    expect(p.from(0)).toEqual({ end: 10, hole: false });
    p.addHoles([
      [5, 25],
      [40, 60],
    ]);
    expect(walk(p, 10, 60)).toEqual([
      [10, 25, true],
      [25, 35, false],
      [35, 40, false],
      [40, 55, true],
      [55, 60, true],
    ]);
  });
});
