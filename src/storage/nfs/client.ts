/**
 * A small NFSv3 client (RFC 1813) in TypeScript: portmapper GETPORT, MOUNT v3 EXPORT/MNT and
 * the NFS procedures the driver needs. Only TCP, AUTH_SYS.
 */
import { RpcConnection, RpcError } from './rpc';
import { XdrWriter, type XdrReader } from './xdr';

const PMAP_PROG = 100000;
const MOUNT_PROG = 100005;
const NFS_PROG = 100003;
const IPPROTO_TCP = 6;

export const enum Proc {
  GETATTR = 1,
  SETATTR = 2,
  LOOKUP = 3,
  READ = 6,
  WRITE = 7,
  CREATE = 8,
  MKDIR = 9,
  REMOVE = 12,
  RMDIR = 13,
  RENAME = 14,
  READDIRPLUS = 17,
  FSINFO = 19,
  COMMIT = 21,
}

export const enum Stable {
  UNSTABLE = 0,
  DATA_SYNC = 1,
  FILE_SYNC = 2,
}

export const NFS3_STATUS: Record<number, string> = {
  1: 'NFS3ERR_PERM',
  2: 'NFS3ERR_NOENT',
  5: 'NFS3ERR_IO',
  6: 'NFS3ERR_NXIO',
  13: 'NFS3ERR_ACCES',
  17: 'NFS3ERR_EXIST',
  18: 'NFS3ERR_XDEV',
  19: 'NFS3ERR_NODEV',
  20: 'NFS3ERR_NOTDIR',
  21: 'NFS3ERR_ISDIR',
  22: 'NFS3ERR_INVAL',
  27: 'NFS3ERR_FBIG',
  28: 'NFS3ERR_NOSPC',
  30: 'NFS3ERR_ROFS',
  31: 'NFS3ERR_MLINK',
  63: 'NFS3ERR_NAMETOOLONG',
  66: 'NFS3ERR_NOTEMPTY',
  69: 'NFS3ERR_DQUOT',
  70: 'NFS3ERR_STALE',
  71: 'NFS3ERR_REMOTE',
  10001: 'NFS3ERR_BADHANDLE',
  10002: 'NFS3ERR_NOT_SYNC',
  10003: 'NFS3ERR_BAD_COOKIE',
  10004: 'NFS3ERR_NOTSUPP',
  10005: 'NFS3ERR_TOOSMALL',
  10006: 'NFS3ERR_SERVERFAULT',
  10007: 'NFS3ERR_BADTYPE',
  10008: 'NFS3ERR_JUKEBOX',
};

/** An NFS or MOUNT status other than OK. */
export class NfsStatusError extends Error {
  constructor(
    readonly status: number,
    readonly statusName: string,
    readonly operation: string,
  ) {
    super(`${operation}: ${statusName}`);
  }
}

export interface Fattr {
  type: number; // 1 regular, 2 directory
  mode: number;
  size: number;
  fileid: number;
  mtime: Date;
}

export interface DirEntry {
  name: string;
  attrs?: Fattr;
  fh?: Buffer;
}

function readFattr(r: XdrReader): Fattr {
  const type = r.u32();
  const mode = r.u32();
  r.skip(12); // nlink uid gid
  const size = r.u64();
  r.skip(8 + 8 + 8); // used rdev fsid
  const fileid = r.u64();
  r.skip(8); // atime
  const sec = r.u32();
  const nsec = r.u32();
  r.skip(8); // ctime
  return { type, mode, size, fileid, mtime: new Date(sec * 1000 + Math.floor(nsec / 1e6)) };
}

function postOpAttr(r: XdrReader): Fattr | undefined {
  return r.bool() ? readFattr(r) : undefined;
}

function wccData(r: XdrReader): Fattr | undefined {
  if (r.bool()) r.skip(8 + 8 + 8); // pre_op_attr: size mtime ctime
  return postOpAttr(r);
}

function postOpFh(r: XdrReader): Buffer | undefined {
  return r.bool() ? Buffer.from(r.opaque()) : undefined;
}

/** sattr3 with only mode and/or size set */
/** time_how of sattr3 (RFC 1813): DONT_CHANGE, SET_TO_SERVER_TIME */
const DONT_CHANGE = 0;
const SET_TO_SERVER_TIME = 1;

function sattr(w: XdrWriter, a: { mode?: number; size?: number; timesToServerTime?: boolean }): XdrWriter {
  if (a.mode !== undefined) w.bool(true).u32(a.mode);
  else w.bool(false);
  w.bool(false).bool(false); // uid gid
  if (a.size !== undefined) w.bool(true).u64(a.size);
  else w.bool(false);
  const how = a.timesToServerTime ? SET_TO_SERVER_TIME : DONT_CHANGE;
  return w.u32(how).u32(how); // atime, mtime
}

export interface FsInfo {
  rtmax: number;
  wtmax: number;
}

export interface NfsMountOptions {
  host: string;
  /** NFS port; asked from the portmapper when absent */
  port?: number;
  /** full path from the URL; split into export + subdirectory with the server's export list */
  path: string;
  retryWindowMs?: number;
}

async function pmapGetPort(host: string, prog: number, vers: number): Promise<number> {
  const pmap = new RpcConnection({ host, port: 111, retryWindowMs: 0, callTimeoutMs: 10_000 });
  try {
    const r = await pmap.call(PMAP_PROG, 2, 3, [new XdrWriter().u32(prog).u32(vers).u32(IPPROTO_TCP).u32(0).bytes()]);
    const port = r.u32();
    if (port === 0)
      throw new RpcError(`program ${prog} v${vers} is not registered with the portmapper on ${host}`, 'ECONNREFUSED');
    return port;
  } finally {
    pmap.close();
  }
}

export class NfsClient {
  private constructor(
    private readonly nfs: RpcConnection,
    readonly exportPath: string,
    /** the export root handle */
    readonly rootFh: Buffer,
    /** the part of the URL path below the export, '' when none */
    readonly subPath: string,
    readonly fsinfo: FsInfo,
  ) {}

  /** Portmapper -> MOUNT (pick the export, get its root handle) -> NFS connection. */
  static async mount(opts: NfsMountOptions): Promise<NfsClient> {
    const mountPort = await pmapGetPort(opts.host, MOUNT_PROG, 3);
    const mnt = new RpcConnection({ host: opts.host, port: mountPort, retryWindowMs: 0, callTimeoutMs: 10_000 });
    let exportPath: string;
    let rootFh: Buffer;
    try {
      const exportsReply = await mnt.call(MOUNT_PROG, 3, 5, []);
      const exports: string[] = [];
      while (exportsReply.bool()) {
        exports.push(exportsReply.string());
        while (exportsReply.bool()) exportsReply.string(); // groups
      }
      const match = exports
        .map((e) => e.replace(/\/+$/, '') || '/')
        .filter((e) => opts.path === e || opts.path.startsWith(e === '/' ? '/' : `${e}/`))
        .sort((a, b) => b.length - a.length)[0];
      if (!match)
        throw new NfsStatusError(
          2,
          'NFS3ERR_NOENT',
          `no export on ${opts.host} contains ${opts.path} (exports: ${exports.join(', ') || 'none'})`,
        );
      exportPath = match;
      const r = await mnt.call(MOUNT_PROG, 3, 1, [new XdrWriter().string(exportPath).bytes()]);
      const status = r.u32();
      if (status !== 0)
        throw new NfsStatusError(status, NFS3_STATUS[status] ?? `MNT3ERR ${status}`, `MOUNT ${exportPath}`);
      rootFh = Buffer.from(r.opaque());
    } finally {
      mnt.close();
    }
    const nfsPort = opts.port ?? (await pmapGetPort(opts.host, NFS_PROG, 3));
    const nfs = new RpcConnection({ host: opts.host, port: nfsPort, retryWindowMs: opts.retryWindowMs ?? 60_000 });
    await nfs.open();
    const client = new NfsClient(nfs, exportPath, rootFh, opts.path.slice(exportPath.length).replace(/^\/+/, ''), {
      rtmax: 0,
      wtmax: 0,
    });
    const info = await client.fsinfoCall(rootFh);
    (client as { fsinfo: FsInfo }).fsinfo = info;
    return client;
  }

  private call(proc: Proc, args: Buffer[]): Promise<XdrReader> {
    return this.nfs.call(NFS_PROG, 3, proc, args);
  }

  private fail(status: number, op: string): NfsStatusError {
    return new NfsStatusError(status, NFS3_STATUS[status] ?? `NFS3ERR ${status}`, op);
  }

  private async fsinfoCall(fh: Buffer): Promise<FsInfo> {
    const r = await this.call(Proc.FSINFO, [new XdrWriter().opaque(fh).bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, 'FSINFO');
    postOpAttr(r);
    const rtmax = r.u32();
    r.u32(); // rtpref
    r.u32(); // rtmult
    const wtmax = r.u32();
    return { rtmax, wtmax };
  }

  async getattr(fh: Buffer): Promise<Fattr> {
    const r = await this.call(Proc.GETATTR, [new XdrWriter().opaque(fh).bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, 'GETATTR');
    return readFattr(r);
  }

  async setSize(fh: Buffer, size: number): Promise<void> {
    const w = new XdrWriter().opaque(fh);
    sattr(w, { size }).bool(false);
    const r = await this.call(Proc.SETATTR, [w.bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, 'SETATTR');
  }

  /** Sets atime and mtime to the server's clock (the client's may differ; ages are compared with server times). */
  async touch(fh: Buffer): Promise<void> {
    const w = new XdrWriter().opaque(fh);
    sattr(w, { timesToServerTime: true }).bool(false);
    const r = await this.call(Proc.SETATTR, [w.bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, 'SETATTR (times)');
  }

  /** undefined when the name does not exist */
  async lookup(dir: Buffer, name: string): Promise<{ fh: Buffer; attrs?: Fattr } | undefined> {
    const r = await this.call(Proc.LOOKUP, [new XdrWriter().opaque(dir).string(name).bytes()]);
    const status = r.u32();
    if (status === 2) return undefined;
    if (status !== 0) throw this.fail(status, `LOOKUP ${name}`);
    const fh = Buffer.from(r.opaque());
    const attrs = postOpAttr(r);
    return { fh, ...(attrs ? { attrs } : {}) };
  }

  /**
   * UNCHECKED create truncates nothing and succeeds if the file exists; GUARDED fails with EXIST. The file
   * gets mode `perm` (default 0600): asked for in CREATE, and set with SETATTR if the server applied a umask
   * of its own.
   */
  async create(dir: Buffer, name: string, mode: 'unchecked' | 'guarded', perm = 0o600): Promise<Buffer> {
    const w = new XdrWriter()
      .opaque(dir)
      .string(name)
      .u32(mode === 'unchecked' ? 0 : 1);
    sattr(w, { mode: perm });
    const r = await this.call(Proc.CREATE, [w.bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, `CREATE ${name}`);
    let fh = postOpFh(r);
    const attrs = postOpAttr(r);
    if (!fh) {
      const found = await this.lookup(dir, name);
      if (!found) throw this.fail(2, `CREATE ${name}`);
      fh = found.fh;
    }
    if (mode === 'guarded') await this.ensureMode(fh, perm, attrs, `CREATE ${name}`);
    return fh;
  }

  /** A new directory gets mode `perm` (default 0700); an existing one (EXIST) is returned as it is. */
  async mkdir(dir: Buffer, name: string, perm = 0o700): Promise<Buffer> {
    const w = new XdrWriter().opaque(dir).string(name);
    sattr(w, { mode: perm });
    const r = await this.call(Proc.MKDIR, [w.bytes()]);
    const status = r.u32();
    if (status === 17) {
      const found = await this.lookup(dir, name);
      if (found) return found.fh;
    }
    if (status !== 0) throw this.fail(status, `MKDIR ${name}`);
    let fh = postOpFh(r);
    const attrs = postOpAttr(r);
    if (!fh) {
      const found = await this.lookup(dir, name);
      if (!found) throw this.fail(2, `MKDIR ${name}`);
      fh = found.fh;
    }
    await this.ensureMode(fh, perm, attrs, `MKDIR ${name}`);
    return fh;
  }

  /** SETATTR the mode unless the attributes the server returned show it already. */
  private async ensureMode(fh: Buffer, perm: number, attrs: Fattr | undefined, op: string): Promise<void> {
    if (attrs && (attrs.mode & 0o7777) === perm) return;
    const w = new XdrWriter().opaque(fh);
    sattr(w, { mode: perm }).bool(false);
    const r = await this.call(Proc.SETATTR, [w.bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, `SETATTR (mode) after ${op}`);
  }

  /** Returns the write verifier (hex); a different verifier at COMMIT means the server lost unstable data. */
  async write(fh: Buffer, offset: number, data: Buffer, stable: Stable): Promise<{ count: number; verifier: string }> {
    const head = new XdrWriter(fh.length + 32)
      .opaque(fh)
      .u64(offset)
      .u32(data.length)
      .u32(stable)
      .u32(data.length)
      .bytes();
    const pad = (4 - (data.length % 4)) % 4;
    const parts = pad ? [head, data, Buffer.alloc(pad)] : [head, data];
    const r = await this.call(Proc.WRITE, parts);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, 'WRITE');
    wccData(r);
    const count = r.u32();
    r.u32(); // committed
    return { count, verifier: r.fixed(8).toString('hex') };
  }

  async commit(fh: Buffer): Promise<string> {
    const r = await this.call(Proc.COMMIT, [new XdrWriter().opaque(fh).u64(0).u32(0).bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, 'COMMIT');
    wccData(r);
    return r.fixed(8).toString('hex');
  }

  async read(fh: Buffer, offset: number, count: number): Promise<{ data: Buffer; eof: boolean }> {
    const r = await this.call(Proc.READ, [new XdrWriter().opaque(fh).u64(offset).u32(count).bytes()]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, 'READ');
    postOpAttr(r);
    r.u32(); // count
    const eof = r.bool();
    return { data: r.opaque(), eof };
  }

  async rename(fromDir: Buffer, fromName: string, toDir: Buffer, toName: string): Promise<void> {
    const r = await this.call(Proc.RENAME, [
      new XdrWriter().opaque(fromDir).string(fromName).opaque(toDir).string(toName).bytes(),
    ]);
    const status = r.u32();
    if (status !== 0) throw this.fail(status, `RENAME ${fromName} ${toName}`);
  }

  /** false when the name did not exist */
  async remove(dir: Buffer, name: string): Promise<boolean> {
    const r = await this.call(Proc.REMOVE, [new XdrWriter().opaque(dir).string(name).bytes()]);
    const status = r.u32();
    if (status === 2) return false;
    if (status !== 0) throw this.fail(status, `REMOVE ${name}`);
    return true;
  }

  /** false when missing or not empty */
  async rmdir(dir: Buffer, name: string): Promise<boolean> {
    const r = await this.call(Proc.RMDIR, [new XdrWriter().opaque(dir).string(name).bytes()]);
    const status = r.u32();
    if (status === 2 || status === 66 || status === 17) return false;
    if (status !== 0) throw this.fail(status, `RMDIR ${name}`);
    return true;
  }

  async readdirplus(dir: Buffer): Promise<DirEntry[]> {
    const entries: DirEntry[] = [];
    let cookie = 0n;
    let verf = Buffer.alloc(8);
    for (;;) {
      const w = new XdrWriter().opaque(dir);
      w.u64(cookie)
        .fixed(verf)
        .u32(32 * 1024)
        .u32(256 * 1024);
      const r = await this.call(Proc.READDIRPLUS, [w.bytes()]);
      const status = r.u32();
      if (status !== 0) throw this.fail(status, 'READDIRPLUS');
      postOpAttr(r);
      verf = Buffer.from(r.fixed(8));
      let last = cookie;
      while (r.bool()) {
        r.u64(); // fileid
        const name = r.string();
        // cookies are opaque 64-bit values: keep them exact
        const hi = r.u32();
        const lo = r.u32();
        last = (BigInt(hi) << 32n) | BigInt(lo);
        const attrs = postOpAttr(r);
        const fh = postOpFh(r);
        if (name !== '.' && name !== '..') entries.push({ name, ...(attrs ? { attrs } : {}), ...(fh ? { fh } : {}) });
      }
      const eof = r.bool();
      if (eof || last === cookie) return entries;
      cookie = last;
    }
  }

  close(): void {
    this.nfs.close();
  }
}
