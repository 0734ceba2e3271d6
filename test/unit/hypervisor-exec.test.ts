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

  test('tools see PATH, HOME and the libvirt variables, never a secret of ours', async () => {
    const canary = `canary-${process.pid}-${Date.now()}`;
    const saved = { ...process.env };
    Object.assign(process.env, {
      AWS_SECRET_ACCESS_KEY: canary,
      AWS_ACCESS_KEY_ID: `id-${canary}`,
      TEMPORAL_API_KEY: `key-${canary}`,
      VMBACKUP_SOMETHING: canary,
      LIBVIRT_DEFAULT_URI: 'qemu:///system',
      XDG_RUNTIME_DIR: '/run/user/0',
    });
    try {
      const env = (await execTool('env', [])).stdout;
      expect(env).not.toContain(canary);
      const names = env
        .split('\n')
        .filter(Boolean)
        .map((l) => l.split('=')[0])
        .sort();
      expect(names).toEqual(
        ['HOME', 'LANG', 'LC_ALL', 'LIBVIRT_DEFAULT_URI', 'PATH', 'TMPDIR', 'XDG_RUNTIME_DIR'].filter(
          (n) => n in process.env || n === 'LANG' || n === 'LC_ALL',
        ),
      );
      expect(env).toContain('LIBVIRT_DEFAULT_URI=qemu:///system\n');
    } finally {
      for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
      Object.assign(process.env, saved);
    }
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
