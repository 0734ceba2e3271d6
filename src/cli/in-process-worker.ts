/**
 * The host's worker inside a CLI command (the embedded default): `backup` runs its backup with it, `cancel` runs
 * the undo steps of a backup whose CLI is gone. It keeps running on SIGINT/SIGTERM until the command stops it.
 */
import type { Config } from '../worker/config';

export async function startInProcessWorker(config: Config, address: string): Promise<() => Promise<void>> {
  // Loaded only here: a CLI that just submits to a cluster need not load the worker, webpack and the SDKs.
  const { createHostWorker, quietWorkerLogs } = await import('../worker');
  quietWorkerLogs();
  const hostWorker = await createHostWorker({ config, address });
  const { close } = hostWorker;
  const running = hostWorker.run();
  return async () => {
    hostWorker.shutdown();
    await running.catch(() => undefined);
    await close();
  };
}
