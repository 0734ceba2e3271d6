/**
 * SocketReader (src/nbd/reader.ts) over a real Unix socket: bytes come out exactly as sent however the sender splits
 * them, and a READ payload the parser waits for is read by the socket straight into the request's buffer (shared
 * memory too, as a chunk backup's buffers are), not copied out of a scratch buffer.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { SocketReader } from '../../src/nbd/reader';

const MiB = 1 << 20;

let dir: string;
let server: Server | undefined;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmbackup-nbd-reader-'));
});
afterEach(async () => {
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  server = undefined;
  await rm(dir, { recursive: true, force: true });
});

/** A server that sends PARTS (each written in pieces of `piece` bytes, with a pause between parts), then ends. */
async function serve(parts: Buffer[], piece: number): Promise<string> {
  const path = join(dir, 'sock');
  server = createServer((c: Socket) => {
    void (async () => {
      for (const p of parts) {
        for (let o = 0; o < p.length; o += piece) c.write(p.subarray(o, Math.min(p.length, o + piece)));
        await sleep(5);
      }
      c.end();
    })();
  });
  await new Promise<void>((resolve) => server!.listen(path, resolve));
  return path;
}

function attach(path: string): { reader: SocketReader; socket: Socket } {
  const reader = new SocketReader();
  const socket = connect({
    path,
    onread: { buffer: () => reader.nextBuffer(), callback: (n: number, b: Buffer) => reader.feed(b.subarray(0, n)) },
  });
  reader.attach(socket);
  socket.on('end', () => reader.end(new Error('ended')));
  return { reader, socket };
}

test.each([
  ['shared memory, sent in 64 KiB writes', true, 64 * 1024],
  ['a plain buffer, sent in odd 100,003-byte writes', false, 100_003],
])('headers and payloads come out exact; a payload lands in place (%s)', async (_name, shared, piece) => {
  const head1 = randomBytes(16);
  const payload = randomBytes(8 * MiB);
  const head2 = randomBytes(20);
  const tail = randomBytes(3);
  // the first header and the payload's start arrive together, as a server sends a reply
  const path = await serve([Buffer.concat([head1, payload]), Buffer.concat([head2, tail])], piece);
  const { reader, socket } = attach(path);
  try {
    const dest = shared ? Buffer.from(new SharedArrayBuffer(8 * MiB + 10)) : Buffer.alloc(8 * MiB + 10);
    expect((await reader.read(16)).equals(head1)).toBe(true);
    await reader.readInto(dest, 10, 8 * MiB);
    expect(dest.subarray(10).equals(payload)).toBe(true);
    expect(dest.subarray(0, 10).equals(Buffer.alloc(10))).toBe(true); // nothing before the offset was touched
    expect((await reader.read(20)).equals(head2)).toBe(true);
    const small = Buffer.alloc(3);
    await reader.readInto(small, 0, 3);
    expect(small.equals(tail)).toBe(true);
    // all but the first reads of the payload (they came with its header) went straight into dest
    expect(reader.inPlace).toBeGreaterThan(6 * MiB);
    await expect(reader.read(1)).rejects.toThrow('ended');
  } finally {
    socket.destroy();
  }
});

test('a payload cut short by the end of the stream rejects its read and leaves nothing pending', async () => {
  const path = await serve([Buffer.concat([randomBytes(16), randomBytes(MiB)])], 64 * 1024);
  const { reader, socket } = attach(path);
  try {
    await reader.read(16);
    const dest = Buffer.from(new SharedArrayBuffer(2 * MiB));
    await expect(reader.readInto(dest, 0, 2 * MiB)).rejects.toThrow('ended');
  } finally {
    socket.destroy();
  }
});
