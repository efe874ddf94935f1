"""lguest_net for a Python guest: one net device, one page of slots (the guest side).

The lguest_net rules it follows (ABI.md §6): 8 receive buffers of 1514 bytes bound at its own
slot's key, irq = device index + 1; the MAC 02:00:<guestid>:00:00 in its slot (with the
promiscuous bit when asked) written only once the buffers are bound; transmit = one SEND_DMA
per slot that is used, not ours, and wants the frame (multicast destination, promiscuous slot,
or matching MAC ignoring bit 0); used_len != length is a carrier error; on the receive
interrupt every used buffer is taken and re-armed (used_len = 0 after reading).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lgnet import abi
from lgnet.guest.host import GuestStopped
from lgnet.guest.pvmachine import Machine

ETHERTYPE_LGNET = abi.ETHERTYPE_LGNET


@dataclass
class Frame:
    data: bytes
    device: int


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


def format_mac(mac: bytes) -> str:
    return ":".join("%02x" % b for b in mac)
