/** The NBD frame encoders and decoders (src/nbd/protocol.ts), byte for byte against the spec's layouts. */
import {
  CMD,
  REPLY_TYPE,
  decodeBlockStatus,
  decodeChunkHeader,
  decodeErrorPayload,
  decodeInfoBlockSize,
  decodeInfoExport,
  encodeGoData,
  encodeMetaContextData,
  encodeOption,
  encodeRequest,
} from '../../src/nbd/protocol';
import { nbdErrnoName, printable } from '../../src/nbd/errors';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

test('a request header: magic, flags, type, cookie, offset, length', () => {
  const b = encodeRequest({
    flags: 0x0002,
    type: CMD.WRITE_ZEROES,
    cookie: 0x0102030405060708n,
    offset: 2 ** 40,
    length: 65536,
  });
  expect(b).toEqual(hex('25609513 0002 0006 0102030405060708 0000010000000000 00010000'));
});

test('options: IHAVEOPT, option, length, data; GO and SET_META_CONTEXT data', () => {
  expect(encodeOption(8)).toEqual(hex('49484156454f5054 00000008 00000000'));
  expect(encodeGoData('vda', [3])).toEqual(hex('00000003 766461 0001 0003'));
  expect(encodeMetaContextData('', ['base:allocation'])).toEqual(
    Buffer.concat([hex('00000000 00000001 0000000f'), Buffer.from('base:allocation')]),
  );
});

test('a structured reply chunk header', () => {
  expect(decodeChunkHeader(hex('668e33ef 0001 0002 00000000000000ff 0000000c'))).toEqual({
    flags: 1,
    type: REPLY_TYPE.OFFSET_HOLE,
    cookie: 255n,
    length: 12,
  });
});

test('error payloads: the lengths must add up exactly', () => {
  const msg = Buffer.from('bad');
  const err = Buffer.concat([hex('00000005 0003'), msg]);
  expect(decodeErrorPayload(REPLY_TYPE.ERROR, err)).toEqual({ error: 5, message: 'bad' });
  expect(decodeErrorPayload(REPLY_TYPE.ERROR, Buffer.concat([err, hex('00')]))).toBeUndefined();
  expect(decodeErrorPayload(REPLY_TYPE.ERROR, hex('00000005 0009 6261'))).toBeUndefined();
  expect(decodeErrorPayload(REPLY_TYPE.ERROR_OFFSET, Buffer.concat([err, hex('0000000000100000')]))).toEqual({
    error: 5,
    message: 'bad',
    offset: 1048576,
  });
  expect(decodeErrorPayload(REPLY_TYPE.ERROR_OFFSET, err)).toBeUndefined();
  expect(nbdErrnoName(5)).toBe('EIO');
  expect(nbdErrnoName(4242)).toBe('error 4242');
});

test('block status: context id then whole (length, flags) pairs', () => {
  expect(decodeBlockStatus(hex('00000002 00001000 00000003 00002000 00000000'))).toEqual({
    contextId: 2,
    descriptors: [
      { length: 4096, flags: 3 },
      { length: 8192, flags: 0 },
    ],
  });
  expect(decodeBlockStatus(hex('00000002 00001000'))).toBeUndefined();
});

test('NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE, with the spec rules on block sizes', () => {
  expect(decodeInfoExport(hex('0000 0000000004000000 0003'))).toEqual({ size: 64n << 20n, flags: 3 });
  expect(decodeInfoExport(hex('0000 0000000004000000'))).toBeUndefined();
  const bs = (min: number, pref: number, max: number) => {
    const b = Buffer.alloc(14);
    b.writeUInt16BE(3, 0);
    b.writeUInt32BE(min, 2);
    b.writeUInt32BE(pref, 6);
    b.writeUInt32BE(max, 10);
    return decodeInfoBlockSize(b);
  };
  expect(bs(1, 4096, 32 << 20)).toEqual({ minimum: 1, preferred: 4096, maximum: 32 << 20 });
  expect(bs(512, 4096, 0xffffffff)).toEqual({ minimum: 512, preferred: 4096, maximum: 0xffffffff });
  expect(bs(0, 4096, 1 << 20)).toBeUndefined(); // minimum 0
  expect(bs(3, 4096, 1 << 20)).toBeUndefined(); // not a power of two
  expect(bs(128 << 10, 128 << 10, 1 << 20)).toBeUndefined(); // minimum above 64 KiB
  expect(bs(4096, 512, 1 << 20)).toBeUndefined(); // preferred below minimum
  expect(bs(4096, 4096, 6000)).toBeUndefined(); // maximum not a multiple of minimum
});

test('a server-controlled text is made printable and short before it reaches a log', () => {
  expect(printable('disk\u001b[31m gone\n')).toBe('disk?[31m gone?');
  expect(printable('x'.repeat(500))).toHaveLength(203);
});
