"""lgnet.packets: deliveries as scapy packets, and expectation checks (the filters themselves:
tests/test_filters.py)."""
import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from lgnet.fabric.capture import Delivery
from lgnet.packets import check, describe, to_packet
from lgnet.scenario import Expectation

pytestmark = pytest.mark.timeout(30)

A, B = "02:00:00:00:00:00", "02:00:01:00:00:00"
WHO_HAS = Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A, psrc="10.0.0.1",
                                                       pdst="10.0.0.2")
PING = Ether(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8)
PONG = Ether(src=B, dst=A) / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=0)


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


def test_check_counts_impaired_frames_only_for_fault():
    from dataclasses import replace
    ok = delivery(ARP(op=1))
    lost = replace(delivery(ARP(op=1), t=100.5), buffer=-1, used_len=0,
                   fault="dropped: loss 0.1 (link alpha->beta on lan0)")
    late = replace(delivery(ARP(op=2), t=101.0), fault="delayed: delay 20ms (net lan0)")
    everything = [ok, lost, late]
    assert len(check(Expectation("x:1"), everything, 100.0).matched) == 2     # deliveries
    assert check(Expectation("x:1", sender="alpha", receiver="beta", fault="dropped: loss"),
                 everything, 100.0).matched == [lost]
    assert check(Expectation("x:1", fault="delayed"), everything, 100.0).matched == [late]
    assert not check(Expectation("x:2", fault="corrupted"), everything, 100.0).held
