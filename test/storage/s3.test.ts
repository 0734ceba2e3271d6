import { requireS3 } from '../helpers/stack';
import { describeConformance } from './conformance';
import { s3Target } from './fixtures';

beforeAll(requireS3);

// 5 MiB parts, one at a time: a checkpoint after every part, and a crash after part 1 leaves parts to send
describeConformance('s3', () => s3Target({ concurrency: 1 }), { checkpointBytes: 5 << 20 });
