"""A Python kernel that binds its receive buffers (lguest_net's 8) and then leaves whatever
arrives in them until the file named by `release=PATH` exists: a used buffer stays used for
as long as a test wants to look at it. Then it takes every frame (re-arming each buffer, as
lguest_net's interrupt handler does) and serves on, halted, until stopped."""
import os
import time

from lgnet import abi
from lgnet.guest.pvdriver import PyGuest, parse_cmdline

POLL_SECONDS = 0.01


def main(machine) -> None:
    guest = PyGuest.boot(machine)
    release = parse_cmdline(machine.cmdline())["release"]
    guest.console.write("holding receive buffers until %s exists\n" % release)
    # No hypercall meanwhile: an interrupt the Host raises waits in the control page.
    while not os.path.exists(release):
        time.sleep(POLL_SECONDS)
    for net in guest.nets:
        net.receive()
    guest.console.write("released: took %d frames\n" % sum(len(n.received) for n in guest.nets))
    while True:
        machine.hcall(abi.LHCALL_HALT)
