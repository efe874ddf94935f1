"""Capture: the broker records every delivery as pcapng with the lguest facts of it.

First the format and the engine hook in one process (lgnet.fabric.capture over the real DMA
engine), then real labs whose files are read back with scapy and with the real tshark."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

import lgnet
from lgnet import abi, netfile
from lgnet.fabric import capture as pcap
from lgnet.fabric.dma import Engine
from lgnet.fabric.memory import GuestMemory

from conftest import ENV, REPO, lgnet_shm

pytestmark = pytest.mark.timeout(60)
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed "
                                  "(.ci/run installs it: apt-get install tshark)")


# --- the format -------------------------------------------------------------------------

def test_blocks_round_trip_and_a_half_written_block_waits_for_its_end(tmp_path):
    path = tmp_path / "x.pcapng"
    head = pcap.section_header("lgnet test") + pcap.interface_description("lan0", "a net")
    first = pcap.enhanced_packet(1_700_000_000_123_456_789, b"\x01" * 61, 61, "one")
    second = pcap.enhanced_packet(1_700_000_000_223_456_789, b"\x02" * 60, 70, "two")
    path.write_bytes(head + first + second[:30])
    reader = pcap.Reader(path)
    records = list(reader.records())
    assert [(r.ts_ns, r.data, r.orig_len, r.comments) for r in records] == [
        (1_700_000_000_123_456_789, b"\x01" * 61, 61, ["one"])]
    assert reader.interfaces == [("lan0", 1)]
    with open(path, "ab") as f:
        f.write(second[30:])
    assert [(r.data, r.orig_len, r.comments) for r in reader.records()] == [
        (b"\x02" * 60, 70, ["two"])]
    assert list(reader.records()) == []


def test_the_per_frame_block_is_the_generic_block_for_every_padding():
    # The capture's five-piece Enhanced Packet Block must be what the generic block and
    # options builders make, whatever the data's and the comment's lengths modulo 4.
    for data_len in range(9):
        for comment_len in range(9):
            data, comment = bytes(range(data_len)), "c" * comment_len
            ts = 1_700_000_000_123_456_789 + data_len
            generic = pcap._block(pcap.EPB_TYPE, pcap._EPB_BODY.pack(
                0, ts >> 32, ts & abi.U32_MASK, data_len, data_len + 3)
                + pcap._pad(data) + pcap._options([(pcap.OPT_COMMENT, comment.encode())]))
            assert pcap.enhanced_packet(ts, data, data_len + 3, comment) == generic
            assert pcap.enhanced_packet(ts, data, data_len + 3, comment.encode()) == generic


def test_facts_round_trip_through_the_comment():
    text = pcap.format_facts("alpha", None, "beta", 3, "lan0", 12, 5, 60, 17, 100, (0, 1),
                             (4242, 4243))
    assert text == ("alpha slot ? -> beta slot 3 key lan0+0xc buffer 5 used_len 60 send 17 "
                    "truncated from 100 (guest 0 pid 4242 -> guest 1 pid 4243)")
    d = pcap.parse_facts(text, 1.5, b"x")
    assert (d.sender, d.sender_slot, d.receiver, d.receiver_slot, d.net, d.key_offset,
            d.buffer, d.used_len, d.send, d.offered, d.truncated, d.sender_pid) == (
        "alpha", None, "beta", 3, "lan0", 12, 5, 60, 17, 100, True, 4242)
    assert pcap.parse_facts("somebody else's comment", 0, b"") is None


# --- the engine's hook, in one process ---------------------------------------------------

NET_AT = 0x10000                 # where each kit guest maps the net page
RX, TX, BUF = 0x1000, 0x2000, 0x3000


class Net:
    """A real net file (the capture names it from its path) mapped by every kit guest."""

    def __init__(self, path: Path):
        self.fd = netfile.open_netfile(path)
        self.identity = netfile.file_identity(self.fd)
        self.page = bytearray(abi.PAGE_SIZE)


def kit_guest(engine: Engine, net: Net, pid: int, rx_sizes=(1514,)):
    memory = GuestMemory()
    memory.add_region(0, bytearray(0x10000), name="ram")
    memory.add_region(NET_AT, net.page, shared=net.identity, name="net")
    g = engine.initialize(owner=pid, memory=memory, pfn_limit=0x20, pgdir=0, start=0,
                          page_offset=0)
    for i, size in enumerate(rx_sizes):
        memory.view(RX + i * abi.LGUEST_DMA_SIZE, abi.LGUEST_DMA_SIZE)[:] = abi.pack_dma(
            [(BUF + i * 0x800, size)])
    return g


def bind_slot(engine, g, slot, count):
    assert engine.bind_dma(g, abi.peer_key(NET_AT, slot), RX, count, 1) == 1


def send(engine, g, slot, data: bytes):
    g.memory.view(TX + 0x100, len(data))[:] = data
    g.memory.view(TX, abi.LGUEST_DMA_SIZE)[:] = abi.pack_dma([(TX + 0x100, len(data))])
    return engine.send_dma(g, abi.peer_key(NET_AT, slot), TX)


def test_the_hook_records_deliveries_with_slots_keys_buffers_and_sends(tmp_path):
    net = Net(tmp_path / "lan0.net")
    cap = pcap.Capture(str(tmp_path / "cap"), {str(tmp_path / "lan0.net"): "office"},
                       {100: "alpha", 101: "beta"})
    engine = Engine()
    engine.on_transfer = cap.on_transfer
    a = kit_guest(engine, net, 100)
    b = kit_guest(engine, net, 101, rx_sizes=(1514, 1514))
    c = kit_guest(engine, net, 102, rx_sizes=(40,))       # no name: "guest2"; small buffer
    loner = kit_guest(engine, net, 103)                    # sends, never binds: slot unknown
    cap.learn_net(net.identity, net.fd)
    for g, slot in ((a, 0), (b, 1), (c, 2)):
        bind_slot(engine, g, slot, 2 if g is b else 1)
    frame = bytes(range(60))
    for slot in (1, 2):                                   # one transmit: the same send
        send(engine, a, slot, frame)
    send(engine, a, 1, frame)                             # the same bytes again: a new send
    send(engine, loner, 0, frame[:50])
    cap.close()

    got = pcap.read_deliveries(tmp_path / "cap" / "office.pcapng")
    assert [(d.sender, d.sender_slot, d.receiver, d.receiver_slot, d.key_offset, d.buffer,
             d.used_len, d.offered, d.send) for d in got] == [
        ("alpha", 0, "beta", 1, 4, 0, 60, 60, 1),
        ("alpha", 0, "guest2", 2, 8, 0, 40, 60, 1),       # truncated by c's 40-byte buffer
        ("alpha", 0, "beta", 1, 4, 1, 60, 60, 2),
        ("guest3", None, "alpha", 0, 0, 0, 50, 50, 3)]
    assert [d.data for d in got] == [frame, frame[:40], frame, frame[:50]]
    assert got[1].truncated and "truncated from 60" in got[1].comment
    assert all(g.dead is None for g in (a, b, c, loner))


def test_a_receive_entry_across_two_regions_is_recorded_whole(tmp_path):
    # lguest let a receive array run from the end of RAM into the next page (here the net
    # page): the capture reads such an entry across both and records the frame it got.
    net = Net(tmp_path / "lan0.net")
    cap = pcap.Capture(str(tmp_path / "cap"), {str(tmp_path / "lan0.net"): "lan0"})
    engine = Engine()
    engine.on_transfer = cap.on_transfer
    a = kit_guest(engine, net, 100)
    b = kit_guest(engine, net, 101)
    straddling = NET_AT - abi.LGUEST_DMA_SIZE // 2
    assert b.memory.view(straddling, abi.LGUEST_DMA_SIZE) is None     # no one window
    assert b.memory.scatter(straddling, abi.pack_dma([(BUF, 1514)]))
    cap.learn_net(net.identity, net.fd)
    bind_slot(engine, a, 0, 1)
    assert engine.bind_dma(b, abi.peer_key(NET_AT, 1), straddling, 1, 1) == 1
    frame = bytes(range(100))
    send(engine, a, 1, frame)
    cap.close()
    got = pcap.read_deliveries(tmp_path / "cap" / "lan0.pcapng")
    assert [(d.data, d.used_len, d.receiver_slot) for d in got] == [(frame, 100, 1)]


def test_impaired_frames_are_recorded_with_what_happened_and_the_seed(tmp_path):
    from lgnet.fabric.impair import Impairments, Params
    net = Net(tmp_path / "lan0.net")
    cap = pcap.Capture(str(tmp_path / "cap"), {str(tmp_path / "lan0.net"): "lan0"},
                       {100: "alpha", 101: "beta"}, seed=77)
    engine = Engine()
    engine.on_transfer, engine.on_fault = cap.on_transfer, cap.on_fault
    a = kit_guest(engine, net, 100)
    b = kit_guest(engine, net, 101, rx_sizes=(1514, 1514))
    cap.learn_net(net.identity, net.fd)
    bind_slot(engine, a, 0, 1)
    bind_slot(engine, b, 1, 2)
    table = Impairments(77, lambda: 0.0, net_of=lambda space: "lan0",
                        name_of={a: "alpha", b: "beta"}.get)
    engine.impair = table
    frame = bytes(range(60))
    table.set("lan0", "alpha", "beta", Params(loss=1.0))
    send(engine, a, 1, frame)
    table.set("lan0", "alpha", "beta", Params(corrupt=1.0))
    send(engine, a, 1, frame)
    cap.close()
    path = tmp_path / "cap" / "lan0.pcapng"
    lost, damaged = pcap.read_deliveries(path)
    assert not lost.delivered and lost.buffer == -1 and lost.used_len == 0
    assert lost.data == frame and lost.offered == 60
    assert lost.fault == "dropped: loss 1 (link alpha->beta on lan0)"
    assert "alpha slot 0 -> beta slot 1 key lan0+0x4 buffer - used_len 0" in lost.comment
    assert damaged.delivered and damaged.fault == "corrupted: corrupt 1 (link alpha->beta on lan0)"
    assert sum(bin(x ^ y).count("1") for x, y in zip(damaged.data, frame)) == 1
    assert pcap.capture_seed(path) == 77


def test_the_hook_reads_through_views_that_never_kill(tmp_path):
    net = Net(tmp_path / "lan0.net")
    cap = pcap.Capture(str(tmp_path / "cap"))
    engine = Engine()
    a, b = kit_guest(engine, net, 1), kit_guest(engine, net, 2)
    cap.learn_net(net.identity, net.fd)
    bind_slot(engine, b, 1, 1)
    binding = next(x for x in b.dma if x.interrupt)
    # A destination whose descriptor is out of its memory (as if rewritten after the copy).
    cap.on_transfer(a, binding, 0, 0xFFFFFF00, 60, abi.unpack_dma(abi.pack_dma([(TX, 60)])))
    cap.close()
    (d,) = pcap.read_deliveries(tmp_path / "cap" / "lan0.pcapng")
    assert d.data == b"" and d.used_len == 60
    assert a.dead is None and b.dead is None


# --- real labs ---------------------------------------------------------------------------

def test_the_pcap_of_a_known_exchange_has_exactly_the_expected_frames_in_order(tmp_path):
    out = tmp_path / "pcap"
    with lgnet.up(REPO / "scenarios" / "echo.yaml", pcap=str(out)) as lab:
        port = lab.port("lan0", name="tester")
        port.send(ARP(pdst="10.0.0.1", psrc="10.0.0.99"))
        alpha = port.expect("is-at and src host 10.0.0.1", timeout=10)[ARP].hwsrc
        port.send(Ether(dst=alpha) / IP(src="10.0.0.99", dst="10.0.0.1") / ICMP(id=9, seq=1))
        port.expect("echo-reply", timeout=10)
        port.send(Ether(dst=alpha) / IP(src="10.0.0.99", dst="10.0.0.1")
                  / UDP(sport=5000, dport=7) / b"lgnet")
        port.expect("udp and src port 7", timeout=10)
        live = lab.capture("lan0")
    def kind(p):
        if ARP in p:
            return "who-has" if p[ARP].op == 1 else "is-at"
        if ICMP in p:
            return "echo-request" if p[ICMP].type == 8 else "echo-reply"
        return "udp" if UDP in p else "other"

    # The ARP request is a broadcast: one send, two deliveries in slot order. Guests run
    # concurrently, so alpha's answer may be delivered before the copy for the other guest:
    # the first three frames are those three, the answer after the copy to alpha.
    arp = [(p.sender, p.receiver, kind(p)) for p in live[:3]]
    assert sorted(arp) == [("alpha", "tester", "is-at"), ("tester", "alpha", "who-has"),
                           ("tester", "beta", "who-has")]
    assert arp.index(("tester", "alpha", "who-has")) < arp.index(("alpha", "tester", "is-at"))
    broadcast = [p for p in live[:3] if kind(p) == "who-has"]
    assert [p.lgnet.receiver_slot for p in broadcast] == sorted(
        p.lgnet.receiver_slot for p in broadcast)
    assert [(p.sender, p.receiver, kind(p)) for p in live[3:]] == [
        ("tester", "alpha", "echo-request"), ("alpha", "tester", "echo-reply"),
        ("tester", "alpha", "udp"), ("alpha", "tester", "udp")]
    expected = [kind(p) for p in live]
    sends = [p.lgnet.send for p in live]
    assert broadcast[0].lgnet.send == broadcast[1].lgnet.send and len(set(sends)) == 6

    # The file on disk: the same frames, read back by scapy's own reader ...
    on_disk = rdpcap(str(out / "lan0.pcapng"))
    assert [bytes(p) for p in on_disk] == [bytes(p) for p in live]
    assert [p.comments[0].decode() for p in on_disk] == [p.lgnet.comment for p in live]
    assert [kind(p) for p in on_disk] == expected
    assert lgnet_shm() == []


@needs_tshark
def test_tshark_reads_the_known_exchange(tmp_path):
    out = tmp_path / "pcap"
    with lgnet.up(REPO / "scenarios" / "echo.yaml", pcap=str(out)) as lab:
        port = lab.port("lan0", name="tester")
        port.send(ARP(pdst="10.0.0.2", psrc="10.0.0.99"))
        beta = port.expect("is-at", timeout=10)[ARP].hwsrc
        port.send(Ether(dst=beta) / IP(src="10.0.0.99", dst="10.0.0.2") / ICMP(id=3, seq=1))
        port.expect("echo-reply", timeout=10)
    fields = subprocess.run(
        [TSHARK, "-r", str(out / "lan0.pcapng"), "-T", "fields", "-E", "separator=|",
         "-e", "frame.number", "-e", "_ws.col.Protocol", "-e", "_ws.col.Info",
         "-e", "frame.comment", "-e", "frame.interface_name"],
        capture_output=True, text=True, timeout=30)
    assert fields.returncode == 0, fields.stderr
    rows = [line.split("|") for line in fields.stdout.splitlines()]
    assert [r[1] for r in rows] == ["ARP", "ARP", "ARP", "ICMP", "ICMP"]
    # The broadcast's two copies and beta's answer, in some order (guests run concurrently),
    # the answer after the copy to beta; then the ping.
    who_has = [r for r in rows[:3] if "Who has 10.0.0.2? Tell 10.0.0.99" in r[2]]
    is_at = [r for r in rows[:3] if "10.0.0.2 is at" in r[2]]
    assert len(who_has) == 2 and len(is_at) == 1, rows
    to_beta = next(r for r in who_has if " -> beta slot " in r[3])
    assert rows.index(to_beta) < rows.index(is_at[0])
    assert "Echo (ping) request" in rows[3][2] and "Echo (ping) reply" in rows[4][2]
    for r in who_has:
        assert re.match(r"tester slot \d+ -> (alpha|beta) slot \d+ key lan0\+0x[0-9a-f]+ "
                        r"buffer 0 used_len 42 send 1 \(guest", r[3]), r[3]
    assert is_at[0][3].startswith("beta slot") and " -> tester slot " in is_at[0][3]
    assert {r[4] for r in rows} == {"lan0"}


def run_lgnet(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "lgnet", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


@needs_tshark
def test_lgnet_up_pcap_writes_one_file_per_net_that_tshark_lists(tmp_path):
    result = run_lgnet("up", "scenarios/python-guests.yaml", "--pcap", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(tmp_path)) == ["lan0.pcapng"]
    listed = subprocess.run([TSHARK, "-r", str(tmp_path / "lan0.pcapng")], capture_output=True,
                            text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    # Each of three guests: one broadcast (two deliveries) and one unicast to each peer.
    assert len(listed.stdout.splitlines()) == 12
    got = pcap.read_deliveries(tmp_path / "lan0.pcapng")
    assert sorted({(d.sender, d.receiver) for d in got}) == sorted(
        {(s, r) for s in ("alpha", "beta", "gamma") for r in ("alpha", "beta", "gamma") if s != r})
    assert len({d.send for d in got}) == 9                # 3 broadcasts + 6 unicasts
    broadcasts = [d for d in got if d.data[:6] == abi.BROADCAST_MAC]
    assert len(broadcasts) == 6 and len({d.send for d in broadcasts}) == 3


@needs_tshark
def test_three_unicorn_guests_pcap_lists_every_frame_they_sent(tmp_path):
    result = run_lgnet("up", "scenarios/three-guests.yaml", "--pcap", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.split("\nguest ", 1)[1].splitlines()[1:]
    sent = sum(int(row.split()[1]) for row in table if row.split()[:1] in (["alpha"], ["beta"],
                                                                            ["gamma"]))
    assert table[-1] == "capture: %s" % (tmp_path / "lan0.pcapng")
    listed = subprocess.run([TSHARK, "-r", str(tmp_path / "lan0.pcapng")], capture_output=True,
                            text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == sent > 0
    assert any("Echo (ping) request" in line for line in lines)
    assert any("Echo (ping) reply" in line for line in lines)


def test_lgnet_dump_follows_a_live_capture_then_reads_the_file(tmp_path):
    up = subprocess.Popen([sys.executable, "-m", "lgnet", "up", "scenarios/python-guests.yaml",
                           "--pcap", str(tmp_path)], cwd=REPO, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "lan0.pcapng").exists():
            assert time.monotonic() < deadline and up.poll() is None
            time.sleep(0.02)
        live = run_lgnet("dump", "lan0", "--pcap", tmp_path, "--follow", timeout=40)
        assert up.wait(20) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    lines = live.stdout.splitlines()
    assert live.returncode == 0 and len(lines) == 12, live.stdout + live.stderr
    assert re.match(r"^\s+1\s+0\.000000 02:00:0\d:00:00:00 > ff:ff:ff:ff:ff:ff \(0x88b5\) / Raw"
                    r"\s+\[(alpha|beta|gamma) slot \d -> "
                    r"(alpha|beta|gamma) slot \d key lan0\+0x[0-9a-f]+ buffer \d+ used_len 60 "
                    r"send \d+ \(guest \d+ pid \d+ -> guest \d+ pid \d+\)\]$", lines[0]), lines[0]
    again = run_lgnet("dump", tmp_path / "lan0.pcapng", "--count", 5)
    assert again.returncode == 0 and again.stdout.splitlines() == lines[:5]
    missing = run_lgnet("dump", "lan9", "--pcap", tmp_path)
    assert missing.returncode == 2 and "no capture of net 'lan9'" in missing.stderr


def test_lgnet_slots_shows_the_live_table(tmp_path):
    with lgnet.up(REPO / "scenarios" / "echo.yaml", capture=False) as lab:
        port = lab.port("lan0", promisc=True, mac="02:aa:00:00:00:01")
        table = run_lgnet("slots", lab.net_file("lan0"))
        pids = {run.name: run.process.pid for run in lab.guests}
        pids["port"] = port.run.process.pid
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0] == ["slot", "mac", "promisc", "lock", "guest", "holder", "pids"]
    by_pid = {int(r[5]): r for r in rows[1:]}
    assert set(by_pid) == set(pids.values())
    assert by_pid[pids["port"]][1:5] == ["03:aa:00:00:00:01", "yes", "held", "port0"]
    assert by_pid[pids["alpha"]][2:4] == ["no", "held"]
    assert sorted(int(r[0]) for r in rows[1:]) == [0, 1, 2]
