"""A very small network stack for Python guests: ARP, IPv4, ICMP echo and UDP echo.

The same behaviour as the bundled C kernel's ip.c, so a test cannot tell which kind of guest
answered: configured with `ip=A.B.C.D[/N][,...]` (one address per net device, in order; /24
when no prefix is given), a guest answers ARP who-has for its address, ICMP echo requests and
UDP datagrams to port 7 (RFC 862) sent to it, and can ping. Everything happens in the receive
interrupt: a frame comes in, the reply goes straight out to the sender's Ethernet address.

Rules of this file: frames are built and parsed with struct, like a kernel would (no scapy in
a guest). Checksums are always computed on the way out; on the way in the IPv4 header checksum
is always checked, ICMP and UDP checksums only when the device lacks LGUEST_NET_F_NOCSUM.
No fragments, no IP options on the way out, no routing beyond "which of my nets is this on".
"""
from __future__ import annotations

import ipaddress
import struct
import time
from dataclasses import dataclass, field

from lgnet import abi

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ARPHRD_ETHER = 1
ARP_REQUEST = 1
ARP_REPLY = 2
IPV4_ADDR_LEN = 4
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
IP_VERSION = 4
IP_VERSION_IHL = 0x45               # version 4, five words of header
IP_DEFAULT_TTL = 64
IP_FRAG_MASK = 0x3FFF               # "more fragments" and the offset
ICMP_ECHOREPLY = 0
ICMP_ECHO = 8
UDP_ECHO_PORT = 7
DEFAULT_PREFIX = 24
PING_DATA = 56                      # ping's default: 64 bytes of ICMP
ARP_RETRY_SECONDS = 0.25
BROADCAST_IP = 0xFFFFFFFF

ETH = struct.Struct("!6s6sH")
ARP = struct.Struct("!HHBBH6sI6sI")
IPV4 = struct.Struct("!BBHHHBBHII")
ICMP = struct.Struct("!BBHHH")
UDP = struct.Struct("!HHHH")
PING_STAMP = struct.Struct("<Q")


def checksum(data: bytes, start: int = 0) -> int:
    """The Internet checksum (RFC 1071), folded and complemented."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_checksum(saddr: int, daddr: int, segment: bytes) -> int:
    pseudo = (saddr >> 16) + (saddr & 0xFFFF) + (daddr >> 16) + (daddr & 0xFFFF) \
        + IPPROTO_UDP + len(segment)
    return checksum(segment, pseudo)


def parse_ip_list(text: str) -> list[tuple[int, int]]:
    """"10.0.0.1/24,10.0.1.1" -> [(address, netmask), ...]; ValueError when malformed."""
    out = []
    for item in filter(None, text.split(",")):
        iface = ipaddress.IPv4Interface(item if "/" in item else "%s/%d" % (item, DEFAULT_PREFIX))
        out.append((int(iface.ip), int(iface.netmask)))
    return out


def ip_text(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


@dataclass
class PingReply:
    seq: int
    source: int
    rtt_ns: int


@dataclass
class Interface:
    """One net device with an address."""
    net: object                       # pvnet.NetDevice
    ip: int
    netmask: int

    @property
    def nocsum(self) -> bool:
        return self.net.nocsum


@dataclass
class IpStack:
    machine: object                   # pvmachine.Machine
    interfaces: list[Interface] = field(default_factory=list)
    arp_cache: dict[int, bytes] = field(default_factory=dict)
    replies: list[PingReply] = field(default_factory=list)
    ping_ident: int = 0
    ip_ident: int = 0

    def attach(self, net, ip: int, netmask: int) -> Interface:
        iface = Interface(net, ip, netmask)
        self.interfaces.append(iface)
        net.on_receive = lambda frame, iface=iface: self.eth_input(iface, frame)
        return iface

    # --- building frames ----------------------------------------------------------------

    def _send(self, iface: Interface, dst_mac: bytes, proto: int, payload: bytes) -> None:
        iface.net.transmit(ETH.pack(dst_mac, iface.net.mac, proto) + payload)

    def arp_send(self, iface: Interface, op: int, eth_dst: bytes, tha: bytes, tpa: int) -> None:
        self._send(iface, eth_dst, ETH_P_ARP,
                   ARP.pack(ARPHRD_ETHER, ETH_P_IP, abi.ETH_ALEN, IPV4_ADDR_LEN, op,
                            iface.net.mac, iface.ip, tha, tpa))

    def ip_send(self, iface: Interface, dst_mac: bytes, daddr: int, proto: int,
                payload: bytes) -> None:
        self.ip_ident = (self.ip_ident + 1) & 0xFFFF
        header = IPV4.pack(IP_VERSION_IHL, 0, IPV4.size + len(payload), self.ip_ident, 0,
                           IP_DEFAULT_TTL, proto, 0, iface.ip, daddr)
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        self._send(iface, dst_mac, ETH_P_IP, header + payload)

    # --- receiving (in the receive interrupt) -------------------------------------------

    def eth_input(self, iface: Interface, frame: bytes) -> None:
        if len(frame) < ETH.size:
            return
        dst, src, proto = ETH.unpack_from(frame)
        # Promiscuous or not, we only want our own frames and multicast.
        if not abi.is_multicast(dst) and dst != iface.net.mac:
            return
        if proto == ETH_P_ARP:
            self.arp_input(iface, frame[ETH.size:])
        elif proto == ETH_P_IP:
            self.ip_input(iface, src, frame[ETH.size:])

    def arp_input(self, iface: Interface, p: bytes) -> None:
        if len(p) < ARP.size:
            return
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = ARP.unpack_from(p)
        if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, abi.ETH_ALEN, IPV4_ADDR_LEN):
            return
        if tpa != iface.ip:
            return
        self.arp_cache[spa] = sha          # whoever asks for us or answers us is worth keeping
        if op == ARP_REQUEST:
            self.arp_send(iface, ARP_REPLY, sha, sha, spa)

    def ip_input(self, iface: Interface, src_mac: bytes, p: bytes) -> None:
        if len(p) < IPV4.size or p[0] >> 4 != IP_VERSION:
            return
        ihl = (p[0] & 0xF) * 4
        ver, _tos, tot, _id, frag, _ttl, proto, _check, saddr, daddr = IPV4.unpack_from(p)
        if ihl < IPV4.size or ihl > len(p) or tot < ihl or tot > len(p):
            return
        if checksum(p[:ihl]) != 0 or frag & IP_FRAG_MASK:
            return
        unicast = daddr == iface.ip
        if not unicast and daddr not in (BROADCAST_IP, iface.ip | (~iface.netmask & BROADCAST_IP)):
            return
        body = p[ihl:tot]
        if proto == IPPROTO_ICMP:
            self.icmp_input(iface, src_mac, saddr, unicast, body)
        elif proto == IPPROTO_UDP:
            self.udp_input(iface, src_mac, saddr, daddr, unicast, body)

    def icmp_input(self, iface: Interface, src_mac: bytes, saddr: int, unicast: bool,
                   p: bytes) -> None:
        if len(p) < ICMP.size or (not iface.nocsum and checksum(p) != 0):
            return
        kind, code, _check, ident, seq = ICMP.unpack_from(p)
        if kind == ICMP_ECHO and unicast:
            reply = ICMP.pack(ICMP_ECHOREPLY, code, 0, ident, seq) + p[ICMP.size:]
            reply = reply[:2] + struct.pack("!H", checksum(reply)) + reply[4:]
            self.ip_send(iface, src_mac, saddr, IPPROTO_ICMP, reply)
        elif (kind == ICMP_ECHOREPLY and ident == self.ping_ident
              and len(p) >= ICMP.size + PING_STAMP.size):
            sent = PING_STAMP.unpack_from(p, ICMP.size)[0]
            now = time.monotonic_ns()
            if sent <= now:
                self.replies.append(PingReply(seq, saddr, now - sent))

    def udp_input(self, iface: Interface, src_mac: bytes, saddr: int, daddr: int,
                  unicast: bool, p: bytes) -> None:
        if len(p) < UDP.size:
            return
        sport, dport, ulen, check = UDP.unpack_from(p)
        if ulen < UDP.size or ulen > len(p):
            return
        segment = p[:ulen]
        # A zero checksum means "none" in IPv4.
        if not iface.nocsum and check and udp_checksum(saddr, daddr, segment) != 0:
            return
        if not unicast or dport != UDP_ECHO_PORT:
            return
        reply = UDP.pack(dport, sport, ulen, 0) + segment[UDP.size:]
        check = udp_checksum(iface.ip, saddr, reply) or 0xFFFF
        self.ip_send(iface, src_mac, saddr, IPPROTO_UDP,
                     reply[:6] + struct.pack("!H", check) + reply[8:])

    # --- pinging --------------------------------------------------------------------------

    def route(self, dst: int) -> Interface | None:
        """The interface whose net holds dst, else the first one with an address."""
        for iface in self.interfaces:
            if dst & iface.netmask == iface.ip & iface.netmask:
                return iface
        return self.interfaces[0] if self.interfaces else None

    def arp_resolve(self, iface: Interface, ip: int, timeout: float) -> bytes | None:
        """Ask every quarter second until someone answers or the time is up."""
        deadline = time.monotonic() + timeout
        while ip not in self.arp_cache and time.monotonic() < deadline:
            self.arp_send(iface, ARP_REQUEST, abi.BROADCAST_MAC, bytes(abi.ETH_ALEN), ip)
            self.machine.idle_until(min(deadline, time.monotonic() + ARP_RETRY_SECONDS),
                                    lambda: ip in self.arp_cache)
        return self.arp_cache.get(ip)

    def ping(self, console, target: str, count: int, interval: float = 1.0,
             timeout: float = 1.0) -> int:
        """ping(8) in miniature; prints like the C kernel; returns the replies received."""
        dst = int(ipaddress.IPv4Address(target))
        console.write("PING %s (%s) %d(%d) bytes of data.\n"
                      % (target, target, PING_DATA, PING_DATA + ICMP.size + IPV4.size))
        iface = self.route(dst)
        if iface is None:
            console.write("connect: Network is unreachable (no ip= for a net device)\n")
            return 0
        self.ping_ident = (self.machine.guest_id + 1) & 0xFFFF
        self.replies.clear()
        mac = self.arp_resolve(iface, dst, timeout)
        seen: set[int] = set()
        rtts: list[int] = []

        def drain() -> bool:
            while self.replies:
                r = self.replies.pop(0)
                if r.source != dst or r.seq in seen or not 1 <= r.seq <= count:
                    continue
                seen.add(r.seq)
                rtts.append(r.rtt_ns)
                console.write("%d bytes from %s: icmp_seq=%d time=%.3f ms\n"
                              % (ICMP.size + PING_DATA, target, r.seq, r.rtt_ns / 1e6))
            return len(seen) == count

        start = time.monotonic()
        for seq in range(1, count + 1):
            if mac is None:
                self.arp_send(iface, ARP_REQUEST, abi.BROADCAST_MAC, bytes(abi.ETH_ALEN), dst)
            else:
                data = PING_STAMP.pack(time.monotonic_ns()) + bytes(
                    range(PING_STAMP.size, PING_DATA))
                echo = ICMP.pack(ICMP_ECHO, 0, 0, self.ping_ident, seq) + data
                echo = echo[:2] + struct.pack("!H", checksum(echo)) + echo[4:]
                self.ip_send(iface, mac, dst, IPPROTO_ICMP, echo)
            if seq < count:
                self.machine.idle_until(start + seq * interval, lambda: drain() and False)
        self.machine.idle_until(time.monotonic() + timeout, drain)
        drain()
        loss = (count - len(seen)) * 100 // count if count else 0
        console.write("--- %s ping statistics ---\n%d packets transmitted, %d received, "
                      "%d%% packet loss\n" % (target, count, len(seen), loss))
        if rtts:
            console.write("rtt min/avg/max = %.3f/%.3f/%.3f ms\n"
                          % (min(rtts) / 1e6, sum(rtts) / len(rtts) / 1e6, max(rtts) / 1e6))
        return len(seen)
