"""Filters are pcap-filter(7), as tcpdump: compiled by libpcap, run by libpcap.

Every filter lgnet takes — a scenario's `match:`, `port.expect("…")`, `port.sniff(match=…)`,
`lgnet dump FILE EXPR` — is handed to libpcap's pcap_compile for Ethernet (DLT_EN10MB) and run
with pcap_offline_filter on the bytes the receiver got. So an expression means here exactly
what it means to tcpdump, byte offsets, `vlan`, precedence (`and` and `or` bind equally, left
to right) and all; an expression libpcap refuses is refused with libpcap's own message.

Rules of this file: there is one filter language, libpcap's. lgnet adds only a few words of its
own, MACROS, each a name for a pcap-filter expression, expanded (in parentheses) before
libpcap sees the text; they are the words lgnet's tests use most. lguest facts (which guest
sent, to whom, on which net) are not filter words: they are the `from:`, `to:` and `net:` keys.

The binding is pcapy-ng, whose manylinux wheels carry libpcap inside: `pip install` is all it
takes, and no C compiler or libpcap-dev is needed.
"""
from __future__ import annotations

import re
from typing import Callable

import pcapy

from lgnet import abi

# tcpdump's largest snapshot length: a filter sees the whole of any frame lgnet can deliver.
SNAPLEN = 262144
OPTIMIZE = 1
NETMASK_UNKNOWN = 0xFFFFFFFF         # PCAP_NETMASK_UNKNOWN: we capture no interface

# lgnet's own words, and the pcap-filter(7) each stands for.
MACROS = {
    "who-has": "arp[6:2] = 1",                      # ARP request (ar_op at byte 6)
    "is-at": "arp[6:2] = 2",                        # ARP reply
    "echo-request": "icmp[icmptype] = icmp-echo",
    "echo-reply": "icmp[icmptype] = icmp-echoreply",
    "lgnet": "ether proto %#06x" % abi.ETHERTYPE_LGNET,  # the Python driver's test frames
}
# A macro is a whole word: not inside `icmp-echo` or a host name such as `lgnet-box`.
_MACRO = re.compile(r"(?<![\w.-])(%s)(?![\w.-])" % "|".join(map(re.escape, MACROS)),
                    re.IGNORECASE)


class FilterError(ValueError):
    """An expression libpcap will not compile; str() carries libpcap's message."""


def expand(text: str) -> str:
    """The pcap-filter(7) text of a filter: lgnet's words replaced by what they stand for."""
    return _MACRO.sub(lambda m: "(%s)" % MACROS[m.group(1).lower()], text)


class Filter:
    """A compiled filter: call it with a frame (bytes, or a scapy packet) -> matches?"""

    def __init__(self, text: str):
        self.text = text
        self.expression = expand(text)
        try:
            self._program = pcapy.compile(pcapy.DLT_EN10MB, SNAPLEN, self.expression,
                                          OPTIMIZE, NETMASK_UNKNOWN)
        except pcapy.PcapError as error:
            shown = repr(text) if self.expression == text else "%r (that is, %r)" % (
                text, self.expression)
            raise FilterError("filter %s: libpcap: %s" % (shown, error)) from None

    def __call__(self, frame) -> bool:
        if not isinstance(frame, bytes):
            frame = bytes(frame)         # a scapy packet, a bytearray, a memoryview
        return self._program.filter(frame) != 0

    def __repr__(self) -> str:
        return "Filter(%r)" % self.text


def compile_filter(text: str) -> Filter:
    return Filter(text)


Predicate = Callable[[object], bool]


def as_predicate(match) -> tuple[Predicate, str]:
    """A filter string or a callable -> (predicate, how to describe it)."""
    if isinstance(match, str):
        return compile_filter(match), repr(match)
    if callable(match):
        return match, getattr(match, "__name__", repr(match))
    raise TypeError("match must be a filter string or a callable, not %r" % (match,))
