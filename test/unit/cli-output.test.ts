import { printJson, printTable, safeText } from '../../src/cli/output';

function captureStdout(fn: () => void): string {
  let out = '';
  const spy = jest.spyOn(process.stdout, 'write').mockImplementation((s) => ((out += String(s)), true));
  try {
    fn();
  } finally {
    spy.mockRestore();
  }
  return out;
}

/** every character a terminal acts on: C0 (ESC, BEL, CR, ...), DEL, C1 (8-bit CSI/OSC), separators, bidi controls */
// eslint-disable-next-line no-control-regex -- finding control characters is the point
const ACTIVE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

describe('text read from a target, printed', () => {
  const evil = '\u001b]0;pwned\u0007\u001b[31m';

  test('safeText shows every control character as a visible escape and leaves the rest alone', () => {
    expect(safeText(evil)).toBe('\\x1b]0;pwned\\x07\\x1b[31m');
    expect(safeText('a\u009b2Jb\u007fc\rd\ne\u202eé漢')).toBe('a\\x9b2Jb\\x7fc\\x0dd\\x0ae\\u202eé漢');
    expect(safeText('two\nlines\u001b', { keepNewlines: true })).toBe('two\nlines\\x1b');
    expect(safeText('vm1-20261130T020000Z-ab12 push (quiesced) 1.5 GiB')).toBe(
      'vm1-20261130T020000Z-ab12 push (quiesced) 1.5 GiB',
    );
  });

  test('a table cell cannot retitle the terminal, recolour it or fake a row', () => {
    const out = captureStdout(() =>
      printTable(
        ['ID', 'HOST'],
        [
          ['b1', evil],
          ['b2', 'h2\nb3  fake-row'],
        ],
      ),
    );
    expect(out.split('\n')).toEqual(['ID  HOST', 'b1  \\x1b]0;pwned\\x07\\x1b[31m', 'b2  h2\\x0ab3  fake-row', '']);
  });

  test('JSON keeps the values (a script reads the same string) but spells every active character as \\u', () => {
    const value = { host: evil, note: '\u009b31m\u202e', n: 1 };
    const out = captureStdout(() => printJson(value));
    expect(JSON.parse(out)).toEqual(value);
    const body = out.replace(/\n/g, '');
    expect(body).not.toMatch(ACTIVE);
    expect(out).toContain('"note": "\\u009b31m\\u202e"');
  });
});
