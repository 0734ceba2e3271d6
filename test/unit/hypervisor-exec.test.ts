/** The child-process runner (no libvirt needed). */
import { ExecStartError, execTool } from '../../src/hypervisor/exec';

describe('execTool', () => {
  test('collects stdout, stderr and the exit code; arguments are not interpreted by a shell', async () => {
    const r = await execTool('sh', ['-c', 'echo "$1"; echo err >&2; exit 3', 'sh', '$(rm -rf /); `x`']);
    expect(r).toMatchObject({ code: 3, signal: null, stdout: '$(rm -rf /); `x`\n', stderr: 'err\n', timedOut: false });
  });

  test('runs in the C locale', async () => {
    expect((await execTool('sh', ['-c', 'echo $LC_ALL'])).stdout).toBe('C\n');
  });

  test('a missing program is an ExecStartError with ENOENT', async () => {
    await expect(execTool('/nonexistent/tool', [])).rejects.toMatchObject({ name: 'ExecStartError', code: 'ENOENT' });
    await expect(execTool('/nonexistent/tool', [])).rejects.toBeInstanceOf(ExecStartError);
  });

  test('the timeout kills the child', async () => {
    const started = Date.now();
    const r = await execTool('sleep', ['30'], { timeoutMs: 100 });
    expect(r).toMatchObject({ timedOut: true, code: null, signal: 'SIGTERM' });
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  test('an abort kills the child and rejects with the reason', async () => {
    const ac = new AbortController();
    const run = execTool('sleep', ['30'], { signal: ac.signal });
    setTimeout(() => ac.abort(new Error('cancelled by the workflow')), 50);
    await expect(run).rejects.toThrow('cancelled by the workflow');
    await expect(execTool('true', [], { signal: ac.signal })).rejects.toThrow('cancelled by the workflow');
  });

  test('streams stdout chunks', async () => {
    const chunks: string[] = [];
    await execTool('sh', ['-c', 'printf "a\\r"; sleep 0.05; printf "b\\r"'], { onStdout: (c) => chunks.push(c) });
    expect(chunks.join('')).toBe('a\rb\r');
  });
});
