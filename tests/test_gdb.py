"""gdb into a Unicorn guest: Debian's gdb, in batch mode, against a guest of a running lab,
and the remote protocol spoken by hand where gdb's batch mode cannot reach (^C, re-attach,
kill). Real processes throughout: the broker, bundled-kernel launchers, gdb."""
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from elftools.elf.elffile import ELFFile
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from conftest import ENV, REPO, lgnet_shm
from lgnet.guest.images import BUNDLED_KERNEL
from lgnet.lab import Lab
from lgnet.scenario import load_scenario

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(shutil.which("gdb") is None,
                                 reason="gdb is not installed (.ci/run installs it)")]

BREAK_AT = "net_xmit"                 # the bundled kernel's lguest_net transmit
FLOOD = 20                            # frames sent to the held guest: more than its buffers
SECONDS = 60


def symbol(name: str) -> int:
    with open(BUNDLED_KERNEL, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


def wait_for(what, condition, timeout=SECONDS):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def counters(lab: Lab) -> dict:
    lab.collect()
    return {run.name: dict(run.stats) for run in lab.guests}


def grown(before: dict, after: dict, guest: str, counter: str) -> int:
    return after[guest].get(counter, 0) - before[guest].get(counter, 0)


THREE_GUESTS = """
networks: {lan0: {}}
guests:
  - {name: alpha, kernel: bundled, nets: [lan0],
     cmdline: ip=10.0.0.1/24 peers=2 ping=10.0.0.2 count=100000 interval=50}
  - {name: beta, kernel: bundled, nets: [lan0],
     cmdline: ip=10.0.0.2/24 peers=2 ping=10.0.0.1 count=100000 interval=50}
  - {name: gamma, kernel: bundled, nets: [lan0], gdb: 0,
     cmdline: ip=10.0.0.3/24 peers=2 ping=10.0.0.1 count=100000 interval=100}
"""


def test_gdb_breaks_in_the_net_driver_of_a_running_guest_while_its_peers_ping_on(tmp_path):
    (tmp_path / "lab.yaml").write_text(THREE_GUESTS)
    stopped, go = tmp_path / "stopped", tmp_path / "go"
    with Lab(load_scenario(tmp_path / "lab.yaml")) as lab:
        gamma = lab.guest("gamma")
        wait_for("gamma's first ping reply",
                 lambda: "64 bytes from 10.0.0.1" in gamma.console_text)
        port = lab.port("lan0")               # sends to gamma while gdb holds it
        gamma_mac = re.search(r"net0: slot \d+, mac (\S+),", gamma.console_text).group(1)
        gdb = subprocess.Popen(
            ["gdb", "-nx", "-batch", "-ex", "file %s" % BUNDLED_KERNEL,
             "-ex", "target remote :%d" % gamma.gdb_port, "-ex", "break %s" % BREAK_AT,
             "-ex", "continue",
             "-ex", "shell touch %s" % stopped,
             "-ex", "shell while [ ! -e %s ]; do sleep 0.05; done" % go,
             "-ex", "info registers eip", "-ex", "p/x $esp", "-ex", "x/4x $esp",
             "-ex", "info symbol *(unsigned int *)$esp", "-ex", "x/x 0x1000",
             "-ex", "x/2i $pc", "-ex", "stepi", "-ex", "info registers eip",
             "-ex", "detach"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            wait_for("gdb to stop gamma at %s" % BREAK_AT,
                     lambda: stopped.exists() or gdb.poll() is not None)
            assert stopped.exists(), gdb.communicate()[0]
            # Held: a halted guest to the Host. Its peers ping on; frames to it fill its
            # receive buffers, then drop.
            before = counters(lab)
            lines = {run.name: len(run.console) for run in lab.guests}
            for seq in range(FLOOD):
                port.send(Ether(dst=gamma_mac) / IP(src="10.0.0.99", dst="10.0.0.3")
                          / ICMP(seq=seq))
            time.sleep(1.0)
            during = counters(lab)
            quiet = len(gamma.console) == lines["gamma"]      # a held guest prints nothing
            go.touch()
            out = gdb.communicate(timeout=SECONDS)[0]
        finally:
            if gdb.poll() is None:
                gdb.kill()
                gdb.communicate()
        assert gdb.returncode == 0, out

        for peer in ("alpha", "beta"):
            assert grown(before, during, peer, "tx_packets") >= 5, (before, during)
            assert grown(before, during, peer, "rx_packets") >= 5, (before, during)
        assert grown(before, during, "gamma", "tx_packets") == 0, (before, during)
        assert quiet, gamma.console[lines["gamma"]:]
        taken = grown(before, during, "gamma", "rx_packets")
        dropped = grown(before, during, "gamma", "rx_dropped")
        assert taken + dropped == FLOOD and taken <= 8 and dropped >= FLOOD - 8, (taken, dropped)

        # gdb saw what the guest was doing.
        entry = symbol(BREAK_AT)
        assert "Breakpoint 1, %#010x in %s ()" % (entry, BREAK_AT) in out, out
        eips = re.findall(r"^eip\s+(0x[0-9a-f]+)\s", out, re.M)
        assert int(eips[0], 16) == entry, out
        esp = re.search(r"^\$1 = (0x[0-9a-f]+)$", out, re.M).group(1)
        words = re.search(r"^%s:\s+(0x\w+)\s+(0x\w+)\s+(0x\w+)\s+(0x\w+)$" % esp, out, re.M)
        assert words, out
        assert re.search(r"^\w+ \+ \d+ in section \.text$", out, re.M), out   # a return address
        assert "Cannot access memory at address 0x1000" in out, out
        following = re.findall(r"^\s+(0x[0-9a-f]+) <%s\+\d+>:" % BREAK_AT, out, re.M)
        assert int(eips[1], 16) == int(following[0], 16), out     # stepi: the next instruction
        assert "[Inferior 1 (Remote target) detached]" in out, out

        # Let go, gamma carries on: it sends again, and answers what it had queued.
        wait_for("gamma to ping again", lambda: counters(lab)["gamma"]["tx_packets"]
                 > during["gamma"]["tx_packets"] + 3)
        wait_for("gamma's next ping reply", lambda: "64 bytes from 10.0.0.1"
                 in "\n".join(gamma.console[lines["gamma"]:]))
        assert "lgnet: gdb connected from 127.0.0.1:" in gamma.console_text
        assert "lgnet: gdb disconnected" in gamma.console_text
        assert all(run.process.poll() is None for run in lab.guests)
    assert lgnet_shm() == []


class Remote:
    """gdb's end of the remote protocol, by hand."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SECONDS)
        self.buffer = b""

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, packet: str) -> str:
        """Send a packet; the acknowledgement."""
        body = packet.encode()
        self.raw(b"$%s#%02x" % (body, sum(body) & 0xFF))
        return self.read(1).decode()

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(4096)
            assert data, "the server closed the connection"
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def reply(self) -> str:
        while b"#" not in self.buffer or len(self.buffer) < self.buffer.index(b"#") + 3:
            data = self.sock.recv(4096)
            assert data, "the server closed the connection"
            self.buffer += data
        start, end = self.buffer.index(b"$"), self.buffer.index(b"#")
        body, check = self.buffer[start + 1:end], self.buffer[end + 1:end + 3]
        self.buffer = self.buffer[end + 3:]
        assert check == b"%02x" % (sum(body) & 0xFF)
        self.raw(b"+")
        return body.decode()

    def ask(self, packet: str) -> str:
        assert self.send(packet) == "+"
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def test_the_protocol_by_hand_interrupt_detach_attach_again_and_vkill(guests, tmp_path):
    """An idle guest sleeps in the Host's HALT: a ^C still stops it (the Waker kicks it out
    with BREAK), a detached gdb can come back, and vKill kills the guest with a reason."""
    proc = guests.launch(tmp_path / "lan0.net", kernel="bundled", args=["ip=10.0.0.1/24"],
                         options=["--gdb", "0"])
    announcement = proc.stdout.readline().decode()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", announcement).group(1))
    while b"lguest: ready" not in proc.stdout.readline():
        pass

    gdb = Remote(port)
    assert "qXfer:features:read+" in gdb.ask("qSupported:swbreak+")
    gdb.raw(b"$?#00")                            # a wrong checksum is refused
    assert gdb.read(1) == b"-"
    assert gdb.ask("?") == "T05"
    xml = gdb.ask("qXfer:features:read:target.xml:0,4000")
    assert xml.startswith("l<?xml") and "org.gnu.gdb.i386.core" in xml
    assert gdb.ask("p8").endswith("c0")          # eip, little-endian: 0xc0......
    assert gdb.ask("m1000,4") == "E0e"           # nothing mapped there
    assert gdb.ask("Z2,c0100000,4") == ""        # watchpoints: not supported
    assert gdb.ask("Z1,%x,1" % symbol(BREAK_AT)) == "OK"     # hbreak: a code hook too
    assert gdb.ask("z1,%x,1" % symbol(BREAK_AT)) == "OK"
    assert gdb.send("c") == "+"
    time.sleep(0.5)
    gdb.raw(b"\x03")                             # ^C
    assert gdb.reply() == "T02"
    gdb.raw(b"$c#63\x03")                        # c and ^C in one segment
    assert gdb.read(1) == b"+" and gdb.reply() == "T02"
    assert gdb.ask("D") == "OK"
    gdb.close()

    gdb = Remote(port)
    assert gdb.ask("?") == "T05"                 # attached again
    assert gdb.ask("vKill;1") == "OK"
    out = guests.finish(proc)
    assert proc.returncode == 1, out
    assert "lgnet: guest died: killed from the debugger" in out, out
    assert "lgnet: gdb connected from 127.0.0.1:" in out


def test_gdb_interrupts_a_sleeping_guest_and_kills_it(guests, tmp_path):
    """gdb's ^C (SIGINT to gdb, 0x03 on the wire) stops a guest asleep in HALT; kill ends it."""
    proc = guests.launch(tmp_path / "lan0.net", kernel="bundled", args=["ip=10.0.0.1/24"],
                         options=["--gdb", "0"])
    port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stdout.readline().decode()).group(1))
    continuing = tmp_path / "continuing"
    gdb = subprocess.Popen(
        ["gdb", "-nx", "-batch", "-ex", "file %s" % BUNDLED_KERNEL,
         "-ex", "target remote :%d" % port, "-ex", "shell touch %s" % continuing,
         "-ex", "continue", "-ex", "info registers eip", "-ex", "kill"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        wait_for("gdb to continue", lambda: continuing.exists() or gdb.poll() is not None)
        time.sleep(0.5)
        gdb.send_signal(signal.SIGINT)
        out = gdb.communicate(timeout=SECONDS)[0]
    finally:
        if gdb.poll() is None:
            gdb.kill()
            gdb.communicate()
    assert "Program received signal SIGINT, Interrupt." in out, out
    assert re.search(r"^eip\s+0xc01[0-9a-f]+\s", out, re.M), out
    assert "[Inferior 1 (Remote target) killed]" in out, out
    console = guests.finish(proc)
    assert proc.returncode == 1, console
    assert "lgnet: guest died: killed from the debugger" in console, console


def test_a_guest_held_in_gdb_still_stops_when_its_launcher_is_told_to(guests, tmp_path):
    proc = guests.launch(tmp_path / "lan0.net", kernel="bundled", args=["ip=10.0.0.1/24"],
                         options=["--gdb", "0"])
    port = int(re.search(r"127\.0\.0\.1:(\d+)", proc.stdout.readline().decode()).group(1))
    gdb = Remote(port)
    try:
        assert gdb.ask("?") == "T05"             # held
        proc.terminate()
        out = guests.finish(proc, timeout=10)
        assert proc.returncode == 1, out
        assert gdb.sock.recv(4096) == b""        # gdb sees its connection close
    finally:
        gdb.close()
    assert lgnet_shm() == []


def test_gdb_option_mistakes_are_user_errors(broker):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    cases = [("x", "bundled", "--gdb wants a TCP port from 0 (any free one) to 65535, got 'x'"),
             ("70000", "bundled", "to 65535, got '70000'"),
             ("0", "python:", "--gdb needs a kernel of real i386 code (Unicorn), not python:"),
             (str(busy), "bundled", "--gdb %d: cannot listen on 127.0.0.1:%d (Address already "
                                    "in use)" % (busy, busy))]
    try:
        for port, kernel, message in cases:
            proc = subprocess.run(
                [sys.executable, "-m", "lgnet", "launch", "--broker", broker,
                 "--no-console-input", "--gdb", port, "16", kernel],
                cwd=REPO, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=SECONDS)
            assert proc.returncode == 2, proc
            assert proc.stderr.startswith("lgnet: --gdb") and message in proc.stderr, proc.stderr
    finally:
        taken.close()
