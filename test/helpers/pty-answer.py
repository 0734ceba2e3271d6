"""Runs a command on a pseudo-terminal, as a person at a terminal would: waits for each prompt (output ending in
':'), types the next answer from PTY_ANSWERS ('|'-separated) and Enter. Prints everything the terminal showed
(what the program wrote and what the terminal echoed) and exits with the command's exit code."""
import os
import pty
import select
import sys
import time

answers = [a for a in os.environ.get('PTY_ANSWERS', '').split('|') if a != '']
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
shown = b''
pending = b''
deadline = time.time() + 300
while time.time() < deadline:
    ready, _, _ = select.select([fd], [], [], 0.2)
    if not ready:
        continue
    try:
        data = os.read(fd, 4096)
    except OSError:  # EIO: the command closed the terminal
        break
    if not data:
        break
    shown += data
    pending += data
    if answers and pending.rstrip().endswith(b':'):
        os.write(fd, answers.pop(0).encode() + b'\r')
        pending = b''
_, status = os.waitpid(pid, 0)
sys.stdout.write(shown.decode(errors='replace'))
sys.exit(os.waitstatus_to_exitcode(status))
