"""Driving a running lab through the Python API the shell calls: nodes, links, pingall,
ping, dump, kill and restart."""
import threading

import pytest

import lgnet
from lgnet.errors import LgnetError

from conftest import REPO, lgnet_shm

pytestmark = pytest.mark.timeout(120)
ECHO = str(REPO / "scenarios" / "echo.yaml")


def test_kill_then_restart_comes_back_with_the_same_mac_and_answers():
    with lgnet.up(ECHO, console_input=True) as lab:
        lab.wait_net("lan0")
        before = {l.guest: l for l in lab.links()}
        assert lab.pingall().loss == 0
        old_pid = lab.guest("beta").process.pid
        lab.kill("beta")
        assert lab.guest("beta").ending == "killed by SIGKILL"
        assert {l.guest: l.state for l in lab.links()}["beta"] == "down"
        assert lab.pingall(timeout=1).loss == 50
        with pytest.raises(LgnetError, match="beta is not running"):
            lab.kill("beta")
        fresh = lab.restart("beta")
        assert fresh.process.pid != old_pid and fresh.lives == 2
        after = {l.guest: l for l in lab.links()}
        assert after["beta"].mac == before["beta"].mac and after["beta"].state == "up"
        matrix = lab.pingall()
        assert (matrix.loss, matrix.sent) == (0, 2)
        assert [n["name"] for n in lab.nodes()] == ["alpha", "beta", "ping-lan0"]
    assert lgnet_shm() == []


def test_dump_is_live_and_ping_runs_in_the_guest():
    with lgnet.up(ECHO, console_input=True) as lab:
        lab.wait_net("lan0")
        stop = threading.Event()
        lines = []
        follower = threading.Thread(target=lambda: lines.extend(
            lab.dump("lan0", "icmp", stop)))
        follower.start()
        out = lab.ping("alpha", "10.0.0.2", 2)
        assert "2 packets transmitted, 2 received, 0% packet loss" in out
        stop.set()
        follower.join(5)
        assert len(lines) == 4 and all("ICMP" in line for line in lines), lines
        with pytest.raises(LgnetError, match="not an IPv4 address"):
            lab.ping("alpha", "10.0.0")
    assert lgnet_shm() == []


def test_ping_says_why_a_guest_cannot(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text("networks: {lan0: {}}\nguests:\n"
                        "  - {name: k, kernel: bundled, nets: [lan0], ip: 10.0.0.1/24}\n"
                        "  - {name: p, driver: python, nets: [lan0]}\n")
    with lgnet.up(str(scenario), capture=False) as lab:
        with pytest.raises(LgnetError, match="its kernel .the bundled kernel. takes no "
                                             "commands"):
            lab.ping("k", "10.0.0.2")
        with pytest.raises(LgnetError, match="only a Python-driver guest with an address"):
            lab.ping("p", "10.0.0.1")
        with pytest.raises(LgnetError, match="no guest 'nobody'"):
            lab.kill("nobody")
