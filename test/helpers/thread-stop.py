"""
Stops ONE thread of another process (not the whole process, as SIGSTOP would) until stdin closes:
PTRACE_SEIZE + PTRACE_INTERRUPT put just that thread in a ptrace stop; the rest of the process runs on.
Prints "stopped <tid>" once the thread is stopped. On EOF of stdin, or when this process dies,
the thread is detached and runs again (the kernel detaches the tracees of a dead tracer).

Usage: python3 thread-stop.py TID   (root, or the same user with ptrace allowed)
"""
import ctypes
import os
import sys

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long


def call(req, tid, what):
    if libc.ptrace(req, tid, None, None) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"thread-stop: {what} of thread {tid} failed: {os.strerror(err)}\n")
        sys.exit(1)


tid = int(sys.argv[1])
call(PTRACE_SEIZE, tid, "PTRACE_SEIZE")
call(PTRACE_INTERRUPT, tid, "PTRACE_INTERRUPT")
os.waitpid(tid, WALL)
print(f"stopped {tid}", flush=True)
sys.stdin.read()
libc.ptrace(PTRACE_DETACH, tid, None, None)
print(f"released {tid}", flush=True)
