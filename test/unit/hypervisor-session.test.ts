/**
 * Which virsh commands a session may answer, and how their arguments are written for virsh's shell
 * parser. The sessions themselves run against the real libvirt: test/integration/hypervisor-session.test.ts.
 */
import { queryLine, quoteVirshArg } from '../../src/hypervisor/virsh-session';

describe('queryLine', () => {
  test('the queries VirshHypervisor makes, each argument single-quoted', () => {
    expect(queryLine(['version'])).toBe('version');
    expect(queryLine(['domstate', 'vm1'])).toBe(`domstate 'vm1'`);
    expect(queryLine(['dumpxml', 'vm1', '--inactive'])).toBe(`dumpxml 'vm1' '--inactive'`);
    expect(queryLine(['domblkinfo', 'vm1', 'vda'])).toBe(`domblkinfo 'vm1' 'vda'`);
    expect(queryLine(['domjobinfo', 'vm1', '--completed', '--keep-completed', '--rawstats'])).toBe(
      `domjobinfo 'vm1' '--completed' '--keep-completed' '--rawstats'`,
    );
    expect(queryLine(['blockjob', 'vm1', 'vda', '--raw'])).toBe(`blockjob 'vm1' 'vda' '--raw'`);
  });

  test('anything with a side effect runs as its own process', () => {
    expect(queryLine(['backup-begin', 'vm1', '/tmp/b.xml'])).toBeUndefined();
    expect(queryLine(['blockjob', 'vm1', 'vda', '--pivot'])).toBeUndefined();
    expect(queryLine(['blockjob', 'vm1', 'vda', '--abort'])).toBeUndefined();
    expect(queryLine(['blockjob', 'vm1', 'vda', '--raw', '--bandwidth', '1'])).toBeUndefined();
    expect(queryLine(['blockcommit', 'vm1', 'vda', '--active', '--shallow'])).toBeUndefined();
    expect(queryLine(['domjobabort', 'vm1'])).toBeUndefined();
    expect(queryLine(['snapshot-create-as', '--domain', 'vm1'])).toBeUndefined();
    expect(queryLine([])).toBeUndefined();
  });

  test('characters the line editor could act on, or an empty argument, keep a query out of the session', () => {
    expect(queryLine(['domblkinfo', 'vm1', '/a\tb'])).toBeUndefined();
    expect(queryLine(['domblkinfo', 'vm1', '/a\nb'])).toBeUndefined();
    expect(queryLine(['domblkinfo', 'vm1', '/caf\u00e9'])).toBeUndefined();
    expect(queryLine(['domblkinfo', 'vm1', ''])).toBeUndefined();
    expect(queryLine(['domstate', 'x'.repeat(5000)])).toBeUndefined();
  });
});

test('quoteVirshArg closes the quote around an embedded one, as virsh parses it', () => {
  expect(quoteVirshArg(`it's "x" \\ ;#`)).toBe(`'it'\\''s "x" \\ ;#'`);
});
