/**
 * Stopping one thread of a running QEMU, for tests that need a hung I/O thread: the domain's disks in an IOThread of
 * their own (`iothread: true` fixtures) stop doing I/O and running their block jobs, while QEMU's main loop (and so
 * its monitor and libvirt) keeps answering. SIGSTOP would stop every thread, the monitor's too, and libvirt's calls
 * would hang instead. The stop is a ptrace stop of that thread alone (thread-stop.py); it ends when released, or when
 * the test process dies (the kernel detaches the tracees of a dead tracer).
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { virsh } from './images';

/** The OS thread ids of a running domain's IOThreads (QMP query-iothreads). */
export async function iothreadIds(domain: string): Promise<number[]> {
  const out = await virsh('qemu-monitor-command', domain, '{"execute":"query-iothreads"}');
  return (JSON.parse(out) as { return: Array<{ 'thread-id': number }> }).return.map((t) => t['thread-id']);
}

export interface StoppedThread {
  /** lets the thread run again; resolves once it does */
  release(): Promise<void>;
}

/** Stops thread `tid` (of any process; needs root) until released. Fails loudly when python3 or ptrace is missing. */
export async function stopThread(tid: number): Promise<StoppedThread> {
  const child = spawn('python3', [join(__dirname, 'thread-stop.py'), String(tid)], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => {
    child.on('exit', (code) => resolve(code));
    child.on('error', (e) => {
      err += String(e);
      resolve(-1);
    });
  });
  await new Promise<void>((resolve, reject) => {
    const check = () => {
      if (out.includes(`stopped ${tid}`)) resolve();
    };
    child.stdout.on('data', check);
    void exited.then((code) =>
      reject(new Error(`thread-stop.py could not stop thread ${tid} (exit ${String(code)}): ${err.trim()}`)),
    );
  });
  return {
    async release() {
      child.stdin.end();
      await exited;
    },
  };
}
