import { describeConformance } from './conformance';
import { localTarget } from './fixtures';

// the local driver fsyncs and checkpoints every 64 MiB
describeConformance('local', localTarget, { checkpointBytes: 64 << 20 });
