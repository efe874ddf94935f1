"""The spawner: a lab's launchers are forks of one process that imported the Launcher once.

What a user of a lab must not be able to tell apart from `python -m lgnet.guest.launcher`
under Popen: exit statuses, signals, consoles, passed descriptors, the process group, and
that nothing is left behind on any exit path."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lgnet.guest import spawner
from lgnet.lab import Lab
from lgnet.scenario import GuestSpec, Network, Scenario

from conftest import lgnet_shm

pytestmark = pytest.mark.timeout(60)
NET = "lan0"
BENCH_KERNEL = "python:lgnet.guest.benchguests"


def one_net() -> Scenario:
    return Scenario(Path("<test>"), None, {NET: Network(NET)}, [], [])


def waiting_guest(name: str, seconds: float = 30) -> GuestSpec:
    """A bench receiver with no sender: it waits `seconds` for frames, then reports."""
    return GuestSpec(name, mem_mb=4, kernel=BENCH_KERNEL, nets=(NET,),
                     args=("role=recv", "size=60", "seconds=%r" % seconds, "rx=8",
                           "rxsize=1514", "grace=%r" % seconds))


def parent_of(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its new parent has yet to reap (a launcher
    whose spawner was SIGKILLed is reparented; reaping it is init's job then)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_launchers_are_forks_of_the_spawner_each_in_its_own_group_and_all_go_at_stop():
    with Lab(one_net()) as lab:
        runs = [lab.start_guest(waiting_guest("g%d" % i)) for i in range(3)]
        spawner_pid = lab.spawner.process.pid
        assert all(isinstance(r.process, spawner.Spawned) for r in runs)
        assert {parent_of(r.process.pid) for r in runs} == {spawner_pid}
        assert all(os.getpgid(r.process.pid) == r.process.pid for r in runs)
        pids = [r.process.pid for r in runs]
    assert all(gone(pid) for pid in pids + [spawner_pid])
    assert [r.ending for r in runs] == ["stopped by the lab"] * 3
    assert lgnet_shm() == []


def test_exit_statuses_are_those_popen_would_report():
    with Lab(one_net()) as lab:
        refused = lab.start_guest(GuestSpec("nokernel", mem_mb=4, kernel="python:no_such_mod",
                                            nets=(NET,)))
        killed = lab.start_guest(waiting_guest("victim"))
        done = lab.start_guest(waiting_guest("quick", seconds=0.2))
        assert refused.wait(20) == 2
        assert refused.ending == "refused at launch (exit 2)"
        assert any("no_such_mod" in line for line in refused.console)
        assert done.wait(20) == 0
        time.sleep(0.2)
        killed.kill()
        assert killed.wait(10) == -signal.SIGKILL
        assert killed.ending == "killed by SIGKILL"
        slow = lab.start_guest(waiting_guest("slow"))
        with pytest.raises(subprocess.TimeoutExpired):
            slow.process.wait(0.05)
        assert slow.wait(0.05) is None and slow.process.poll() is None


def test_a_changed_environment_starts_the_launcher_with_popen_and_it_sees_the_change(
        monkeypatch):
    with Lab(one_net()) as lab:
        first = lab.start_guest(waiting_guest("before"))
        monkeypatch.setenv("LGNET_TEST_SPAWNER", "changed")
        second = lab.start_guest(waiting_guest("after"))
        assert isinstance(first.process, spawner.Spawned)
        assert isinstance(second.process, subprocess.Popen)
        with open("/proc/%d/environ" % second.process.pid, "rb") as environ:
            assert b"LGNET_TEST_SPAWNER=changed" in environ.read().split(b"\0")


def test_sigkill_of_the_spawner_ends_its_launchers_and_the_lab_hears_it():
    with Lab(one_net()) as lab:
        runs = [lab.start_guest(waiting_guest("g%d" % i)) for i in range(2)]
        os.kill(lab.spawner.process.pid, signal.SIGKILL)
        assert [r.wait(15) for r in runs] == [-signal.SIGTERM] * 2
        pids = [r.process.pid for r in runs]
        # A spawner that is gone serves no more: the next launcher is a Popen's.
        later = lab.start_guest(waiting_guest("later"))
        assert isinstance(later.process, subprocess.Popen)
    assert all(gone(pid) for pid in pids)
    assert lgnet_shm() == []


def test_descriptors_land_at_the_numbers_asked_and_no_other_stays_open():
    read_end, write_end = os.pipe()
    passed_r, passed_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: as the spawner's fork would
        try:
            os.close(report_r)
            spawner.place_fds([read_end, report_w, report_w, passed_w], [0, 1, 2, 9])
            os.write(1, (" ".join(sorted(os.listdir("/proc/self/fd"), key=int))).encode())
            os.write(9, b"nine")
        finally:
            os._exit(0)
    for fd in (read_end, report_w, passed_w):
        os.close(fd)
    try:
        assert os.waitpid(pid, 0)[1] == 0
        listed = os.read(report_r, 4096).decode().split()
        # 0, 1, 2 and 9, and the descriptor of the listing itself.
        assert [int(fd) for fd in listed if int(fd) in (0, 1, 2, 9)] == [0, 1, 2, 9]
        assert len(listed) == 5
        assert os.read(passed_r, 16) == b"nine"
    finally:
        for fd in (write_end, passed_r, report_r):
            os.close(fd)
