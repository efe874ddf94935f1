"""A Python kernel that keeps sending a broadcast every few milliseconds until told to stop,
counting what it receives: the "mid-stream" peer of the SIGKILL tests.

It prints `rx <n>` lines as frames arrive (at most one line per 50 ms) so a test can watch
traffic continue while other guests come and go.
"""
import time

from lgnet import abi
from lgnet.guest.pvdriver import PyGuest
from lgnet.guest.pvmachine import Machine, parse_cmdline


def main(machine: Machine) -> None:
    guest = PyGuest.boot(machine)
    seconds = float(parse_cmdline(machine.cmdline()).get("seconds", "5"))
    net = guest.nets[0]
    end = time.monotonic() + seconds
    last_report = 0.0
    while time.monotonic() < end:
        net.transmit(guest.frame(net, abi.BROADCAST_MAC, "chatter"))
        machine.idle_until(time.monotonic() + 0.005)
        if time.monotonic() - last_report > 0.05:
            guest.console.write("rx %d\n" % net.stats.rx_packets)
            last_report = time.monotonic()
    net.close()
    machine.power_down()
