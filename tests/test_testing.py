"""The Python API and pytest plugin: host ports into a net, scapy packets in and out, the
capture as a PacketList, guests by name, and the `lab` fixture itself."""
import os
import subprocess
import sys

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

import lgnet
from lgnet.errors import LgnetError

from conftest import ENV, REPO, lgnet_shm

pytestmark = pytest.mark.timeout(60)
ECHO = str(REPO / "scenarios" / "echo.yaml")
ME = "10.0.0.99"
PAYLOAD_TYPE = 0x88B5                 # lgnet's experimental ethertype


@pytest.fixture(scope="module")
def echo_lab():
    """alpha (10.0.0.1) and beta (10.0.0.2), answering; shared by the tests of this module
    that only add ports."""
    with lgnet.up(ECHO) as lab:
        yield lab
    assert lgnet_shm() == []


def resolve(port, ip: str) -> str:
    port.send(ARP(pdst=ip, psrc=ME))
    return port.expect("is-at and src host %s" % ip, timeout=10)[ARP].hwsrc


def test_arp_who_has_from_a_port_is_answered_by_a_python_guest(echo_lab):
    port = echo_lab.port("lan0")
    port.send(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(op="who-has", pdst="10.0.0.1", psrc=ME))
    reply = port.expect(lambda p: ARP in p and p[ARP].op == 2, timeout=10)
    assert reply[ARP].psrc == "10.0.0.1" and reply[ARP].pdst == ME
    assert reply[ARP].hwdst == port.mac == reply[Ether].dst
    assert reply[ARP].hwsrc == reply[Ether].src == "02:00:%02x:00:00:00" % (
        echo_lab.guest("alpha").stats["guest"])


def test_a_unicorn_guest_answers_a_port_too(tmp_path):
    """The bundled i386 kernel under Unicorn: same ARP, ICMP echo and UDP echo answers."""
    scenario = tmp_path / "unicorn.yaml"
    scenario.write_text("networks: {lan0: {}}\nguests:\n"
                        "  - {name: real, kernel: bundled, nets: [lan0], ip: 10.0.0.7/24}\n")
    with lgnet.up(str(scenario)) as lab:
        port = lab.port("lan0")
        mac = resolve(port, "10.0.0.7")
        port.send(Ether(dst=mac) / IP(src=ME, dst="10.0.0.7") / ICMP(id=5, seq=2) / b"ping")
        pong = port.expect("echo-reply and src host 10.0.0.7", timeout=10)
        assert (pong[ICMP].id, pong[ICMP].seq, bytes(pong[ICMP].payload)) == (5, 2, b"ping")
        port.send(Ether(dst=mac) / IP(src=ME, dst="10.0.0.7") / UDP(sport=999, dport=7) / b"u")
        assert port.expect("udp port 7", timeout=10)[UDP].load == b"u"
        assert {(p.sender, p.receiver) for p in lab.capture("lan0")} == {
            ("port0", "real"), ("real", "port0")}
    assert lgnet_shm() == []


def test_icmp_echo(echo_lab):
    port = echo_lab.port("lan0")
    beta = resolve(port, "10.0.0.2")
    port.send(Ether(dst=beta) / IP(src=ME, dst="10.0.0.2") / ICMP(id=0x1234, seq=7)
              / b"are you there?")
    reply = port.expect("icmp and echo-reply", timeout=10)
    assert (reply[IP].src, reply[IP].dst, reply[ICMP].id, reply[ICMP].seq) == (
        "10.0.0.2", ME, 0x1234, 7)
    assert bytes(reply[ICMP].payload) == b"are you there?"
    # The guest computed real checksums: scapy computes the same ones afresh.
    fresh = reply.copy()
    del fresh[ICMP].chksum, fresh[IP].chksum
    rebuilt = Ether(bytes(fresh))
    assert (rebuilt[IP].chksum, rebuilt[ICMP].chksum) == (reply[IP].chksum, reply[ICMP].chksum)


def test_udp_echo(echo_lab):
    port = echo_lab.port("lan0")
    alpha = resolve(port, "10.0.0.1")
    port.send(Ether(dst=alpha) / IP(src=ME, dst="10.0.0.1") / UDP(sport=33333, dport=7)
              / b"echo me")
    reply = port.expect("udp and src host 10.0.0.1 and src port 7 and dst port 33333",
                        timeout=10)
    assert bytes(reply[UDP].payload) == b"echo me"
    fresh = reply.copy()
    del fresh[UDP].chksum
    assert Ether(bytes(fresh))[UDP].chksum == reply[UDP].chksum
    # Port 9 is not echoed.
    port.send(Ether(dst=alpha) / IP(src=ME, dst="10.0.0.1") / UDP(sport=33334, dport=9) / b"x")
    assert len(port.sniff(timeout=0.3)) == 0


def test_broadcast_reaches_every_other_slot_exactly_once(echo_lab):
    ports = [echo_lab.port("lan0") for _ in range(3)]
    before = len(echo_lab.deliveries("lan0"))
    marker = b"broadcast-once " + bytes(40)
    ports[0].send(Ether(dst="ff:ff:ff:ff:ff:ff", type=PAYLOAD_TYPE) / marker)
    for other in ports[1:]:
        got = other.expect("lgnet and broadcast", timeout=10)
        assert bytes(got.payload) == marker
    for other in ports:
        assert len(other.sniff(timeout=0.3)) == 0          # no second copy, none to itself
    mine = [d for d in echo_lab.deliveries("lan0")[before:] if d.data.endswith(marker)]
    # Every other slot: both guests, and every port of this lab (earlier tests' too).
    assert sorted(d.receiver for d in mine) == sorted(
        ["alpha", "beta"] + [p.name for p in echo_lab.ports if p is not ports[0]])
    assert len({d.receiver_slot for d in mine}) == len(mine)      # each slot once
    assert {d.sender for d in mine} == {ports[0].name} and len({d.send for d in mine}) == 1
    assert ports[0].slot not in {d.receiver_slot for d in mine}


def test_a_promiscuous_port_sees_unicast_between_two_others_a_plain_one_does_not(echo_lab):
    talker, listener = echo_lab.port("lan0"), echo_lab.port("lan0")
    spy = echo_lab.port("lan0", promisc=True, name="spy")
    bystander = echo_lab.port("lan0", name="bystander")
    frame = Ether(dst=listener.mac, type=PAYLOAD_TYPE) / (b"just for you" + bytes(40))
    talker.send(frame)
    assert bytes(listener.expect("lgnet", timeout=10).payload).startswith(b"just for you")
    seen = spy.expect("lgnet and ether dst %s" % listener.mac, timeout=10)
    assert seen[Ether].src == talker.mac
    assert len(bystander.sniff(timeout=0.5)) == 0
    assert len(talker.sniff(timeout=0.1)) == 0
    # The spy sees a guest's unicast reply to another port too; the bystander does not.
    resolve(talker, "10.0.0.1")
    spy.expect("is-at and src host 10.0.0.1", timeout=10)
    assert len(bystander.sniff(timeout=0.3).filter(lambda p: ARP in p and p[ARP].op == 2)) == 0
    captured = echo_lab.capture("lan0")
    to_spy = {p.sender for p in captured if p.receiver == "spy" and not p[Ether].dst.startswith(
        "ff:")}
    assert {talker.name, "alpha"} <= to_spy
    # All the bystander ever got were broadcasts (the talker's ARP request among them).
    assert [p[Ether].dst for p in captured if p.receiver == "bystander"] \
        == ["ff:ff:ff:ff:ff:ff"] * len([p for p in captured if p.receiver == "bystander"])


def test_expect_fails_with_a_readable_list_of_what_arrived(echo_lab):
    port, other = echo_lab.port("lan0"), echo_lab.port("lan0")
    other.send(Ether(dst=port.mac, type=PAYLOAD_TYPE) / (b"not what you want" + bytes(40)))
    with pytest.raises(AssertionError) as caught:
        port.expect("icmp", timeout=0.5)
    message = str(caught.value)
    assert message.startswith("port %s on lan0: no frame matching 'icmp' within 0.5s" % port.name)
    assert "what arrived (not yet taken), 1 frame:" in message
    assert "%s > %s (0x88b5) / Raw" % (other.mac, port.mac) in message
    # The frame that did not match is still there for the next expect.
    assert port.expect("lgnet", timeout=1)[Ether].src == other.mac


def test_a_port_refuses_a_frame_longer_than_lguest_net_s_buffers(echo_lab):
    port, spy = echo_lab.port("lan0"), echo_lab.port("lan0", promisc=True)
    long = Ether(dst=spy.mac, type=PAYLOAD_TYPE) / bytes(1942 - 14)
    with pytest.raises(LgnetError) as caught:
        port.send(long)
    assert str(caught.value) == ("port %s: a frame of 1942 bytes is longer than lguest_net's "
                                 "receive buffers (1514 bytes, ETH_FRAME_LEN): not sent"
                                 % port.name)
    largest = Ether(dst=spy.mac, type=PAYLOAD_TYPE) / bytes(1500)
    port.send(largest)                                  # 1514 bytes: whole, as offered
    got = spy.expect("lgnet and greater 1514", timeout=5)
    assert bytes(got) == port.frame_bytes(largest) and len(got) == 1514
    assert not spy.sniff(timeout=0.3, match="greater 1515")  # nothing cut short slipped through


def test_sniff_takes_only_the_frames_a_filter_keeps(echo_lab):
    port, other = echo_lab.port("lan0"), echo_lab.port("lan0")
    for n in range(3):
        other.send(Ether(dst=port.mac, type=PAYLOAD_TYPE) / (b"%d" % n + bytes(45)))
    other.send(Ether(dst=port.mac) / IP(src=ME, dst="10.0.0.50") / UDP(dport=9) / b"x")
    udp = port.sniff(count=1, timeout=5, match="udp dst port 9")
    assert len(udp) == 1 and udp[0][UDP].dport == 9
    rest = port.sniff(count=3, timeout=5)
    assert [bytes(p.payload)[:1] for p in rest] == [b"0", b"1", b"2"]


def test_capture_is_a_packet_list_annotated_with_guest_names(echo_lab):
    port = echo_lab.port("lan0", name="asker", mac="02:42:00:00:00:01")
    assert port.mac == "02:42:00:00:00:01"
    resolve(port, "10.0.0.2")
    captured = echo_lab.capture("lan0")
    asks = [p for p in captured if p.sender == "asker" and ARP in p]
    assert asks and echo_lab.capture("lan0")[-1].lgnet == captured[-1].lgnet
    answer = next(p for p in captured if p.receiver == "asker" and ARP in p)
    assert {p.receiver for p in asks} >= {"alpha", "beta"}
    assert answer.sender == "beta" and answer[ARP].op == 2
    assert answer.lgnet.receiver_slot == port.slot and answer.lgnet.used_len == len(answer)
    assert captured.listname == "lan0" and answer.sniffed_on == "lan0"


def test_port_mistakes_are_lgnet_errors(echo_lab):
    with pytest.raises(LgnetError, match="no network 'lan9'"):
        echo_lab.port("lan9")
    with pytest.raises(LgnetError, match="must be six bytes, unicast"):
        echo_lab.port("lan0", mac="03:00:00:00:00:01")
    with pytest.raises(LgnetError, match="no guest 'zeta'"):
        echo_lab.guest("zeta")
    for name in ("two words", "alpha"):
        with pytest.raises(LgnetError, match="port name %r: must be a new name" % name):
            echo_lab.port("lan0", name=name)


def test_a_guest_by_name_console_stats_kill_wait():
    with lgnet.up(ECHO) as lab:
        port = lab.port("lan0")
        resolve(port, "10.0.0.1")
        alpha = lab.guest("alpha")
        assert "eth0: 10.0.0.1/24: answering ARP, ping and UDP echo" in alpha.console_text
        assert alpha.stats["rx_packets"] >= 1 and alpha.stats["tx_packets"] >= 1
        assert alpha.wait(0.1) is None
        alpha.kill()
        assert alpha.wait(5) == -9
        assert lab.guest("alpha").killed
        # beta goes on answering.
        resolve(port, "10.0.0.2")
        during = len(lab.capture("lan0"))
    # The lab's own capture directory is gone, not what it recorded.
    assert not os.path.exists(lab.capture_dir)
    after = lab.capture("lan0")
    assert len(after) >= during and {"alpha", "beta"} <= {p.sender for p in after}
    assert lgnet_shm() == []


@pytest.mark.lgnet_scenario(ECHO)
def test_the_lab_fixture_with_a_marker(lab):
    assert [g.name for g in lab.guests] == ["alpha", "beta"]
    assert resolve(lab.port("lan0"), "10.0.0.2").startswith("02:00:")


@pytest.mark.parametrize("lab", [ECHO], indirect=True)
def test_the_lab_fixture_parametrized_indirectly(lab):
    assert lab.capture_dir is not None and lab.scenario.path.name == "echo.yaml"


def test_importing_lgnet_imports_no_lab_until_up_is_used():
    code = ("import sys, lgnet; assert 'lgnet.lab' not in sys.modules; up = lgnet.up; "
            "import lgnet.lab; assert up is lgnet.lab.up; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                            text=True, timeout=30)
    assert result.stdout.strip() == "ok", result.stderr


def test_the_plugin_is_registered_as_a_pytest11_entry_point():
    from importlib.metadata import entry_points
    assert [e.value for e in entry_points(group="pytest11") if e.name == "lgnet"] == [
        "lgnet.testing"]
