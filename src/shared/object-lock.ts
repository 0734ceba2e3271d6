/**
 * S3 Object Lock dates (sandbox-safe: the backup workflow fixes one date per backup from its start time).
 */
import type { BackupRequest, ObjectLockOption, S3TargetOptions } from './types';

const DAY_MS = 86_400_000;
/** S3 accepts retention of up to 100 years; more is a typo. */
export const MAX_OBJECT_LOCK_DAYS = 36_500;

/** `days` after `start` (an ISO date), as an ISO date. */
export function retainUntilFrom(start: string, days: number): string {
  return new Date(Date.parse(start) + days * DAY_MS).toISOString();
}

/**
 * The S3 options of one backup that started at `startedAt`: its objects are all retained until startedAt + days,
 * whatever date the request carried (one date describes the backup, and a retried activity never moves it).
 */
export function lockAt(s3: S3TargetOptions | undefined, startedAt: string): S3TargetOptions | undefined {
  const lock = s3?.objectLock;
  if (!s3 || !lock) return s3;
  return { ...s3, objectLock: { ...lock, retainUntil: retainUntilFrom(startedAt, lock.days) } };
}

/** The date `lock` means when no backup fixed one: `now` + days. */
export function resolvedLock(lock: ObjectLockOption, now: Date): Required<ObjectLockOption> {
  return { ...lock, retainUntil: lock.retainUntil ?? retainUntilFrom(now.toISOString(), lock.days) };
}

/** `req` with its S3 lock date fixed at `startedAt` + days; `req` itself when it asks for no lock. */
export function lockedRequest(req: BackupRequest, startedAt: string): BackupRequest {
  if (!req.options.s3?.objectLock) return req;
  return { ...req, options: { ...req.options, s3: lockAt(req.options.s3, startedAt) } };
}

/**
 * At least how many days a schedule's retention policy keeps a backup, backing up every `everySeconds`: keep-last n
 * reaches n runs back, keep-daily n days (or n runs when they are further apart), keep-weekly n weeks, keep-monthly
 * n months (counted as 28 days: the shortest). 0 when the policy keeps nothing by time.
 */
export function retentionReachDays(
  policy: { keepLast?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number },
  everySeconds: number,
): number {
  const everyDays = everySeconds / 86_400;
  return Math.max(
    (policy.keepLast ?? 0) * everyDays,
    (policy.keepDaily ?? 0) * Math.max(1, everyDays),
    (policy.keepWeekly ?? 0) * Math.max(7, everyDays),
    (policy.keepMonthly ?? 0) * Math.max(28, everyDays),
  );
}
