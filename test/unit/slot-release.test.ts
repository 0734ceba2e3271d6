/**
 * A backup releases its host slot by cancelling its holdBackupSlot activity, and Temporal delivers that cancel only
 * in the answer to a heartbeat. If the worker coalesces the slot's heartbeats (the SDK's default: 0.8 x the 30 s
 * heartbeat timeout, one every 24 s), a finished backup's slot stays taken for up to 24 s while other backups queue
 * for it. Every heartbeat of a held slot must reach the server, and they must come often.
 */
import { SLOT_HEARTBEAT_MS, slotHeartbeatThrottle } from '../../src/worker';

describe('host backup slots: a released slot is freed at the next heartbeat', () => {
  test('the slot worker sends every heartbeat (no coalescing longer than the heartbeat period)', () => {
    const t = slotHeartbeatThrottle();
    expect(t.maxHeartbeatThrottleInterval).toBeLessThanOrEqual(SLOT_HEARTBEAT_MS);
    expect(t.defaultHeartbeatThrottleInterval).toBeLessThanOrEqual(SLOT_HEARTBEAT_MS);
  });

  test('a held slot heartbeats at least once a second', () => {
    expect(SLOT_HEARTBEAT_MS).toBeLessThanOrEqual(1000);
  });
});
