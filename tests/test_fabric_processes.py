"""The fabric as it runs: a real broker process, real launcher processes, real shared memory
and real fcntl locks. Nothing here is faked; every test has a timeout so a hang fails."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENV, REPO, Guests, lgnet_shm, stats
from lgnet import abi, netfile, wire

pytestmark = pytest.mark.timeout(90)


def received(output: str) -> list[str]:
    return sorted(line.split(": ", 2)[2] for line in output.splitlines()
                  if line.startswith("eth0: from "))


def test_three_guests_each_frame_arrives_once_at_the_right_guests(guests, tmp_path):
    lan = tmp_path / "lan0.net"
    script = "script=await:0:2:10,bcast:0,peers:0,wait:1"
    procs = [guests.launch(lan, args=[script]) for _ in range(3)]
    outs = [guests.finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    macs = {abi.guest_mac(i).hex(":") for i in range(3)}
    for out in outs:
        me = out.split("mac ", 1)[1].split()[0]
        others = sorted(macs - {me})
        expected = sorted(["broadcast from %s" % m for m in others]
                          + ["unicast from %s to %s" % (m, me) for m in others])
        assert received(out) == expected, out


def test_promiscuous_guest_sees_unicast_between_others_and_other_net_sees_nothing(
        guests, tmp_path):
    lan, other = tmp_path / "lan0.net", tmp_path / "lan1.net"
    watcher = guests.launch(lan, args=["script=await:0:2:10,wait:2", "promisc"])
    loner = guests.launch(other, args=["script=wait:2"])
    talkers = [guests.launch(lan, args=["script=await:0:2:10,peers:0,wait:1"])
               for _ in range(2)]
    out = guests.finish(watcher)
    for t in talkers:
        guests.finish(t)
    talker_to_talker = [line for line in received(out) if "unicast" in line
                        and not line.endswith(out.split("mac ", 1)[1].split()[0])]
    assert len(talker_to_talker) == 2, out      # both unicasts between the two others
    assert received(guests.finish(loner)) == []


def test_sigkill_of_a_guest_mid_stream(guests, broker, tmp_path):
    lan = tmp_path / "lan0.net"
    chatters = [guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=6"])
                for _ in range(2)]
    victim = guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=30"])
    time.sleep(2.0)
    victim_slot = next(s.slot for s in netfile.slot_table(lan) if victim.pid in s.pids)
    victim.kill()
    victim.wait(5)
    time.sleep(0.5)
    # Its slot lock died with it; its bindings were released with its connection.
    table = {s.slot: s for s in netfile.slot_table(lan)}
    assert victim_slot not in table or not table[victim_slot].locked
    assert len([row for row in stats(broker) if row["pid"] == victim.pid and
                row["dead"] is None]) <= 1
    # A new launcher gets the same slot, and the others keep exchanging frames.
    newcomer = guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=2"])
    time.sleep(1.0)
    assert any(newcomer.pid in s.pids and s.slot == victim_slot for s in netfile.slot_table(lan))
    outs = [guests.finish(c) for c in chatters]
    for out in outs:
        counts = [int(line.split()[1]) for line in out.splitlines() if line.startswith("rx ")]
        assert counts and counts[-1] > counts[len(counts) // 2] > 0, out
    assert [c.returncode for c in chatters] == [0, 0]
    guests.finish(newcomer)


def test_sigkill_of_the_broker_stops_every_launcher_and_leaves_no_shm(tmp_path):
    path = str(tmp_path / "run" / "broker.sock")
    broker = subprocess.Popen([sys.executable, "-m", "lgnet", "broker", "--socket", path],
                              stdout=subprocess.PIPE, env=ENV)
    assert b"listening" in broker.stdout.readline()
    g = Guests(path)
    try:
        procs = [g.launch(tmp_path / "lan0.net", kernel="python:tests.guests.chatter",
                          args=["seconds=30"]) for _ in range(2)]
        time.sleep(1.5)
        broker.kill()
        broker.wait(5)
        for proc in procs:
            out = g.finish(proc, timeout=10)
            assert proc.returncode != 0
            assert "the broker went away" in out
        assert lgnet_shm() == []
    finally:
        g.close()
        broker.stdout.close()


def test_a_crash_message_in_the_last_bytes_of_ram_is_read_across_into_the_next_page(
        guests, broker):
    proc = guests.launch(kernel="python:tests.guests.lastbytes")
    out = guests.finish(proc)
    assert proc.returncode == 1, out
    assert "lgnet: guest died: CRASH: at the end of RAM\n" in out, out
    assert [row["dead"] for row in stats(broker) if row["pid"] == proc.pid] == [
        "CRASH: at the end of RAM"]


def test_a_second_connection_cannot_act_for_another_guest(guests, broker, tmp_path):
    proc = guests.launch(tmp_path / "lan0.net", args=["script=wait:3"])
    deadline = time.monotonic() + 10
    while not any(r["pid"] == proc.pid for r in stats(broker)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gid = next(r["guest"] for r in stats(broker) if r["pid"] == proc.pid)
    intruder = wire.Channel(broker)
    try:
        assert intruder.call(wire.OP_ATTACH, gid).result == 0
        import errno
        assert intruder.call(wire.OP_GETDMA, 0).result == -errno.EPERM
        assert intruder.call(wire.OP_IRQ, 1).result == -errno.EPERM
        assert intruder.call(wire.OP_HCALL, abi.LHCALL_HALT).result == -errno.EPERM
        assert intruder.call(wire.OP_INITIALIZE).result == -errno.EPERM
    finally:
        intruder.close()
    guests.finish(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize("act, reason", [
    ("baddma", "bad DMA entry: 8192@0xfffff000"),
    ("crosspage", "bad DMA entry: 200@"),
    ("badkey", "bad sending DMA key"),
    ("crash", "CRASH: hostile guest"),
])
def test_a_hostile_guest_is_killed_with_its_reason_while_the_others_continue(
        guests, tmp_path, act, reason):
    lan = tmp_path / "lan0.net"
    peers = [guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=4"])
             for _ in range(2)]
    hostile = guests.launch(lan, kernel="python:tests.guests.hostile", args=["hostile=" + act])
    out = guests.finish(hostile)
    assert hostile.returncode == 1
    assert "lgnet: guest died: " + reason in out
    for peer in peers:
        peer_out = guests.finish(peer)
        assert peer.returncode == 0, peer_out
        assert int(peer_out.strip().splitlines()[-1].split()[1]) > 10


def test_lgnet_up_python_guests_exits_0_and_prints_the_table():
    result = subprocess.run([sys.executable, "-m", "lgnet", "up", "scenarios/python-guests.yaml"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.split("\nguest ", 1)[1].splitlines()
    for name in ("alpha", "beta", "gamma"):
        row = next(line.split() for line in table if line.startswith(name))
        assert row[1:3] == ["4", "250"] and row[3:5] == ["4", "250"], table
        assert " ".join(row[7:]) == "powered down"
    assert lgnet_shm() == []


def test_lgnet_up_sigterm_tears_everything_down_quickly(tmp_path):
    scenario = tmp_path / "slow.yaml"
    scenario.write_text("networks: {lan0: {}}\nguests:\n"
                        + "".join("  - {name: g%d, driver: python, nets: [lan0], "
                                  "script: [{wait: 60}]}\n" % i for i in range(2)))
    up = subprocess.Popen([sys.executable, "-m", "lgnet", "up", str(scenario)], env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(2.5)
    started = time.monotonic()
    up.send_signal(signal.SIGTERM)
    up.communicate(timeout=10)
    assert time.monotonic() - started < 3.0
    time.sleep(0.3)
    assert subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True).stdout == b""
    assert lgnet_shm() == []


def test_sigkill_of_lgnet_up_its_children_go_too(tmp_path):
    scenario = tmp_path / "slow.yaml"
    scenario.write_text("networks: {lan0: {}}\nguests:\n"
                        "  - {name: g0, driver: python, nets: [lan0], script: [{wait: 60}]}\n")
    private_tmp = tmp_path / "tmp"           # the lab's runtime directory goes in here
    private_tmp.mkdir()
    up = subprocess.Popen([sys.executable, "-m", "lgnet", "up", str(scenario)],
                          env=dict(ENV, TMPDIR=str(private_tmp)),
                          stdout=subprocess.DEVNULL, start_new_session=True)
    time.sleep(2.5)
    assert [p.name[:6] for p in private_tmp.iterdir()] == ["lgnet-"]
    up.kill()
    up.wait()
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True).stdout:
        assert time.monotonic() < deadline, "children outlived a SIGKILLed lgnet up"
        time.sleep(0.1)
    assert lgnet_shm() == []
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("text, message", [
    ("guests: []\n", "guests"),
    ("networks: {lan0: {}}\nguests:\n  - {name: a, driver: python, nets: [lan9]}\n", "lan9"),
    ("networks: {lan0: {}}\nguests:\n  - {name: a, driver: python, mem: lots}\n", "mem"),
])
def test_a_bad_scenario_file_exits_2_naming_file_and_key(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = subprocess.run([sys.executable, "-m", "lgnet", "up", str(bad)], env=ENV,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert str(bad) in result.stderr and message in result.stderr


def test_a_halted_guest_sleeps_through_interrupts_it_blocked(guests, tmp_path):
    lan = tmp_path / "lan0.net"
    chatter = guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=4"])
    sleeper = guests.launch(lan, kernel="python:tests.guests.blocker")
    out = guests.finish(sleeper)
    halted_ms = int(out.split("halted for ", 1)[1].split()[0])
    assert 350 <= halted_ms < 2000, out       # woken by its timer, not by the blocked net irq
    guests.finish(chatter)


@pytest.mark.parametrize("act", ["badconsole", "badpointer"])
def test_a_bad_pointer_handed_to_the_launcher_kills_that_guest_and_the_host_hears_why(
        guests, broker, tmp_path, act):
    lan = tmp_path / "lan0.net"
    peer = guests.launch(lan, kernel="python:tests.guests.chatter", args=["seconds=3"])
    hostile = guests.launch(lan, kernel="python:tests.guests.hostile", args=["hostile=" + act])
    out = guests.finish(hostile)
    reason = "Invalid address %#x" % abi.LGUEST_GUEST_TOP
    # A killed guest (status 1, its reason), not a user's mistake (status 2).
    assert hostile.returncode == 1, out
    assert "lgnet: guest died: " + reason in out
    assert [r["dead"] for r in stats(broker) if r["pid"] == hostile.pid] == [reason]
    guests.finish(peer)
    assert peer.returncode == 0


def test_a_timer_that_fires_before_the_halt_does_not_leave_the_guest_asleep(guests, tmp_path):
    # The stream sender that hung after its receiver's SIGKILL: a clock event that fired
    # and was taken between SET_CLOCKEVENT and HALT left the HALT waiting for nothing.
    napper = guests.launch(tmp_path / "lan0.net", kernel="python:tests.guests.napper",
                           args=["naps=3000"])
    out = guests.finish(napper)
    assert napper.returncode == 0 and "naps 3000" in out, out
