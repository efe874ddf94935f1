"""A host port, as the test process holds it: send scapy packets into a net, expect replies.

`Lab.port(net)` starts the port's guest (`python:lgnet.guest.port`, its own Launcher, a slot
in the net file like any guest) and hands it one end of a SOCK_SEQPACKET socket pair as its
`--tunnet=fd:N` link; this object keeps the other end. One message is one Ethernet frame, both
ways, exactly as with a TAP. A thread receives every frame the net delivers to the port, so
nothing is lost between two calls; `expect` and `sniff` take frames from that queue in arrival
order, and `received` keeps them all.
"""
from __future__ import annotations

import socket
import threading
import time

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.filters import Filter, as_predicate
from lgnet.guest.port import parse_ready
from lgnet.packets import L, MAX_SHOWN

MAX_FRAME = 1 << 16
BROADCAST = "ff:ff:ff:ff:ff:ff"
POLL_SECONDS = 0.01


class Port:
    def __init__(self, lab, net: str, run, sock: socket.socket):
        self.lab = lab
        self.net = net
        self.run = run                      # the port's launcher (a lab.GuestRun)
        self.name = run.name
        self.sock = sock
        self.slot: int | None = None
        self.mac: str | None = None
        self._frames: list[tuple[float, bytes]] = []     # every frame, in arrival order
        self._pending: list[int] = []                      # indexes not taken by expect/sniff
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._receive, name="lgnet-port-" + self.name,
                                        daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return "Port(%r on %s, slot %s, mac %s)" % (self.name, self.net, self.slot, self.mac)

    # --- coming up ------------------------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        self.slot, self.mac = await_ready_line(self.run, timeout,
                                               "port %s on %s" % (self.name, self.net))

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_FRAME)
            except OSError:
                data = b""
            if not data:
                return
            with self._cond:
                self._pending.append(len(self._frames))
                self._frames.append((time.time(), data))
                self._cond.notify_all()

    # --- sending --------------------------------------------------------------------------

    def send(self, packet) -> None:
        """Send one frame into the net from this port's slot: bytes, or a scapy packet.

        A packet without an Ethernet layer gets one; an Ethernet or ARP layer without source
        addresses gets this port's MAC, and without a destination the broadcast address (so
        scapy never resolves anything on the host's own network).

        A frame longer than lguest_net's receive buffers (ETH_FRAME_LEN, 1514 bytes) is
        refused (LgnetError): no lguest guest could send it, and the port's link, like a TAP
        read into such a buffer, would cut it short without a word."""
        frame = self.frame_bytes(packet)
        if len(frame) > abi.ETH_FRAME_LEN:
            raise LgnetError("port %s: a frame of %d bytes is longer than lguest_net's receive "
                             "buffers (%d bytes, ETH_FRAME_LEN): not sent" % (
                                 self.name, len(frame), abi.ETH_FRAME_LEN))
        self.sock.send(frame)

    def frame_bytes(self, packet) -> bytes:
        if isinstance(packet, (bytes, bytearray, memoryview)):
            return bytes(packet)
        L.load()
        if L.Ether not in packet:
            packet = L.Ether() / packet
        else:
            packet = packet.copy()
        ether = packet[L.Ether]
        if "src" not in ether.fields:
            ether.src = self.mac
        if "dst" not in ether.fields:
            ether.dst = BROADCAST
        if L.ARP in packet and "hwsrc" not in packet[L.ARP].fields:
            packet[L.ARP].hwsrc = self.mac
        return bytes(packet)

    # --- receiving ------------------------------------------------------------------------

    def _packet(self, index: int):
        ts, data = self._frames[index]
        packet = L.load().Ether(data)
        packet.time = ts
        packet.sniffed_on = self.name
        return packet

    def expect(self, match, timeout: float = 5.0):
        """The first frame not yet taken that matches (a pcap-filter(7) string, see
        lgnet.filters, or a predicate on a scapy packet), waiting up to `timeout` seconds for
        it; it is taken, the others stay for later calls. Fails with AssertionError listing
        what did arrive."""
        matches, what = self._matcher(match)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for position, index in enumerate(self._pending):
                    if matches(index):
                        del self._pending[position]
                        return self._packet(index)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                seen = len(self._frames)
                self._cond.wait_for(lambda: len(self._frames) > seen, left)
            raise AssertionError(self._nothing_matched(what, timeout))

    def _nothing_matched(self, what: str, timeout: float) -> str:
        lines = ["port %s on %s: no frame matching %s within %gs" % (self.name, self.net, what,
                                                                    timeout)]
        if not self._pending:
            lines.append("  nothing arrived (not yet taken by expect/sniff)")
        else:
            lines.append("  what arrived (not yet taken), %d frame%s:"
                         % (len(self._pending), "" if len(self._pending) == 1 else "s"))
            for index in self._pending[:MAX_SHOWN]:
                lines.append("    " + self._packet(index).summary())
            if len(self._pending) > MAX_SHOWN:
                lines.append("    ... and %d more" % (len(self._pending) - MAX_SHOWN))
        return "\n".join(lines)

    def _matcher(self, match) -> tuple:
        """(test of a frame's index, how to say what it wants). A filter string runs in
        libpcap on the bytes as they arrived; a predicate gets the scapy packet."""
        predicate, what = as_predicate(match)
        if isinstance(predicate, Filter):
            return (lambda index: predicate(self._frames[index][1])), what
        return (lambda index: predicate(self._packet(index))), what

    def sniff(self, count: int | None = None, timeout: float = 1.0, match=None):
        """Take the frames not yet taken (only those that `match`, a filter string or a
        predicate, when given; the others stay), waiting until there are `count` (or,
        without a count, for `timeout` seconds): a scapy PacketList, oldest first."""
        from scapy.plist import PacketList
        matches = self._matcher(match)[0] if match is not None else (lambda index: True)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                wanted = [i for i in self._pending if matches(i)]
                if count is not None and len(wanted) >= count:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken = wanted[:count] if count is not None else wanted
            chosen = set(taken)
            self._pending = [i for i in self._pending if i not in chosen]
            return PacketList([self._packet(i) for i in taken], name=self.name)

    @property
    def received(self):
        """Every frame this port received so far (taken or not), as a PacketList."""
        from scapy.plist import PacketList
        with self._cond:
            return PacketList([self._packet(i) for i in range(len(self._frames))],
                              name=self.name)

    @property
    def stats(self) -> dict:
        """The broker's counters for this port's guest (frames and bytes in and out, carrier
        errors, drops), fetched now."""
        self.lab.collect()
        return dict(self.run.stats)

    # --- going down -----------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=1)


def host_mac(mac: str | None) -> str | None:
    """Check a MAC given to Lab.port: six bytes, unicast (bit 0 is lguest's promisc marker)."""
    if mac is None:
        return None
    try:
        raw = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        raw = b""
    # mac[0] == 0 marks an unused slot, and its bit 0 the promiscuous ones.
    if len(raw) != abi.ETH_ALEN or raw[0] == 0 or abi.is_multicast(raw):
        raise LgnetError("port MAC %r: must be six bytes, unicast, with a first byte other "
                         "than 00 (lguest's mark of an unused slot)" % mac)
    return raw.hex(":")


def await_ready_line(run, timeout: float, what: str) -> tuple[int, str]:
    """Until the port kernel's Launcher prints its READY line (lgnet.guest.port): its (slot,
    MAC). A Launcher that ends first, or stays silent past timeout, is an LgnetError that
    says what it printed. Host ports and uplinks both come up this way."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(run.console):
            ready = parse_ready(line)
            if ready:
                return ready
        if run.process.poll() is not None or time.monotonic() > deadline:
            said = " / ".join(line for line in run.console if line.strip())
            raise LgnetError("%s did not come up: %s" % (what, said or "no output"))
        time.sleep(POLL_SECONDS)
