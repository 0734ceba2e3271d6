/**
 * The NBD client (src/nbd) against real servers: qemu-nbd (qcow2 with holes, zero clusters and a persistent dirty
 * bitmap) and nbdkit (memory plugin with holes; the error filter for injected read errors). Expected values come from
 * other tools reading the same image: `qemu-img map` / `qemu-img convert`, and libnbd's `nbdinfo` / `nbdcopy`.
 * A small fake server (test/helpers/nbd-fake-server.ts) covers only what real servers never do: malformed replies
 * and a disconnect in the middle of one. Needs only local binaries (no Temporal, no libvirt).
 */
import { mkdtemp, readFile, rm, writeFile, copyFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  NbdClient,
  NbdError,
  STATE_DIRTY,
  STATE_HOLE,
  extents,
  pooledReads,
  rangesWhere,
  readRanges,
} from '../../src/nbd';
import { BufferPool } from '../../src/shared/buffer-pool';
import { startFakeNbdServer } from '../helpers/nbd-fake-server';
import type { FakeServer, Scenario } from '../helpers/nbd-fake-server';
import { mergeMap, nbdinfoMap, qemuImgMap, requireNbdTools, startNbdkit, startQemuNbd, tool } from '../helpers/nbd';
import type { NbdServer } from '../helpers/nbd';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
/** what a test started, stopped even when it failed half-way (an open socket or child would keep jest running) */
const started: Array<{ stop(): Promise<void> | void }> = [];
async function stopAll(): Promise<void> {
  for (const s of started.splice(0).reverse()) await s.stop();
}
function track<T extends NbdServer | NbdClient | FakeServer>(thing: T): T {
  if (thing instanceof NbdClient) started.push({ stop: () => thing.close() });
  else if ('close' in thing) started.push({ stop: () => thing.close() });
  else started.push(thing);
  return thing;
}
beforeAll(async () => {
  await requireNbdTools();
  dir = await mkdtemp(join(tmpdir(), 'vmbt-nbd-'));
});
afterAll(async () => {
  await stopAll();
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const e of it) out.push(e);
  return out;
}

/** mulberry32: the same pseudo-random ranges every run */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('against qemu-nbd (qcow2)', () => {
  const SIZE = 64 * MiB;
  /** the ranges written after the bitmap was added: what qemu:dirty-bitmap:b0 must report, and nothing else */
  const DIRTY: Array<[number, number]> = [
    [1 * MiB, 64 * KiB],
    [40 * MiB, 192 * KiB],
  ];
  let image: string;
  let raw: Buffer;
  let server: NbdServer;
  let client: NbdClient;

  beforeAll(async () => {
    image = join(dir, 'disk.qcow2');
    await tool('qemu-img', ['create', '-f', 'qcow2', image, String(SIZE)]);
    // data, a hole, data ending mid-cluster, an explicit zero cluster, then the bitmap and writes it must record
    await tool('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0x11 0 1M',
      '-c',
      'write -P 0x22 5M 300k',
      '-c',
      'write -z 10M 1M',
      '-c',
      'write -P 0x33 20M 4M',
      image,
    ]);
    await tool('qemu-img', ['bitmap', '--add', '--enable', '-f', 'qcow2', image, 'b0']);
    for (const [off, len] of DIRTY) await tool('qemu-io', ['-f', 'qcow2', '-c', `write -P 0xab ${off} ${len}`, image]);
    await tool('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, join(dir, 'disk.raw')]);
    raw = await readFile(join(dir, 'disk.raw'));
    server = track(await startQemuNbd(image, join(dir, 'qemu.sock'), { bitmap: 'b0' }));
    client = await NbdClient.connect({
      socketPath: server.socket,
      exportName: 'vda',
      metaContexts: ['base:allocation', 'qemu:dirty-bitmap:b0'],
    });
  });
  afterAll(async () => {
    await client?.disconnect();
    await server?.stop();
  });

  test('the handshake reports the size, block sizes, flags and contexts nbdinfo sees', async () => {
    const seen = JSON.parse(await tool('nbdinfo', ['--json', server.uri])) as {
      exports: Array<Record<string, unknown>>;
    };
    const ex = seen.exports[0]!;
    expect(client.info.size).toBe(SIZE);
    expect(client.info.size).toBe(ex['export-size']);
    expect(client.info.blockSizeAnnounced).toBe(true);
    expect(client.info.blockSize).toEqual({
      minimum: ex['block_size_minimum'],
      preferred: ex['block_size_preferred'],
      maximum: ex['block_size_maximum'],
    });
    expect(client.info.readOnly).toBe(true);
    expect(client.info.readOnly).toBe(ex['is_read_only']);
    expect(client.info.canFlush).toBe(ex['can_flush']);
    expect(client.info.canTrim).toBe(ex['can_trim']);
    expect(client.info.structuredReplies).toBe(true);
    expect([...client.info.metaContexts.keys()].sort()).toEqual(['base:allocation', 'qemu:dirty-bitmap:b0']);
    expect(ex['contexts']).toEqual(expect.arrayContaining([...client.info.metaContexts.keys()]));
  });

  test('base:allocation extents equal `qemu-img map` of the image', async () => {
    const ours = await collect(extents(client, { context: 'base:allocation' }));
    expect(ours).toEqual(await qemuImgMap(image));
    expect(ours.reduce((n, e) => n + e.length, 0)).toBe(SIZE);
    // a sub-range is clipped to it, still merged
    const part = await collect(extents(client, { context: 'base:allocation', offset: 512 * KiB, length: 5 * MiB }));
    expect(part[0]).toEqual({ offset: 512 * KiB, length: 512 * KiB + 64 * KiB, flags: 0 });
    expect(part.reduce((n, e) => n + e.length, 0)).toBe(5 * MiB);
  });

  test('the dirty bitmap context reports exactly the ranges written after the bitmap was added', async () => {
    const dirty = await collect(
      rangesWhere(extents(client, { context: 'qemu:dirty-bitmap:b0' }), (f) => (f & STATE_DIRTY) !== 0),
    );
    expect(dirty).toEqual(DIRTY.map(([offset, length]) => ({ offset, length })));
    expect(await collect(extents(client, { context: 'qemu:dirty-bitmap:b0' }))).toEqual(
      mergeMap(await nbdinfoMap(server.uri, 'qemu:dirty-bitmap:b0')),
    );
  });

  test('reads across extent boundaries equal `qemu-img convert -O raw`; holes arrive as OFFSET_HOLE zeros', async () => {
    const cases: Array<[number, number]> = [
      [1 * MiB - 4 * KiB, 8 * KiB], // data 0x11 -> dirty 0xab
      [1 * MiB + 60 * KiB, 8 * KiB], // 0xab -> hole
      [5 * MiB + 300 * KiB - 100, 300], // data -> the zeroed tail of the cluster -> hole
      [10 * MiB - 1, 1 * MiB + 2], // hole -> zero cluster -> hole
      [0, SIZE], // everything, split to the server's maximum
      [SIZE - 1, 1],
    ];
    for (const [off, len] of cases) {
      const got = await client.read(off, len);
      expect(got.length).toBe(len);
      expect(got.equals(raw.subarray(off, off + len))).toBe(true);
    }
    const before = { ...client.received };
    const hole = await client.read(30 * MiB, 2 * MiB);
    expect(hole.equals(Buffer.alloc(2 * MiB))).toBe(true);
    expect(client.received.holeBytes - before.holeBytes).toBe(2 * MiB);
    expect(client.received.dataBytes - before.dataBytes).toBe(0);
  });

  test('many reads in flight each get their own bytes', async () => {
    const next = prng(16);
    const ranges = Array.from({ length: 400 }, () => {
      const len = 1 + Math.floor(next() * 256 * KiB);
      return [Math.floor(next() * (SIZE - len)), len] as const;
    });
    const got = await Promise.all(ranges.map(([off, len]) => client.read(off, len)));
    got.forEach((b, i) => {
      const [off, len] = ranges[i]!;
      expect(b.equals(raw.subarray(off, off + len))).toBe(true);
    });
  });

  test('readRanges hands out the allocated extents in order, 16 requests in flight', async () => {
    const allocated = rangesWhere(extents(client, { context: 'base:allocation' }), (f) => (f & STATE_HOLE) === 0);
    const pieces: Array<{ offset: number; length: number }> = [];
    const parts: Buffer[] = [];
    for await (const { offset, data } of readRanges(client, allocated, { inFlight: 16, requestSize: 64 * KiB })) {
      pieces.push({ offset, length: data.length });
      parts.push(data);
    }
    const expected = (await qemuImgMap(image)).filter((e) => (e.flags & STATE_HOLE) === 0);
    expect(mergeMap(pieces.map((p) => ({ ...p, flags: 0 })))).toEqual(
      mergeMap(expected.map((e) => ({ ...e, flags: 0 }))),
    );
    expect(pieces.every((p) => p.length <= 64 * KiB)).toBe(true);
    const want = Buffer.concat(expected.map((e) => raw.subarray(e.offset, e.offset + e.length)));
    expect(Buffer.concat(parts).equals(want)).toBe(true);
  });

  test('readRanges into a BufferPool: a buffer given back holds a later piece, the bytes stay right', async () => {
    const allocated = rangesWhere(extents(client, { context: 'base:allocation' }), (f) => (f & STATE_HOLE) === 0);
    const pool = new BufferPool(16 * KiB);
    const parts: Buffer[] = [];
    const memory = new Set<ArrayBufferLike>();
    let pieces = 0;
    for await (const { data } of readRanges(client, allocated, { inFlight: 4, requestSize: 16 * KiB, pool })) {
      parts.push(Buffer.from(data)); // a copy: the buffer itself is given back and read into again
      memory.add(data.buffer);
      pieces++;
      pool.give(data);
    }
    const expected = (await qemuImgMap(image)).filter((e) => (e.flags & STATE_HOLE) === 0);
    const want = Buffer.concat(expected.map((e) => raw.subarray(e.offset, e.offset + e.length)));
    expect(Buffer.concat(parts).equals(want)).toBe(true);
    expect(pieces).toBeGreaterThan(20);
    expect(memory.size).toBeLessThanOrEqual(5); // reused: at most inFlight + 1 buffers
    expect(pool.allocated).toBe(memory.size);
    // pooledReads: the same bytes, each piece's buffer its own until released
    const reads = pooledReads(client, { inFlight: 4 });
    const again: Buffer[] = [];
    for await (const { data } of reads.read(
      rangesWhere(extents(client, { context: 'base:allocation' }), (f) => (f & STATE_HOLE) === 0),
    )) {
      again.push(Buffer.from(data));
      reads.release(data);
    }
    expect(Buffer.concat(again).equals(want)).toBe(true);
    // read(into): the bytes land in the caller's buffer, which is what resolves; a buffer of another size is refused
    const into = Buffer.alloc(8 * KiB, 0xee);
    expect(await client.read(12 * KiB, 8 * KiB, into)).toBe(into);
    expect(into.equals(raw.subarray(12 * KiB, 20 * KiB))).toBe(true);
    const odd = Buffer.alloc(5000);
    expect((await client.read(1000, 5000, odd)).equals(raw.subarray(1000, 6000))).toBe(true);
    await expect(client.read(0, 4 * KiB, Buffer.alloc(KiB))).rejects.toThrow(
      /cannot read 4096 bytes into a buffer of 1024/,
    );
  });

  test('readRanges spreads its requests over 4 connections (multi-conn) and still hands the bytes out in order', async () => {
    expect(client.info.canMultiConn).toBe(true);
    const more = await Promise.all(
      [1, 2, 3].map(async () => track(await NbdClient.connect({ socketPath: server.socket, exportName: 'vda' }))),
    );
    const conns = [client, ...more];
    const before = conns.map((c) => c.received.dataBytes + c.received.holeBytes);
    const parts: Buffer[] = [];
    let at = 0;
    for await (const { offset, data } of readRanges(conns, [{ offset: 0, length: SIZE }], {
      inFlight: 16,
      requestSize: 256 * KiB,
    })) {
      expect(offset).toBe(at);
      at += data.length;
      parts.push(data);
    }
    expect(Buffer.concat(parts).equals(raw)).toBe(true);
    // every connection carried its share
    conns.forEach((c, i) => expect(c.received.dataBytes + c.received.holeBytes - before[i]!).toBe(SIZE / 4));
    await Promise.all(more.map((c) => c.disconnect()));
  });

  test('a context the export does not have, or an export it does not have, is one clear error', async () => {
    const missing = NbdClient.connect({
      socketPath: server.socket,
      exportName: 'vda',
      metaContexts: ['base:allocation', 'qemu:dirty-bitmap:nosuch'],
    });
    await expect(missing).rejects.toMatchObject({
      kind: 'unsupported',
      message: expect.stringMatching(/does not offer the meta context qemu:dirty-bitmap:nosuch\.$/),
    });
    await expect(NbdClient.connect({ socketPath: server.socket, exportName: 'vdz' })).rejects.toMatchObject({
      kind: 'no-export',
      message: expect.stringContaining("export 'vdz'"),
    });
    await expect(NbdClient.connect({ socketPath: join(dir, 'nosuch.sock') })).rejects.toMatchObject({
      kind: 'unreachable',
      message: expect.stringContaining('ENOENT'),
    });
  });

  test('reads past the end and writes to a read-only export are refused before anything is sent', async () => {
    await expect(client.read(SIZE - 10, 11)).rejects.toMatchObject({ kind: 'invalid' });
    await expect(client.write(0, Buffer.alloc(512))).rejects.toMatchObject({ kind: 'unsupported' });
    // the connection is still good
    expect((await client.read(20 * MiB, 16)).equals(Buffer.alloc(16, 0x33))).toBe(true);
  });
});

describe('writes against a writable qemu-nbd export', () => {
  test('WRITE, WRITE_ZEROES (with and without NO_HOLE), TRIM and FLUSH give the image qemu-io makes', async () => {
    const base = join(dir, 'w-base.qcow2');
    await tool('qemu-img', ['create', '-f', 'qcow2', base, '16M']);
    await tool('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 0 12M', base]);
    const ours = join(dir, 'w-ours.qcow2');
    const theirs = join(dir, 'w-theirs.qcow2');
    await copyFile(base, ours);
    await copyFile(base, theirs);
    const pattern = Buffer.alloc(3 * MiB, 0x5a);
    await tool('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      `write -P 0x5a 1M 3M`,
      '-c',
      'write -z 5M 1M', // NO_HOLE: may not unmap
      '-c',
      'write -z -u 7M 1M', // may unmap
      '-c',
      'discard 9M 1M',
      '-c',
      'flush',
      theirs,
    ]);

    const server = track(await startQemuNbd(ours, join(dir, 'w.sock'), { readOnly: false }));
    try {
      const c = track(await NbdClient.connect({ socketPath: server.socket, exportName: 'vda' }));
      expect(c.info.readOnly).toBe(false);
      expect(c.info.canTrim && c.info.canWriteZeroes && c.info.canFlush).toBe(true);
      await Promise.all([
        c.write(1 * MiB, pattern),
        c.writeZeroes(5 * MiB, 1 * MiB, { noHole: true }),
        c.writeZeroes(7 * MiB, 1 * MiB),
        c.trim(9 * MiB, 1 * MiB),
      ]);
      await c.flush();
      expect((await c.read(1 * MiB, 3 * MiB)).equals(pattern)).toBe(true);
      expect((await c.read(5 * MiB, 1 * MiB)).equals(Buffer.alloc(MiB))).toBe(true);
      await c.disconnect();
    } finally {
      await server.stop();
    }
    const compared = await tool('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs]).catch(
      (err: { stdout?: string; stderr?: string }) => `${err.stdout ?? ''}${err.stderr ?? ''}`,
    );
    expect(compared).toMatch(/^Images are identical\.$/m);
    // same allocation too: NO_HOLE kept the cluster allocated where qemu-io's `write -z` does, and nowhere else
    const map = async (p: string) =>
      (
        JSON.parse(await tool('qemu-img', ['map', '--output=json', '-f', 'qcow2', p])) as Array<Record<string, unknown>>
      ).map((r) => [r['start'], r['length'], r['zero'], r['data'], r['offset'] !== undefined]);
    expect(await map(ours)).toEqual(await map(theirs));
  });
});

describe('against nbdkit', () => {
  test('memory plugin with holes: extents equal nbdinfo --map, bytes equal nbdcopy', async () => {
    const server = track(await startNbdkit(join(dir, 'mem.sock'), ['memory', '64M']));
    try {
      await tool('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 0x61 0 64k',
        '-c',
        'write -P 0x62 3M 1M',
        '-c',
        'write -P 0x63 63M 512k',
        server.uri,
      ]);
      const c = track(await NbdClient.connect({ socketPath: server.socket, metaContexts: ['base:allocation'] }));
      const ours = await collect(extents(c, { context: 'base:allocation' }));
      expect(ours).toEqual(await nbdinfoMap(server.uri));
      expect(ours.some((e) => (e.flags & STATE_HOLE) !== 0)).toBe(true);
      await tool('nbdcopy', [server.uri, join(dir, 'mem.raw')]);
      const raw = await readFile(join(dir, 'mem.raw'));
      const all = await c.read(0, c.info.size);
      expect(all.equals(raw)).toBe(true);
      const across = await c.read(3 * MiB - 100, 1 * MiB + 200);
      expect(across.equals(raw.subarray(3 * MiB - 100, 4 * MiB + 100))).toBe(true);
      await c.disconnect();
    } finally {
      await server.stop();
    }
  });

  test('readRanges refuses several connections to an export without multi-conn', async () => {
    const server = track(
      await startNbdkit(join(dir, 'nomc.sock'), ['--filter=multi-conn', 'pattern', '1M', 'multi-conn-mode=disable']),
    );
    const a = track(await NbdClient.connect({ socketPath: server.socket }));
    const b = track(await NbdClient.connect({ socketPath: server.socket }));
    expect(a.info.canMultiConn).toBe(false);
    await expect(readRanges([a, b], [{ offset: 0, length: MiB }]).next()).rejects.toMatchObject({
      kind: 'invalid',
      message: expect.stringContaining('multi-conn'),
    });
    // one connection is fine
    const pieces = [];
    for await (const p of readRanges([a], [{ offset: 0, length: MiB }])) pieces.push(p);
    expect(pieces.map((p) => p.data.length)).toEqual([MiB]);
    await Promise.all([a.disconnect(), b.disconnect()]);
  });

  test('the error filter: an injected EIO fails that read with the offset, nothing of it is returned, the connection goes on', async () => {
    const errFile = join(dir, 'inject-eio');
    const server = track(
      await startNbdkit(join(dir, 'err.sock'), [
        '--filter=error',
        'pattern',
        '16M',
        'error-pread=EIO',
        'error-pread-rate=100%',
        `error-pread-file=${errFile}`,
      ]),
    );
    try {
      const c = track(await NbdClient.connect({ socketPath: server.socket }));
      const good = await c.read(1 * MiB, 64 * KiB);
      await writeFile(errFile, '');
      await expect(c.read(1 * MiB, 64 * KiB)).rejects.toMatchObject({
        kind: 'server-error',
        errno: 'EIO',
        offset: 1 * MiB,
        message: expect.stringMatching(/failed the read of 65536 bytes at offset 1048576 with EIO\.$/),
      });
      const handed: number[] = [];
      const reading = (async () => {
        for await (const piece of readRanges(c, [{ offset: 2 * MiB, length: 4 * MiB }], { inFlight: 4 })) {
          handed.push(piece.offset);
        }
      })();
      await expect(reading).rejects.toMatchObject({ kind: 'server-error', errno: 'EIO', offset: 2 * MiB });
      expect(handed).toEqual([]);
      await rm(errFile);
      expect((await c.read(1 * MiB, 64 * KiB)).equals(good)).toBe(true);
      await c.disconnect();
    } finally {
      await server.stop();
    }
  });
});

describe('a server that breaks the protocol (fake server)', () => {
  const SIZE = 1 * MiB;
  afterEach(stopAll);
  let n = 0;
  async function against(scenario: Scenario, contexts: string[] = []): Promise<{ fake: FakeServer; c: NbdClient }> {
    const fake = track(await startFakeNbdServer(join(dir, `fake-${n++}.sock`), SIZE, scenario));
    const c = track(await NbdClient.connect({ socketPath: fake.socket, metaContexts: contexts }));
    return { fake, c };
  }
  const bytes = (len: number, fill = 0x77) => Buffer.alloc(len, fill);

  async function expectProtocol(p: Promise<unknown>, message: RegExp): Promise<NbdError> {
    const err = await p.then(
      (v) => {
        throw new Error(`resolved with ${String(v)}`);
      },
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NbdError);
    expect(err).toMatchObject({ kind: 'protocol', message: expect.stringMatching(message) });
    expect((err as Error).message).toMatch(/the connection was closed\.$/);
    return err as NbdError;
  }

  test('a chunk outside the requested range', async () => {
    const { fake, c } = await against((req, r) => r.data(req.cookie, req.offset + req.length, bytes(4096), true));
    await expectProtocol(
      c.read(0, 4096),
      /OFFSET_DATA chunk for bytes 4096\.\.8192 in the reply to a read of bytes 0\.\.4096/,
    );
    await expect(c.read(0, 4096)).rejects.toMatchObject({ kind: 'disconnected' });
    await fake.close();
  });

  test('overlapping chunks', async () => {
    const { fake, c } = await against((req, r) => {
      r.data(req.cookie, 0, bytes(4096), false);
      r.data(req.cookie, 2048, bytes(4096), true);
    });
    await expectProtocol(c.read(0, 8192), /bytes 2048\.\.6144 overlaps bytes 0\.\.4096/);
    await fake.close();
  });

  test('DONE before the chunks covered the whole read', async () => {
    const { fake, c } = await against((req, r) => r.data(req.cookie, 0, bytes(4096), true));
    await expectProtocol(c.read(0, 8192), /read of 8192 bytes at offset 0 ended after 4096 bytes/);
    await fake.close();
  });

  test('a reply for a cookie nobody sent fails every pending request', async () => {
    let seen = 0;
    const { fake, c } = await against((req, r) => {
      if (++seen === 3) r.simple(Buffer.from('ffffffffffffffff', 'hex'), 0);
    });
    const pending = [c.read(0, 4096), c.read(4096, 4096), c.read(8192, 4096)];
    const errors = await Promise.all(pending.map((p) => expectProtocol(p, /cookie 18446744073709551615/)));
    expect(new Set(errors).size).toBe(1);
    await fake.close();
  });

  test('a chunk length larger than the request is refused before its payload is read', async () => {
    const { fake, c } = await against((req, r) => {
      // the header claims 1 GiB; the payload never comes
      r.socket.write(
        Buffer.concat([
          Buffer.from('668e33ef00010001', 'hex'),
          req.cookie,
          Buffer.from('40000008', 'hex'),
          Buffer.alloc(8),
        ]),
      );
    });
    await expectProtocol(c.read(0, 4096), /OFFSET_DATA chunk of 1073741824 bytes for a read of 4096 bytes/);
    await fake.close();
  });

  test('a reply chunk of the wrong command type', async () => {
    const { fake, c } = await against((req, r) => r.status(req.cookie, [[req.length, 0]], true), ['base:allocation']);
    await expectProtocol(c.read(0, 4096), /BLOCK_STATUS chunk in the reply to READ/);
    await fake.close();
  });

  test('a simple reply to READ although structured replies were agreed', async () => {
    const { fake, c } = await against((req, r) => r.simple(req.cookie, 0, bytes(req.length)));
    await expectProtocol(c.read(0, 4096), /simple reply to READ at offset 0 although structured replies were agreed/);
    await fake.close();
  });

  test('BLOCK_STATUS: a zero-length extent, an extent past the request that is not the last, past the export', async () => {
    const zero = await against(
      (req, r) =>
        r.status(
          req.cookie,
          [
            [4096, 0],
            [0, 3],
          ],
          true,
        ),
      ['base:allocation'],
    );
    await expectProtocol(zero.c.blockStatus(0, 65536), /zero-length extent at offset 4096 for base:allocation/);
    await zero.fake.close();
    const past = await against(
      (req, r) =>
        r.status(
          req.cookie,
          [
            [8192, 0],
            [4096, 3],
          ],
          true,
        ),
      ['base:allocation'],
    );
    await expectProtocol(
      past.c.blockStatus(0, 4096),
      /extent for base:allocation at offset 0 runs to 8192, past the request's end 4096/,
    );
    await past.fake.close();
    const beyond = await against((req, r) => r.status(req.cookie, [[2 * SIZE, 0]], true), ['base:allocation']);
    await expectProtocol(beyond.c.blockStatus(0, 4096), /past the export's end 1048576/);
    await beyond.fake.close();
  });

  test('a disconnect in the middle of a reply fails the pending reads, and never hands out what arrived', async () => {
    const { fake, c } = await against((req, r) => {
      if (req.offset !== 0) return;
      r.socket.write(
        Buffer.concat([Buffer.from('668e33ef00010001', 'hex'), req.cookie, Buffer.from('00001008', 'hex')]),
      );
      r.socket.write(Buffer.concat([Buffer.alloc(8), bytes(100)]));
      setTimeout(() => r.socket.destroy(), 50);
    });
    const reads = [c.read(0, 4096), c.read(4096, 4096)];
    for (const p of reads) {
      await expect(p).rejects.toMatchObject({
        kind: 'disconnected',
        message: expect.stringMatching(/closed the connection in the middle of a reply\.$/),
      });
    }
    await fake.close();
  });
});
