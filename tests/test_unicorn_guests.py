"""Real guests: lgnet's bundled i386 kernel under Unicorn, one launcher process each, talking
through the real broker. These are the end-to-end tests of the Unicorn issue."""
import re
import subprocess
import sys
import time

import pytest

from conftest import ENV, REPO, lgnet_shm, stats
from lgnet import abi

pytestmark = pytest.mark.timeout(120)
PINGS = "count=3 interval=100 linger=800"


def up(scenario, *extra, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lgnet", "up", str(scenario), *extra],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def lines_of(output: str, guest: str) -> list[str]:
    prefix = guest + ": "
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


def test_three_guests_ping_each_other_with_no_loss_and_learn_arp():
    result = up("scenarios/three-guests.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    ips = {"alpha": "10.0.0.1", "beta": "10.0.0.2", "gamma": "10.0.0.3"}
    for name, ip in ips.items():
        console = lines_of(result.stdout, name)
        assert console[0] == "lguest: booting"
        assert console.count("3 packets transmitted, 3 received, 0% packet loss") == 2, console
        learned = sorted(re.findall(r"arp: (\S+) at 02:00:", "\n".join(console)))
        assert learned == sorted(set(ips.values()) - {ip}), console
    *rows, note = result.stdout.splitlines()[-4:]
    assert [line.split()[-2:] for line in rows] == [["powered", "down"]] * 3
    assert note.startswith("(the broker's counts, per delivery")
    assert lgnet_shm() == []


def test_block_device_write_then_read_round_trip(guests, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"sector zero says hello".ljust(abi.SECTOR_SIZE, b"\0")
                     + bytes(7 * abi.SECTOR_SIZE))
    proc = guests.launch(kernel="bundled", block=disk, args=["block=test", "poweroff"])
    out = guests.finish(proc)
    assert "block: sector 0: sector zero says hello" in out, out
    assert "block: test passed" in out, out
    written = disk.read_bytes()[abi.SECTOR_SIZE:2 * abi.SECTOR_SIZE]
    assert written.startswith(b"lgnet block test: sector 1 written by guest ")
    assert disk.stat().st_size == 8 * abi.SECTOR_SIZE


@pytest.mark.parametrize("act, reason", [
    ("baddma", "bad DMA entry: 8192@0xfffff000"),
    ("crosspage", "bad DMA entry: 64@0x"),
    ("badkey", "bad sending DMA key"),
    ("crash", "CRASH: hostile guest"),
    # The trap is reflected: the kernel's own handler oopses, with cr2 from lguest_data.
    ("fault", "CRASH: Oops: page fault (trap 14) at eip 0xc01"),
])
def test_a_hostile_kernel_is_killed_with_its_reason_while_the_others_keep_pinging(
        guests, tmp_path, act, reason):
    lan = tmp_path / "lan0.net"
    a = guests.launch(lan, kernel="bundled", args=["ip=10.0.0.1/24", "peers=2",
                                                   "ping=10.0.0.2", "count=15", "interval=100",
                                                   "linger=500"])
    b = guests.launch(lan, kernel="bundled", args=["ip=10.0.0.2/24", "peers=2",
                                                   "ping=10.0.0.1", "count=15", "interval=100",
                                                   "linger=500"])
    time.sleep(0.5)
    hostile = guests.launch(lan, kernel="bundled", args=["peers=2", "hostile=" + act])
    out = guests.finish(hostile)
    assert hostile.returncode == 1, out
    assert "lgnet: guest died: " + reason in out, out
    if act == "fault":
        assert out.rstrip().endswith("error 0x0, cr2 0x1000"), out
    for peer in (a, b):
        peer_out = guests.finish(peer)
        assert peer.returncode == 0, peer_out
        assert "15 packets transmitted, 15 received, 0% packet loss" in peer_out, peer_out


def test_a_runaway_guest_is_stopped_by_duration_while_the_others_ping(tmp_path):
    scenario = tmp_path / "runaway.yaml"
    scenario.write_text(
        "networks: {lan0: {}}\nguests:\n"
        "  - {name: spinner, kernel: bundled, nets: [lan0], cmdline: hostile=spin}\n"
        "  - {name: a, kernel: bundled, nets: [lan0], cmdline: 'ip=10.0.0.1/24 peers=2 "
        "ping=10.0.0.2 %s'}\n"
        "  - {name: b, kernel: bundled, nets: [lan0], cmdline: 'ip=10.0.0.2/24 peers=2 "
        "ping=10.0.0.1 %s'}\n" % (PINGS, PINGS))
    started = time.monotonic()
    result = up(scenario, "--duration", "6")
    assert time.monotonic() - started < 20
    for name in ("a", "b"):
        assert "3 packets transmitted, 3 received, 0% packet loss" in lines_of(result.stdout, name)
    row = next(line for line in result.stdout.splitlines() if line.startswith("spinner "))
    assert row.endswith("stopped by the lab"), result.stdout
    assert result.returncode == 0, result.stdout
    assert lgnet_shm() == []


@pytest.mark.parametrize("misuse, reason", [
    ("pastend", "Write past end 3584+1024"),
    ("badsector", "Bad offset 6144 vs 4096"),
])
def test_the_block_device_refuses_what_the_reference_launcher_refused(guests, broker, tmp_path,
                                                                      misuse, reason):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * abi.SECTOR_SIZE))
    proc = guests.launch(kernel="python:tests.guests.blocky", block=disk,
                         args=["block=" + misuse])
    out = guests.finish(proc)
    assert proc.returncode == 1
    assert "lgnet: guest died: " + reason in out
    assert disk.stat().st_size == 8 * abi.SECTOR_SIZE       # trimmed back, never grown
    assert [row["dead"] for row in stats(broker) if row["pid"] == proc.pid] == [reason]


def test_a_block_request_of_any_nonzero_type_is_a_write(guests, broker, tmp_path):
    from tests.guests.blocky import PATTERN
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * abi.SECTOR_SIZE))
    proc = guests.launch(kernel="python:tests.guests.blocky", block=disk, args=["block=type2"])
    out = guests.finish(proc)
    assert proc.returncode == 0, out
    data = disk.read_bytes()
    assert data[abi.SECTOR_SIZE:abi.SECTOR_SIZE + len(PATTERN)] == PATTERN
    assert data[:abi.SECTOR_SIZE] == bytes(abi.SECTOR_SIZE) and len(data) == 8 * abi.SECTOR_SIZE


def test_a_real_guest_pings_a_host_port_and_the_port_sees_the_request(tmp_path):
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import ARP, Ether

    import lgnet
    scenario = tmp_path / "pinger.yaml"
    scenario.write_text("networks: {lan0: {}}\nguests:\n"
                        "  - {name: pinger, kernel: bundled, nets: [lan0], "
                        "cmdline: 'ip=10.0.0.1/24 peers=1 ping=10.0.0.9 count=2 timeout=3000'}\n")
    with lgnet.up(str(scenario)) as lab:
        port = lab.port("lan0")
        who_has = port.expect(lambda p: ARP in p and p[ARP].op == 1, timeout=20)
        assert who_has[ARP].pdst == "10.0.0.9" and who_has[ARP].psrc == "10.0.0.1"
        port.send(Ether(dst=who_has[Ether].src) / ARP(op=2, hwsrc=port.mac, psrc="10.0.0.9",
                                                      hwdst=who_has[Ether].src,
                                                      pdst="10.0.0.1"))
        request = port.expect(lambda p: ICMP in p and p[ICMP].type == 8, timeout=10)
        assert request[IP].src == "10.0.0.1" and request[IP].dst == "10.0.0.9"
        assert request[Ether].dst == port.mac


def test_a_guest_on_two_nets_pings_on_both_and_no_receive_buffer_crosses_a_page():
    """lguest killed a guest whose receive buffer crossed a page ("bad DMA entry"): the
    bundled kernel's second net device's buffers used to, on the first frame of lan1."""
    result = up("scenarios/two-nets.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    want = {"alpha": ["10.0.0.2", "10.0.1.2"], "beta": ["10.0.0.1"], "gamma": ["10.0.1.1"]}
    for name, targets in want.items():
        console = lines_of(result.stdout, name)
        for target in targets:
            at = console.index("--- %s ping statistics ---" % target)
            assert console[at + 1] == "3 packets transmitted, 3 received, 0% packet loss", console
    alpha = lines_of(result.stdout, "alpha")
    # Three requests and three replies each way, and ARP: one side asks and learns, the other
    # learns from the question (7 frames), or both ask at once (8).
    for dev in ("net0", "net1"):
        counts = [line for line in alpha if line.startswith(dev + ": tx ")]
        assert counts and re.fullmatch(
            r"%s: tx ([78]) packets, rx \1 packets, 0 carrier errors, 0 length errors, "
            r"0 checksum errors" % dev, counts[0]), alpha
    *rows, _note = result.stdout.splitlines()[-4:]
    assert [line.split()[-2:] for line in rows] == [["powered", "down"]] * 3
    assert lgnet_shm() == []


@pytest.mark.parametrize("word, why", [
    ("pnig=10.0.0.2", "unknown option"),
    ("count=abc", "not a number in"),
    ("promisc=1", "this option takes no value:"),
    ("ip=10.0.0", "bad value in"),
])
def test_a_command_line_word_the_bundled_kernel_cannot_follow_stops_it_naming_the_word(
        tmp_path, word, why):
    scenario = tmp_path / "typo.yaml"
    scenario.write_text("networks: {lan0: {}}\nguests:\n"
                        "  - {name: typo, kernel: bundled, nets: [lan0], "
                        "cmdline: 'ip=10.0.0.1/24 %s'}\n" % word)
    result = up(scenario)
    assert result.returncode == 1, result.stdout + result.stderr
    console = lines_of(result.stdout, "typo")
    assert ("lguest: %s '%s'; the options are: ip= ping= flood= count= interval= timeout= "
            "peers= linger= promisc csum block= poweroff hostile=" % (why, word)) in console, \
        console
    row = next(line for line in result.stdout.splitlines() if line.startswith("typo "))
    assert row.endswith("killed: CRASH: %s '%s' on the command line" % (why, word)), row
    assert lgnet_shm() == []


def test_ping_on_a_guest_without_a_net_device_says_exactly_that(guests):
    proc = guests.launch(kernel="bundled", args=["ping=10.0.0.1"])
    out = guests.finish(proc)
    assert proc.returncode == 1, out
    assert "lgnet: guest died: CRASH: ping= needs a net device, and this guest has none" \
        in out, out
    assert "no ip= for a net device" not in out


def test_console_input_reaches_a_guest_that_computes_without_hypercalls(broker):
    """hostile=spin never makes a hypercall; lguest still serviced the Waker's BREAK at each
    host tick, so keystrokes are echoed by its console interrupt."""
    import os
    import pty

    from test_console import read_until
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lgnet", "launch", "--broker", broker,
                             "16", "bundled", "hostile=spin"], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    out = proc.stdout.fileno()
    try:
        read_until(out, b"hostile: spin\n")
        time.sleep(0.3)                       # well into the spin
        os.write(master, b"typed while spinning")
        read_until(out, b"typed while spinning")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        os.close(master)
        os.close(slave)


# --- the bundled kernel's timer: armed only for an earlier deadline ------------------------

def echo_and(tmp_path, cmdline: str, **up_options):
    """A bundled guest "echo" (10.0.0.2, answering until the lab ends) and another, "guest",
    with this command line, on lan0: (guest's console, seconds from the lab's start to the
    guest's power-down)."""
    import lgnet
    scenario = tmp_path / "pair.yaml"
    scenario.write_text(
        "networks: {lan0: {}}\nguests:\n"
        "  - {name: echo, kernel: bundled, nets: [lan0], cmdline: 'ip=10.0.0.2/24'}\n"
        "  - {name: guest, kernel: bundled, nets: [lan0], cmdline: '%s'}\n" % cmdline)
    started = time.monotonic()
    with lgnet.up(str(scenario), **up_options) as lab:
        guest = next(run for run in lab.guests if run.name == "guest")
        status = guest.wait(60)
        took = time.monotonic() - started
    console = list(guest.console)       # read to its end once the lab is down
    assert status == 0, console
    return console, took


def test_a_flood_arms_the_timer_only_when_its_deadline_is_earlier_than_the_armed_one(tmp_path):
    """Each request waits up to FLOOD_WAIT_MS (100 ms) for its reply, a deadline later than
    the last one: the kernel arms SET_CLOCKEVENT again only when the armed one has fired
    (about ten times a second), not before every HALT, as Linux's clockevents did."""
    from lgnet import timeline
    from lgnet.bench.run import parse_flood_summary
    trace = tmp_path / "flood.json"
    console, _took = echo_and(tmp_path, "ip=10.0.0.1/24 peers=1 ping=10.0.0.2 flood=1",
                              trace=str(trace))
    summary = parse_flood_summary(console)
    assert summary is not None and summary["received"] >= 30, console
    events = timeline.load(str(trace))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e["name"] == "process_name"}
    flooder = next(pid for pid, name in names.items() if name == "guest")
    mine = sorted((e for e in events if e.get("pid") == flooder and e.get("ph") == "X"),
                  key=lambda e: e["ts"])
    # From its first frame on (peers= polls the page before that): one flood second is ten
    # FLOOD_WAIT_MS windows, and ARP adds a few.
    first = next(i for i, e in enumerate(mine) if e["name"] == "SEND_DMA"
                 and e["args"]["key"].startswith("lan0+"))
    mine = [e["name"] for e in mine[first:]]
    assert mine.count("SET_CLOCKEVENT") <= 20, (mine.count("SET_CLOCKEVENT"), summary)
    assert mine.count("HALT") > mine.count("SET_CLOCKEVENT")


def test_a_wait_longer_than_the_armed_timer_still_ends_when_due(tmp_path):
    """The last replies come back long before timeout= (the timer stays armed for it), then
    linger= asks for a later deadline, which the kernel does not arm at once: it wakes at the
    armed one and arms again. The guest must still power down, and not before linger= is up."""
    console, took = echo_and(tmp_path, "ip=10.0.0.1/24 peers=1 ping=10.0.0.2 count=2 "
                             "interval=100 timeout=300 linger=1500")
    assert "2 packets transmitted, 2 received, 0% packet loss" in console, console
    assert took >= 1.5 + 0.1


# --- net_xmit: every slot of the page, looked at sixteen at a time -------------------------

def hold_slots(path, first: int, count: int) -> int:
    """Take slots [first, first+count) of a net file as a launcher would (one OFD write lock
    on those lock bytes), so the guests started next get the slots around them."""
    import fcntl

    from lgnet import netfile
    fd = netfile.open_netfile(path)
    netfile._lock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, first, count)
    return fd


@pytest.mark.parametrize("free", [(0, 340, 500, 681), (15, 16, 17, 671)])
def test_frames_reach_guests_in_any_slot_unicast_to_one_broadcast_to_all(tmp_path, free):
    """Four guests, all other slots taken: in the first and last slots of the page, in the
    middle, and either side of a boundary between the groups net_xmit skips at once when
    unused. Three ping each other (unicast, answered), the fourth is promiscuous;
    every broadcast (each ARP request) reaches every other used slot, and every unicast frame
    its one destination and the promiscuous guest, as lguest_net sent them."""
    import os

    import lgnet
    net = tmp_path / "lan0.net"
    held = []
    before = 0
    for slot in free:                           # every slot between them is taken
        if slot > before:
            held.append(hold_slots(net, before, slot - before))
        before = slot + 1
    ips = ["10.0.0.%d" % (n + 1) for n in range(len(free) - 1)]
    scenario = tmp_path / "slots.yaml"
    scenario.write_text("networks: {lan0: {file: %s}}\nguests:\n" % net + "".join(
        "  - {name: g%d, kernel: bundled, nets: [lan0], cmdline: 'ip=%s/24 peers=%d "
        "ping=%s count=2 interval=100 linger=1500'}\n"
        % (n, ip, len(ips), ",".join(other for other in ips if other != ip))
        for n, ip in enumerate(ips)) + (
        "  - {name: promisc, kernel: bundled, nets: [lan0], cmdline: 'ip=10.0.0.99/24 "
        "peers=%d linger=3000 promisc poweroff'}\n" % len(ips)))
    try:
        with lgnet.up(str(scenario)) as lab:
            assert lab.wait(90), "the guests did not power down"
        deliveries = lab.deliveries("lan0")
    finally:
        for fd in held:
            os.close(fd)
    slot_of_guest = {}
    for run in lab.guests:
        console = list(run.console)
        slot_of_guest[run.name] = int(re.search(r"net0: slot (\d+),", "\n".join(console))[1])
        if run.name != "promisc":
            assert console.count("2 packets transmitted, 2 received, 0% packet loss") == 2, \
                console
    # The launchers start at once: which guest takes which of the free slots is theirs.
    everyone, promisc = set(slot_of_guest.values()), slot_of_guest["promisc"]
    assert everyone == set(free)
    receivers: dict[int, set] = {}
    for d in deliveries:
        receivers.setdefault(d.send, set()).add(d.receiver_slot)
    sends = {d.send: d for d in deliveries}
    broadcasts = [d for d in sends.values() if d.data[:6] == b"\xff" * 6]
    unicasts = [d for d in sends.values() if not d.data[0] & 1]
    assert len(broadcasts) >= len(ips) and unicasts
    for d in broadcasts:
        assert receivers[d.send] == everyone - {d.sender_slot}, d
    slot_of = {bytes.fromhex("0200%02x000000" % guest): slot for guest, slot in
               {d.receiver_guest: d.receiver_slot for d in deliveries}.items()}
    for d in unicasts:
        assert receivers[d.send] == {slot_of[d.data[:6]], promisc}, d


# --- the bundled kernel's frames go through the async ring ---------------------------------

def test_frames_queued_in_the_async_ring_are_all_sent_and_every_short_one_counted(tmp_path):
    """interval=0 sends 60 echo requests without a hypercall between them: more frames than
    the kernel has transmit buffers, so it must have the Host make what it queued before it
    builds in a buffer again. Every request goes out, and the carrier errors the kernel counts
    when it reaps its sends (a receiver with no free buffer) are exactly the broker's."""
    import lgnet
    from lgnet.lab import _broker_rows
    scenario = tmp_path / "burst.yaml"
    scenario.write_text(
        "networks: {lan0: {}}\nguests:\n"
        "  - {name: echo, kernel: bundled, nets: [lan0], cmdline: 'ip=10.0.0.2/24'}\n"
        "  - {name: guest, kernel: bundled, nets: [lan0], cmdline: 'ip=10.0.0.1/24 peers=1 "
        "ping=10.0.0.2 count=60 interval=0 timeout=2000'}\n")
    with lgnet.up(str(scenario)) as lab:
        guest = lab.guest("guest")
        assert guest.wait(60) == 0, guest.console_text
        rows = {row["name"]: row for row in _broker_rows(lab.socket_path)}
    text = guest.console_text
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received",
                                        text).groups())
    assert sent == 60 and received >= 8, text
    frames, carrier = map(int, re.search(r"net0: tx (\d+) packets, rx \d+ packets, "
                                         r"(\d+) carrier errors", text).groups())
    assert frames > sent                     # and the ARP request(s)
    assert carrier == rows["guest"]["tx_carrier_errors"], (text, rows["guest"])
    assert rows["guest"]["tx_packets"] == frames - carrier
