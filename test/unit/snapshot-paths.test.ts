import { OverlayPaths, parseOverlayFile } from '../../src/activities/snapshot-paths';
import { parseRsyncLiteral, parseRsyncProgress, rsyncOptions } from '../../src/activities/snapshot-copy';

describe('overlay paths', () => {
  const paths = new OverlayPaths('/var/lib/vmbackup');

  it('names overlays after the backup id, domain and disk', () => {
    expect(paths.root).toBe('/var/lib/vmbackup/overlays');
    expect(paths.overlay('web1-20260101T000000Z-ab12', 'web1', 'vda')).toBe(
      '/var/lib/vmbackup/overlays/web1-20260101T000000Z-ab12/web1.vda.qcow2',
    );
  });

  it('refuses ids and names that would leave the overlay directory', () => {
    expect(() => paths.backupDir('..')).toThrow(/not a valid backup id/);
    expect(() => paths.backupDir('a/b')).toThrow(/not a valid backup id/);
    expect(() => paths.overlay('b1', '../etc', 'vda')).toThrow(/not a valid domain/);
    expect(() => paths.overlay('b1', 'web1', 'vda/x')).toThrow(/not a valid disk/);
  });

  it('recognises only files exactly one directory below the root', () => {
    expect(paths.locate('/var/lib/vmbackup/overlays/b1/my.vm.vdb.qcow2')).toEqual({
      backupId: 'b1',
      file: 'my.vm.vdb.qcow2',
      domain: 'my.vm',
      disk: 'vdb',
    });
    expect(paths.locate('/var/lib/vmbackup/overlays/b1/notes.txt')).toEqual({ backupId: 'b1', file: 'notes.txt' });
    expect(paths.locate('/var/lib/vmbackup/overlays/b1.qcow2')).toBeUndefined();
    expect(paths.locate('/var/lib/vmbackup/overlays/b1/sub/x.vda.qcow2')).toBeUndefined();
    expect(paths.locate('/var/lib/vmbackup/overlays/../overlays2/b1/x.vda.qcow2')).toBeUndefined();
    expect(paths.locate('/var/lib/images/web1.vda.qcow2')).toBeUndefined();
    expect(paths.locate('relative/overlays/b1/x.vda.qcow2')).toBeUndefined();
  });

  it('parses <domain>.<disk>.qcow2', () => {
    expect(parseOverlayFile('web1.vda.qcow2')).toEqual({ domain: 'web1', disk: 'vda' });
    expect(parseOverlayFile('web1.snapshot.json')).toEqual({});
    expect(parseOverlayFile('vda.qcow2')).toEqual({});
  });
});

describe('rsync command line', () => {
  it('writes a fresh copy sparse and in place', () => {
    const args = rsyncOptions(false);
    expect(args).toEqual(
      expect.arrayContaining(['--inplace', '--sparse', '--info=progress2', '--outbuf=L', '--stats']),
    );
    expect(args).not.toContain('--append-verify');
  });

  it('resumes with --append-verify and never with --sparse (rsync 3.5 rewrites the prefix then)', () => {
    const args = rsyncOptions(true);
    expect(args).toEqual(expect.arrayContaining(['--inplace', '--append-verify']));
    expect(args).not.toContain('--sparse');
  });

  it('reads progress2 lines and the stats', () => {
    expect(parseRsyncProgress('      233078784  55%  222.25MB/s    0:00:00  ')).toBe(233078784);
    expect(parseRsyncProgress('      419430400 100%  172.70MB/s    0:00:02 (xfr#1, to-chk=0/1)')).toBe(419430400);
    expect(parseRsyncProgress('Number of files: 1 (reg: 1)')).toBeUndefined();
    expect(parseRsyncProgress('      2330')).toBeUndefined(); // a redraw cut by the pipe
    expect(parseRsyncProgress('      501972992 119%   41.75MB/s   ??:??:??  ')).toBe(501972992);
    expect(parseRsyncLiteral('Total transferred file size: 419430400 bytes\nLiteral data: 173342720 bytes\n')).toBe(
      173342720,
    );
  });
});
