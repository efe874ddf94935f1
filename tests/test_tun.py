"""--tunnet: a real TAP interface between the host and a guest, in a network namespace the
test creates (so nothing of the machine's own network is touched). The host side pings the
guest with the kernel's own ICMP (a raw socket, as ping(8) does): ARP, echo request and reply
all cross the tun device and the Python guest's stack."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ENV, lgnet_shm

pytestmark = pytest.mark.timeout(60)
GUEST_UP_SECONDS = 20

# ping(8) in a few lines (the image may have no ping): exit 0 when every echo came back.
PING = r"""
import os, socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s & 0xFFFF) + (s >> 16)
    return ~(s + (s >> 16)) & 0xFFFF
dst, count = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(3)
ident, got = os.getpid() & 0xFFFF, 0
for seq in range(1, count + 1):
    echo = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"lgnet tun test!!"
    sock.sendto(echo[:2] + struct.pack("!H", csum(echo)) + echo[4:], (dst, 0))
    try:
        while True:
            data, (source, _) = sock.recvfrom(2048)
            kind, _, _, i, s = struct.unpack_from("!BBHHH", data, (data[0] & 15) * 4)
            if (kind, i, s, source) == (0, ident, seq, dst):
                got += 1
                break
    except socket.timeout:
        pass
print("%d/%d" % (got, count))
sys.exit(0 if got == count else 1)
"""


def sh(*cmd, check=True, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=check,
                          **kw)


@pytest.fixture
def netns():
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed (.ci/run installs it)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("this machine has no /dev/net/tun")
    name = "lgnet-test-%d" % os.getpid()
    made = sh("ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        pytest.skip("network namespaces are forbidden here: %s" % made.stderr.strip())
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def launchers(broker):
    procs = []

    def launch(ns, tunnet, *args):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "lgnet", "launch", "--verbose",
             "--broker", broker, "--no-console-input", "--tunnet", tunnet, "16", "python:",
             *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=ENV, text=True)
        procs.append(proc)
        deadline = time.monotonic() + GUEST_UP_SECONDS
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "answering ARP, ping and UDP echo" in line:
                return proc, seen
            assert time.monotonic() < deadline, seen
        raise AssertionError("the guest never came up: %s" % "".join(seen))

    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=10)


def ping(ns, address, count=3):
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", PING, address, str(count),
              check=False)


def test_a_ping_from_the_host_side_of_a_tap_reaches_a_python_guest(netns, launchers):
    proc, seen = launchers(netns, "10.9.0.1/24", "ip=10.9.0.2/24")
    assert any(line.startswith("lgnet: tun device tap0, host MAC") for line in seen), seen
    link = sh("ip", "netns", "exec", netns, "ip", "-br", "addr", "show", "tap0").stdout
    assert "UP" in link or "UNKNOWN" in link
    assert "10.9.0.1/24" in link
    result = ping(netns, "10.9.0.2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "3/3"
    # The host learnt the guest's MAC from the guest's ARP reply.
    neigh = sh("ip", "netns", "exec", netns, "ip", "neigh", "show", "10.9.0.2").stdout
    assert "lladdr 02:00:" in neigh
    proc.terminate()
    proc.wait(10)
    assert lgnet_shm() == []


def test_bridge_puts_the_tap_on_a_host_bridge(netns, launchers):
    sh("ip", "netns", "exec", netns, "ip", "link", "add", "lgbr0", "type", "bridge")
    sh("ip", "netns", "exec", netns, "ip", "addr", "add", "10.8.0.1/24", "dev", "lgbr0")
    sh("ip", "netns", "exec", netns, "ip", "link", "set", "lgbr0", "up")
    launchers(netns, "bridge:lgbr0", "ip=10.8.0.2/24")
    master = sh("ip", "netns", "exec", netns, "ip", "-o", "link", "show", "master", "lgbr0").stdout
    assert "tap0" in master, master
    deadline = time.monotonic() + 10         # the bridge port goes to forwarding
    while True:
        result = ping(netns, "10.8.0.2", 2)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_cap_net_admin_tunnet_is_a_clear_error(netns):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN")
    result = sh("ip", "netns", "exec", netns, "setpriv", "--bounding-set", "-net_admin",
                sys.executable, "-m", "lgnet", "launch", "--tunnet", "10.7.0.1/24", "16",
                "python:", check=False, env=ENV)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == ("lgnet: --tunnet needs CAP_NET_ADMIN (configuring "
                                     "/dev/net/tun: Operation not permitted)")
    assert lgnet_shm() == []
