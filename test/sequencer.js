// The order jest runs test files in, for finding order dependencies (scripts/test-all.sh sets it):
//   VMBACKUP_TEST_ORDER=reverse   files in reverse path order
//   VMBACKUP_TEST_ORDER=random    files shuffled by VMBACKUP_TEST_SEED (an integer; printed when chosen here)
// Unset: jest's own order (failed first, then slowest first by the previous run's timings).
'use strict';
const Sequencer = require('@jest/test-sequencer').default;

/** mulberry32: a small seeded generator, so a printed seed replays the same order */
function generator(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class OrderedSequencer extends Sequencer {
  sort(tests) {
    const order = process.env.VMBACKUP_TEST_ORDER || 'default';
    const byPath = [...tests].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
    if (order === 'default') return super.sort(tests);
    if (order === 'reverse') return byPath.reverse();
    if (order !== 'random') throw new Error(`VMBACKUP_TEST_ORDER must be default, reverse or random, not '${order}'`);
    const given = process.env.VMBACKUP_TEST_SEED;
    if (given !== undefined && !/^-?\d+$/.test(given)) throw new Error(`VMBACKUP_TEST_SEED must be an integer`);
    const seed = given !== undefined ? Number(given) : Math.floor(Math.random() * 0x7fffffff);
    const next = generator(seed);
    for (let i = byPath.length - 1; i > 0; i--) {
      const j = Math.floor(next() * (i + 1));
      [byPath[i], byPath[j]] = [byPath[j], byPath[i]];
    }
    process.stderr.write(`test files in random order, seed ${seed}:\n${byPath.map((t) => `  ${t.path}`).join('\n')}\n`);
    return byPath;
  }
}

module.exports = OrderedSequencer;
