/**
 * A deliberately broken NBD server, for what real servers never do: it speaks a correct fixed-newstyle handshake
 * (structured replies, base:allocation as context id 1, one export of SIZE bytes), then hands every request to the
 * test's SCENARIO, which answers with whatever bytes it likes. Written from the spec, independently of src/nbd.
 * Only protocol-violation tests use it; everything the client should do right is tested against qemu-nbd and nbdkit.
 */
import { createServer } from 'node:net';
import type { Server, Socket } from 'node:net';

export interface FakeRequest {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
}

export interface FakeReplies {
  socket: Socket;
  /** a structured reply chunk: magic, flags, type, cookie, length, payload */
  chunk(cookie: Buffer, type: number, flags: number, payload: Buffer): void;
  /** OFFSET_DATA at OFFSET with DATA */
  data(cookie: Buffer, offset: number, data: Buffer, done: boolean): void;
  /** BLOCK_STATUS for context 1 */
  status(cookie: Buffer, extents: Array<[number, number]>, done: boolean): void;
  simple(cookie: Buffer, error: number, payload?: Buffer): void;
}

export type Scenario = (req: FakeRequest, reply: FakeReplies) => void;

export interface FakeServer {
  socket: string;
  close(): Promise<void>;
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};
const u16 = (n: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
};
const u64 = (n: number | bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};

function optionReply(option: number, type: number, data: Buffer): Buffer {
  return Buffer.concat([u64(0x3e889045565a9n), u32(option), u32(type), u32(data.length), data]);
}

export async function startFakeNbdServer(path: string, size: number, scenario: Scenario): Promise<FakeServer> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    const replies: FakeReplies = {
      socket,
      chunk(cookie, type, flags, payload) {
        socket.write(Buffer.concat([u32(0x668e33ef), u16(flags), u16(type), cookie, u32(payload.length), payload]));
      },
      data(cookie, offset, data, done) {
        this.chunk(cookie, 1, done ? 1 : 0, Buffer.concat([u64(offset), data]));
      },
      status(cookie, extents, done) {
        this.chunk(cookie, 5, done ? 1 : 0, Buffer.concat([u32(1), ...extents.flatMap(([l, f]) => [u32(l), u32(f)])]));
      },
      simple(cookie, error, payload) {
        socket.write(Buffer.concat([u32(0x67446698), u32(error), cookie, payload ?? Buffer.alloc(0)]));
      },
    };
    socket.write(Buffer.concat([Buffer.from('NBDMAGICIHAVEOPT'), u16(3)]));
    socket.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const option = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          const data = buf.subarray(16, 16 + len);
          buf = buf.subarray(16 + len);
          if (option === 8) socket.write(optionReply(8, 1, Buffer.alloc(0)));
          else if (option === 10) {
            const nameLen = data.readUInt32BE(0);
            const count = data.readUInt32BE(4 + nameLen);
            let at = 8 + nameLen;
            for (let i = 0; i < count; i++) {
              const l = data.readUInt32BE(at);
              const q = data.subarray(at + 4, at + 4 + l).toString();
              at += 4 + l;
              if (q === 'base:allocation') socket.write(optionReply(10, 4, Buffer.concat([u32(1), Buffer.from(q)])));
            }
            socket.write(optionReply(10, 1, Buffer.alloc(0)));
          } else if (option === 7) {
            // NBD_INFO_EXPORT: size, flags HAS_FLAGS | READ_ONLY | SEND_FLUSH
            socket.write(optionReply(7, 3, Buffer.concat([u16(0), u64(size), u16(1 | 2 | 4)])));
            socket.write(optionReply(7, 1, Buffer.alloc(0)));
            phase = 'transmission';
          } else if (option === 2) {
            socket.end(optionReply(2, 1, Buffer.alloc(0)));
            return;
          } else socket.write(optionReply(option, 0x80000001, Buffer.alloc(0)));
        } else {
          if (buf.length < 28) return;
          const req: FakeRequest = {
            flags: buf.readUInt16BE(4),
            type: buf.readUInt16BE(6),
            cookie: Buffer.from(buf.subarray(8, 16)),
            offset: Number(buf.readBigUInt64BE(16)),
            length: buf.readUInt32BE(24),
          };
          const payload = req.type === 1 ? req.length : 0;
          if (buf.length < 28 + payload) return;
          buf = buf.subarray(28 + payload);
          if (req.type === 2) {
            socket.end();
            return;
          }
          scenario(req, replies);
        }
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  return {
    socket: path,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
