"""What a scripted Python guest does, as typed steps, and how they ride its command line.

Rules of this file: the steps are pure data with one text form; the lab (and anyone starting
a Python guest) builds steps and calls `command_line`; the Python kernel (guest/pvdriver.py)
calls `parse`, then `run_script` runs them on the guest's devices. The text form exists
because a guest's only input is its kernel command line, as lguest's guests had: `script=STEP,STEP,...` with steps
`await:NET:PEERS[:SECONDS]`, `bcast:NET`, `peers:NET`, `wait:SECONDS`, `ping:IP[:COUNT]`
(NET is a net device's index: eth0 is 0).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lgnet import abi
from lgnet.guest.pvnet import format_mac

if TYPE_CHECKING:
    from lgnet.guest.pvdriver import PyGuest

AWAIT_SECONDS = 10.0               # how long an await waits for its peers by default
ARG = "script="


@dataclass(frozen=True)
class Await:
    """Wait until `peers` other guests have a slot on net `net` (or `seconds` passed)."""
    net: int
    peers: int
    seconds: float = AWAIT_SECONDS


@dataclass(frozen=True)
class Broadcast:
    """One test frame to the broadcast address of net `net`."""
    net: int


@dataclass(frozen=True)
class Peers:
    """One unicast test frame to each other guest on net `net`."""
    net: int


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Ping:
    """ICMP echo requests to `ip` (the guest needs an address of its own: ip=)."""
    ip: str
    count: int = 1


@dataclass(frozen=True)
class Unknown:
    """A step the text form did not name; the guest says so on its console."""
    text: str


Step = Await | Broadcast | Peers | Wait | Ping | Unknown


def encode_step(step: Step) -> str:
    if isinstance(step, Await):
        return "await:%d:%d:%g" % (step.net, step.peers, step.seconds)
    if isinstance(step, Broadcast):
        return "bcast:%d" % step.net
    if isinstance(step, Peers):
        return "peers:%d" % step.net
    if isinstance(step, Wait):
        return "wait:%g" % step.seconds
    if isinstance(step, Ping):
        return "ping:%s:%d" % (step.ip, step.count)
    return step.text


def command_line(steps: list[Step]) -> str:
    """The `script=` argument of a guest's command line."""
    return ARG + ",".join(encode_step(step) for step in steps)


def parse_step(text: str) -> Step:
    kind, *args = text.split(":")
    try:
        if kind == "await" and len(args) in (2, 3):
            return Await(int(args[0]), int(args[1]),
                         float(args[2]) if len(args) > 2 else AWAIT_SECONDS)
        if kind == "bcast" and len(args) == 1:
            return Broadcast(int(args[0]))
        if kind == "peers" and len(args) == 1:
            return Peers(int(args[0]))
        if kind == "wait" and len(args) == 1:
            return Wait(float(args[0]))
        if kind == "ping" and len(args) in (1, 2):
            return Ping(args[0], int(args[1]) if len(args) > 1 else 1)
    except ValueError:
        pass
    return Unknown(text)


def parse(text: str) -> list[Step]:
    """The steps of a `script=` value (without `script=`)."""
    return [parse_step(part) for part in text.split(",") if part]


# --- running them -----------------------------------------------------------------------

def run_script(guest: "PyGuest", steps: list[Step]) -> None:
    """Run the steps in order on a booted Python guest."""
    console = guest.console
    for step in steps:
        if isinstance(step, Await):
            net = guest.nets[step.net]
            deadline = time.monotonic() + step.seconds
            while len(net.peers()) < step.peers and time.monotonic() < deadline:
                guest.machine.idle_until(min(deadline, time.monotonic() + 0.01))
        elif isinstance(step, Broadcast):
            net = guest.nets[step.net]
            got = net.transmit(guest.frame(net, abi.BROADCAST_MAC,
                                           "broadcast from %s" % format_mac(net.mac)))
            console.write("eth%d: broadcast reached %d peers\n" % (net.index, got))
        elif isinstance(step, Peers):
            net = guest.nets[step.net]
            for _slot, mac in net.peers():
                dest = bytes([mac[0] & ~abi.NET_PROMISC_BIT]) + mac[1:]
                net.transmit(guest.frame(net, dest, "unicast from %s to %s"
                                         % (format_mac(net.mac), format_mac(dest))))
        elif isinstance(step, Wait):
            guest.machine.idle_until(time.monotonic() + step.seconds)
        elif isinstance(step, Ping) and guest.stack is not None:
            guest.stack.ping(console, step.ip, step.count)
        else:
            console.write("lgnet pvdriver: unknown script step %r\n" % encode_step(step))
