/**
 * Starting, finding and watching backups. A backup is a `backupDomain` workflow; its id is
 * a search attribute, so `status` finds it from the backup id alone.
 */
import { randomBytes } from 'node:crypto';
import { WorkflowExecutionAlreadyStartedError, WorkflowIdConflictPolicy } from '@temporalio/client';
import type { Client, WorkflowExecutionDescription, WorkflowHandle } from '@temporalio/client';
import { defaultPayloadConverter } from '@temporalio/common';
import type { Payload } from '@temporalio/common';
import { backupWorkflowId, hostTaskQueue, makeBackupId, SEARCH_ATTRIBUTES } from '../shared/names';
import { progressQuery } from '../shared/queries';
import { BackupIdKey, DomainKey, HostKey, MethodKey, StateKey } from '../shared/search';
import type {
  BackupOptions,
  BackupProgress,
  BackupRequest,
  BackupResult,
  BackupState,
  RequestedMethod,
} from '../shared/types';
import type { backupDomain } from '../workflows/backup';
import { PayloadKeyError } from './codec';

export class BackupAlreadyRunningError extends Error {
  constructor(
    readonly domain: string,
    readonly backupId: string,
  ) {
    super(`a backup of ${domain} is already running: ${backupId}`);
  }
}

export class BackupNotFoundError extends Error {
  constructor(readonly backupId: string) {
    super(`no backup ${backupId} is known to Temporal: check the id with \`vmbackup list\``);
  }
}

export interface StartBackupInput {
  domain: string;
  host: string;
  method: RequestedMethod;
  targets: string[];
  options: BackupOptions;
}

export async function startBackup(
  client: Client,
  input: StartBackupInput,
): Promise<{ backupId: string; handle: WorkflowHandle<typeof backupDomain> }> {
  const now = new Date();
  const backupId = makeBackupId(input.domain, now, randomBytes(2).toString('hex'));
  const req: BackupRequest = { ...input, backupId, requestedAt: now.toISOString() };
  const workflowId = backupWorkflowId(input.host, input.domain);
  try {
    const handle = await client.workflow.start<typeof backupDomain>('backupDomain', {
      taskQueue: hostTaskQueue(input.host),
      workflowId,
      // Temporal refuses a second running workflow with this id: one backup per VM and host at a time.
      workflowIdConflictPolicy: WorkflowIdConflictPolicy.FAIL,
      args: [req],
      typedSearchAttributes: [
        { key: BackupIdKey, value: backupId },
        { key: DomainKey, value: input.domain },
        { key: HostKey, value: input.host },
        { key: StateKey, value: 'starting' },
        { key: MethodKey, value: input.method },
      ],
      // No memo: every client lists workflows (and their memos) through its codec, and a memo encrypted with a
      // payload key would make a listing fail for every client with another key or none.
    });
    return { backupId, handle };
  } catch (err) {
    if (err instanceof WorkflowExecutionAlreadyStartedError) {
      throw new BackupAlreadyRunningError(input.domain, (await runningBackupId(client, workflowId)) ?? workflowId);
    }
    throw err;
  }
}

/** The backup id of a running workflow, from its search attribute (read raw: no codec, no memo). */
async function runningBackupId(client: Client, workflowId: string): Promise<string | undefined> {
  const { workflowExecutionInfo } = await client.workflowService.describeWorkflowExecution({
    namespace: client.options.namespace,
    execution: { workflowId },
  });
  const attr = workflowExecutionInfo?.searchAttributes?.indexedFields?.[SEARCH_ATTRIBUTES.backupId];
  const value: unknown = attr ? defaultPayloadConverter.fromPayload(attr) : undefined;
  const id = Array.isArray(value) ? (value[0] as unknown) : value;
  return typeof id === 'string' ? id : undefined;
}

/**
 * The workflow of a backup id, by its search attribute. Read raw: the ids are all it needs, and the memo of a
 * backup started with a payload key (before memos were dropped) is ciphertext to a client without it.
 */
export async function findBackup(client: Client, backupId: string): Promise<WorkflowHandle<typeof backupDomain>> {
  const query = `${SEARCH_ATTRIBUTES.backupId} = '${backupId.replace(/'/g, '')}'`;
  const { executions } = await client.workflowService.listWorkflowExecutions({
    namespace: client.options.namespace,
    query,
    pageSize: 1,
  });
  const wf = executions?.[0]?.execution;
  if (wf?.workflowId && wf.runId) return client.workflow.getHandle(wf.workflowId, wf.runId);
  throw new BackupNotFoundError(backupId);
}

/** An id that can be quoted safely in a visibility query (what makeBackupId makes, and more). */
const QUOTABLE_ID_RE = /^[A-Za-z0-9_.+@=,:-]+$/;

/**
 * Whether a `backupDomain` workflow with this backup id is running, from Temporal's visibility (gc asks before it
 * removes what looks like a dead backup's objects). An id that could not be quoted safely in the query counts as
 * running: gc then keeps its objects.
 */
export async function isBackupRunning(client: Client, backupId: string): Promise<boolean> {
  if (!QUOTABLE_ID_RE.test(backupId)) return true;
  return (await backupState(client, backupId)) === 'running';
}

/**
 * What Temporal's visibility shows now for a backup id: running (some `backupDomain` run with it is open: a reset
 * reopens a backup under a new run), closed (all are), unknown (none: visibility can trail a start). Recovery asks
 * before it undoes what a backup left on a host, gc before it removes what one left on a target.
 *
 * Counted, not listed: a listing decodes every memo, and one encoded with a payload codec this client lacks would
 * fail it. All runs are counted first, so a backup that becomes visible between the two counts never reads as
 * closed.
 */
export async function backupState(client: Client, backupId: string): Promise<BackupState> {
  if (!QUOTABLE_ID_RE.test(backupId)) throw new Error(`'${backupId}' cannot be asked about: it is no backup id`);
  const ofBackup = `WorkflowType = 'backupDomain' AND ${SEARCH_ATTRIBUTES.backupId} = '${backupId}'`;
  if ((await client.workflow.count(ofBackup)).count === 0) return 'unknown';
  const open = await client.workflow.count(`${ofBackup} AND ExecutionStatus = 'Running'`);
  return open.count > 0 ? 'running' : 'closed';
}

/**
 * A running backup of `domain` (on any host), other than the run `exceptRunId`: its backup id, else its workflow id;
 * undefined when none. Retention after a scheduled backup asks first (a running backup may build on a backup the
 * prune would remove). Read raw, like findBackup: no memo is decoded.
 */
export async function runningBackupOfDomain(
  client: Client,
  domain: string,
  exceptRunId?: string,
): Promise<string | undefined> {
  if (!QUOTABLE_ID_RE.test(domain)) throw new Error(`'${domain}' cannot be asked about: it is no domain name`);
  const except = exceptRunId && QUOTABLE_ID_RE.test(exceptRunId) ? ` AND RunId != '${exceptRunId}'` : '';
  const { executions } = await client.workflowService.listWorkflowExecutions({
    namespace: client.options.namespace,
    query: `WorkflowType = 'backupDomain' AND ExecutionStatus = 'Running' AND ${SEARCH_ATTRIBUTES.domain} = '${domain}'${except}`,
    pageSize: 1,
  });
  const wf = executions?.[0];
  if (!wf) return undefined;
  const attr = wf.searchAttributes?.indexedFields?.[SEARCH_ATTRIBUTES.backupId];
  const value: unknown = attr ? defaultPayloadConverter.fromPayload(attr) : undefined;
  const id = Array.isArray(value) ? (value[0] as unknown) : value;
  return typeof id === 'string' ? id : (wf.execution?.workflowId ?? 'a backup');
}

export interface BackupStatusView {
  backupId: string;
  workflowId: string;
  runId: string;
  /** Temporal's execution status: RUNNING, COMPLETED, FAILED, CANCELLED, TERMINATED, TIMED_OUT */
  execution: string;
  progress?: BackupProgress;
  /** bytes of the running long step (from its last heartbeat) */
  activity?: {
    name: string;
    bytesDone: number;
    bytesTotal: number;
    attempt: number;
    /** an upload waiting for a place on its target (`vmbackup worker --max-concurrent-uploads`) */
    waitingForUpload?: boolean;
  };
  /** while it waits for one of its host's backup slots: how many backups on that host started earlier wait too */
  queue?: { host: string; ahead: number };
  result?: BackupResult;
  error?: string;
}

export async function backupStatus(
  client: Client,
  handle: WorkflowHandle<typeof backupDomain>,
  backupId: string,
): Promise<BackupStatusView> {
  const desc: WorkflowExecutionDescription = await handle.describe();
  const view: BackupStatusView = {
    backupId,
    workflowId: desc.workflowId,
    runId: desc.runId,
    execution: desc.status.name,
  };
  if (desc.status.name === 'RUNNING') {
    // A worker that is busy or gone answers no query: status shows no phase then. A payload key this client
    // lacks is another matter: it must say so.
    view.progress = await handle.query(progressQuery).catch((err: unknown) => {
      if (err instanceof PayloadKeyError) throw err;
      return undefined;
    });
    // the slot a backup holds is a pending activity for its whole run: the step is any other one
    const pending = desc.raw.pendingActivities?.find((a) => a.activityType?.name !== 'holdBackupSlot');
    if (pending) {
      const details = pending.heartbeatDetails?.payloads?.[0];
      const decoded = details ? await decodePayload(client, details) : undefined;
      view.activity = {
        name: pending.activityType?.name ?? 'activity',
        bytesDone: Number((decoded as { bytesDone?: number } | undefined)?.bytesDone ?? 0),
        bytesTotal: Number((decoded as { bytesTotal?: number } | undefined)?.bytesTotal ?? 0),
        attempt: pending.attempt ?? 1,
        ...((decoded as { waitingForUpload?: boolean } | undefined)?.waitingForUpload
          ? { waitingForUpload: true }
          : {}),
      };
    }
    if (view.progress?.phase === 'queued') {
      view.queue = { host: view.progress.host, ahead: await queuedBefore(client, view.progress.host, desc.startTime) };
    }
  } else if (desc.status.name === 'COMPLETED') {
    view.result = await handle.result();
  } else {
    try {
      await handle.result();
    } catch (err) {
      view.error = failureMessage(err);
    }
  }
  return view;
}

/**
 * Backups of `host` waiting for a slot that started before `startTime` (visibility; the slot queue hands out slots
 * roughly, not strictly, in that order).
 */
async function queuedBefore(client: Client, host: string, startTime: Date): Promise<number> {
  if (!QUOTABLE_ID_RE.test(host)) return 0;
  const { count } = await client.workflow.count(
    `WorkflowType = 'backupDomain' AND ExecutionStatus = 'Running' AND ${SEARCH_ATTRIBUTES.host} = '${host}' AND ` +
      `${SEARCH_ATTRIBUTES.state} = 'queued' AND StartTime < '${startTime.toISOString()}'`,
  );
  return count;
}

/**
 * The targets a backup was started with, read from the first event of its history (no worker needed, unlike
 * the progress query); undefined when the history cannot be read or decoded.
 */
export async function backupTargets(
  client: Client,
  handle: WorkflowHandle<typeof backupDomain>,
): Promise<string[] | undefined> {
  const history = await handle.fetchHistory().catch(() => undefined);
  const input = history?.events?.[0]?.workflowExecutionStartedEventAttributes?.input?.payloads?.[0];
  if (!input) return undefined;
  const req = (await decodePayload(client, input as Payload)) as Partial<BackupRequest> | undefined;
  const targets = req?.targets;
  return Array.isArray(targets) && targets.every((t) => typeof t === 'string') ? targets : undefined;
}

/** A raw payload of a describe() answer (heartbeat details): through the client's codecs, then its converter. */
async function decodePayload(client: Client, payload: Payload): Promise<unknown> {
  const { payloadCodecs, payloadConverter } = client.options.loadedDataConverter;
  try {
    let payloads = [payload];
    for (const codec of [...payloadCodecs].reverse()) payloads = await codec.decode(payloads);
    return payloads[0] ? payloadConverter.fromPayload(payloads[0]) : undefined;
  } catch (err) {
    if (err instanceof PayloadKeyError) throw err;
    return undefined;
  }
}

/** The innermost message of a workflow/activity failure chain: the one sentence a user needs. */
export function failureMessage(err: unknown): string {
  let cur: unknown = err;
  let msg = err instanceof Error ? err.message : String(err);
  while (cur instanceof Error) {
    if (
      cur.message &&
      !/^(Workflow execution failed|Activity task failed|Activity function .* failed)$/.test(cur.message)
    ) {
      msg = cur.message;
    }
    cur = (cur as { cause?: unknown }).cause;
  }
  return msg;
}
