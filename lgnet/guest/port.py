"""`python:lgnet.guest.port`: a host port, the Python guest that plugs a test into a net.

A port is a guest like any other — its own Launcher, a slot reserved in the net file, the
lguest_net driver talking to the broker with hypercalls — with two net devices: eth0 on the
net (--sharenet) and eth1, a --tunnet=fd:N link whose host end is the test process
(lgnet.hostport). It bridges them: every frame the net delivers to eth0 goes out on eth1 to the
test, and every frame the test writes comes in on eth1 and is transmitted on eth0 by
lguest_net's rules (to the slot whose MAC it is addressed to, to every slot if it is multicast,
and always to promiscuous slots). So what a test sends and sees is exactly what a guest in
that slot would send and see; the port adds no rules of its own.

Command line: `mac=02:..` (the MAC in our slot; default lguest_net's 02:00:<guest id>:00:00)
and `promisc` (set the promiscuous bit: receive every frame on the net). Once both devices are
up it prints `lgnet port: up slot N mac M`, which the lab waits for.

`uplink` makes the port a net's uplink (lgnet.uplink): its link is a TAP in a kernel bridge, its
slot holds the TAP's MAC (so `lgnet slots` and `ip link` name the same address), and it sends
out only what must leave this host: a promiscuous slot gets a copy of every frame on the net,
but one addressed to a MAC another slot holds has arrived already and stays home. What does
leave — multicast, and unicast to a MAC no slot here holds (which lguest_net hands to
promiscuous slots only) — goes out; what comes in is sent by lguest_net's rules like any
guest's frame.
"""
from __future__ import annotations

import re

from lgnet import abi
from lgnet.guest.pvconsole import Console
from lgnet.guest.pvmachine import Machine, parse_cmdline
from lgnet.guest.pvnet import NetDevice, format_mac

READY = "lgnet port: up slot %d mac %s"
CLASH = ("lgnet uplink: a frame from %s came in, but a guest here has that MAC: give each "
         "host's lab its own guest ids (first_guest_id:)\n")
READY_LINE = re.compile(r"^lgnet port: up slot (\d+) mac ([0-9a-f:]{17})$")


def ready_line(slot: int, mac: str) -> str:
    """What the port prints once it is up (the lab waits for it)."""
    return READY % (slot, mac)


def parse_ready(line: str) -> tuple[int, str] | None:
    """(slot, mac) from the port's ready line, None for any other console line."""
    m = READY_LINE.match(line)
    return (int(m.group(1)), m.group(2)) if m else None


def parse_mac(text: str) -> bytes:
    mac = bytes.fromhex(text.replace(":", ""))
    if len(mac) != abi.ETH_ALEN:
        raise ValueError(text)
    return mac


def make_uplink(lan: NetDevice, link: NetDevice, console: Console) -> None:
    """Our slot takes the TAP's MAC; only what leaves this host goes out; a frame coming in
    from a MAC a guest here holds too is reported once per MAC, then sent all the same."""
    host_mac = link.slot_mac(abi.TUN_HOST_SLOT)
    lan.mac = bytes([host_mac[0] & ~abi.NET_PROMISC_BIT]) + host_mac[1:]
    clashes: set[bytes] = set()

    def send_out(frame: bytes) -> None:
        if leaves(lan, frame):
            link.transmit(frame)

    def bring_in(frame: bytes) -> None:
        source = frame[abi.ETH_ALEN:2 * abi.ETH_ALEN]
        if source not in clashes and lan.holds(source):
            # Like a bridge's "own address as source address": two hosts gave out the same
            # MAC (lguest_net's 02:00:<guest id>:00:00, from the same guest id).
            clashes.add(source)
            console.write(CLASH % format_mac(source))
        lan.transmit(frame)

    lan.on_receive, link.on_receive = send_out, bring_in


def leaves(lan: NetDevice, frame: bytes) -> bool:
    """Whether an uplink sends this frame out: it is not for a slot of this net alone."""
    dest = frame[:abi.ETH_ALEN]
    return abi.is_multicast(dest) or not lan.holds(dest)


def main(machine: Machine) -> None:
    options = parse_cmdline(machine.cmdline())
    console = Console(machine)
    found = [d for d in machine.devices() if d[1] == abi.LGUEST_DEVICE_T_NET]
    if len(found) != 2:
        console.write("lgnet port: needs a net (--sharenet) and a link (--tunnet), got %d nets\n"
                      % len(found))
        machine.power_down()
        return
    (lan_index, _, lan_features, _, _, lan_pfn), (link_index, _, link_features, _, _, link_pfn) \
        = found
    uplink = "uplink" in options
    # An uplink must hear frames for MACs no slot holds: lguest_net sends those to promiscuous
    # slots only.
    lan = NetDevice(machine, lan_index, lan_features, lan_pfn,
                    promisc="promisc" in options or uplink)
    if "mac" in options:
        lan.mac = parse_mac(options["mac"])
    link = NetDevice(machine, link_index, link_features, link_pfn)
    lan.on_receive, link.on_receive = link.transmit, lan.transmit
    if uplink:
        make_uplink(lan, link, console)
    link.open()
    lan.open()
    console.write(ready_line(lan.slot, format_mac(lan.mac)) + "\n")
    while True:
        # Everything happens in the receive interrupts; HALT until the next one.
        machine.hcall(abi.LHCALL_HALT)
