"""`lgnet status` while two labs run and after they end; `lgnet up` interrupted (Ctrl-C at
the terminal, SIGTERM to its process group) still prints the real counts."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import lgnet
from lgnet import netfile

from conftest import ENV, REPO, lgnet_shm

pytestmark = pytest.mark.timeout(90)
ECHO = str(REPO / "scenarios" / "echo.yaml")
CHATTY = """\
# Two Python guests: each broadcasts once, then waits a minute (until interrupted).
networks: {lan0: {}}
guests:
  - {name: alpha, driver: python, nets: [lan0], script: [{send: broadcast, net: lan0}, {wait: 60}]}
  - {name: beta, driver: python, nets: [lan0], script: [{send: broadcast, net: lan0}, {wait: 60}]}
"""


def status() -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "lgnet", "status", "--json"], env=ENV,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_lists_two_running_labs_then_neither(tmp_path):
    chatty = tmp_path / "chatty.yaml"
    chatty.write_text(CHATTY)
    with lgnet.up(ECHO, capture=False) as echo, lgnet.up(str(chatty)) as other:
        for lab in (echo, other):
            lab.wait_net("lan0")
        labs = {lab["runtime"]: lab for lab in status()}      # other users' labs too: ours
        for lab in (echo, other):
            seen = labs[lab.runtime]
            assert seen["scenario"] == os.path.abspath(lab.scenario.path)
            assert seen["broker_pid"] == lab.broker.pid and seen["lab_pid"] == os.getpid()
            slots = {pid: s for s in netfile.slot_table(lab.net_file("lan0")) for pid in s.pids}
            assert {g["name"]: g["pid"] for g in seen["guests"]} == {
                run.name: run.process.pid for run in lab.guests}
            for g in seen["guests"]:
                assert g["slots"] == [{"net": "lan0", "slot": slots[g["pid"]].slot,
                                       "mac": slots[g["pid"]].mac_text}]
                assert g["state"] in ("running", "halted", "pending DMA")
                assert set(g["counters"]) >= {"tx_packets", "rx_packets", "rx_dropped"}
        text = subprocess.run([sys.executable, "-m", "lgnet", "status"], env=ENV,
                              capture_output=True, text=True, timeout=30).stdout
        assert str(chatty) in text and echo.runtime in text
        run = lambda *a: subprocess.run([sys.executable, "-m", "lgnet", *a], env=ENV,
                                        capture_output=True, text=True, timeout=30)
        # A lab and a net name instead of paths: the lab by its scenario's name.
        dumped = run("dump", "lan0", "--lab", "chatty", "-c", "2")
        assert dumped.returncode == 0, dumped.stderr
        assert [line.split()[0] for line in dumped.stdout.splitlines()] == ["1", "2"]
        refused = run("dump", "lan0", "--lab", echo.runtime)
        assert refused.returncode == 2 and "does not capture" in refused.stderr
        slots = run("slots", "lan0", "--lab", "chatty")
        assert {"alpha", "beta"} <= {line.split()[4] for line in slots.stdout.splitlines()[1:]}
        echo.guest("alpha").kill()
        echo.guest("alpha").wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alpha = [g for g in {lab["runtime"]: lab for lab in status()}[echo.runtime]["guests"]
                     if g["name"] == "alpha"]
            if alpha[0]["state"] == "ended":
                break
            time.sleep(0.1)
        assert alpha[0]["state"] == "ended" and alpha[0]["slots"] == []
        runtimes = (echo.runtime, other.runtime)
    assert not any(lab["runtime"] in runtimes for lab in status())
    assert lgnet_shm() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_up_prints_the_real_counts(tmp_path, sig):
    """The terminal's Ctrl-C goes to the whole foreground process group: the lab's children
    are in groups of their own, so the lab asks the broker for the counts before it stops
    them."""
    chatty = tmp_path / "chatty.yaml"
    chatty.write_text(CHATTY)
    up = subprocess.Popen([sys.executable, "-m", "lgnet", "up", str(chatty)], env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    lines = []
    for line in up.stdout:
        lines.append(line)
        if sum("broadcast reached 1 peers" in seen for seen in lines) == 2:
            break
    os.killpg(up.pid, sig)                     # as the terminal does: the whole group
    out = "".join(lines) + up.stdout.read()
    assert up.wait(30) == 130, out
    table = out[out.index("\nguest "):].splitlines()[1:]
    rows = {row.split()[0]: row.split() for row in table[1:3]}
    for name in ("alpha", "beta"):
        assert rows[name][1:5] == ["1", "60", "1", "60"], out
        assert " ".join(rows[name][7:]) == "stopped by the lab", out
    assert lgnet_shm() == []
