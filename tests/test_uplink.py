"""Uplinks: a net that leaves its host through a TAP in a kernel bridge, and, joined by VXLAN,
one net across two "hosts" — two network namespaces this test creates, joined by a veth pair
with addresses of their own (10.254.0.1 and .2, MTU 1550 so 1514-byte frames fit in VXLAN's
50 more). Each host runs its own lab (`ip netns exec NS python -m lgnet up ...`: its own broker
and private runtime directory), uplinked to a bridge br0 in its namespace; the shipped
scenarios/two-hosts-{a,b}.yaml create the VXLAN ports themselves. Every name lives inside the
test's own namespaces (unique per run), every address too, and the fixtures remove them on
every exit path."""
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ENV, REPO
from lgnet.fabric import capture

pytestmark = pytest.mark.timeout(150)
SCENARIOS = REPO / "scenarios"
UP_SECONDS = 40
RUN_SECONDS = 90
_serial = itertools.count()

# Count the frames of one ethertype the lab writes into a TAP (the kernel "receives" them on
# it), by destination MAC, for SECONDS.
SNIFF = r"""
import collections, json, socket, sys, time
iface, ethertype, seconds = sys.argv[1], int(sys.argv[2], 0), float(sys.argv[3])
ETH_P_ALL = 3      # a bridge port's frames are the bridge's: only ETH_P_ALL taps see them
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
sock.bind((iface, 0))
sock.settimeout(0.1)
print("listening", flush=True)
seen = collections.Counter()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        data, address = sock.recvfrom(2048)
    except socket.timeout:
        continue
    if address[2] != socket.PACKET_OUTGOING and int.from_bytes(data[12:14], "big") == ethertype:
        seen[data[:6].hex(":")] += 1
print(json.dumps(seen))
"""


def sh(*cmd, check=True):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=check)


def in_ns(ns, *cmd, check=True):
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


def links(ns) -> list[str]:
    """The interface names in a namespace."""
    out = sh("ip", "-n", ns, "-o", "link", "show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def ns_pids(ns) -> list[str]:
    return sh("ip", "netns", "pids", ns, check=False).stdout.split()


def new_namespace(made: list) -> str:
    name = "lgnet-up-%d-%d" % (os.getpid(), next(_serial))
    done = sh("ip", "netns", "add", name, check=False)
    if done.returncode != 0:
        pytest.skip("network namespaces are forbidden here: %s" % done.stderr.strip())
    made.append(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


@pytest.fixture
def namespaces():
    """new() -> a fresh namespace; all of them (and whatever still runs in them) go at the end."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed (.ci/run installs it)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("this machine has no /dev/net/tun")
    made: list[str] = []
    yield lambda: new_namespace(made)
    for ns in made:
        for pid in ns_pids(ns):          # only ever processes this test started in its own ns
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def two_hosts(namespaces):
    """(A, B): namespaces joined by veth0 (10.254.0.1/24, 10.254.0.2/24), each with a bridge br0."""
    a, b = namespaces(), namespaces()
    sh("ip", "-n", a, "link", "add", "veth0", "mtu", "1550", "type", "veth", "peer", "name",
       "veth0", "mtu", "1550", "netns", b)
    for ns, address in ((a, "10.254.0.1/24"), (b, "10.254.0.2/24")):
        sh("ip", "-n", ns, "addr", "add", address, "dev", "veth0")
        sh("ip", "-n", ns, "link", "set", "veth0", "up")
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
    return a, b


class LabProcess:
    """`lgnet up` running inside a namespace; its output collected line by line."""

    def __init__(self, ns: str, scenario, pcap: Path, *extra: str):
        self.ns = ns
        self.pcap = pcap
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "lgnet", "up", str(scenario),
             "--pcap", str(pcap), *extra], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=ENV)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, *needles: str, timeout: float = UP_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while not all(any(n in line for line in self.lines) for n in needles):
            assert self.proc.poll() is None, "lab ended early:\n" + self.text
            assert time.monotonic() < deadline, "waited for %s:\n%s" % (needles, self.text)
            time.sleep(0.05)

    def finish(self, timeout: float = RUN_SECONDS) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.finish(30)

    def deliveries(self):
        return capture.read_deliveries(str(self.pcap / "lan0.pcapng"))


@pytest.fixture
def labs():
    started: list[LabProcess] = []

    def start(*args) -> LabProcess:
        lab = LabProcess(*args)
        started.append(lab)
        return lab

    yield start
    for lab in started:
        if lab.proc.poll() is None:
            lab.proc.kill()
        lab.proc.wait(10)


def ethertype(d) -> int:
    return int.from_bytes(d.data[12:14], "big")


def icmp_type(d) -> int | None:
    """8 echo request, 0 echo reply; None for a frame that is not ICMP over IPv4."""
    if ethertype(d) != 0x0800 or d.data[23] != 1:
        return None
    return d.data[14 + (d.data[14] & 15) * 4]


def host_b_up(labs, b, tmp_path, scenario=SCENARIOS / "two-hosts-b.yaml") -> LabProcess:
    lab = labs(b, scenario, tmp_path / "b")
    lab.wait_for("uplink:lan0: lgnet port: up", "kilo: net0: ip 10.0.0.11",
                 "lima: eth0: 10.0.0.12/24: answering")
    return lab


def left_behind(ns: str, pids: list[str]) -> list[str]:
    """What a stopped lab left in its namespace: processes, netdevs, guest RAM in /dev/shm."""
    left = ["process %s" % p for p in ns_pids(ns)]
    left += [name for name in links(ns) if name not in ("lo", "veth0", "br0")]
    left += [n for n in os.listdir("/dev/shm") for p in pids if n.startswith("lgnet-%s-" % p)]
    return left


def test_a_guest_on_host_a_pings_guests_on_host_b_across_vxlan(two_hosts, labs, tmp_path):
    a, b = two_hosts
    lab_b = host_b_up(labs, b, tmp_path)
    b_pids = ns_pids(b)
    lab_a = labs(a, SCENARIOS / "two-hosts-a.yaml", tmp_path / "a")
    assert lab_a.finish() == 0, lab_a.text
    for target in ("10.0.0.11", "10.0.0.12"):         # kilo (bundled kernel), lima (Python)
        assert "--- %s ping statistics ---" % target in lab_a.text
    assert lab_a.text.count("5 packets transmitted, 5 received, 0% packet loss") == 2, lab_a.text
    assert "came in, but a guest here has that MAC" not in lab_a.text + lab_b.text
    # The results table has a row for the uplink, and the line of what crossed it.
    assert any(line.startswith("uplink:lan0 ") for line in lab_a.lines), lab_a.text
    assert any(line.startswith("uplink:lan0: tap0 in bridge br0") and "vxlan lgvx42 to "
               "10.254.0.2 over veth0: out " in line for line in lab_a.lines), lab_a.text

    # Host A's capture: alpha's echo requests go to the uplink, the replies come from it.
    seen_a = lab_a.deliveries()
    assert sum(d.sender == "alpha" and d.receiver == "uplink:lan0" and icmp_type(d) == 8
               for d in seen_a) == 10
    assert sum(d.sender == "uplink:lan0" and d.receiver == "alpha" and icmp_type(d) == 0
               for d in seen_a) == 10
    # Host B's: they come in through its uplink to kilo and lima, the replies go back out.
    seen_b = lab_b.deliveries()
    for guest in ("kilo", "lima"):
        assert sum(d.sender == "uplink:lan0" and d.receiver == guest and icmp_type(d) == 8
                   for d in seen_b) == 5
        assert sum(d.sender == guest and d.receiver == "uplink:lan0" and icmp_type(d) == 0
                   for d in seen_b) == 5
    # bravo's one broadcast (the Python driver's own ethertype) reached each guest of B once.
    bcast = [d for d in seen_b if ethertype(d) == 0x88B5]
    assert sorted(d.receiver for d in bcast) == ["kilo", "lima"], bcast
    assert all(d.sender == "uplink:lan0" and d.data[:6] == b"\xff" * 6 for d in bcast)

    assert lab_b.stop() == 130
    assert any(line.startswith("uplink:lan0 ") and line.endswith("stopped by the lab")
               for line in lab_b.lines), lab_b.text
    assert left_behind(b, b_pids) == []
    assert left_behind(a, []) == []


def test_stopping_host_b_leaves_host_a_running_and_its_sends_go_nowhere(two_hosts, labs,
                                                                         tmp_path):
    a, b = two_hosts
    scenario = tmp_path / "pinger.yaml"
    scenario.write_text(
        "networks:\n"
        "  lan0:\n"
        "    uplink: {bridge: br0, vxlan: {id: 42, remote: 10.254.0.2, dev: veth0}}\n"
        "guests:\n"
        "  - {name: alpha, kernel: bundled, nets: [lan0],\n"
        "     cmdline: ip=10.0.0.1/24 ping=10.0.0.11 count=40 interval=150 timeout=500}\n")
    lab_b = host_b_up(labs, b, tmp_path)
    b_pids = ns_pids(b)
    lab_a = labs(a, scenario, tmp_path / "a")
    lab_a.wait_for("icmp_seq=3 ")
    assert lab_b.stop() == 130
    stopped = time.time()
    assert left_behind(b, b_pids) == []
    assert lab_a.proc.poll() is None, lab_a.text          # host A carries on
    assert lab_a.finish() == 0, lab_a.text                 # no guest killed, no crash
    statistics = [l for l in lab_a.lines if "packets transmitted" in l]
    assert len(statistics) == 1 and statistics[0].startswith("alpha: 40 packets transmitted")
    assert "100% packet loss" not in statistics[0] and " 0% packet loss" not in statistics[0]
    seen = lab_a.deliveries()
    later = [d for d in seen if d.time > stopped + 0.5]
    # alpha kept sending, its uplink kept taking the requests out; nothing answered them.
    assert sum(d.sender == "alpha" and d.receiver == "uplink:lan0" and icmp_type(d) == 8
               for d in later) >= 5
    assert not [d for d in later if d.sender == "uplink:lan0" and icmp_type(d) == 0]
    assert left_behind(a, []) == []


def test_without_cap_net_admin_the_uplink_is_a_clear_error(two_hosts, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN")
    a, _ = two_hosts
    result = in_ns(a, "setpriv", "--bounding-set", "-net_admin", "env",
                   "PYTHONPATH=%s" % REPO, sys.executable, "-m", "lgnet", "up",
                   "scenarios/two-hosts-a.yaml", "--pcap", str(tmp_path / "a"), check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "lgnet: the uplink of lan0 (a TAP in bridge br0, VXLAN 42 to 10.254.0.2 over veth0) "
        "needs CAP_NET_ADMIN, to create a TAP device and a VXLAN port and add them to a "
        "bridge: run lgnet as root, e.g. in a network namespace (ip netns exec NS lgnet up "
        "scenarios/two-hosts-a.yaml)")
    assert left_behind(a, []) == []


def test_the_host_reaches_guests_through_an_uplink_and_local_frames_stay_home(namespaces, labs,
                                                                             tmp_path):
    ns = namespaces()
    sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", ns, "addr", "add", "10.6.0.254/24", "dev", "br0")
    sh("ip", "-n", ns, "link", "set", "br0", "up")
    net = tmp_path / "lan0.net"
    scenario = tmp_path / "one-host.yaml"
    scenario.write_text(
        "networks:\n"
        "  lan0: {file: %s}\n"              # the uplink comes from the command line
        "guests:\n"
        "  - {name: alpha, kernel: bundled, nets: [lan0], cmdline: ip=10.6.0.1/24}\n"
        "  - {name: bravo, driver: python, nets: [lan0], ip: 10.6.0.2/24}\n"
        "  - name: charlie\n"
        "    driver: python\n"
        "    nets: [lan0]\n"
        "    script: [{wait: 2.0}, {send: peers, net: lan0}, {send: broadcast, net: lan0}]\n"
        % net)
    lab = labs(ns, scenario, tmp_path / "cap", "--uplink", "lan0=bridge:br0")
    lab.wait_for("uplink:lan0: lgnet port: up")
    sniffer = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SNIFF, "tap0",
                                "0x88b5", "8"], stdout=subprocess.PIPE, text=True)
    assert sniffer.stdout.readline().strip() == "listening"
    lab.wait_for("bravo: eth0: 10.6.0.2/24: answering", "alpha: net0: ip 10.6.0.1",
                 "charlie: eth0: broadcast reached 3 peers")
    uplink_mac = next(l for l in lab.lines if "uplink:lan0: lgnet port: up" in l).split()[-1]
    # charlie's unicast frames to alpha and bravo stayed on the net; the one to the uplink's
    # own MAC (the TAP's) and the broadcast went out into the bridge.
    out, _ = sniffer.communicate(timeout=20)
    assert json.loads(out.strip().splitlines()[-1]) == {uplink_mac: 1, "ff:ff:ff:ff:ff:ff": 1}

    from test_tun import ping
    for guest in ("10.6.0.1", "10.6.0.2"):
        result = ping(ns, guest, 2)
        assert result.returncode == 0, result.stdout + result.stderr
    slots = in_ns(ns, sys.executable, "-m", "lgnet", "slots", str(net)).stdout
    row = next(line for line in slots.splitlines() if uplink_mac[3:] in line)
    assert row.split()[2] == "yes" and row.endswith("(uplink: tap0 in bridge br0)"), slots

    assert lab.stop() == 130
    summary = next(l for l in lab.lines if l.startswith("uplink:lan0: tap0 in bridge br0"))
    assert ": out " in summary and ", in " in summary
    assert left_behind(ns, []) == []


# Host A's side as a test would write it: a host port (lgnet.up + lab.port) on a net whose
# uplink reaches host B; ARP, then UDP echo from kilo (the bundled kernel) and lima (Python).
PORT_ACROSS = r"""
import sys
import lgnet
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
with lgnet.up(sys.argv[1]) as lab:
    port = lab.port("lan0")
    for target in ("10.0.0.11", "10.0.0.12"):
        port.send(ARP(pdst=target, psrc="10.0.0.99"))
        mac = port.expect("is-at and src host %s" % target, timeout=10)[ARP].hwsrc
        port.send(Ether(dst=mac) / IP(src="10.0.0.99", dst=target)
                  / UDP(sport=4242, dport=7) / b"across")
        echo = port.expect("udp port 7 and src host %s" % target, timeout=10)
        print(target, mac, echo[UDP].load.decode())
"""


def test_a_host_port_on_host_a_sees_host_b_like_local_guests(two_hosts, labs, tmp_path):
    a, b = two_hosts
    scenario = tmp_path / "port-side.yaml"
    scenario.write_text(
        "networks:\n"
        "  lan0:\n"
        "    uplink: {bridge: br0, vxlan: {id: 42, remote: 10.254.0.2, dev: veth0}}\n"
        "guests:\n"
        "  - {name: alpha, driver: python, nets: [lan0], ip: 10.0.0.1/24}\n")
    lab_b = host_b_up(labs, b, tmp_path)
    result = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", PORT_ACROSS,
                             str(scenario)], capture_output=True, text=True, timeout=90, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["10.0.0.11", "10.0.0.12"]
    assert all(line.split()[2] == "across" for line in lines)
    # Host B numbers its guests from 256: MACs 02:00:<id le16>:00:00 with a second byte of 01.
    assert all(line.split()[1].startswith("02:00:") and line.split()[1][9:11] == "01"
               for line in lines), lines
    assert lab_b.stop() == 130
    assert left_behind(a, []) == []


def test_two_hosts_numbering_guests_alike_hear_of_the_mac_clash(two_hosts, labs, tmp_path):
    a, b = two_hosts
    same_ids = tmp_path / "b-from-0.yaml"
    same_ids.write_text((SCENARIOS / "two-hosts-b.yaml").read_text().replace(
        "first_guest_id: 256\n", ""))
    lab_b = host_b_up(labs, b, tmp_path, same_ids)
    lab_a = labs(a, SCENARIOS / "two-hosts-a.yaml", tmp_path / "a")
    lab_a.finish()
    clashes = [line for line in lab_a.lines + lab_b.lines if "came in, but a guest here" in line]
    assert clashes and all(line.startswith("uplink:lan0: lgnet uplink: a frame from 02:00:0")
                           and line.endswith("give each host's lab its own guest ids "
                                             "(first_guest_id:)") for line in clashes), clashes
    lab_b.stop()


# The Python API in host A's namespace: the uplink's Launcher dies by SIGKILL (so it cannot
# remove its VXLAN port); the lab, stopping, removes what it left.
KILL_UPLINK = r"""
import os, sys
from lgnet.lab import Lab
lab = Lab(sys.argv[1])
try:
    lab.start()
    link = lab.uplinks[0]
    link.run.kill()
    link.run.wait(10)
    print(os.path.exists("/sys/class/net/lgvx42"))
finally:
    lab.stop()
print(os.path.exists("/sys/class/net/lgvx42"))
"""


def test_a_sigkilled_uplink_leaves_no_vxlan_port_behind(two_hosts, tmp_path):
    a, _ = two_hosts
    result = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", KILL_UPLINK,
                             str(SCENARIOS / "two-hosts-a.yaml")], capture_output=True, text=True,
                            timeout=60, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["True", "False"]
    assert left_behind(a, []) == []


def test_a_sigkilled_lab_leaves_nothing_behind_in_its_namespace(two_hosts, labs, tmp_path):
    a, _ = two_hosts
    lab = labs(a, SCENARIOS / "two-hosts-b.yaml", tmp_path / "a")   # serves until stopped
    lab.wait_for("uplink:lan0: lgnet port: up", "lima: eth0: 10.0.0.12/24: answering")
    pids = ns_pids(a)
    assert "lgvx42" in links(a)
    lab.proc.kill()                       # the lab's children are told (PDEATHSIG, the pipe)
    # Removing a netdev waits for the kernel's rtnl lock, which namespaces being torn down
    # (this suite's, or anyone's) can hold for seconds on a loaded machine.
    deadline = time.monotonic() + 60
    while left_behind(a, pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left_behind(a, pids) == [], [open("/proc/%s/cmdline" % p).read() for p in ns_pids(a)]


def test_a_vxlan_port_over_too_small_an_mtu_warns_what_will_not_fit(two_hosts, labs, tmp_path):
    a, _ = two_hosts
    sh("ip", "-n", a, "link", "set", "veth0", "mtu", "1500")
    lab = labs(a, SCENARIOS / "two-hosts-a.yaml", tmp_path / "a", "--duration", "2")
    lab.finish()
    assert ("uplink:lan0: lgnet: vxlan lgvx42 over veth0 (MTU 1500) carries frames of at most "
            "1464 bytes, lguest_net's are up to 1514: raise the MTU of veth0 to 1550 on both "
            "hosts") in lab.lines, lab.text
    assert left_behind(a, []) == []


def test_an_uplink_to_a_missing_bridge_is_a_clear_error(namespaces, tmp_path):
    ns = namespaces()
    result = in_ns(ns, "env", "PYTHONPATH=%s" % REPO, sys.executable, "-m", "lgnet", "up",
                   str(SCENARIOS / "two-hosts-b.yaml"), "--uplink", "lan0=bridge:br9",
                   check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "lgnet: the uplink of lan0 (a TAP in bridge br9) did not come up: lgnet: --tunnet: "
        "can't add tap0 to bridge br9: No such device")
    assert left_behind(ns, []) == []
