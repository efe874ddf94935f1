"""An idle lab sleeps: the broker in its selector, every guest in HALT. Nothing may spin while
nobody sends (wake-ups are cheap because they are rare, not because someone polls)."""
import os
import time
from pathlib import Path

import pytest

from lgnet.lab import Lab
from lgnet.scenario import GuestSpec, Network, Scenario

IDLE_SECONDS = 1.0
MAX_CORE_SHARE = 0.10                 # of one core, over every process of the lab
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (/proc/PID/stat fields 14 and 15)."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@pytest.mark.timeout(90)
def test_an_idle_lab_uses_almost_no_cpu():
    scenario = Scenario(Path("<idle>"), None, {"lan0": Network("lan0")}, [], [])
    with Lab(scenario) as lab:
        lab.start_guest(GuestSpec("unicorn", mem_mb=16, kernel="bundled", nets=("lan0",),
                                  args=("ip=10.0.0.1/24",)))
        lab.start_guest(GuestSpec("python", nets=("lan0",), ip=("10.0.0.2/24",)))
        lab.wait_net("lan0")
        time.sleep(0.5)                           # the bundled kernel's boot settles
        pids = [lab.broker.pid] + [run.process.pid for run in lab.guests]
        before = sum(cpu_seconds(pid) for pid in pids)
        started = time.monotonic()
        time.sleep(IDLE_SECONDS)
        used = sum(cpu_seconds(pid) for pid in pids) - before
        elapsed = time.monotonic() - started
        assert all(run.process.poll() is None for run in lab.guests)
    assert used < MAX_CORE_SHARE * elapsed, "an idle lab used %.0f%% of a core" % (
        100 * used / elapsed)
