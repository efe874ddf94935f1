"""`lgnet launch`'s device options as the reference Launcher read them, with real processes: a
real broker, a real launcher, a Python guest that reports the descriptors it finds."""
import re
import socket
import subprocess
import sys

import pytest

from conftest import ENV
from lgnet import abi
from lgnet.fabric.tsc import host_tsc_khz

pytestmark = pytest.mark.timeout(90)

INFO_KERNEL = "python:tests.guests.initinfo"
TOP_PFN = abi.LGUEST_GUEST_TOP // abi.PAGE_SIZE


def launch(broker, options, pass_fds=()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lgnet", "launch", "--broker", broker,
                           "--no-console-input", *options, "16", INFO_KERNEL],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=ENV,
                          pass_fds=pass_fds, timeout=60)


def devices(out: str) -> list[tuple[str, int, int]]:
    """(type, features, pfn) per descriptor, in the guest's order."""
    found = re.findall(r"^device (\d+) (\w+) features (0x[0-9a-f]+) pfn (0x[0-9a-f]+)$", out,
                       re.M)
    assert [int(i) for i, *_ in found] == list(range(len(found))), out
    return [(kind, int(features, 16), int(pfn, 16)) for _i, kind, features, pfn in found]


def test_devices_are_added_one_per_option_in_command_line_order_the_console_last(
        broker, tmp_path):
    (tmp_path / "a.img").write_bytes(bytes(4096))
    (tmp_path / "b.img").write_bytes(bytes(4096))
    links = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    try:
        theirs = [pair[1].fileno() for pair in links]
        result = launch(broker, ["--block", str(tmp_path / "a.img"),
                                 "--sharenet", str(tmp_path / "lan0.net"),
                                 "--tunnet", "fd:%d" % theirs[0],
                                 "--block", str(tmp_path / "b.img"),
                                 "--sharenet", str(tmp_path / "lan1.net"),
                                 "--tunnet", "fd:%d" % theirs[1]], pass_fds=theirs)
    finally:
        for pair in links:
            for end in pair:
                end.close()
    assert result.returncode == 0, result.stdout + result.stderr
    found = devices(result.stdout)
    assert [kind for kind, _f, _p in found] == ["block", "net", "net", "block", "net", "net",
                                                "console"]
    # Each net file gave slot 0 (NOCSUM); each tun is slot 1 with RANDOMNESS.
    assert [f for kind, f, _p in found if kind == "net"] == [
        abi.LGUEST_NET_F_NOCSUM, abi.TUN_GUEST_SLOT | abi.LGUEST_DEVICE_F_RANDOMNESS] * 2
    # The July 2007 patch's placement: one page each, downward from LGUEST_GUEST_TOP.
    assert [p for _k, _f, p in found] == [TOP_PFN - 1 - i for i in range(6)] + [0]


def test_at_most_16_devices_the_console_included(broker, tmp_path):
    nets = [str(tmp_path / ("lan%d.net" % i)) for i in range(abi.MAX_DEVICES)]
    fifteen = launch(broker, [opt for net in nets[:-1] for opt in ("--sharenet", net)])
    assert fifteen.returncode == 0, fifteen.stdout + fifteen.stderr
    assert len(devices(fifteen.stdout)) == abi.MAX_DEVICES == 16
    # One more (16 options and the console) is refused before anything is taken: no net file
    # is created, and the missing block file is not even looked at.
    fresh = [str(tmp_path / ("new%d.net" % i)) for i in range(abi.MAX_DEVICES - 1)]
    sixteen = launch(broker, [opt for net in fresh for opt in ("--sharenet", net)]
                     + ["--block", str(tmp_path / "missing.img")])
    assert sixteen.returncode == 2
    assert sixteen.stderr == "lgnet: too many devices\n"
    assert sixteen.stdout == ""
    assert list(tmp_path.glob("new*.net")) == []


def test_lguest_init_gives_a_python_guest_reserve_mem_and_the_hosts_tsc_khz(broker):
    result = launch(broker, [])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reserve_mem %d tsc_khz %d\n" % (abi.SWITCHER_RESERVE, host_tsc_khz()) \
        in result.stdout
