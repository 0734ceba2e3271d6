import { parseAge } from '../../src/repository/gc';

describe('gc --older-than', () => {
  test.each([
    ['0s', 0],
    ['45s', 45_000],
    ['30m', 1_800_000],
    ['12h', 43_200_000],
    ['1d', 86_400_000],
    ['2w', 1_209_600_000],
  ])('%s is %d ms', (text, ms) => {
    expect(parseAge(text)).toBe(ms);
  });

  test.each(['', 'abc', '1', '-5m', '1.5h', '1 d', '1y', '1dd', '99999999999d'])('%j is refused', (text) => {
    expect(parseAge(text)).toBeUndefined();
  });
});
