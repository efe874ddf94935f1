"""The console as a user meets it: stdin in raw mode, keystrokes into the guest's buffer at
key 0 (the Waker kicks the guest out of HALT), three ^C within a second end the Launcher with
status 2, and the terminal is restored afterwards. A real pseudo-terminal, a real guest."""
import os
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

from conftest import ENV

pytestmark = pytest.mark.timeout(60)


def read_until(fd: int, text: bytes, seconds: float = 15) -> bytes:
    seen = b""
    deadline = time.monotonic() + seconds
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, "never saw %r in %r" % (text, seen)
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, "output closed before %r; got %r" % (text, seen)
            seen += chunk
    return seen


def test_keystrokes_reach_the_guest_and_three_ctrl_c_exit_2(broker):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "lgnet", "launch", "--broker", broker,
                             "16", "bundled"], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=ENV)
    out = proc.stdout.fileno()
    try:
        read_until(out, b"lguest: ready")
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        os.write(master, b"hello")
        read_until(out, b"hello")
        for _ in range(3):
            os.write(master, b"\x03")       # each ^C in a buffer of its own
            time.sleep(0.15)
        assert proc.wait(10) == 2
        assert termios.tcgetattr(slave)[3] == before[3]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        os.close(master)
        os.close(slave)
