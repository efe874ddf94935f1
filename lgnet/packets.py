"""Packets for people: captured deliveries as scapy packets, and the `expect:` checks of a
scenario.

Rules of this file: filters are lgnet.filters' (pcap-filter(7), run by libpcap on the
delivered bytes, so checking needs no scapy); everything else here works on scapy packets,
whose layers are imported on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from lgnet.filters import compile_filter

MAX_SHOWN = 12                       # deliveries listed in a failure message


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


def packet_list(deliveries: Iterable, name: str = "lgnet"):
    from scapy.plist import PacketList
    return PacketList([to_packet(d) for d in deliveries], name=name)


def describe(delivery) -> str:
    """One line: the scapy summary, then the lguest facts (what `lgnet dump` prints)."""
    return describe_frame(delivery.data, delivery.comment)


def describe_frame(data: bytes, facts: str = "") -> str:
    """The scapy summary of an Ethernet frame, then its facts in brackets when it has any."""
    try:
        summary = L.load().Ether(bytes(data)).summary()
    except Exception as exc:          # scapy chokes on a hostile frame: say so, keep going
        summary = "undecodable frame (%s)" % exc
    return "%s  [%s]" % (summary, facts) if facts else summary


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
                  and (e.within is None or d.time - start <= e.within)
                  # frames an impairment kept from their receivers count only for `fault:`
                  and (d.delivered if e.fault is None else e.fault in d.fault)]
    test = compile_filter(e.match) if e.match else (lambda p: True)
    matched = [d for d in considered if test(d.data)]
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
