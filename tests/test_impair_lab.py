"""Impairments in a running lab: real broker, real launchers, read back from the capture with
lgnet's reader, scapy and tshark."""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

import lgnet
from lgnet import netfile
from lgnet.errors import LgnetError
from lgnet.fabric.capture import capture_seed
from lgnet.lab import impair_request

pytestmark = pytest.mark.timeout(180)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ECHO = os.path.join(ROOT, "scenarios", "echo.yaml")
LGNET_ETHERTYPE = 0x88B5


def write(tmp_path, text: str) -> str:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return str(path)


def frames(src, dst, n):
    """n numbered frames of lgnet's own ethertype, from one port to another."""
    return [Ether(src=src.mac, dst=dst.mac, type=LGNET_ETHERTYPE) / (b"%06d" % i + bytes(54))
            for i in range(n)]


def number(data: bytes) -> int:
    return int(data[14:20])


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.05)


def faults(lab, net, words):
    return [d for d in lab.records(net) if words in d.fault]


# --- delay and jitter, in bundled-kernel ping RTTs and in the capture ---------------------

DELAY_SCENARIO = """
seed: 5
networks: {lan0: {}}
guests:
  - {name: alpha, kernel: bundled, nets: [lan0],
     cmdline: "ip=10.0.0.1/24 peers=1 ping=10.0.0.2 count=10 interval=50 linger=200"}
  - {name: beta, kernel: bundled, nets: [lan0], cmdline: "ip=10.0.0.2/24"}
impair:
  - {net: lan0, src: beta, dst: alpha, delay: 20, jitter: 5}
"""


def test_delay_and_jitter_show_in_ping_rtts_and_in_the_capture(tmp_path):
    with lgnet.up(write(tmp_path, DELAY_SCENARIO)) as lab:
        alpha = lab.guest("alpha")
        assert alpha.wait(120) is not None, alpha.console_text
        text = alpha.console_text
        assert "10 packets transmitted, 10 received" in text, text
        low, avg, high = map(float, re.search(r"rtt min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+)",
                                              text).groups())
        # 20 ms +- 5 ms one way; the other way and the guests add a little
        assert 15.0 <= low and avg <= 40.0, text
        records = lab.records("lan0")
        requests = {}
        for d in records:
            packet = Ether(d.data)
            if ICMP in packet and packet[ICMP].type == 8 and d.receiver == "beta":
                requests[packet[ICMP].seq] = d.time
        replies = [(Ether(d.data)[ICMP].seq, d) for d in records
                   if d.receiver == "alpha" and ICMP in Ether(d.data)]
        assert len(replies) == 10
        for seq, reply in replies:
            assert reply.fault == "delayed: delay 20ms jitter 5ms (link beta->alpha on lan0)"
            assert 0.015 <= reply.time - requests[seq] <= 0.025 + 0.030


# --- corruption, as the bundled kernel's checksums see it -------------------------------------

CORRUPT_SCENARIO = """
networks: {lan0: {}}
guests:
  - {name: alpha, kernel: bundled, nets: [lan0],
     cmdline: "ip=10.0.0.1/24 peers=1 ping=10.0.0.2 count=60 interval=50 csum"}
  - {name: beta, kernel: bundled, nets: [lan0], cmdline: "ip=10.0.0.2/24"}
"""


def internet_checksum_ok(data: bytes) -> bool:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_corrupted_frames_fail_the_bundled_kernels_checksums(tmp_path):
    with lgnet.up(write(tmp_path, CORRUPT_SCENARIO), seed=8) as lab:
        port = lab.port("lan0")
        port.send(ARP(pdst="10.0.0.1", psrc="10.0.0.99"))
        mac = port.expect("is-at and src host 10.0.0.1", timeout=20)[ARP].hwsrc
        with lab.impair("lan0", src=port.name, dst="alpha", corrupt=1.0):
            for seq in range(30):
                port.send(Ether(dst=mac) / IP(src="10.0.0.99", dst="10.0.0.1")
                          / ICMP(seq=seq) / bytes(56))
            alpha = lab.guest("alpha")
            assert alpha.wait(120) is not None, alpha.console_text
        damaged = [d for d in lab.records("lan0") if d.receiver == "alpha"
                   and d.fault == "corrupted: corrupt 1 (link port0->alpha on lan0)"]
    # Those whose IP header or ICMP message no longer adds up are in alpha's count (a flip
    # in the Ethernet header is no checksum's to see, nor one in the IP version or lengths,
    # which fail a check before it).
    bad = [d for d in damaged if d.data[12:14] == b"\x08\x00" and not (
        internet_checksum_ok(d.data[14:34]) and internet_checksum_ok(d.data[34:98]))]
    counted = int(re.search(r"(\d+) checksum errors", alpha.console_text)[1])
    assert len(damaged) == 30 and bad
    assert 0.8 * len(bad) <= counted <= len(bad)


# --- link down and up on a timeline ------------------------------------------------------------

LINK_SCENARIO = """
seed: 3
networks: {lan0: {}}
guests:
  - {name: alpha, kernel: bundled, nets: [lan0],
     cmdline: "ip=10.0.0.1/24 peers=1 ping=10.0.0.2 count=120 interval=100 linger=200"}
  - {name: beta, kernel: bundled, nets: [lan0], cmdline: "ip=10.0.0.2/24"}
events:                      # well inside alpha's 12 s of pings, even on a loaded machine
  - {at: 5.0, link: [beta, lan0], down: true}
  - {at: 7.0, link: [beta, lan0], up: true}
"""


def test_link_down_and_up_on_a_timeline_read_back_with_scapy_and_tshark(tmp_path):
    pcap = tmp_path / "pcap"
    with lgnet.up(write(tmp_path, LINK_SCENARIO), pcap=str(pcap)) as lab:
        alpha = lab.guest("alpha")
        assert alpha.wait(120) is not None, alpha.console_text
        lab.collect()
        carrier = alpha.stats["tx_carrier_errors"]
        assert [e.describe() for _, e, error in lab.timeline_done if not error] == [
            "link beta on lan0 down", "link beta on lan0 up"]
    # the bundled kernel counted the carrier errors, as lguest_net would
    counted = int(re.search(r"(\d+) carrier errors", alpha.console_text)[1])
    assert counted == carrier > 0
    path = str(pcap / "lan0.pcapng")
    packets = rdpcap(path)
    comments = [p.comments[0].decode() if p.comments else "" for p in packets]
    down = [p.time for p, c in zip(packets, comments) if "down: link beta on lan0 is down" in c]
    to_beta = [p.time for p, c in zip(packets, comments)
               if " -> beta slot " in c and "buffer -" not in c]
    assert len(down) == carrier
    assert not [t for t in to_beta if down[0] <= t <= down[-1]]   # nothing reached beta
    assert [t for t in to_beta if t > down[-1]]                   # traffic resumed after up
    assert capture_seed(path) == 3
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed")
    out = subprocess.run([tshark, "-r", path, "-Y", 'frame.comment contains "is down"',
                          "-T", "fields", "-e", "frame.comment"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    assert len(out) == carrier and all("alpha slot" in line for line in out)
    seed = subprocess.run(["capinfos", path], capture_output=True, text=True).stdout \
        if shutil.which("capinfos") else "lgnet seed 3"
    assert "lgnet seed 3" in seed


# --- kill, restart, partition and heal on a timeline -------------------------------------------

CRASH_SCENARIO = """
networks: {lan0: {}}
guests:
  - {name: alpha, driver: python, nets: [lan0], ip: 10.0.0.1/24}
  - {name: beta, driver: python, nets: [lan0], ip: 10.0.0.2/24}
  - {name: gamma, driver: python, nets: [lan0], ip: 10.0.0.3/24}
events:
  - {at: 4.0, kill: gamma}
  - {at: 5.5, restart: gamma}
  - {at: 7.0, partition: [[alpha], [beta, gamma]]}
  - {at: 8.5, heal: true}
  - {at: 9.0, impair: {net: lan0, src: alpha, loss: 0.5, burst: 3}}
"""


def pinged(port, ip, mac, seq, timeout=1.5) -> bool:
    port.send(Ether(dst=mac) / IP(src="10.0.0.99", dst=ip) / ICMP(seq=seq))
    try:
        port.expect(lambda p: ICMP in p and p[ICMP].type == 0 and p[ICMP].seq == seq,
                    timeout=timeout)
        return True
    except AssertionError:
        return False


def via(port, ip, mac, as_mac, as_ip, seq):
    """Make the guest at `ip` answer to another guest (the one at as_mac): its reply goes to
    the sender's Ethernet address."""
    port.send(Ether(src=as_mac, dst=mac) / IP(src=as_ip, dst=ip) / ICMP(seq=seq))


def test_kill_restart_partition_and_heal_on_a_timeline(tmp_path):
    with lgnet.up(write(tmp_path, CRASH_SCENARIO)) as lab:
        port = lab.port("lan0")
        macs = {}
        for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            port.send(ARP(pdst=ip, psrc="10.0.0.99"))
            macs[ip] = port.expect("is-at and src host %s" % ip, timeout=5)[ARP].hwsrc
        assert not lab.timeline_done, "the port came up too late to see gamma alive"
        wait_for(lambda: len(lab.timeline_done) >= 1, what="the kill")
        assert lab.guest("gamma").process.poll() is not None
        assert not pinged(port, "10.0.0.3", macs["10.0.0.3"], 1)        # a dead peer
        assert pinged(port, "10.0.0.1", macs["10.0.0.1"], 2)            # peers unaffected
        assert pinged(port, "10.0.0.2", macs["10.0.0.2"], 3)
        wait_for(lambda: len(lab.timeline_done) >= 2, what="the restart")
        lab.wait_net("lan0")
        # back at the same MAC (a loaded machine may take a while to boot it: three tries)
        assert any(pinged(port, "10.0.0.3", macs["10.0.0.3"], seq, timeout=4)
                   for seq in (40, 41, 42)), (
            netfile.slot_table(lab.net_file("lan0")), lab.guest("gamma").console_text,
            port.received)
        wait_for(lambda: len(lab.timeline_done) >= 3, what="the partition")
        via(port, "10.0.0.1", macs["10.0.0.1"], macs["10.0.0.2"], "10.0.0.2", 5)  # alpha->beta
        via(port, "10.0.0.2", macs["10.0.0.2"], macs["10.0.0.3"], "10.0.0.3", 6)  # beta->gamma
        assert pinged(port, "10.0.0.1", macs["10.0.0.1"], 7)            # port: on every side
        wait_for(lambda: faults(lab, "lan0", "down: partition"), what="a cut frame")
        cut = faults(lab, "lan0", "down: partition")
        assert {(d.sender, d.receiver) for d in cut} == {("alpha", "beta")}
        wait_for(lambda: any(d.sender == "beta" and d.receiver == "gamma" and
                             ICMP in Ether(d.data) for d in lab.deliveries("lan0")),
                 what="beta's answer to gamma")
        wait_for(lambda: len(lab.timeline_done) >= 4, what="the heal")
        via(port, "10.0.0.1", macs["10.0.0.1"], macs["10.0.0.2"], "10.0.0.2", 8)
        wait_for(lambda: any(d.sender == "alpha" and d.receiver == "beta" and d.delivered
                             and ICMP in Ether(d.data) for d in lab.records("lan0")),
                 what="alpha reaching beta again")
        wait_for(lambda: len(lab.timeline_done) >= 5, what="the rule")
        assert [error for _, _, error in lab.timeline_done] == [""] * 5
        state = lab.impairments()
        assert state["partition"] == [] and state["rules"] == [
            {"net": "lan0", "src": "alpha", "dst": None, "loss": 0.5, "burst": 3.0}]


# --- rate, duplicate, corrupt, loss: between two host ports --------------------------------------

def test_rate_limiting_holds_the_rate_and_records_limit_drops():
    with lgnet.up(ECHO, seed=1) as lab:
        sender, receiver = lab.port("lan0"), lab.port("lan0")
        lab.impair("lan0", src=sender.name, dst=receiver.name, rate="100fps", limit=10)
        sent = frames(sender, receiver, 120)
        for f in sent:
            sender.send(f)
        wait_for(lambda: len(faults(lab, "lan0", "dropped: rate")) + len(
            [d for d in lab.deliveries("lan0") if d.receiver == receiver.name]) >= 120,
            timeout=30, what="every frame delivered or dropped")
        got = [d for d in lab.deliveries("lan0") if d.receiver == receiver.name]
        dropped = faults(lab, "lan0", "dropped: rate 100fps limit 10 (link port0->port1")
        assert len(got) + len(dropped) == 120 and dropped
        rate = (len(got) - 1) / (got[-1].time - got[0].time)
        assert 90 <= rate <= 110
        lab.collect()
        assert sender.stats["tx_lost"] == len(dropped)


def test_duplicates_and_corruption_reach_a_host_port():
    with lgnet.up(ECHO, seed=2) as lab:
        sender, receiver = lab.port("lan0"), lab.port("lan0")
        with lab.impair("lan0", src=sender.name, dst=receiver.name, duplicate=1.0):
            for f in frames(sender, receiver, 5):
                sender.send(f)
            got = receiver.sniff(count=10, timeout=10)
            assert sorted(number(bytes(p)) for p in got) == sorted(list(range(5)) * 2)
        with lab.impair("lan0", src=sender.name, dst=receiver.name, corrupt=1.0):
            sent = frames(sender, receiver, 5)
            for f in sent:
                sender.send(f)
            got = receiver.sniff(count=5, timeout=10)
        flips = [sum(bin(a ^ b).count("1") for a, b in zip(bytes(p), bytes(s)))
                 for p, s in zip(got, sent)]
        assert flips == [1] * 5
        lab.collect()
        assert receiver.stats["rx_duplicates"] == 5 and receiver.stats["rx_corrupted"] == 5
        records = lab.records("lan0")
        assert len([d for d in records if d.fault.startswith("duplicated: duplicate 1")]) == 5
        assert len([d for d in records if d.fault.startswith("corrupted: corrupt 1")]) == 5
        assert lab.impairments()["rules"] == []          # both restored on the way out


def lost_numbers(seed):
    with lgnet.up(ECHO, seed=seed) as lab:
        sender, receiver = lab.port("lan0"), lab.port("lan0")
        lab.impair("lan0", src=sender.name, dst=receiver.name, loss=0.3)
        for f in frames(sender, receiver, 100):
            sender.send(f)
            time.sleep(0.005)        # the receiver keeps up: every frame is delivered or lost
        wait_for(lambda: len([d for d in lab.records("lan0")
                              if d.sender == sender.name]) >= 100, what="100 frames")
        return sorted(number(d.data) for d in faults(lab, "lan0", "dropped: loss 0.3"))


def test_the_same_seed_loses_the_same_frames_in_a_lab():
    first = lost_numbers(42)
    assert first and first == lost_numbers(42)
    assert first != lost_numbers(43)


# --- live changes: readable errors, the CLI -----------------------------------------------------

def test_live_changes_to_unknown_guests_or_nets_are_readable_errors(tmp_path):
    with lgnet.up(ECHO) as lab:
        with pytest.raises(LgnetError, match=r"no network 'lan9' in .*\(networks: lan0\)"):
            lab.impair("lan9", loss=0.1)
        with pytest.raises(LgnetError, match=r"no guest 'zed' in .*\(guests: alpha, beta\)"):
            lab.link("zed", "lan0")
        with pytest.raises(LgnetError, match=r"impair: loss: must be a probability"):
            lab.impair("lan0", loss=2)
        with pytest.raises(LgnetError, match=r"impair: no guest 'zed' \(guests: alpha, beta\)"):
            impair_request(lab.socket_path, {"do": "set", "net": "lan0", "src": "zed",
                                             "params": {"loss": 0.1}})
        env = dict(os.environ, PYTHONPATH=ROOT)
        cli = [sys.executable, "-m", "lgnet", "impair", "--lab", lab.runtime]
        bad = subprocess.run(cli + ["lan9", "loss=0.1"], capture_output=True, text=True,
                             env=env, timeout=60)
        assert bad.returncode == 2
        assert "impair: no network 'lan9' (networks: lan0)" in bad.stderr
        good = subprocess.run(cli + ["--link", "beta", "lan0", "down"], capture_output=True,
                              text=True, env=env, timeout=60)
        assert good.returncode == 0, good.stderr
        assert lab.link("beta", "lan0").state == "down"
        with lab.link("beta", "lan0").up():
            assert lab.link("beta", "lan0").state == "up"
        assert lab.link("beta", "lan0").state == "down"     # the with put it back
