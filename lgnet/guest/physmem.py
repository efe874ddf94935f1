"""Guest-physical memory as the Launcher (and the Python driver) sees it.

In lguest, guest-physical address X was Launcher address X. In lgnet the guest's RAM is one
shared-memory object and its device pages are other mappings, so this small map translates.
The Launcher checks every pointer the guest hands it, as the reference Launcher's
check_pointer() did: an address at or above LGUEST_GUEST_TOP, one that wraps, or one nothing
backs is refused with "Invalid address". That is the guest's fault, never the user's: the
guest dies with that reason, reported to the Host (guest/host.py, guest/launcher.py), and the
Launcher ends as for any killed guest.
"""
from __future__ import annotations

import struct

from lgnet import abi

_U32 = struct.Struct("<I")


class InvalidAddress(Exception):
    """A pointer from the guest that the Launcher cannot use; str() is the guest's reason."""


class PhysMap:
    def __init__(self):
        self.regions: list[tuple[int, int, memoryview]] = []    # (base, end, bytes)
        # RAM (the region at 0) unsliced, as bytes and as native u32s, for guest code on a
        # hot path: indexing them creates no view, and a u32 store is one aligned store.
        # Owned here and released with the map, so nothing pins the mapping at exit.
        self.ram: memoryview | None = None
        self.ram_words: memoryview | None = None

    def add(self, base: int, buffer) -> None:
        view = memoryview(buffer).cast("B")
        self.regions.append((base, base + len(view), view))
        if base == 0:
            self.ram = view
            self.ram_words = view[:len(view) & ~3].cast("I")

    def view(self, addr: int, length: int) -> memoryview:
        if addr >= abi.LGUEST_GUEST_TOP or addr + length >= abi.LGUEST_GUEST_TOP:
            raise InvalidAddress("Invalid address %#x" % addr)
        for base, end, view in self.regions:
            if base <= addr and addr + length <= end:
                return view[addr - base:addr - base + length]
        raise InvalidAddress("Invalid address %#x" % addr)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data) -> None:
        self.view(addr, len(data))[:] = data

    def read_u32(self, addr: int) -> int:
        return _U32.unpack(self.view(addr, 4))[0]

    def write_u32(self, addr: int, value: int) -> None:
        """One aligned 32-bit store (used_len is read by another process)."""
        window = self.view(addr, 4)
        if addr % 4 == 0:
            window.cast("I")[0] = value & abi.U32_MASK
        else:
            _U32.pack_into(window, 0, value & abi.U32_MASK)

    def dma_pieces(self, dma_addr: int) -> list[memoryview]:
        """dma2iov: the pieces of the struct lguest_dma at dma_addr, each checked."""
        dma = abi.unpack_dma(self.view(dma_addr, abi.LGUEST_DMA_SIZE))
        return [self.view(addr, length) for addr, length in dma.pieces()]

    def regions_for_cpu(self) -> list[tuple[int, memoryview]]:
        """(guest-physical base, live buffer) of every region, for the CPU to map in place."""
        return [(base, view) for base, _end, view in self.regions]

    def release(self) -> None:
        if self.ram_words is not None:
            self.ram_words.release()
        self.ram = self.ram_words = None
        for _, _, view in self.regions:
            view.release()
        self.regions.clear()
