"""`lgnet dump` and `lgnet slots` refuse what they cannot read, take filters, and say who is
who; a capture file has one writer (two labs on one --pcap DIR)."""
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from scapy.layers.l2 import ARP
from scapy.utils import PcapReader, wrpcap

import lgnet
from conftest import ENV, REPO, lgnet_shm
from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.fabric import capture as pcap
from test_filters import FRAMES, NAMES, RAW

pytestmark = pytest.mark.timeout(90)

TCPDUMP = shutil.which("tcpdump")
TSHARK = shutil.which("tshark")
ECHO_REQUEST = "icmp[icmptype] == icmp-echo"

PINGING = """
networks: {lan0: {}}
guests:
  - {name: alpha, driver: python, nets: [lan0], ip: 10.0.0.1/24}
  - name: beta
    driver: python
    nets: [lan0]
    ip: 10.0.0.2/24
    script: [{ping: 10.0.0.1, count: 3}]
"""


def run_lgnet(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "lgnet", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def lgnet_pcapng(path, frames=RAW):
    """A capture as the broker writes it: every frame with its lguest facts."""
    blocks = [pcap.section_header("test"), pcap.interface_description("lan0", "test")]
    for n, data in enumerate(frames):
        facts = pcap.format_facts("alpha", 0, "beta", 1, "lan0", 4, n % 8, len(data), n + 1,
                                  len(data), (0, 1), (100, 101))
        blocks.append(pcap.enhanced_packet(1_700_000_000 * 10**9 + n * 1000, data, len(data),
                                           facts))
    path.write_bytes(b"".join(blocks))
    return path


def numbers(output: str) -> list[int]:
    return [int(line.split()[0]) for line in output.splitlines()]


# --- what dump reads ---------------------------------------------------------------------

def test_dump_reads_lgnet_pcapng_with_its_facts(tmp_path):
    result = run_lgnet("dump", lgnet_pcapng(tmp_path / "f.pcapng"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(RAW)
    assert re.match(r"^\s+1\s+0\.000000 Ether / ARP who has 10\.0\.0\.2 says 10\.0\.0\.1\s+"
                    r"\[alpha slot 0 -> beta slot 1 key lan0\+0x4 buffer 0 ", lines[0]), lines[0]


def test_dump_reads_a_classic_pcap(tmp_path):
    path = tmp_path / "f.pcap"
    wrpcap(str(path), [FRAMES[n] for n in NAMES])
    result = run_lgnet("dump", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(RAW) and "ARP who has 10.0.0.2" in lines[0]
    assert "[" not in lines[0]                      # no lguest facts in a foreign capture


@pytest.mark.parametrize("content, found", [
    (b"# lgnet\n\nSome text.\n", "it is text ('# lgnet')"),
    (b"", "it is an empty file"),
    (b"\x7fELF\x01\x01\x01" + bytes(11) + b"\x03\x00" + bytes(40),
     "it is a 32-bit i386 ELF file"),
])
def test_dump_refuses_what_is_not_a_capture(tmp_path, content, found):
    path = tmp_path / "notes"
    path.write_bytes(content)
    result = run_lgnet("dump", path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "lgnet: %s is not a capture (pcapng or pcap): %s" % (
        path, found)


def test_dump_of_readme_exits_2(tmp_path):
    result = run_lgnet("dump", REPO / "README.md", "--count", "0")
    assert result.returncode == 2 and "is not a capture" in result.stderr


@pytest.mark.parametrize("kind", ["pcapng", "pcap"])
def test_dump_prints_what_is_whole_of_a_truncated_capture_then_exits_2(tmp_path, kind):
    path = tmp_path / ("f." + kind)
    if kind == "pcapng":
        lgnet_pcapng(path, RAW[:3])
    else:
        wrpcap(str(path), [FRAMES[n] for n in NAMES[:3]])
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])
    result = run_lgnet("dump", path)
    assert result.returncode == 2
    assert numbers(result.stdout) == [1, 2]
    assert re.fullmatch(r"lgnet: %s is truncated: \d+ bytes after its last whole frame "
                        r"\(at byte \d+\)" % re.escape(str(path)), result.stderr.strip())


def test_dump_count_0_prints_nothing_and_count_n_stops_after_n(tmp_path):
    path = lgnet_pcapng(tmp_path / "f.pcapng")
    nothing = run_lgnet("dump", path, "--count", "0")
    assert nothing.returncode == 0 and nothing.stdout == ""
    two = run_lgnet("dump", path, "udp", "--count", "2")
    assert two.returncode == 0 and numbers(two.stdout) == [6, 7]
    as_tcpdump = run_lgnet("dump", path, "--count", "2", "udp", "and", "src", "port", "7")
    assert as_tcpdump.returncode == 0 and numbers(as_tcpdump.stdout) == [7], as_tcpdump.stderr
    negative = run_lgnet("dump", path, "--count", "-1")
    assert negative.returncode == 2 and "--count" in negative.stderr


def test_dump_filter_errors_exit_2_with_libpcap_s_message(tmp_path):
    result = run_lgnet("dump", lgnet_pcapng(tmp_path / "f.pcapng"), "icmp and")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("lgnet: filter 'icmp and': libpcap: can't parse filter "
                                     "expression: syntax error")


@pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed (.ci/run installs it)")
@pytest.mark.parametrize("expression", [ECHO_REQUEST, "udp port 7", "vlan and icmp",
                                        "icmp or arp and host 10.0.0.2", "lgnet"])
def test_dump_with_a_filter_prints_what_tcpdump_lists_in_order(tmp_path, expression):
    path = lgnet_pcapng(tmp_path / "f.pcapng")
    result = run_lgnet("dump", path, lgnet.filters.expand(expression)
                       if expression == "lgnet" else expression)
    assert result.returncode == 0, result.stderr
    listed = subprocess.run([TCPDUMP, "-r", str(path), "-w", "-",
                             lgnet.filters.expand(expression)], capture_output=True, timeout=20)
    kept = [bytes(p) for p in PcapReader(io.BytesIO(listed.stdout))]
    assert [RAW[n - 1] for n in numbers(result.stdout)] == kept and kept


@pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed (.ci/run installs it)")
def test_done_when_dump_of_a_real_lab_lists_tcpdump_s_echo_requests(tmp_path):
    scenario = tmp_path / "ping.yaml"
    scenario.write_text(textwrap.dedent(PINGING))
    with lgnet.up(scenario, pcap=tmp_path / "pcap") as lab:
        assert lab.guest("beta").wait(30) == 0         # alpha serves on until the lab stops
    capture = tmp_path / "pcap" / "lan0.pcapng"
    ours = run_lgnet("dump", capture, ECHO_REQUEST)
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run([TCPDUMP, "-nn", "-tt", "-r", str(capture), ECHO_REQUEST],
                            capture_output=True, text=True, timeout=20)
    assert theirs.returncode == 0, theirs.stderr
    # tcpdump: "1764625000.123456 IP 10.0.0.2 > 10.0.0.1: ICMP echo request, id 0, seq 1, ..."
    seqs = [int(re.search(r"seq (\d+)", line).group(1)) for line in theirs.stdout.splitlines()]
    assert seqs == [1, 2, 3]
    lines = ours.stdout.splitlines()
    assert len(lines) == 3 and all("echo-request" in line for line in lines)
    every = [d.data for d in pcap.read_deliveries(capture)]
    ours_frames = [every[n - 1] for n in numbers(ours.stdout)]
    assert [int.from_bytes(f[40:42], "big") for f in ours_frames] == seqs   # ICMP seq


# --- slots ----------------------------------------------------------------------------

def test_slots_refuses_a_file_that_is_not_a_net_page(tmp_path):
    result = run_lgnet("slots", REPO / "README.md")
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(r"lgnet: \S+README\.md is not a net file \(one 4096-byte page of 682 "
                        r"MAC slots\): it is text \('# lgnet'\) of \d+ bytes",
                        result.stderr.strip()), result.stderr
    missing = run_lgnet("slots", "lan7", "--lab", tmp_path)
    assert missing.returncode == 2 and "no net 'lan7' in the lab at" in missing.stderr


def test_slots_finds_a_running_lab_s_net_by_name_and_shows_guest_names():
    with lgnet.up(REPO / "scenarios" / "echo.yaml", capture=False) as lab:
        port = lab.port("lan0", name="spy")
        by_lab = run_lgnet("slots", "lan0", "--lab", lab.runtime)
        by_path = run_lgnet("slots", lab.net_file("lan0"))
        pids = {run.name: run.process.pid for run in lab.guests + [port.run]}
    assert by_lab.returncode == 0, by_lab.stderr
    assert by_lab.stdout == by_path.stdout
    rows = {line.split()[4]: line.split() for line in by_lab.stdout.splitlines()[1:]}
    assert set(rows) == {"alpha", "beta", "spy"}
    for name, row in rows.items():
        assert row[3] == "held" and row[5] == str(pids[name])


def test_lgnet_up_says_where_its_net_files_are_and_slots_reads_them_with_names():
    up = subprocess.Popen([sys.executable, "-m", "lgnet", "up", str(REPO / "scenarios" /
                          "echo.yaml"), "--duration", "30"], cwd=REPO, env=ENV,
                          stdout=subprocess.PIPE, text=True)
    try:
        said = {}
        for line in up.stdout:
            m = re.match(r"^lgnet up: runtime directory (\S+) \(broker socket (\S+)\)$", line)
            if m:
                said["runtime"], said["socket"] = m.groups()
            m = re.match(r"^lgnet up: net lan0: (\S+) \(`lgnet slots lan0`\)$", line)
            if m:
                said["net"] = m.group(1)
                break
        assert said["net"] == os.path.join(said["runtime"], "lan0.net")
        assert said["socket"] == os.path.join(said["runtime"], "broker.sock")
        deadline = time.monotonic() + 20
        while True:
            table = run_lgnet("slots", "lan0", "--lab", said["runtime"])
            guests = [line.split()[4] for line in table.stdout.splitlines()[1:]]
            if sorted(guests) == ["alpha", "beta"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert table.returncode == 0 and sorted(guests) == ["alpha", "beta"], table.stdout
        assert run_lgnet("slots", said["net"]).stdout == table.stdout
    finally:
        up.terminate()
        up.communicate(timeout=20)


# --- one writer per capture file ---------------------------------------------------------

def test_two_labs_on_one_pcap_dir_the_second_is_refused_with_the_first_s_pid(tmp_path):
    keep = tmp_path / "pcap"
    scenario = tmp_path / "ping.yaml"
    scenario.write_text(textwrap.dedent(PINGING))
    first = subprocess.Popen([sys.executable, "-m", "lgnet", "up", str(REPO / "scenarios" /
                              "echo.yaml"), "--pcap", str(keep), "--duration", "30"],
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("lgnet up: capture of lan0"):
                break
        second = run_lgnet("up", scenario, "--pcap", keep)
        with pytest.raises(LgnetError) as caught:
            with lgnet.up(scenario, pcap=keep):
                pass
        assert pcap.writer_active(keep / "lan0.pcapng")
        writer = pcap.writer_pid(keep / "lan0.pcapng")
    finally:
        first.terminate()
        first.communicate(timeout=20)
    assert second.returncode == 2, second.stdout + second.stderr
    message = ("capture %s is being written by another lgnet broker (pid %d): one file has "
               "one writer; give this lab a --pcap DIR of its own" % (keep / "lan0.pcapng",
                                                                      writer))
    assert second.stderr.strip() == "lgnet: " + message
    assert str(caught.value) == message
    assert writer != first.pid and writer is not None              # the first lab's broker
    if TSHARK:
        listed = subprocess.run([TSHARK, "-r", str(keep / "lan0.pcapng")], capture_output=True,
                                text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
    assert lgnet_shm() == []


def test_two_labs_at_once_on_one_pcap_dir_with_their_own_nets_both_valid(tmp_path):
    keep = tmp_path / "pcap"
    other = tmp_path / "other.yaml"
    other.write_text(textwrap.dedent(PINGING).replace("lan0", "lan1"))
    with lgnet.up(REPO / "scenarios" / "echo.yaml", pcap=keep) as one, \
            lgnet.up(other, pcap=keep) as two:
        port = one.port("lan0")
        port.send(ARP(pdst="10.0.0.1", psrc="10.0.0.99"))
        port.expect("is-at", timeout=10)
        assert two.guest("beta").wait(30) == 0
    for name in ("lan0", "lan1"):
        assert pcap.read_deliveries(keep / (name + ".pcapng"))
        if TSHARK:
            listed = subprocess.run([TSHARK, "-r", str(keep / (name + ".pcapng"))],
                                    capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0 and listed.stdout, listed.stderr


def test_a_broker_claims_its_named_captures_and_a_second_one_is_refused(tmp_path):
    net = str(tmp_path / "lan0.net")
    first = pcap.Capture(str(tmp_path / "pcap"), {net: "lan0"})
    try:
        with pytest.raises(pcap.CaptureBusy) as caught:
            pcap.Capture(str(tmp_path / "pcap"), {net: "lan0"})
        assert caught.value.pid == os.getpid()
        # An unnamed net whose file another writer holds gets a name of its own.
        fd = os.open(net, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, abi.PAGE_SIZE)
            stranger = pcap.Capture(str(tmp_path / "pcap"))
            stranger.learn_net((1, 2), fd)
            assert [c.path for c in stranger.nets.values()] == [
                str(tmp_path / "pcap" / "lan0-2.pcapng")]
            stranger.close()
        finally:
            os.close(fd)
    finally:
        first.close()
    # The refused broker left the first one's file alone: header intact, readable.
    assert pcap.Reader(tmp_path / "pcap" / "lan0.pcapng").interfaces == [] and \
        list(pcap.read_capture(tmp_path / "pcap" / "lan0.pcapng")) == []


@pytest.mark.timeout(15)
def test_a_lab_socket_that_never_answers_does_not_hang_the_query(tmp_path):
    """A socket named like a broker's that accepts and stays silent (a stopped broker, or
    another program's) gives no guest names, after QUERY_SECONDS, instead of a hang."""
    import socket as socketlib
    from lgnet import lab as labmod
    path = str(tmp_path / "broker.sock")
    silent = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_SEQPACKET)
    silent.bind(path)
    silent.listen(1)
    try:
        assert labmod.guest_names(path) == {}
    finally:
        silent.close()
