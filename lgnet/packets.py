"""Packets for people: a small filter language, captured deliveries as scapy packets, and the
`expect:` checks of a scenario.

Rules of this file: parsing a filter needs nothing but this module (the scenario checks every
`match:` when it is loaded, without importing scapy); evaluating one, and everything else here,
works on scapy packets, whose layers are imported on first use.

The filter language is a BPF-like subset (there is no libpcap here to compile real BPF), read
left to right with the usual precedence (not > and > or) and parentheses:

    arp  ip  icmp  udp  tcp  lgnet          the frame carries that protocol (lgnet: the Python
                                            driver's own test frames, ethertype 0x88b5)
    echo-request  echo-reply                ICMP echo request / reply
    who-has  is-at                          ARP request / reply
    broadcast  multicast                    the destination MAC
    [PROTO] [src|dst] host A.B.C.D          IPv4 address (IP header, or ARP sender/target)
    [PROTO] [src|dst] port N                UDP/TCP port ("udp port 7": PROTO is arp, ip,
                                            udp or tcp, and must be there too)
    ether [src|dst] [host] MAC              Ethernet address
    ether proto N                           ethertype (0x0806 or 2054)
    len (<|<=|>|>=|==|!=) N                 frame length in bytes
    not X   X and Y   X or Y   (X)          also written !  &&  ||
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Iterable

ETHERTYPE_LGNET = 0x88B5
ICMP_ECHOREPLY = 0
ICMP_ECHO = 8
ARP_WHO_HAS = 1
ARP_IS_AT = 2
MULTICAST_BIT = 0x01
MAX_SHOWN = 12                       # deliveries listed in a failure message

PROTOCOLS = ("arp", "ip", "icmp", "udp", "tcp", "lgnet")
QUALIFIED = ("arp", "ip", "udp", "tcp")      # may prefix host/port: "udp port 7"
FLAGS = ("echo-request", "echo-reply", "who-has", "is-at", "broadcast", "multicast")
COMPARISONS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
               ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
ALIASES = {"!": "not", "&&": "and", "||": "or"}
_TOKEN = re.compile(r"\s*(\(|\)|<=|>=|==|!=|&&|\|\||<|>|!|[^\s()<>=!&|]+)")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class FilterError(ValueError):
    """A filter expression that does not parse; str() says where and what was expected."""


# --- scapy, on first use ------------------------------------------------------------------

class _Layers:
    loaded = False

    def load(self) -> "_Layers":
        if not self.loaded:
            from scapy.layers.inet import ICMP, IP, TCP, UDP
            from scapy.layers.l2 import ARP, Ether
            self.Ether, self.ARP, self.IP, self.ICMP, self.UDP, self.TCP = \
                Ether, ARP, IP, ICMP, UDP, TCP
            self.loaded = True
        return self


L = _Layers()


# --- the filter language -------------------------------------------------------------------

Predicate = Callable[[object], bool]


class Filter:
    """A compiled filter: call it with a scapy packet."""

    def __init__(self, text: str):
        self.text = text
        self._test = _Parser(text).parse()

    def __call__(self, packet) -> bool:
        L.load()
        return bool(self._test(packet))

    def __repr__(self) -> str:
        return "Filter(%r)" % self.text


def compile_filter(text: str) -> Filter:
    return Filter(text)


def as_predicate(match) -> tuple[Predicate, str]:
    """A filter string or a callable -> (predicate, how to describe it)."""
    if isinstance(match, str):
        return compile_filter(match), repr(match)
    if callable(match):
        return match, getattr(match, "__name__", repr(match))
    raise TypeError("match must be a filter string or a callable, not %r" % (match,))


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = self._tokenize(text)
        self.pos = 0

    def _tokenize(self, text: str) -> list[str]:
        tokens, off = [], 0
        while off < len(text):
            m = _TOKEN.match(text, off)
            if m is None:
                break
            token = m.group(1)
            tokens.append(ALIASES.get(token, token.lower()))
            off = m.end()
        if text[off:].strip():
            raise FilterError("cannot read %r in filter %r" % (text[off:].strip(), text))
        return tokens

    # helpers
    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            self.fail("more")
        self.pos += 1
        return token

    def fail(self, wanted: str):
        where = "at %r" % self.peek() if self.peek() is not None else "at the end"
        raise FilterError("%s of filter %r: expected %s" % (where, self.text, wanted))

    # grammar
    def parse(self) -> Predicate:
        if not self.tokens:
            raise FilterError("an empty filter matches nothing: write what to match")
        test = self.alternatives()
        if self.peek() is not None:
            self.fail("'and', 'or' or the end")
        return test

    def alternatives(self) -> Predicate:
        parts = [self.conjunction()]
        while self.peek() == "or":
            self.take()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else (lambda p, parts=parts: any(t(p) for t in parts))

    def conjunction(self) -> Predicate:
        parts = [self.negation()]
        while self.peek() == "and":
            self.take()
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else (lambda p, parts=parts: all(t(p) for t in parts))

    def negation(self) -> Predicate:
        token = self.peek()
        if token == "not":
            self.take()
            inner = self.negation()
            return lambda p: not inner(p)
        if token == "(":
            self.take()
            inner = self.alternatives()
            if self.peek() != ")":
                self.fail("')'")
            self.take()
            return inner
        return self.primitive()

    def primitive(self) -> Predicate:
        token = self.take()
        if token in PROTOCOLS:
            if token in QUALIFIED and self.peek() in ("src", "dst", "host", "port"):
                # BPF's "udp port 7", "ip src host X": the protocol qualifies what follows.
                first, then = _protocol(token), self.primitive()
                return lambda p: first(p) and then(p)
            return _protocol(token)
        if token in FLAGS:
            return _flag(token)
        if token == "ether":
            return self.ether()
        if token == "len":
            op = self.take()
            if op not in COMPARISONS:
                self.pos -= 1
                self.fail("one of %s after 'len'" % " ".join(COMPARISONS))
            n = self.number("a length")
            return lambda p: COMPARISONS[op](len(bytes(p)), n)
        direction = None
        if token in ("src", "dst"):
            direction, token = token, self.take()
        if token == "host":
            return _host(direction, self.address())
        if token == "port":
            return _port(direction, self.number("a port number"))
        self.pos -= 1
        self.fail("a primitive (%s, host, port, ether, len, not, '(')"
                  % ", ".join(PROTOCOLS + FLAGS))

    def ether(self) -> Predicate:
        token = self.take()
        if token == "proto":
            return _ether_proto(self.number("an ethertype"))
        if token in ("broadcast", "multicast"):
            return _flag(token)
        direction = None
        if token in ("src", "dst"):
            direction, token = token, self.take()
        if token == "host":
            token = self.take()
        if not _MAC.match(token):
            self.pos -= 1
            self.fail("a MAC address (aa:bb:cc:dd:ee:ff)")
        return _ether_host(direction, token.lower())

    def address(self) -> str:
        token = self.take()
        try:
            return str(ipaddress.IPv4Address(token))
        except ValueError:
            self.pos -= 1
            self.fail("an IPv4 address")

    def number(self, what: str) -> int:
        token = self.take()
        try:
            return int(token, 0)
        except ValueError:
            self.pos -= 1
            self.fail(what)


def _protocol(name: str) -> Predicate:
    if name == "lgnet":
        return lambda p: L.Ether in p and p[L.Ether].type == ETHERTYPE_LGNET
    return lambda p: getattr(L, name.upper()) in p


def _flag(name: str) -> Predicate:
    if name == "echo-request":
        return lambda p: L.ICMP in p and p[L.ICMP].type == ICMP_ECHO
    if name == "echo-reply":
        return lambda p: L.ICMP in p and p[L.ICMP].type == ICMP_ECHOREPLY
    if name == "who-has":
        return lambda p: L.ARP in p and p[L.ARP].op == ARP_WHO_HAS
    if name == "is-at":
        return lambda p: L.ARP in p and p[L.ARP].op == ARP_IS_AT
    if name == "broadcast":
        return lambda p: L.Ether in p and p[L.Ether].dst == "ff:ff:ff:ff:ff:ff"
    return lambda p: L.Ether in p and bool(int(p[L.Ether].dst[:2], 16) & MULTICAST_BIT)


def _host(direction: str | None, addr: str) -> Predicate:
    def test(p) -> bool:
        found = []
        if L.IP in p:
            found = [("src", p[L.IP].src), ("dst", p[L.IP].dst)]
        elif L.ARP in p:
            found = [("src", p[L.ARP].psrc), ("dst", p[L.ARP].pdst)]
        return any(value == addr for where, value in found if direction in (None, where))
    return test


def _port(direction: str | None, port: int) -> Predicate:
    def test(p) -> bool:
        for layer in (L.UDP, L.TCP):
            if layer in p:
                return any(value == port for where, value in (("src", p[layer].sport),
                                                              ("dst", p[layer].dport))
                           if direction in (None, where))
        return False
    return test


def _ether_host(direction: str | None, mac: str) -> Predicate:
    def test(p) -> bool:
        if L.Ether not in p:
            return False
        e = p[L.Ether]
        return any(value == mac for where, value in (("src", e.src), ("dst", e.dst))
                   if direction in (None, where))
    return test


def _ether_proto(proto: int) -> Predicate:
    return lambda p: L.Ether in p and p[L.Ether].type == proto


# --- captured deliveries as scapy packets ---------------------------------------------------

def to_packet(delivery):
    """A scapy Ether of the delivered bytes, annotated: .time, .sniffed_on (the net),
    .sender/.receiver (guest names), .lgnet (the Delivery with every lguest fact), and the
    facts as its pcapng comment."""
    packet = L.load().Ether(bytes(delivery.data))
    packet.time = delivery.time
    packet.sniffed_on = delivery.net
    packet.comments = [delivery.comment.encode()]
    packet.sender = delivery.sender
    packet.receiver = delivery.receiver
    packet.lgnet = delivery
    return packet


def _decoded(delivery):
    """to_packet, once per delivery (a run is checked again and again while it goes on)."""
    packet = getattr(delivery, "_packet", None)
    if packet is None:
        packet = delivery._packet = to_packet(delivery)
    return packet


def packet_list(deliveries: Iterable, name: str = "lgnet"):
    from scapy.plist import PacketList
    return PacketList([to_packet(d) for d in deliveries], name=name)


def describe(delivery) -> str:
    """One line: the scapy summary, then the lguest facts (what `lgnet dump` prints)."""
    try:
        summary = to_packet(delivery).summary()
    except Exception as exc:          # scapy chokes on a hostile frame: say so, keep going
        summary = "undecodable frame (%s)" % exc
    return "%s  [%s]" % (summary, delivery.comment)


# --- expectations (the scenario's `expect:`) -------------------------------------------------

@dataclass
class Verdict:
    held: bool
    matched: list
    considered: list
    report: str


def check(expectation, deliveries: list, start: float) -> Verdict:
    """One expectation against every delivery of the run (deliveries carry .net)."""
    e = expectation
    considered = [d for d in deliveries
                  if (e.net is None or d.net == e.net)
                  and (e.sender is None or d.sender == e.sender)
                  and (e.receiver is None or d.receiver == e.receiver)
                  and (e.within is None or d.time - start <= e.within)]
    test = compile_filter(e.match) if e.match else (lambda p: True)
    matched = [d for d in considered if test(_decoded(d))]
    held = len(matched) == e.count if e.count is not None else len(matched) >= e.least
    wanted = ("exactly %d" % e.count) if e.count is not None else ("at least %d" % e.least)
    lines = ["%s %s: %s" % ("ok    " if held else "FAILED", e.where, e.describe()),
             "       wanted %s matching deliver%s, saw %d" % (
                 wanted, "y" if (e.count if e.count is not None else e.least) == 1 else "ies",
                 len(matched))]
    if not held:
        shown, what = (matched, "matching") if matched else (considered, "considered")
        if not shown:
            lines.append("       nothing was delivered%s" % e.scope())
        else:
            lines.append("       %s deliveries%s:" % (what, e.scope()))
            for d in shown[:MAX_SHOWN]:
                lines.append("         %+.3fs %s" % (d.time - start, describe(d)))
            if len(shown) > MAX_SHOWN:
                lines.append("         ... and %d more" % (len(shown) - MAX_SHOWN))
    return Verdict(held, matched, considered, "\n".join(lines))
