"""Python kernels that misbehave on purpose, chosen by `hostile=` on the command line.

Each waits for a peer on eth0 (so a binding exists for the engine to check against), then:
baddma: a piece at 0xfffff000 of 0x2000 bytes; badkey: a misaligned key; crosspage: a piece
crossing a page; crash: CRASH with a message; badconsole: console output whose piece the
Launcher cannot map; badpointer: the kernel itself reads beyond its memory. After the act it
keeps running (HALT), so a surviving guest would show that lgnet failed to kill it.
"""
import time

from lgnet import abi
from lgnet.guest import script
from lgnet.guest.pvdriver import PyGuest
from lgnet.guest.pvmachine import Machine, parse_cmdline


def main(machine: Machine) -> None:
    guest = PyGuest.boot(machine)
    options = parse_cmdline(machine.cmdline())
    script.run_script(guest, [script.Await(net=0, peers=1, seconds=10)])
    net = guest.nets[0]
    peer_slot, _mac = net.peers()[0]
    key = abi.peer_key(net.page, peer_slot)
    act = options["hostile"]
    if act == "baddma":
        machine.phys.write(net.tx_dma, abi.pack_dma([(0xFFFFF000, 0x2000)]))
        machine.hcall(abi.LHCALL_SEND_DMA, key, net.tx_dma)
    elif act == "crosspage":
        machine.phys.write(net.tx_dma, abi.pack_dma([(net.tx_buffer + 4000, 200)]))
        machine.hcall(abi.LHCALL_SEND_DMA, key, net.tx_dma)
    elif act == "badkey":
        machine.phys.write(net.tx_dma, abi.pack_dma([(net.tx_buffer, 60)]))
        machine.hcall(abi.LHCALL_SEND_DMA, key + 2, net.tx_dma)
    elif act == "crash":
        msg = machine.alloc(32)
        machine.phys.write(msg, b"hostile guest\0")
        machine.hcall(abi.LHCALL_CRASH, msg)
    elif act == "badconsole":
        machine.phys.write(net.tx_dma, abi.pack_dma([(abi.LGUEST_GUEST_TOP, 16)]))
        machine.hcall(abi.LHCALL_SEND_DMA, abi.LGUEST_CONSOLE_DMA_KEY, net.tx_dma)
    elif act == "badpointer":
        machine.phys.read(abi.LGUEST_GUEST_TOP, 4)
    machine.idle_until(time.monotonic() + 30)
