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
"""
from __future__ import annotations

from lgnet import abi
from lgnet.guest.pvdriver import Console, Machine, NetDevice, format_mac, parse_cmdline

READY = "lgnet port: up slot %d mac %s\n"


def parse_mac(text: str) -> bytes:
    mac = bytes.fromhex(text.replace(":", ""))
    if len(mac) != abi.ETH_ALEN:
        raise ValueError(text)
    return mac


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
    lan = NetDevice(machine, lan_index, lan_features, lan_pfn, promisc="promisc" in options)
    if "mac" in options:
        lan.mac = parse_mac(options["mac"])
    link = NetDevice(machine, link_index, link_features, link_pfn)
    lan.on_receive = link.transmit
    link.on_receive = lan.transmit
    link.open()
    lan.open()
    console.write(READY % (lan.slot, format_mac(lan.mac)))
    while True:
        # Everything happens in the receive interrupts; HALT until the next one.
        machine.hcall(abi.LHCALL_HALT)
