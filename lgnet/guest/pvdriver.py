"""A guest whose kernel is Python: lguest_net, a console, and a small script.

Rules of this file: the Python guest uses only what a real guest has — its own RAM (through
PhysMap), the boot header, the device descriptor page and hypercalls. It never talks to the
broker or to another guest any other way, so everything it does crosses the fabric exactly as
a Unicorn guest's frames do. It is the scripted guest of the scenarios, the driver of the host
ports (guest/port.py) and of the benchmarks' guests; with `ip=` its small stack (ipstack.py)
answers ARP, ping and UDP echo like the bundled kernel.

The lguest_net rules it follows (ABI.md §6): 8 receive buffers of 1514 bytes bound at its own
slot's key, irq = device index + 1; the MAC 02:00:<guestid>:00:00 in its slot (with the
promiscuous bit when asked) written only once the buffers are bound; transmit = one SEND_DMA
per slot that is used, not ours, and wants the frame (multicast destination, promiscuous slot,
or matching MAC ignoring bit 0); used_len != length is a carrier error; on the receive
interrupt every used buffer is taken and re-armed (used_len = 0 after reading).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from lgnet import abi
from lgnet.guest import script
from lgnet.guest.host import GuestStopped, HostLink
from lgnet.guest.ipstack import IpStack, ip_text, parse_ip_list
from lgnet.guest.physmem import PhysMap

ETHERTYPE_LGNET = abi.ETHERTYPE_LGNET
FIRST_FREE_RAM = 0x10000            # below: boot header and command line


@dataclass
class Frame:
    data: bytes
    device: int


class Machine:
    """What a Python guest has: RAM, the boot header, devices, hypercalls, interrupts."""

    def __init__(self, phys: PhysMap, mem: int, host: HostLink):
        self.phys = phys
        self.mem = mem
        self.host = host
        self.next_free = FIRST_FREE_RAM
        self.handlers: dict[int, Callable[[], None]] = {}
        self.in_interrupt = False
        self.lguest_data = self.alloc(abi.LGUEST_DATA_SIZE)
        self.phys.write(self.lguest_data + abi.LGUEST_DATA_HCALL_STATUS,
                        bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE)
        self.next_call = 0                  # our cursor into the async hypercall ring
        self.hcall(abi.LHCALL_LGUEST_INIT, self.lguest_data)
        self.guest_id = struct.unpack_from(
            "<H", self.phys.read(self.lguest_data + abi.LGUEST_DATA_GUESTID, 2))[0]

    # --- memory -------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self.next_free // align) * align
        if addr + size > self.mem:
            raise GuestStopped("out of memory")
        self.next_free = addr + size
        return addr

    def alloc_pages(self, size: int) -> int:
        return self.alloc(size, abi.PAGE_SIZE)

    def cmdline(self) -> str:
        ptr = self.phys.read_u32(abi.BOOT_CMDLINE_PTR)
        raw = self.phys.read(ptr, abi.PAGE_SIZE)
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def devices(self) -> list[tuple[int, int, int, int, int, int]]:
        """(index, type, features, status, num_pages, pfn) of every descriptor present."""
        out = []
        for i in range(abi.MAX_DEVICES):
            desc = abi.LGUEST_DEVICE_DESC.unpack(
                self.phys.read(self.mem + i * abi.LGUEST_DEVICE_DESC_SIZE,
                               abi.LGUEST_DEVICE_DESC_SIZE))
            if desc[0] == abi.LGUEST_DEVICE_T_NONE:
                break
            out.append((i,) + desc)
        return out

    # --- the CPU's part: hypercalls and interrupts ----------------------------------------

    def hcall(self, call: int, a1: int = 0, a2: int = 0, a3: int = 0) -> int:
        result = self.host.hypercall(call, a1, a2, a3)
        self.deliver_interrupts()
        return result

    def async_hcall(self, call: int, a1: int = 0, a2: int = 0, a3: int = 0) -> None:
        """lguest's async_hcall(): queue the call in lguest_data's ring for the Host to run,
        in order, before our next synchronous call (or when kicked). When the ring is full, a
        normal hcall does it, and that runs the whole ring first."""
        n = self.next_call
        status = self.lguest_data + abi.LGUEST_DATA_HCALL_STATUS + n
        ram = self.phys.ram
        if ram[status] != abi.HCALL_STATUS_EMPTY:
            self.hcall(call, a1, a2, a3)
            return
        words = self.phys.ram_words
        w = (self.lguest_data + abi.LGUEST_DATA_HCALLS + n * abi.ASYNC_HCALL.size) >> 2
        words[w] = call                     # registers are 32 bits wide
        words[w + 1] = a1 & abi.U32_MASK
        words[w + 2] = a2 & abi.U32_MASK
        words[w + 3] = a3 & abi.U32_MASK
        # The arguments are written before the call is marked to go (lguest's wmb()).
        ram[status] = abi.HCALL_STATUS_PENDING
        self.next_call = (n + 1) % abi.LHCALL_RING_SIZE

    def kick(self) -> None:
        """Let the Host run our async ring soon, without waiting for it (lgnet's doorbell;
        lguest ran the ring at the guest's next exit)."""
        self.host.notify()

    def deliver_interrupts(self) -> None:
        # Handlers run with interrupts off, as behind an interrupt gate: a hypercall made by a
        # handler (a reply it transmits) does not deliver a nested interrupt.
        if self.in_interrupt:
            return
        self.in_interrupt = True
        try:
            pending = self.host.pending_irqs()
            while pending:
                irq = (pending & -pending).bit_length() - 1
                self.host.ack_irq(irq)
                handler = self.handlers.get(irq)
                if handler is not None:
                    handler()
                pending = self.host.pending_irqs()
        finally:
            self.in_interrupt = False

    def idle_until(self, deadline: float, done: Callable[[], bool] = lambda: False) -> None:
        """Take interrupts until `done()` or the monotonic deadline: HALT with a timer."""
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.hcall(abi.LHCALL_SET_CLOCKEVENT, max(1, int(left * abi.NSEC_PER_SEC)))
            self.hcall(abi.LHCALL_HALT)

    def power_down(self) -> None:
        msg = self.alloc(len(abi.MSG_POWER_DOWN) + 1)
        self.phys.write(msg, abi.MSG_POWER_DOWN.encode() + b"\0")
        self.hcall(abi.LHCALL_CRASH, msg)


class Console:
    """Output = SEND_DMA to key 0; the Launcher prints it."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.buffer = machine.alloc_pages(abi.PAGE_SIZE)
        self.dma = machine.alloc(abi.LGUEST_DMA_SIZE, 4)

    def write(self, text: str) -> None:
        data = text.encode()
        for start in range(0, len(data), abi.PAGE_SIZE):
            chunk = data[start:start + abi.PAGE_SIZE]
            self.machine.phys.write(self.buffer, chunk)
            self.machine.phys.write(self.dma, abi.pack_dma([(self.buffer, len(chunk))]))
            self.machine.hcall(abi.LHCALL_SEND_DMA, abi.LGUEST_CONSOLE_DMA_KEY, self.dma)


@dataclass
class NetStats:
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_carrier_errors: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_length_errors: int = 0


class NetDevice:
    """lguest_net for one net device (one descriptor, one page of slots)."""

    def __init__(self, machine: Machine, index: int, features: int, pfn: int,
                 promisc: bool = False, num_rx: int = abi.NUM_NET_RX_BUFFERS,
                 rx_size: int = abi.ETH_FRAME_LEN):
        self.machine = machine
        self.phys = machine.phys
        self.index = index
        self.page = pfn * abi.PAGE_SIZE
        self.slot = features & abi.NET_SLOT_FEATURE_MASK
        self.nocsum = bool(features & abi.LGUEST_NET_F_NOCSUM)
        self.irq = index + 1
        self.promisc = promisc
        self.mac = abi.guest_mac(machine.guest_id)
        self.stats = NetStats()
        self.received: list[Frame] = []
        self.on_receive: Callable[[bytes], None] | None = None
        self.num_rx = num_rx
        self.rx_size = rx_size
        self.rx_array = machine.alloc(num_rx * abi.LGUEST_DMA_SIZE, 4)
        self.rx_buffers = [machine.alloc_pages(rx_size) for _ in range(num_rx)]
        self.tx_buffer = machine.alloc_pages(abi.PAGE_SIZE)
        self.tx_dma = machine.alloc(abi.LGUEST_DMA_SIZE, 4)
        machine.handlers[self.irq] = self.receive

    @property
    def key(self) -> int:
        return abi.peer_key(self.page, self.slot)

    def open(self) -> None:
        for i, buf in enumerate(self.rx_buffers):
            self.phys.write(self.rx_array + i * abi.LGUEST_DMA_SIZE,
                            abi.pack_dma(split_pages(buf, self.rx_size)))
        ok = self.machine.hcall(abi.LHCALL_BIND_DMA, self.key, self.rx_array,
                                abi.bind_dma_arg(self.num_rx, self.irq))
        if ok != 1:
            raise GuestStopped("lguest_net: could not bind receive buffers")
        mac = bytearray(self.mac)
        if self.promisc:
            mac[0] |= abi.NET_PROMISC_BIT
        # Our MAC goes in only once we can receive: a peer that sees it may send at once.
        self.phys.write(self.slot_addr(self.slot), bytes(mac))

    def close(self) -> None:
        self.phys.write(self.slot_addr(self.slot), bytes(abi.ETH_ALEN))
        self.machine.hcall(abi.LHCALL_BIND_DMA, self.key, self.rx_array, 0)

    def slot_addr(self, slot: int) -> int:
        return self.page + slot * abi.ETH_ALEN

    def slot_mac(self, slot: int) -> bytes:
        return self.phys.read(self.slot_addr(slot), abi.ETH_ALEN)

    def peers(self) -> list[tuple[int, bytes]]:
        table = self.phys.read(self.page, abi.NET_SLOTS * abi.ETH_ALEN)
        size = abi.ETH_ALEN
        return [(slot, table[slot * size:(slot + 1) * size]) for slot in range(abi.NET_SLOTS)
                if slot != self.slot and table[slot * size] != 0]

    def holds(self, mac: bytes) -> bool:
        """Whether a peer's slot holds this MAC (either way of the promiscuous bit)."""
        table = self.phys.read(self.page, abi.NET_SLOTS * abi.ETH_ALEN)
        for marked in (bytes([mac[0] & ~abi.NET_PROMISC_BIT]) + mac[1:],
                       bytes([mac[0] | abi.NET_PROMISC_BIT]) + mac[1:]):
            at = table.find(marked)
            while at != -1:
                if at % abi.ETH_ALEN == 0 and at // abi.ETH_ALEN != self.slot:
                    return True
                at = table.find(marked, at + 1)
        return False

    def transmit(self, frame: bytes) -> int:
        """Send to every slot that wants the frame; returns how many received it."""
        dest = frame[:abi.ETH_ALEN]
        self.phys.write(self.tx_buffer, frame)
        delivered = 0
        for slot, mac in self.peers():
            if not (abi.is_multicast(dest) or mac[0] & abi.NET_PROMISC_BIT
                    or same_mac(mac, dest)):
                continue
            self.phys.write(self.tx_dma, abi.pack_dma(split_pages(self.tx_buffer, len(frame))))
            self.machine.hcall(abi.LHCALL_SEND_DMA, abi.peer_key(self.page, slot), self.tx_dma)
            used = self.phys.read_u32(self.tx_dma + abi.DMA_USED_LEN_OFFSET)
            if used != len(frame):
                self.stats.tx_carrier_errors += 1
            else:
                self.stats.tx_packets += 1
                self.stats.tx_bytes += used
                delivered += 1
        return delivered

    def receive(self) -> None:
        """The receive interrupt: take every used buffer, then re-arm it."""
        for i, buf in enumerate(self.rx_buffers):
            entry = self.rx_array + i * abi.LGUEST_DMA_SIZE
            length = self.phys.read_u32(entry + abi.DMA_USED_LEN_OFFSET)
            if length == 0:
                continue
            if abi.ETH_HLEN <= length <= self.rx_size:
                data = self.phys.read(buf, length)
                self.stats.rx_packets += 1
                self.stats.rx_bytes += length
                self.received.append(Frame(data, self.index))
                if self.on_receive is not None:
                    self.on_receive(data)
            else:
                self.stats.rx_length_errors += 1
            self.phys.write_u32(entry + abi.DMA_USED_LEN_OFFSET, 0)


def split_pages(addr: int, length: int) -> list[tuple[int, int]]:
    """Pieces of [addr, addr+length) that do not cross a page (check_dma_list's rule)."""
    pieces = []
    while length:
        n = min(length, abi.PAGE_SIZE - addr % abi.PAGE_SIZE)
        pieces.append((addr, n))
        addr, length = addr + n, length - n
    return pieces


def same_mac(a: bytes, b: bytes) -> bool:
    """MACs match ignoring bit 0 of the first byte (the promiscuous marker)."""
    return (a[0] & ~abi.NET_PROMISC_BIT) == (b[0] & ~abi.NET_PROMISC_BIT) and a[1:] == b[1:]


def parse_cmdline(cmdline: str) -> dict[str, str]:
    return dict(word.split("=", 1) if "=" in word else (word, "")
                for word in cmdline.split())


def format_mac(mac: bytes) -> str:
    return ":".join("%02x" % b for b in mac)


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


# --- the script: what a `driver: python` guest of a scenario does ---------------------------

def run_script(guest: PyGuest, steps: list[script.Step]) -> None:
    """Run the steps of a `script=` (lgnet.guest.script), in order."""
    console = guest.console
    for step in steps:
        if isinstance(step, script.Await):
            net = guest.nets[step.net]
            deadline = time.monotonic() + step.seconds
            while len(net.peers()) < step.peers and time.monotonic() < deadline:
                guest.machine.idle_until(min(deadline, time.monotonic() + 0.01))
        elif isinstance(step, script.Broadcast):
            net = guest.nets[step.net]
            got = net.transmit(guest.frame(net, abi.BROADCAST_MAC,
                                           "broadcast from %s" % format_mac(net.mac)))
            console.write("eth%d: broadcast reached %d peers\n" % (net.index, got))
        elif isinstance(step, script.Peers):
            net = guest.nets[step.net]
            for _slot, mac in net.peers():
                dest = bytes([mac[0] & ~abi.NET_PROMISC_BIT]) + mac[1:]
                net.transmit(guest.frame(net, dest, "unicast from %s to %s"
                                         % (format_mac(net.mac), format_mac(dest))))
        elif isinstance(step, script.Wait):
            guest.machine.idle_until(time.monotonic() + step.seconds)
        elif isinstance(step, script.Ping) and guest.stack is not None:
            guest.stack.ping(console, step.ip, step.count)
        else:
            console.write("lgnet pvdriver: unknown script step %r\n" % script.encode_step(step))


def report(guest: PyGuest) -> None:
    for net in guest.nets:
        guest.console.write("eth%d: received %d frames\n" % (net.index, len(net.received)))
        for frame in net.received:
            ethertype = struct.unpack_from("!H", frame.data, 2 * abi.ETH_ALEN)[0]
            if ethertype == ETHERTYPE_LGNET:
                what = frame.data[abi.ETH_HLEN:].rstrip(b"\0").decode(errors="replace")
            else:
                what = "%d bytes of ethertype %#06x" % (len(frame.data), ethertype)
            guest.console.write("eth%d: from %s: %s\n"
                                % (net.index, format_mac(frame.data[abi.ETH_ALEN:2 * abi.ETH_ALEN]), what))


def serve(guest: PyGuest) -> None:
    """With an address and no script: stay up answering until the Launcher is stopped, like
    the bundled kernel without ping=."""
    while True:
        guest.machine.hcall(abi.LHCALL_HALT)


def main(machine: Machine) -> None:
    """The default Python kernel: boot, run the command line's script, report, power down."""
    guest = PyGuest.boot(machine)
    options = parse_cmdline(machine.cmdline())
    guest.console.write("lgnet pvdriver: guest %d up, %s\n" % (
        machine.guest_id, ", ".join("eth%d slot %d mac %s" % (n.index, n.slot, format_mac(n.mac))
                                    for n in guest.nets) or "no network"))
    if "ip" in options and "script" not in options:
        serve(guest)
    run_script(guest, script.parse(options.get("script", "")))
    report(guest)
    for net in guest.nets:
        net.close()
    machine.power_down()
