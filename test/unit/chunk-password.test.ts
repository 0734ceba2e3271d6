import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { passwordFrom } from '../../src/repository/chunks/password';

describe('where a chunk repository password comes from', () => {
  const dir = mkdtempSync(join(tmpdir(), 'vmb-pw-'));
  const file = join(dir, 'pw');
  writeFileSync(file, 'from the file\nsecond line ignored\n');

  test('--password-file, then VMBACKUP_PASSWORD_FILE, then VMBACKUP_PASSWORD, else none', () => {
    const env = { VMBACKUP_PASSWORD: 'from env', VMBACKUP_PASSWORD_FILE: file };
    const other = join(dir, 'other');
    writeFileSync(other, 'other file\r\n');
    expect(passwordFrom({ passwordFile: other, env })).toBe('other file');
    expect(passwordFrom({ env })).toBe('from the file');
    expect(passwordFrom({ env: { VMBACKUP_PASSWORD: 'from env' } })).toBe('from env');
    expect(passwordFrom({ env: {} })).toBeUndefined();
  });

  test('a missing, empty or huge file is one sentence naming it', () => {
    expect(() => passwordFrom({ passwordFile: join(dir, 'nope') })).toThrow(/^The password file .*nope cannot be read/);
    const empty = join(dir, 'empty');
    writeFileSync(empty, '\nx');
    expect(() => passwordFrom({ passwordFile: empty })).toThrow(/has an empty first line\.$/);
    const huge = join(dir, 'huge');
    writeFileSync(huge, 'x'.repeat(10000));
    expect(() => passwordFrom({ passwordFile: huge })).toThrow(/larger than a password file can be\.$/);
  });
});
