"""A Python kernel that only naps: many short idle_until()s with nothing else to wake it.

Each nap is a SET_CLOCKEVENT of a few tens of microseconds and a HALT; with no traffic on its
net, the timer is the only thing that can end the HALT. It prints `naps <n>` and powers down.
"""
import time

from lgnet.guest.pvdriver import PyGuest
from lgnet.guest.pvmachine import Machine, parse_cmdline

NAP_SECONDS = 0.00003   # about as long as a hypercall takes: the event fires around its reply


def main(machine: Machine) -> None:
    guest = PyGuest.boot(machine)
    naps = int(parse_cmdline(machine.cmdline()).get("naps", "2000"))
    for _ in range(naps):
        machine.idle_until(time.monotonic() + NAP_SECONDS)
    guest.console.write("naps %d\n" % naps)
    machine.power_down()
