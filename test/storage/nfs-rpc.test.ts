/**
 * ONC RPC record-marking reassembly (RFC 5531 section 11) of the NFS driver's RPC client, against a real
 * TCP server in this process that answers with records cut the awkward ways a network can deliver them:
 * record marks split across reads, records of several fragments, a large fragment arriving in pieces,
 * several replies in one segment and out of order. ganesha itself only ever sends one-fragment records.
 */
import { randomBytes } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import { RpcConnection, RpcError } from '../../src/storage/nfs/rpc';

const MiB = 1 << 20;
const LAST = 0x80000000;

interface Call {
  xid: number;
  proc: number;
}

/** A server that hands every parsed call to `answer`, with the socket to reply on. */
async function rpcServer(
  answer: (s: Socket, calls: Call[]) => Promise<void>,
): Promise<{ server: Server; port: number }> {
  const server = createServer((s) => {
    let buffered = Buffer.alloc(0);
    s.on('data', (d: Buffer) => {
      buffered = Buffer.concat([buffered, d]);
      const calls: Call[] = [];
      // every call the client sends is one fragment
      while (buffered.length >= 4) {
        const len = buffered.readUInt32BE(0) & 0x7fffffff;
        if (buffered.length < 4 + len) break;
        calls.push({ xid: buffered.readUInt32BE(4), proc: buffered.readUInt32BE(4 + 20) });
        buffered = buffered.subarray(4 + len);
      }
      if (calls.length > 0) void answer(s, calls);
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as { port: number }).port };
}

/** An accepted, successful reply carrying `payload` as variable-length opaque data. */
function replyBody(xid: number, payload: Buffer): Buffer {
  const head = Buffer.alloc(28);
  head.writeUInt32BE(xid, 0);
  head.writeUInt32BE(1, 4); // REPLY
  head.writeUInt32BE(0, 8); // MSG_ACCEPTED
  head.writeUInt32BE(0, 12); // verifier AUTH_NONE
  head.writeUInt32BE(0, 16); // verifier length
  head.writeUInt32BE(0, 20); // SUCCESS
  head.writeUInt32BE(payload.length, 24);
  const pad = Buffer.alloc((4 - (payload.length % 4)) % 4);
  return Buffer.concat([head, payload, pad]);
}

/** `body` as a record of fragments of the given sizes (the rest goes in the last one). */
function record(body: Buffer, sizes: number[]): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  for (const [i, size] of [...sizes, body.length].entries()) {
    const n = i === sizes.length ? body.length - pos : Math.min(size, body.length - pos);
    const mark = Buffer.alloc(4);
    mark.writeUInt32BE(((i === sizes.length ? LAST : 0) | n) >>> 0, 0);
    out.push(mark, body.subarray(pos, pos + n));
    pos += n;
    if (i === sizes.length) break;
  }
  return out;
}

/** Writes `bytes` in pieces of the given sizes with a pause between them, so the client reads them separately. */
async function dribble(s: Socket, bytes: Buffer, pieces: number[]): Promise<void> {
  let pos = 0;
  for (const n of [...pieces, bytes.length]) {
    const piece = bytes.subarray(pos, Math.min(bytes.length, pos + n));
    if (piece.length > 0) {
      s.write(piece);
      await new Promise((r) => setTimeout(r, 5));
    }
    pos += piece.length;
    if (pos >= bytes.length) return;
  }
}

const closers: Array<() => void> = [];
afterEach(() => {
  for (const c of closers.splice(0)) c();
});

async function connectTo(port: number): Promise<RpcConnection> {
  const c = new RpcConnection({ host: '127.0.0.1', port, retryWindowMs: 0, callTimeoutMs: 10_000 });
  await c.open();
  closers.push(() => c.close());
  return c;
}

test('a large reply in several fragments, with record marks split across reads, arrives intact', async () => {
  const payload = randomBytes(3 * MiB + 5);
  const { server, port } = await rpcServer(async (s, calls) => {
    for (const call of calls) {
      const bytes = Buffer.concat(record(replyBody(call.xid, payload), [5, 70_000, 1, 2 * MiB]));
      // the first mark arrives as 1 + 3 bytes, then the body in uneven pieces
      await dribble(s, bytes, [1, 3, 2, 7, 65_536, 3, 100_000, 1_000_000]);
    }
  });
  closers.push(() => server.close());
  const c = await connectTo(port);
  const r = await c.call(100003, 3, 6, []);
  expect(r.opaque().equals(payload)).toBe(true);
});

test('several replies in one segment, out of order, each reach their own call', async () => {
  const payloads = [randomBytes(10), randomBytes(64 * 1024 + 3), randomBytes(1), randomBytes(200_000)];
  const { server, port } = await rpcServer(async (s, calls) => {
    // proc n asks for payload n; answered in reverse order, all in one write
    const replies = calls.reverse().map((call) => Buffer.concat(record(replyBody(call.xid, payloads[call.proc]!), [])));
    s.write(Buffer.concat(replies));
    await Promise.resolve();
  });
  closers.push(() => server.close());
  const c = await connectTo(port);
  const got = await Promise.all(payloads.map((_, proc) => c.call(100003, 3, proc, [])));
  got.forEach((r, i) => expect(r.opaque().equals(payloads[i]!)).toBe(true));
});

test('a record mark announcing more than any reply can hold fails the calls with EPROTO instead of allocating it', async () => {
  const { server, port } = await rpcServer(async (s) => {
    const mark = Buffer.alloc(4);
    mark.writeUInt32BE((LAST | 0x7ffffff0) >>> 0, 0);
    s.write(mark);
    await Promise.resolve();
  });
  closers.push(() => server.close());
  const c = await connectTo(port);
  const err = await c.call(100003, 3, 6, []).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(RpcError);
  expect((err as RpcError).code).toBe('EPROTO');
});
