"""The default Python guest kernel (`python:`): boot, bring up every device, run the command
line's script, report what arrived, power down.

Rules of this file: a Python guest uses only what a real guest has — its own RAM, the boot
header, the device descriptor page and hypercalls (guest/pvmachine.py) — so everything it does
crosses the fabric exactly as a Unicorn guest's frames do. Its drivers live beside it:
pvconsole.py (console), pvnet.py (lguest_net), ipstack.py (with `ip=`: ARP, ping and UDP echo
like the bundled kernel), script.py (the `script=` steps of a scenario's Python guest).
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from lgnet import abi
from lgnet.guest import script
from lgnet.guest.ipstack import IpStack, ip_text, parse_ip_list
from lgnet.guest.pvconsole import Console
from lgnet.guest.pvmachine import Machine, parse_cmdline
from lgnet.guest.pvnet import ETHERTYPE_LGNET, NetDevice, format_mac


@dataclass
class PyGuest:
    """The Python guest's kernel: devices found in the descriptor page, brought up."""
    machine: Machine
    console: Console
    nets: list[NetDevice] = field(default_factory=list)
    stack: IpStack | None = None

    @classmethod
    def boot(cls, machine: Machine) -> "PyGuest":
        options = parse_cmdline(machine.cmdline())
        promisc = "promisc" in options
        guest = cls(machine, Console(machine))
        for index, dtype, features, _status, _pages, pfn in machine.devices():
            if dtype == abi.LGUEST_DEVICE_T_NET:
                net = NetDevice(machine, index, features, pfn, promisc)
                net.open()
                guest.nets.append(net)
        if "ip" in options:
            guest.configure_ip(options["ip"])
        return guest

    def configure_ip(self, text: str) -> None:
        """ip=A.B.C.D[/N],...: one address per net device, in device order."""
        try:
            addresses = parse_ip_list(text)
        except ValueError:
            self.console.write("lguest: bad address in ip=\n")
            return
        self.stack = IpStack(self.machine)
        for net, (ip, netmask) in zip(self.nets, addresses):
            self.stack.attach(net, ip, netmask)
            self.console.write("eth%d: %s/%d: answering ARP, ping and UDP echo\n"
                               % (net.index, ip_text(ip), bin(netmask).count("1")))

    def frame(self, net: NetDevice, dest: bytes, text: str) -> bytes:
        payload = text.encode()
        frame = dest + net.mac + struct.pack("!H", ETHERTYPE_LGNET) + payload
        return frame.ljust(abi.ETH_ZLEN, b"\0")


def report(guest: PyGuest) -> None:
    for net in guest.nets:
        guest.console.write("eth%d: received %d frames\n" % (net.index, len(net.received)))
        for frame in net.received:
            ethertype = struct.unpack_from("!H", frame.data, 2 * abi.ETH_ALEN)[0]
            if ethertype == ETHERTYPE_LGNET:
                what = frame.data[abi.ETH_HLEN:].rstrip(b"\0").decode(errors="replace")
            else:
                what = "%d bytes of ethertype %#06x" % (len(frame.data), ethertype)
            sender = frame.data[abi.ETH_ALEN:2 * abi.ETH_ALEN]
            guest.console.write("eth%d: from %s: %s\n" % (net.index, format_mac(sender), what))


def serve(guest: PyGuest) -> None:
    """With an address and no script: stay up answering until the Launcher is stopped, like
    the bundled kernel without ping=; and take commands typed on the console (`command`)."""
    guest.console.listen()
    while True:
        guest.machine.hcall(abi.LHCALL_HALT)
        # Outside the interrupt handler: a ping needs the net's interrupts delivered.
        while guest.console.lines:
            command(guest, guest.console.lines.pop(0))


CONSOLE_COMMANDS = "ping A.B.C.D [COUNT]"
MAX_PING_COUNT = 100


def command(guest: PyGuest, line: str) -> None:
    """One console line: `ping A.B.C.D [COUNT]` (COUNT 1..100, default 1), as `NAME ping`
    of lgnet's shell types it."""
    words = line.split()
    if not words:
        return
    try:
        if words[0] != "ping" or len(words) not in (2, 3):
            raise ValueError
        ipaddress.IPv4Address(words[1])
        count = int(words[2]) if len(words) == 3 else 1
        if not 1 <= count <= MAX_PING_COUNT:
            raise ValueError
    except ValueError:
        guest.console.write("lgnet pvdriver: %r: the console takes %s\n"
                            % (line, CONSOLE_COMMANDS))
        return
    guest.stack.ping(guest.console, words[1], count)


def main(machine: Machine) -> None:
    """The default Python kernel: boot, run the command line's script, report, power down."""
    guest = PyGuest.boot(machine)
    options = parse_cmdline(machine.cmdline())
    guest.console.write("lgnet pvdriver: guest %d up, %s\n" % (
        machine.guest_id, ", ".join("eth%d slot %d mac %s" % (n.index, n.slot, format_mac(n.mac))
                                    for n in guest.nets) or "no network"))
    if "ip" in options and "script" not in options:
        serve(guest)
    script.run_script(guest, script.parse(options.get("script", "")))
    report(guest)
    for net in guest.nets:
        net.close()
    machine.power_down()
