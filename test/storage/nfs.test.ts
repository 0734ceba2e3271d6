import { requireNfs } from '../helpers/stack';
import { describeConformance } from './conformance';
import { nfsTarget } from './fixtures';

beforeAll(requireNfs);

// the NFS driver COMMITs and checkpoints every 64 MiB
describeConformance('nfs', nfsTarget, { checkpointBytes: 64 << 20 });
