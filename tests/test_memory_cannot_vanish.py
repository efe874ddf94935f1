"""Memory that could vanish under the broker (issue 13, item 3).

A launcher that shrank its guest RAM after INITIALIZE, or an ordinary small /dev/shm, made
the broker's next touch of that memory a SIGBUS (and launchers died with a bare "Bus error").
Guest RAM is now a memfd sealed against shrinking — the broker refuses it unsealed (see
test_hostile_launcher.py) — and it does not live in /dev/shm at all."""
import errno
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ENV, REPO

pytestmark = pytest.mark.timeout(120)


def guest_ram_fd(pid: int) -> str:
    """/proc's name for a launcher's guest RAM descriptor."""
    fds = "/proc/%d/fd" % pid
    for _ in range(100):
        for name in os.listdir(fds):
            try:
                if os.readlink(os.path.join(fds, name)).startswith("/memfd:lgnet-guest"):
                    return os.path.join(fds, name)
            except FileNotFoundError:
                continue
        time.sleep(0.05)
    raise AssertionError("launcher %d has no guest RAM memfd" % pid)


def test_a_guest_memory_object_cannot_be_shrunk_under_the_broker(guests, tmp_path):
    lan = tmp_path / "lan0.net"
    chatters = [guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=3"])
                for _ in range(2)]
    time.sleep(1.0)
    for chatter in chatters:
        # What a hostile launcher (or anyone of its uid) would do to its own RAM.
        fd = os.open(guest_ram_fd(chatter.pid), os.O_RDWR)
        try:
            with pytest.raises(PermissionError) as refused:
                os.ftruncate(fd, 0)
            assert refused.value.errno == errno.EPERM
        finally:
            os.close(fd)
    outs = [guests.finish(c) for c in chatters]
    assert [c.returncode for c in chatters] == [0, 0], outs
    for out in outs:
        counts = [int(line.split()[1]) for line in out.splitlines() if line.startswith("rx ")]
        assert counts and counts[-1] > counts[len(counts) // 2] > 0, out


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_lab_runs_on_a_tiny_dev_shm(tmp_path):
    # A mount namespace of the test's own whose /dev/shm holds 4 KiB: guest RAM (16 MiB a
    # guest) used to be a shared-memory object there, and the guests died of SIGBUS.
    script = ("mount -t tmpfs -o size=4k lgnet-test-shm /dev/shm || exit 3\n"
              "exec {py} -m lgnet test {scenario}\n").format(
                  py=sys.executable, scenario=REPO / "scenarios" / "ping-expect.yaml")
    run = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout
    assert "4 of 4 expectations held" in run.stdout and "Bus error" not in run.stdout
