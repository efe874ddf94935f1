"""lgnet.packets: the filter language of `expect:` and `port.expect`, and expectation checks."""
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from lgnet.fabric.capture import Delivery
from lgnet.packets import FilterError, check, compile_filter, describe, to_packet
from lgnet.scenario import Expectation

pytestmark = pytest.mark.timeout(30)

A, B = "02:00:00:00:00:00", "02:00:01:00:00:00"
WHO_HAS = Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A, psrc="10.0.0.1",
                                                       pdst="10.0.0.2")
IS_AT = Ether(src=B, dst=A) / ARP(op=2, hwsrc=B, psrc="10.0.0.2", pdst="10.0.0.1")
PING = Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8)
PONG = Ether(src=B, dst=A) / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0)
ECHO = Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=7)
WEB = Ether(src=A, dst="01:00:5e:00:00:01") / IP(src="10.0.0.1", dst="224.0.0.1") / TCP(dport=80)
LGNET = Ether(src=A, dst=B, type=0x88B5) / (b"hello" + bytes(41))
ALL = {"who_has": WHO_HAS, "is_at": IS_AT, "ping": PING, "pong": PONG, "echo": ECHO,
       "web": WEB, "lgnet": LGNET}


@pytest.mark.parametrize("text, matching", [
    ("arp", {"who_has", "is_at"}),
    ("who-has", {"who_has"}),
    ("is-at", {"is_at"}),
    ("ip", {"ping", "pong", "echo", "web"}),
    ("icmp", {"ping", "pong"}),
    ("echo-request", {"ping"}),
    ("icmp and echo-reply", {"pong"}),
    ("udp port 7", {"echo"}),
    ("dst port 7", {"echo"}),
    ("src port 7", set()),
    ("tcp and port 80", {"web"}),
    ("host 10.0.0.2", {"who_has", "is_at", "ping", "pong", "echo"}),
    ("src host 10.0.0.1", {"who_has", "ping", "echo", "web"}),
    ("dst host 10.0.0.1 and not arp", {"pong"}),
    ("broadcast", {"who_has"}),
    ("multicast", {"who_has", "web"}),
    ("ether src 02:00:01:00:00:00", {"is_at", "pong"}),
    ("ether dst host 02:00:01:00:00:00", {"ping", "echo", "lgnet"}),
    ("ether host 02:00:01:00:00:00 and not ip", {"is_at", "lgnet"}),
    ("ether proto 0x0806", {"who_has", "is_at"}),
    ("lgnet", {"lgnet"}),
    ("len > 59", {"lgnet"}),
    ("len <= 42", {"who_has", "is_at", "ping", "pong", "echo"}),
    ("icmp or udp", {"ping", "pong", "echo"}),
    ("not (icmp or udp) and ip", {"web"}),
    ("! arp && (icmp || lgnet)", {"ping", "pong", "lgnet"}),
    ("arp or icmp and echo-reply", {"who_has", "is_at", "pong"}),   # and binds tighter
    ("ICMP AND Echo-Reply", {"pong"}),
])
def test_filters_match_like_bpf(text, matching):
    f = compile_filter(text)
    assert {name for name, packet in ALL.items() if f(packet)} == matching


@pytest.mark.parametrize("text, message", [
    ("", "an empty filter"),
    ("icmp and", "at the end of filter 'icmp and': expected more"),
    ("icmp udp", "at 'udp' of filter 'icmp udp': expected 'and', 'or' or the end"),
    ("host 10.0.0", "at '10.0.0' of filter 'host 10.0.0': expected an IPv4 address"),
    ("port seven", "expected a port number"),
    ("ether src 02:00", "expected a MAC address"),
    ("(arp", "expected ')'"),
    ("len = 3", "cannot read"),
    ("gopher", "at 'gopher' of filter 'gopher': expected a primitive"),
])
def test_filter_errors_say_where(text, message):
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    assert message in str(caught.value)


def delivery(packet, sender="alpha", receiver="beta", t=100.0, send=1):
    data = bytes(packet)
    return Delivery(time=t, data=data, net="lan0", sender=sender, sender_slot=0,
                    receiver=receiver, receiver_slot=1, key_offset=4, buffer=0,
                    used_len=len(data), send=send, offered=len(data), sender_guest=0,
                    sender_pid=10, receiver_guest=1, receiver_pid=11,
                    comment="%s slot 0 -> %s slot 1 key lan0+0x4 buffer 0 used_len %d send %d"
                            % (sender, receiver, len(data), send))


def test_to_packet_carries_the_lguest_facts():
    d = delivery(PING)
    packet = to_packet(d)
    assert ICMP in packet and packet.sender == "alpha" and packet.receiver == "beta"
    assert packet.time == 100.0 and packet.lgnet is d and packet.sniffed_on == "lan0"
    assert describe(d).startswith("Ether / IP / ICMP 10.0.0.1 > 10.0.0.2 echo-request")
    assert describe(d).endswith("[%s]" % d.comment)


def test_check_counts_windows_and_reports_what_was_seen():
    start = 100.0
    seen = [delivery(WHO_HAS, t=100.5), delivery(PING, t=101.0),
            delivery(PONG, "beta", "alpha", t=101.1), delivery(PING, t=109.0)]
    held = check(Expectation("x.yaml:3", sender="alpha", match="echo-request", within=5),
                 seen, start)
    assert held.held and len(held.matched) == 1 and held.report.startswith("ok ")
    exact = check(Expectation("x.yaml:4", receiver="alpha", count=1), seen, start)
    assert exact.held
    none = check(Expectation("x.yaml:5", sender="alpha", match="udp", count=0), seen, start)
    assert none.held
    failed = check(Expectation("x.yaml:6", sender="alpha", match="icmp", least=3), seen, start)
    assert not failed.held
    assert "FAILED x.yaml:6: from alpha, match 'icmp', min 3" in failed.report
    assert "wanted at least 3 matching deliveries, saw 2" in failed.report
    assert "matching deliveries from alpha:" in failed.report
    assert "+1.000s Ether / IP / ICMP 10.0.0.1 > 10.0.0.2 echo-request" in failed.report
    nothing = check(Expectation("x.yaml:7", receiver="gamma"), seen, start)
    assert not nothing.held and "nothing was delivered to gamma" in nothing.report
