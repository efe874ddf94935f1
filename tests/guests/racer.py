"""A Python kernel whose HALTs race the interrupts that end them, for `role=ping` and
`role=pong` on one net (`rounds=N seed=S`).

ping sends a frame (a synchronous SEND_DMA: pong may be woken before it returns), computes
for a random few microseconds, then HALTs until pong's echo came; pong echoes from its
receive interrupt and also computes a random while before each HALT. So an echo (or the next
frame) lands before the HALT is made (answered in the launcher), while it travels to the
broker, or once the broker sleeps on it — and nothing else will ever wake the guest: there is
no timer. A wake-up lost in any of those orders hangs the pair. ping prints `raced N` at the
end; both power down.
"""
import random
import struct
import time

from lgnet import abi
from lgnet.guest import script
from lgnet.guest.pvdriver import PyGuest
from lgnet.guest.pvmachine import Machine, parse_cmdline

ETHERTYPE = 0x88B5                      # IEEE local experimental
MAX_SPIN_SECONDS = 0.0001
END = 0xFFFFFFFF


def spin(rng: random.Random) -> None:
    until = time.perf_counter() + rng.random() * MAX_SPIN_SECONDS
    while time.perf_counter() < until:
        pass


def frame(dest: bytes, src: bytes, seq: int) -> bytes:
    return (dest + src + struct.pack("!HI", ETHERTYPE, seq)).ljust(abi.ETH_ZLEN, b"\0")


def seq_of(data: bytes) -> int:
    return struct.unpack_from("!I", data, abi.ETH_HLEN)[0]


def main(machine: Machine) -> None:
    options = parse_cmdline(machine.cmdline())
    rng = random.Random(int(options.get("seed", "0")))
    guest = PyGuest.boot(machine)
    net = guest.nets[0]
    got = []
    # The handlers go in before we wait for the peer: its first frame may come meanwhile.
    if options.get("role") == "pong":
        def echo(data: bytes) -> None:
            got.append(seq_of(data))
            net.transmit(frame(data[abi.ETH_ALEN:2 * abi.ETH_ALEN], net.mac, seq_of(data)))
        net.on_receive = echo
        while not got or got[-1] != END:
            spin(rng)
            machine.hcall(abi.LHCALL_HALT)
    else:
        net.on_receive = lambda data: got.append(seq_of(data))
        script.run_script(guest, [script.Await(net=0, peers=1, seconds=10)])
        mac = net.peers()[0][1]
        peer = bytes([mac[0] & ~abi.NET_PROMISC_BIT]) + mac[1:]
        rounds = int(options.get("rounds", "1000"))
        for seq in range(rounds):
            net.transmit(frame(peer, net.mac, seq))
            spin(rng)
            while not got:
                machine.hcall(abi.LHCALL_HALT)
            assert got.pop() == seq
        net.transmit(frame(peer, net.mac, END))
        guest.console.write("raced %d\n" % rounds)
    net.close()
    machine.power_down()
