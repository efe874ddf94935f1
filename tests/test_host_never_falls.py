"""The Host never falls (issue 13): a real broker process, real launchers, real limits.

Out of descriptors on accept, a stopped receiver, launchers told to stop: each of these once
crashed or froze the broker (or a launcher) of commit 4ea4f11. Every test has a timeout."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ENV, Guests, stats
from lgnet import netfile, wire
from lgnet.errors import LgnetError

pytestmark = pytest.mark.timeout(120)
LAUNCH_BATCH = 8                     # launchers started at once in the 300-guest test


def start_broker(path: str, nofile: int | None = None) -> subprocess.Popen:
    def limit():
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    proc = subprocess.Popen([sys.executable, "-m", "lgnet", "broker", "--socket", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV,
                            preexec_fn=limit)
    assert b"listening on" in proc.stdout.readline()
    return proc


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out.decode()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    return sock


def test_out_of_descriptors_on_accept_the_broker_rests_and_carries_on(tmp_path):
    path = str(tmp_path / "run" / "broker.sock")
    broker = start_broker(path, nofile=64)
    guests = Guests(path)
    burst = []
    try:
        burst += [connect(path) for _ in range(150)]   # the backlog holds what it cannot take
        time.sleep(0.5)
        assert broker.poll() is None
        for sock in burst:
            sock.close()
        chatter = guests.launch(tmp_path / "lan0.net", kernel="python:tests.guests.chatter",
                                args=["seconds=1"])
        out = guests.finish(chatter)
        assert chatter.returncode == 0, out
        assert broker.poll() is None
    finally:
        for sock in burst:
            sock.close()
        guests.close()
        log = stop(broker)
        print(log)
    assert "out of file descriptors" in log


def rx(path: str, pid: int) -> int:
    return next(row["rx_packets"] for row in stats(path) if row["pid"] == pid
                and row["dead"] is None)


def rate(path: str, pids: list[int], seconds: float) -> list[float]:
    before = [rx(path, pid) for pid in pids]
    time.sleep(seconds)
    return [(rx(path, pid) - b) / seconds for pid, b in zip(pids, before)]


def test_a_stopped_receiver_delays_only_itself(guests, broker, tmp_path):
    # Two chatters broadcast to each other and to a guest that only receives; what each
    # chatter receives comes from the other alone, with the receiver running or stopped.
    lan = tmp_path / "lan0.net"
    others = [guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=12"])
              for _ in range(2)]
    victim = guests.launch(lan, args=["script=wait:30"])
    time.sleep(2.5)
    pids = [p.pid for p in others]
    normal = rate(broker, pids, 2.0)
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        stopped = rate(broker, pids, 3.0)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    assert min(normal) > 0
    for was, now in zip(normal, stopped):
        assert now > was / 2, (normal, stopped)
    for proc in others:
        assert guests.finish(proc) and proc.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kernel", ["python:", "bundled"])
def test_every_launcher_ends_promptly_when_told_to(guests, tmp_path, sig, kernel):
    launcher = guests.launch(tmp_path / "lan0.net",
                             kernel="python:tests.guests.chatter" if kernel == "python:"
                             else "bundled",
                             args=["seconds=60"] if kernel == "python:" else [])
    time.sleep(2.0)
    assert launcher.poll() is None
    os.kill(launcher.pid, sig)
    started = time.monotonic()
    guests.finish(launcher, timeout=10)
    assert time.monotonic() - started < 5
    assert launcher.returncode != 0


def used_slots(net) -> int:
    """Slots taken on a net file (0 while no launcher has made it yet)."""
    try:
        return len(netfile.slot_table(net))
    except LgnetError:
        return 0


def bench_report(path) -> dict:
    with open(path) as report:
        return json.load(report)


@pytest.mark.timeout(600)
def test_300_guests_on_one_net_with_a_stream_running(guests, broker, tmp_path):
    # The broker once used select() (fds < 1024 only) and ran out near 225 guests. Here
    # 298 idle Python guests and a stream pair fill lan0; the pair streams on lan1.
    lan0, lan1 = tmp_path / "lan0.net", tmp_path / "lan1.net"
    idle = []
    deadline = time.monotonic() + 400
    while len(idle) < 298:
        # A few at a time: 298 Python start-ups at once would starve everything else.
        idle += [guests.launch(lan0, args=["script=wait:600"])
                 for _ in range(min(LAUNCH_BATCH, 298 - len(idle)))]
        while used_slots(lan0) < len(idle) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(p.poll() is None for p in idle)
    assert len(netfile.slot_table(lan0)) == len(idle)
    receiver = guests.launch(lan1, lan0, kernel="python:lgnet.guest.benchguests",
                             args=["role=recv", "result=%s" % (tmp_path / "recv.json")])
    sender = guests.launch(lan1, lan0, kernel="python:lgnet.guest.benchguests",
                           args=["role=send", "peers=1", "seconds=2",
                                 "result=%s" % (tmp_path / "send.json")])
    guests.finish(sender, 120)
    guests.finish(receiver, 120)
    sent, got = bench_report(tmp_path / "send.json"), bench_report(tmp_path / "recv.json")
    assert sender.returncode == 0 and receiver.returncode == 0
    assert sent["ok"] > 100 and got["verified"] == sent["ok"] and got["corrupt"] == 0
    broker_pid = broker_stats(broker)["pid"]
    assert len(os.listdir("/proc/%d/fd" % broker_pid)) > 1024
    assert all(p.poll() is None for p in idle)             # everybody still up
    assert len(netfile.slot_table(lan0)) == len(idle)      # (the pair left lan0 again)


def broker_stats(path: str) -> dict:
    channel = wire.Channel(path)
    try:
        return json.loads(channel.call(wire.OP_BROKER_STATS).tail)
    finally:
        channel.close()
