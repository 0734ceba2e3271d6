/**
 * Activity runs read from a workflow history, for tests and the bench: regular activities
 * (scheduled/started/closed events) and local activities (one `core_local_activity` marker each,
 * which carries the activity type, the attempt and its schedule and completion times).
 */
import type { temporal } from '@temporalio/proto';

type HistoryEvent = temporal.api.history.v1.IHistoryEvent;
type Ts = { seconds?: unknown; nanos?: number | null } | null | undefined;

export interface ActivitySpan {
  name: string;
  local: boolean;
  /** ms after the workflow started */
  scheduledAt: number;
  startedAt: number;
  closedAt: number;
  /** the attempt of the last start (regular) or of the recorded result (local) */
  attempts: number;
  /** how the run closed: completed, failed, timed-out, cancelled; undefined while it runs */
  outcome?: 'completed' | 'failed' | 'timed-out' | 'cancelled';
  result?: unknown;
}

export interface ActivityTimeline {
  workflowMs: number;
  activities: ActivitySpan[];
}

const tsMs = (t: Ts): number => (t ? Number(t.seconds ?? 0) * 1000 + (t.nanos ?? 0) / 1e6 : NaN);

function decode(payloads: Array<{ data?: Uint8Array | null }> | null | undefined): unknown {
  const data = payloads?.[0]?.data;
  if (!data) return undefined;
  try {
    return JSON.parse(Buffer.from(data).toString('utf8'));
  } catch {
    return undefined;
  }
}

interface LocalActivityMarkerData {
  activity_type?: string;
  attempt?: number;
  complete_time?: { seconds?: number; nanos?: number };
  original_schedule_time?: { seconds?: number; nanos?: number };
}

export function activityTimeline(events: HistoryEvent[]): ActivityTimeline {
  const t0 = tsMs(events[0]?.eventTime as Ts);
  const spans = new Map<string, ActivitySpan>();
  const locals: ActivitySpan[] = [];
  let end = t0;
  // Local activities run inside the workflow task whose completion records their markers, one after the other
  // (our workflows await each): one starts when the task started or when the previous one completed. The
  // marker's original_schedule_time is not that (core stamps later ones after they completed).
  let taskStartedAt = NaN;
  let lastLocalDone = NaN;
  for (const e of events) {
    const abs = tsMs(e.eventTime as Ts);
    const at = abs - t0;
    end = Math.max(end, abs);
    if (e.workflowTaskStartedEventAttributes) {
      taskStartedAt = at;
      lastLocalDone = NaN;
    }
    const scheduled = e.activityTaskScheduledEventAttributes;
    if (scheduled) {
      const name = scheduled.activityType?.name ?? '?';
      spans.set(String(e.eventId), { name, local: false, scheduledAt: at, startedAt: NaN, closedAt: NaN, attempts: 0 });
    }
    const started = e.activityTaskStartedEventAttributes;
    if (started) {
      const s = spans.get(String(started.scheduledEventId));
      if (s) {
        s.startedAt = at;
        s.attempts = started.attempt ?? 1;
      }
    }
    const closed: Array<[ActivitySpan['outcome'], { scheduledEventId?: unknown } | null | undefined]> = [
      ['completed', e.activityTaskCompletedEventAttributes],
      ['failed', e.activityTaskFailedEventAttributes],
      ['timed-out', e.activityTaskTimedOutEventAttributes],
      ['cancelled', e.activityTaskCanceledEventAttributes],
    ];
    for (const [outcome, attrs] of closed) {
      const s = attrs ? spans.get(String(attrs.scheduledEventId)) : undefined;
      if (!s) continue;
      s.closedAt = at;
      s.outcome = outcome;
      if (outcome === 'completed') s.result = decode(e.activityTaskCompletedEventAttributes?.result?.payloads);
    }
    const marker = e.markerRecordedEventAttributes;
    if (marker?.markerName === 'core_local_activity') {
      const data = decode(marker.details?.data?.payloads) as LocalActivityMarkerData | undefined;
      const result = marker.details?.result?.payloads;
      const closedAt = tsMs(data?.complete_time) - t0;
      const startedAt = Math.min(closedAt, Number.isNaN(lastLocalDone) ? taskStartedAt : lastLocalDone);
      lastLocalDone = closedAt;
      locals.push({
        name: data?.activity_type ?? '?',
        local: true,
        scheduledAt: startedAt,
        startedAt,
        closedAt,
        attempts: data?.attempt ?? 1,
        outcome: marker.failure ? 'failed' : 'completed',
        result: result ? decode(result) : undefined,
      });
    }
  }
  const activities = [...spans.values(), ...locals].sort((a, b) => a.scheduledAt - b.scheduledAt);
  return { workflowMs: end - t0, activities };
}

/** The runs of activity NAME, regular or local. */
export function runsOf(timeline: ActivityTimeline, name: string): ActivitySpan[] {
  return timeline.activities.filter((a) => a.name === name);
}

/**
 * Regular activities in the history that a dead worker would stall for more than `maxMs`: scheduled with no heartbeat
 * timeout and a start-to-close timeout above `maxMs` (Temporal notices a dead worker only through one of the two).
 */
export function slowToNoticeDeadWorker(events: HistoryEvent[], maxMs: number): string[] {
  const durationMs = (d: Ts): number => (d ? Number(d.seconds ?? 0) * 1000 + (d.nanos ?? 0) / 1e6 : 0);
  const out: string[] = [];
  for (const e of events) {
    const a = e.activityTaskScheduledEventAttributes;
    if (!a) continue;
    const heartbeat = durationMs(a.heartbeatTimeout as Ts);
    const startToClose = durationMs(a.startToCloseTimeout as Ts);
    if (!(heartbeat > 0) && startToClose > maxMs) out.push(`${a.activityType?.name} (${startToClose / 1000} s)`);
  }
  return out;
}
