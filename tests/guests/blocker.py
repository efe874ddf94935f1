"""A Python kernel that blocks its net interrupt (lguest_data.blocked_interrupts) and halts
with a 400 ms timer while a peer floods it: the Host must let it sleep until the timer (irq
0), not wake it for the blocked net irq. It prints how long the HALT lasted."""
import time

from lgnet import abi
from lgnet.guest import script
from lgnet.guest.pvdriver import PyGuest
from lgnet.guest.pvmachine import Machine

SLEEP_NS = 400_000_000


def main(machine: Machine) -> None:
    guest = PyGuest.boot(machine)
    net = guest.nets[0]
    script.run_script(guest, [script.Await(net=0, peers=1, seconds=10)])
    machine.phys.write_u32(machine.lguest_data + abi.LGUEST_DATA_BLOCKED_INTERRUPTS,
                           1 << net.irq)
    time.sleep(0.3)                       # the peer's frames arrive meanwhile: irq pending
    machine.host.hypercall(abi.LHCALL_SET_CLOCKEVENT, SLEEP_NS)
    started = time.monotonic()
    machine.host.hypercall(abi.LHCALL_HALT)
    guest.console.write("halted for %d ms\n" % ((time.monotonic() - started) * 1000))
    machine.phys.write_u32(machine.lguest_data + abi.LGUEST_DATA_BLOCKED_INTERRUPTS, 0)
    net.close()
    machine.power_down()
