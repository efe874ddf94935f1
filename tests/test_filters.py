"""lgnet.filters: pcap-filter(7), as tcpdump — checked against tcpdump itself.

The frames below are written to a classic pcap file; for every expression the test asks the
real tcpdump (`tcpdump -r FILE -w - EXPR`) which frames it keeps, and lgnet's filter must keep
exactly those, in order. A few counts are also written down by hand, so a broken tcpdump run
cannot make everything agree by matching nothing.
"""
import io
import shutil
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import PcapReader, wrpcap

from lgnet import abi
from lgnet.filters import MACROS, FilterError, compile_filter, expand

pytestmark = pytest.mark.timeout(60)

TCPDUMP = shutil.which("tcpdump")
needs_tcpdump = pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed "
                                   "(.ci/run installs it: apt-get install tcpdump)")

A, B, C = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
BCAST = "ff:ff:ff:ff:ff:ff"

FRAMES = {
    "who_has": Ether(src=A, dst=BCAST) / ARP(op=1, hwsrc=A, psrc="10.0.0.1", pdst="10.0.0.2"),
    "is_at": Ether(src=B, dst=A) / ARP(op=2, hwsrc=B, psrc="10.0.0.2", hwdst=A,
                                       pdst="10.0.0.1"),
    "ping": Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, seq=1),
    "pong": Ether(src=B, dst=A) / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0, seq=1),
    "big_ping": Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2")
    / ICMP(type=8, seq=2) / bytes(1000),
    "udp_echo": Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2")
    / UDP(sport=4000, dport=7) / b"hello",
    "udp_reply": Ether(src=B, dst=A) / IP(src="10.0.0.2", dst="10.0.0.1")
    / UDP(sport=7, dport=4000) / b"hello",
    "syn": Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2")
    / TCP(sport=40000, dport=80, flags="S"),
    "syn_ack": Ether(src=B, dst=A) / IP(src="10.0.0.2", dst="10.0.0.1")
    / TCP(sport=80, dport=40000, flags="SA"),
    "other_net": Ether(src=C, dst=B) / IP(src="192.168.1.5", dst="10.0.0.2")
    / TCP(sport=50000, dport=8080, flags="PA") / b"GET /",
    "vlan_ping": Ether(src=C, dst=B) / Dot1Q(vlan=5) / IP(src="10.0.0.3", dst="10.0.0.2")
    / ICMP(type=8),
    "ip6_udp": Ether(src=A, dst="33:33:00:00:00:01") / IPv6(src="fe80::1", dst="ff02::1")
    / UDP(sport=5353, dport=5353) / b"mdns",
    "ip6_ping": Ether(src=A, dst=B) / IPv6(src="fe80::1", dst="fe80::2") / ICMPv6EchoRequest(),
    "unreachable": Ether(src=B, dst=A) / IP(src="10.0.0.2", dst="10.0.0.1")
    / ICMP(type=3, code=3) / IPerror(src="10.0.0.1", dst="10.0.0.2")
    / UDPerror(sport=4000, dport=9),
    "frag_first": Ether(src=A, dst=C) / IP(src="10.0.0.1", dst="10.0.0.3", id=7, flags="MF")
    / UDP(sport=4001, dport=9000, len=3008, chksum=0) / bytes(1472),
    "frag_second": Ether(src=A, dst=C) / IP(src="10.0.0.1", dst="10.0.0.3", id=7, frag=185,
                                            proto=17) / bytes(1480),
    "mcast_udp": Ether(src=A, dst="01:00:5e:00:00:fb") / IP(src="10.0.0.1", dst="224.0.0.251",
                                                            ttl=1)
    / UDP(sport=5353, dport=5353) / b"mdns",
    "lgnet_bcast": Ether(src=A, dst=BCAST, type=abi.ETHERTYPE_LGNET) / (b"hello" + bytes(41)),
    "lgnet_unicast": Ether(src=B, dst=C, type=abi.ETHERTYPE_LGNET) / (b"just for you" + bytes(34)),
}
NAMES = list(FRAMES)
RAW = [bytes(FRAMES[n]) for n in NAMES]

EXPRESSIONS = [
    # protocols
    "arp", "ip", "ip6", "icmp", "icmp6", "udp", "tcp", "not ip", "ip proto 1",
    "ip proto \\udp", "ether proto \\arp", "ether proto 0x88b5", "ether[12:2] == 0x8100",
    # hosts and nets
    "host 10.0.0.2", "src host 10.0.0.1", "dst host 10.0.0.1 and not arp",
    "net 10.0.0.0/24", "src net 192.168.0.0/16", "net 10.0.0.0/8 and not net 10.0.0.0/30",
    "ip6 host fe80::1", "ip6 dst net ff02::/16", "arp host 10.0.0.2",
    # ports and ranges
    "port 7", "udp port 7", "src port 7", "dst port 80", "tcp port 80", "udp port 5353",
    "portrange 1-1024", "tcp portrange 8000-9000", "udp dst portrange 9000-9999",
    # ICMP, TCP flags, byte offsets
    "icmp[icmptype] == icmp-echo", "icmp[icmptype] == icmp-echoreply",
    "icmp[icmptype] == icmp-unreach", "icmp[icmptype] != icmp-echo and icmp[icmptype] != "
    "icmp-echoreply", "tcp[tcpflags] & tcp-syn != 0",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)", "tcp[tcpflags] & tcp-push != 0",
    "ip[6:2] & 0x1fff != 0", "ip[6:2] & 0x3fff != 0", "ip[8] < 64", "udp[8:4] == 0x68656c6c",
    "ip[2:2] > 1000",
    # lengths
    "greater 200", "less 64", "len > 100", "len <= 60",
    # link layer
    "ether broadcast", "broadcast", "multicast", "ether multicast", "ip multicast",
    "ether src %s" % A, "ether dst host %s" % B, "ether host %s and not ip" % B,
    # 802.1Q: primitives see inside a tag only after `vlan`
    "vlan", "vlan 5", "vlan and icmp", "icmp", "vlan 6", "not vlan and icmp",
    # precedence: `and` and `or` bind equally, left to right
    "icmp or arp and host 10.0.0.2", "arp or icmp and host 10.0.0.1",
    "not (icmp or udp) and ip", "!arp && (icmp || ether proto 0x88b5)",
    "tcp or udp and not src host 10.0.0.1",
    # lgnet's words (tcpdump is given what they stand for)
    "who-has", "is-at", "echo-request", "echo-reply", "lgnet", "lgnet and broadcast",
    "icmp and echo-reply and src host 10.0.0.2", "who-has and dst host 10.0.0.2",
    "not lgnet and not ip",
]


def lgnet_keeps(expression: str) -> list[bytes]:
    f = compile_filter(expression)
    return [raw for raw in RAW if f(raw)]


@pytest.fixture(scope="module")
def frames_pcap(tmp_path_factory):
    path = tmp_path_factory.mktemp("filters") / "frames.pcap"
    wrpcap(str(path), [FRAMES[n] for n in NAMES])
    return path


def tcpdump_keeps(pcap, expression: str) -> list[bytes]:
    """The frames tcpdump itself keeps: its output capture, read back."""
    done = subprocess.run([TCPDUMP, "-r", str(pcap), "-w", "-", expression],
                          capture_output=True, timeout=20)
    assert done.returncode == 0, done.stderr.decode()
    return [bytes(p) for p in PcapReader(io.BytesIO(done.stdout))]


def names_of(kept: list[bytes]) -> list[str]:
    return [NAMES[RAW.index(raw)] for raw in kept]


def test_the_table_is_as_wide_as_promised():
    assert len(set(EXPRESSIONS)) >= 40 and len(FRAMES) >= 12


@needs_tcpdump
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_lgnet_keeps_exactly_the_frames_tcpdump_keeps(frames_pcap, expression):
    expected = tcpdump_keeps(frames_pcap, expand(expression))
    assert names_of(lgnet_keeps(expression)) == names_of(expected)


@pytest.mark.parametrize("expression, kept", [
    # counted by hand on FRAMES
    ("icmp", {"ping", "pong", "big_ping", "unreachable"}),      # not the tagged one
    ("vlan and icmp", {"vlan_ping"}),
    ("tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn", {"syn"}),
    ("ip[6:2] & 0x1fff != 0", {"frag_second"}),
    ("icmp or arp and host 10.0.0.2",                            # (icmp or arp) and host
     {"who_has", "is_at", "ping", "pong", "big_ping", "unreachable"}),
    ("udp port 7", {"udp_echo", "udp_reply"}),                   # not the ICMP error's copy
    ("lgnet", {"lgnet_bcast", "lgnet_unicast"}),
    ("who-has", {"who_has"}),
    ("greater 200", {"big_ping", "frag_first", "frag_second"}),
])
def test_hand_counted_answers(expression, kept):
    assert set(names_of(lgnet_keeps(expression))) == kept


def test_scapy_packets_and_bytes_get_the_same_answer():
    f = compile_filter("udp port 7")
    assert f(FRAMES["udp_echo"]) and f(RAW[NAMES.index("udp_echo")])
    assert not f(FRAMES["ping"]) and not f(b"")


def test_the_macros_are_pcap_filter_text():
    for word, meaning in MACROS.items():
        compile_filter(meaning)
        assert expand(word) == "(%s)" % meaning
    assert expand("icmp[icmptype] == icmp-echo") == "icmp[icmptype] == icmp-echo"
    assert expand("host lgnet-box") == "host lgnet-box"
    assert expand("Echo-Reply or lgnet") == "(%s) or (%s)" % (MACROS["echo-reply"],
                                                            MACROS["lgnet"])


@pytest.mark.parametrize("text, message", [
    ("icmp and", "filter 'icmp and': libpcap: can't parse filter expression: syntax error"),
    ("gopher", "libpcap: can't parse filter expression: syntax error"),
    ("port 99999", "libpcap: illegal port number 99999 > 65535"),
    ("net 10.0.0.1/8", 'libpcap: non-network bits set in "10.0.0.1/8"'),
    ("ip broadcast", "libpcap: netmask not known, so 'ip broadcast' not supported"),
    ("who-has and", "filter 'who-has and' (that is, '(arp[6:2] = 1) and'): libpcap: "),
])
def test_libpcap_refusals_carry_its_message(text, message):
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    assert message in str(caught.value)


@needs_tcpdump
def test_libpcap_refuses_what_tcpdump_refuses(frames_pcap):
    for text in ("icmp and", "port 99999", "gopher"):
        done = subprocess.run([TCPDUMP, "-r", str(frames_pcap), text], capture_output=True,
                              timeout=20)
        assert done.returncode != 0
        with pytest.raises(FilterError):
            compile_filter(text)
