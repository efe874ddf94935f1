"""A UDP stream between two host ports, within one lab or across the two-host demo's VXLAN.

How README's "Scale on paper" figures were measured (not a test: speed is never asserted).
Each lab runs through the Python API (lgnet.lab.Lab) with one idle guest and a host port
(Lab.port, lguest_net's rules from a slot of its own); the sending port writes COUNT frames of
SIZE bytes (Ethernet + IPv4 + UDP to port 9) to the receiving port's MAC as fast as its link
takes them; the receiver counts what arrived and the time from the first to the last.

    python docs/two-hosts-udp.py local COUNT SIZE                    # both ports in one lab
    ip netns exec hostB python docs/two-hosts-udp.py receive DIR      # host B: prints its MAC
    ip netns exec hostA python docs/two-hosts-udp.py send DIR COUNT SIZE

(`receive` writes DIR/mac once its port is up and DIR/result at the end; `send` waits for
DIR/mac.) The namespaces and bridges are the README's; the labs' uplinks create the VXLAN
ports, as scenarios/two-hosts-{a,b}.yaml do.
"""
import os
import sys
import tempfile
import time

from lgnet.lab import Lab
from lgnet.scenario import load_scenario

IDLE_SECONDS = 2.0            # the stream is over when nothing more arrived for this long
HOST = {"a": (0, "10.254.0.2", "10.0.0.3/24"), "b": (256, "10.254.0.1", "10.0.0.13/24")}
SCENARIO = """\
first_guest_id: {first}
networks:
  lan0: {{uplink: {{bridge: br0, vxlan: {{id: 42, remote: {remote}, dev: veth0}}}}}}
guests:
  - {{name: idle, driver: python, nets: [lan0], ip: {ip}}}
"""
LOCAL = "networks: {lan0: {}}\nguests:\n  - {name: idle, driver: python, nets: [lan0]}\n"


def lab_for(host: str | None) -> Lab:
    text = LOCAL if host is None else SCENARIO.format(
        first=HOST[host][0], remote=HOST[host][1], ip=HOST[host][2])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return Lab(load_scenario(f.name))
    finally:
        os.unlink(f.name)


def frame(port, dest_mac: str, size: int) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    head = Ether(dst=dest_mac, src=port.mac) / IP(src="10.0.0.98", dst="10.0.0.99") \
        / UDP(sport=9, dport=9)
    return bytes(head / (b"\0" * (size - len(head))))


def stream(port, dest_mac: str, count: int, size: int) -> float:
    data = frame(port, dest_mac, size)
    started = time.monotonic()
    for _ in range(count):
        port.sock.send(data)
    return time.monotonic() - started


def received(port) -> tuple[int, float]:
    """Frames of the stream that arrived, and the seconds from the first to the last."""
    while True:
        before = len(port._frames)
        time.sleep(IDLE_SECONDS)
        if len(port._frames) == before:
            break
    times = [t for t, data in port._frames if data[12:14] == b"\x08\x00" and data[23] == 17]
    return len(times), (times[-1] - times[0]) if len(times) > 1 else 0.0


def report(count: int, size: int, sent_s: float | None, got: int, span: float) -> str:
    rate = (got - 1) / span if span else 0.0
    text = "%d of %d frames of %d B arrived (%.1f%% lost), %.0f frames/s = %.2f MB/s" % (
        got, count, size, 100.0 * (count - got) / count, rate, rate * size / 1e6)
    if sent_s is not None:
        text += "; sent in %.2f s" % sent_s
    return text


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "local":
        count, size = int(argv[1]), int(argv[2])
        with lab_for(None) as lab:
            sender, receiver = lab.port("lan0"), lab.port("lan0")
            sent_s = stream(sender, receiver.mac, count, size)
            print(report(count, size, sent_s, *received(receiver)))
    elif role == "receive":
        directory = argv[1]
        with lab_for("b") as lab:
            port = lab.port("lan0")
            with open(os.path.join(directory, "mac"), "w") as f:
                f.write(port.mac)
            while not os.path.exists(os.path.join(directory, "sent")):
                time.sleep(0.1)
            with open(os.path.join(directory, "sent")) as f:
                count, size = map(int, f.read().split())
            result = report(count, size, None, *received(port))
        with open(os.path.join(directory, "result"), "w") as f:
            f.write(result + "\n")
        print(result)
    elif role == "send":
        directory, count, size = argv[1], int(argv[2]), int(argv[3])
        with lab_for("a") as lab:
            port = lab.port("lan0")
            mac_file = os.path.join(directory, "mac")
            while not os.path.exists(mac_file):
                time.sleep(0.1)
            with open(mac_file) as f:
                mac = f.read().strip()
            time.sleep(1.0)            # the bridges settle (and learn, from the first frames)
            sent_s = stream(port, mac, count, size)
            with open(os.path.join(directory, "sent"), "w") as f:
                f.write("%d %d" % (count, size))
            while not os.path.exists(os.path.join(directory, "result")):
                time.sleep(0.1)
        print("sent %d frames in %.2f s" % (count, sent_s))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
