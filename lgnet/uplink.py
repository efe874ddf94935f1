"""A net's uplink: the member of a net whose other end is a TAP device in a kernel bridge.

lguest's nets never left their host: one shared page, one Host. An uplink joins a net to
whatever else the bridge holds — the host itself, or, through a VXLAN (or GRE, or veth) port,
the same net's bridge on another machine, where that lab's uplink joins its own guests. No
protocol of lgnet's crosses between hosts: the kernel's bridge and VXLAN carry plain Ethernet.

An uplink is a host port (guest/port.py, its own Launcher with a slot in the net file) run with
`uplink`: promiscuous, its slot holding the TAP's MAC, its link `--tunnet=bridge:NAME` (a TAP the
Launcher creates and adds to that bridge, and with `vxlan:` also a VXLAN port it creates
beside it and removes when it stops) or `--tunnet=tap:NAME`. Out go multicast frames and
frames for MACs no slot of the net holds; what comes in is sent by lguest_net's rules. So the
broker's capture of the net shows every crossing as a delivery to or from the uplink (named
`uplink:NET`); the TAP's own counters say what crossed (`Uplink.counters`).

Rules of this file: the lab owns each uplink's Launcher like a guest's; this module knows how
to start one, how to see it is up, and what the kernel says about its TAP. Privilege is checked
before anything starts: a bridge (and a VXLAN port) need CAP_NET_ADMIN; only `tap:` alone may
go without it (a persistent TAP its owner may attach to).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.guest.devices import tun
from lgnet.guest.devices.tun import TunSpec
from lgnet.hostport import await_ready_line
from lgnet.scenario import UPLINK_NAME, GuestSpec, Scenario

UPLINK_KERNEL = "python:lgnet.guest.port"
UPLINK_MEM_MB = 4
UPLINK_START_SECONDS = 20
SYS_NET = "/sys/class/net"
# The TAP's view, from the kernel: what it received from us left the net; what it transmitted
# to us came in.
COUNTERS = {"out_packets": "rx_packets", "out_bytes": "rx_bytes",
            "in_packets": "tx_packets", "in_bytes": "tx_bytes"}


def name_of(net: str) -> str:
    return UPLINK_NAME % net


def launch_args(spec: TunSpec) -> list[str]:
    """The uplink Launcher's arguments after its --sharenet."""
    return ["--tunnet", spec.arg, str(UPLINK_MEM_MB), UPLINK_KERNEL, "uplink"]


def guest_spec(net: str) -> GuestSpec:
    return GuestSpec(name=name_of(net), driver="python", nets=(net,), promisc=True)


def check_privilege(scenario: Scenario) -> None:
    """An uplink that makes or bridges devices needs CAP_NET_ADMIN: say so before anything
    starts, naming the net and what it needs the privilege for."""
    if tun.has_net_admin():
        return
    for name, network in scenario.networks.items():
        spec = network.uplink
        if spec is not None and (spec.bridge or spec.vxlan):
            raise LgnetError(
                "the uplink of %s (%s) needs CAP_NET_ADMIN, to create %s and add %s to a "
                "bridge: run lgnet as root, e.g. in a network namespace "
                "(ip netns exec NS lgnet up %s)" % (
                    name, spec.describe(),
                    "a TAP device and a VXLAN port" if spec.vxlan else "a TAP device",
                    "them" if spec.vxlan else "it", scenario.path))


def parse_option(text: str) -> tuple[str, TunSpec]:
    """`lgnet up --uplink NET=bridge:BR[,tap:NAME][,vxlan:ID,remote:A.B.C.D,dev:IFACE]` or
    `NET=tap:NAME` -> (NET, its TunSpec)."""
    net, sep, arg = text.partition("=")
    if not sep or not net or not arg:
        raise LgnetError("--uplink wants NET=bridge:NAME or NET=tap:NAME, got %r" % text)
    try:
        spec = tun.parse_tunnet(arg)
    except LgnetError as exc:
        why = str(exc)[len("--tunnet=%s: " % arg):]
        raise LgnetError("--uplink %s: %s" % (text, why)) from None
    if spec.bridge is None and spec.tap is None:
        raise LgnetError("--uplink %s: wants bridge:NAME or tap:NAME, got %r" % (text, arg))
    return net, spec


def with_uplinks(scenario: Scenario, options: list[str]) -> Scenario:
    """The scenario with the command line's uplinks (which replace the file's, net by net)."""
    networks = dict(scenario.networks)
    for text in options:
        net, spec = parse_option(text)
        if net not in networks:
            raise LgnetError("--uplink %s: no network %r in %s (networks: %s)" % (
                text, net, scenario.path, ", ".join(networks) or "none"))
        networks[net] = replace(networks[net], uplink=spec)
    return replace(scenario, networks=networks)


@dataclass
class Uplink:
    """A running uplink, as the lab holds it: its Launcher (a lab.GuestRun) and its TAP."""
    net: str
    spec: TunSpec
    run: object
    slot: int | None = None
    mac: str | None = None
    tap: str | None = None
    counters: dict | None = None          # what crossed, read from the TAP before it went

    @property
    def name(self) -> str:
        return self.run.name

    def wait_ready(self, timeout: float = UPLINK_START_SECONDS) -> None:
        """Until the uplink's Launcher says it is up; then find its TAP by the MAC it holds."""
        self.slot, self.mac = await_ready_line(
            self.run, timeout, "the uplink of %s (%s)" % (self.net, self.spec.describe()))
        self.tap = interface_with_mac(self.mac)

    def count(self) -> None:
        """Read the TAP's counters (before the Launcher, and with it the TAP, goes)."""
        if self.tap is None:
            return
        try:
            self.counters = {ours: int(read_sys(self.tap, "statistics/" + theirs))
                             for ours, theirs in COUNTERS.items()}
        except (OSError, ValueError):
            pass

    def describe(self) -> str:
        """`uplink:lan0: tap0 in bridge br0, slot 2 mac ..: out 4 frames (392 B), in 3 (294 B)`."""
        where = "%s in bridge %s" % (self.tap, self.spec.bridge) if self.spec.bridge \
            else str(self.tap)
        text = "%s: %s, slot %s mac %s" % (self.name, where, self.slot, self.mac)
        if self.spec.vxlan:
            text += ", vxlan %s to %s over %s" % (self.spec.vxlan.name, self.spec.vxlan.remote,
                                                  self.spec.vxlan.dev)
        c = self.counters
        if c is not None:
            text += ": out %d frames (%d B), in %d frames (%d B)" % (
                c["out_packets"], c["out_bytes"], c["in_packets"], c["in_bytes"])
        return text

    def leftovers(self) -> None:
        """After the Launcher ended: a VXLAN port it could not remove (it was SIGKILLed)."""
        if self.spec.vxlan and self.slot is not None and \
                os.path.exists(os.path.join(SYS_NET, self.spec.vxlan.name)):
            tun.remove_vxlan(self.spec.vxlan.name)


def read_sys(interface: str, what: str) -> str:
    with open(os.path.join(SYS_NET, interface, what)) as f:
        return f.read().strip()


def interface_with_mac(mac: str) -> str | None:
    """This host's TAP with that hardware address (in the caller's namespace). Only a TAP: a
    bridge takes the address of a port, so it may well share the TAP's."""
    try:
        names = sorted(os.listdir(SYS_NET))
    except OSError:
        return None
    for name in names:
        try:
            if os.path.exists(os.path.join(SYS_NET, name, "tun_flags")) \
                    and read_sys(name, "address") == mac:
                return name
        except OSError:
            continue
    return None


def holder(slot_mac: bytes) -> str | None:
    """What `lgnet slots` says of a slot whose MAC (less the promiscuous bit) is a local
    interface's: that is an uplink, and the interface its TAP."""
    mac = bytes([slot_mac[0] & ~abi.NET_PROMISC_BIT]) + slot_mac[1:]
    name = interface_with_mac(mac.hex(":"))
    if name is None:
        return None
    master = os.path.join(SYS_NET, name, "master")
    if os.path.islink(master):
        return "uplink: %s in bridge %s" % (name, os.path.basename(os.readlink(master)))
    return "uplink: %s" % name

