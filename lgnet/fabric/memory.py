"""A guest's physical address space, as the Host sees it.

Rules of this file: every access the Host makes to a guest's memory goes through here, and
here alone decides whether an address is acceptable. lguest's rule is `lguest_address_ok`:
the end of the access must lie below pfn_limit and must not wrap around 32 bits. Past that,
lguest's accessors were copy_*_user on the Launcher's address space, and they fail where the
MMU finds nothing: a range is acceptable when regions that follow each other without a gap
back all of it (the end of RAM and the descriptor page, two device pages), and refused when
any byte of it falls in a hole.

A failed checked access does what lguest's lgread/lgwrite did: it kills the guest that owns
this memory (through `on_fault`, first reason wins, in the words of the accessor that
failed) and the caller carries on with zeros.

Memory is a set of regions — RAM at 0, the descriptor page just above it, device pages below
LGUEST_GUEST_TOP — each backed by any writable buffer (bytearray, mmap of shared memory or of
a net file). A region mapped from a net file carries the file's identity: that is what makes
a DMA key in it a *shared* key.
"""
from __future__ import annotations

import struct
from typing import Callable, Hashable

from lgnet import abi

_U32 = struct.Struct("<I")
_MASK = abi.U32_MASK
_PAGE = abi.PAGE_SIZE


class Region:
    """One backed range [base, base + size) of guest-physical memory."""
    __slots__ = ("base", "end", "view", "words", "shared", "name")

    def __init__(self, base: int, buffer, shared: Hashable | None = None, name: str = ""):
        self.view = memoryview(buffer).cast("B")
        if self.view.readonly:
            raise ValueError("guest memory must be writable")
        self.base = base
        self.end = base + len(self.view)
        # used_len and other shared flags are written as one aligned native 32-bit store
        # (lguest's wmb() ordering relies on the store not being torn).
        self.words = self.view.cast("I") if len(self.view) % 4 == 0 else None
        self.shared = shared
        self.name = name

    def release(self) -> None:
        """Drop our views so the owner can close the underlying mapping."""
        if self.words is not None:
            self.words.release()
        self.view.release()


class GuestMemory:
    """The guest-physical address space of one guest: checked access for the Host."""

    def __init__(self, pfn_limit: int = abi.GUEST_PFN_LIMIT,
                 on_fault: Callable[[str], None] | None = None):
        self.pfn_limit = pfn_limit
        self.regions: list[Region] = []
        self.on_fault = on_fault
        # Bumped whenever the regions change: whatever was worked out from the layout (a
        # resolved key, where a bound array lies) is stale once this moves.
        self.layout = 0
        self.key_cache: dict = {}          # keys.resolve's memo, emptied with the layout

    # --- layout -------------------------------------------------------------------------

    def add_region(self, base: int, buffer, shared: Hashable | None = None,
                   name: str = "") -> Region:
        region = Region(base, buffer, shared, name)
        for other in self.regions:
            if region.base < other.end and other.base < region.end:
                raise ValueError("region %s overlaps %s" % (name or hex(base), other.name))
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.base)
        self._relayout()
        return region

    def release(self) -> None:
        for region in self.regions:
            region.release()
        self.regions.clear()
        self._relayout()

    def _relayout(self) -> None:
        self.layout += 1
        self.key_cache.clear()

    # --- the rules ----------------------------------------------------------------------

    def address_ok(self, addr: int, length: int) -> bool:
        """lguest_address_ok: (addr+len)/PAGE_SIZE < pfn_limit and addr+len does not wrap."""
        end = (addr + length) & _MASK
        return end // _PAGE < self.pfn_limit and end >= addr

    def locate(self, addr: int, length: int) -> tuple[Region, int] | None:
        """The one region that backs all of [addr, addr+length), with the offset in it.
        (A range over two regions is acceptable but has no single window: see pieces.)"""
        if not self.address_ok(addr, length):
            return None
        for region in self.regions:
            if region.base <= addr and addr + length <= region.end:
                return region, addr - region.base
        return None

    def pieces(self, addr: int, length: int) -> list[tuple[Region, int, int]] | None:
        """The regions that back [addr, addr+length) one after another, as (region, offset,
        bytes): what copy_*_user walked over contiguous mappings. None when address_ok
        refuses the range or a hole interrupts it."""
        if not self.address_ok(addr, length):
            return None
        found = []
        for region in self.regions:                 # sorted by base
            if not length:
                break
            if region.end <= addr:
                continue
            if region.base > addr:
                return None                         # a hole
            n = min(length, region.end - addr)
            found.append((region, addr - region.base, n))
            addr += n
            length -= n
        return None if length else found

    def accessible(self, addr: int, length: int) -> bool:
        return self.pieces(addr, length) is not None     # one region is one piece

    def region_at(self, addr: int) -> Region | None:
        for region in self.regions:
            if region.base <= addr < region.end:
                return region
        return None

    def view(self, addr: int, length: int) -> memoryview | None:
        """A live window onto guest memory, or None when no one region backs the range."""
        found = self.locate(addr, length)
        if found is None:
            return None
        region, off = found
        return region.view[off:off + length]

    # --- checked access: a failure kills the owner, the caller carries on -----------------

    def fault(self, reason: str) -> None:
        if self.on_fault is not None:
            self.on_fault(reason)

    def gather(self, addr: int, length: int) -> bytes | None:
        """The bytes of an acceptable range, across regions if need be; None otherwise."""
        window = self.view(addr, length)
        if window is not None:
            return bytes(window)
        found = self.pieces(addr, length)
        if found is None:
            return None
        return b"".join(region.view[off:off + n] for region, off, n in found)

    def scatter(self, addr: int, data) -> bool:
        """Copy data over an acceptable range, across regions if need be; False (nothing
        written) otherwise."""
        window = self.view(addr, len(data))
        if window is not None:
            window[:] = data
            return True
        found = self.pieces(addr, len(data))
        if found is None:
            return False
        data = memoryview(data).cast("B")
        at = 0
        for region, off, n in found:
            region.view[off:off + n] = data[at:at + n]
            at += n
        return True

    def read(self, addr: int, length: int) -> bytes:
        """lgread: the bytes, or zeros after killing the guest."""
        data = self.gather(addr, length)
        if data is None:
            self.fault(abi.MSG_BAD_READ_LEN % (addr, length))
            return bytes(length)
        return data

    def write(self, addr: int, data) -> bool:
        """lgwrite: copy data in, or kill the guest."""
        if not self.scatter(addr, data):
            self.fault(abi.MSG_BAD_WRITE % (addr, len(data)))
            return False
        return True

    def read_u32(self, addr: int) -> int:
        """lgread_u32: the value, or 0 after killing the guest."""
        found = self.locate(addr, 4)
        if found is None:
            data = self.gather(addr, 4)             # the last bytes of one region, maybe
            if data is None:
                self.fault(abi.MSG_BAD_READ % addr)
                return 0
            return _U32.unpack(data)[0]
        region, off = found
        if off & 3 == 0 and region.words is not None:
            return region.words[off >> 2]
        return _U32.unpack_from(region.view, off)[0]

    def write_u32(self, addr: int, value: int) -> bool:
        """lgwrite_u32, as one aligned 32-bit store where the address allows it."""
        found = self.locate(addr, 4)
        if found is None:
            if not self.scatter(addr, _U32.pack(value & abi.U32_MASK)):
                self.fault(abi.MSG_BAD_WRITE_U32 % addr)
                return False
            return True
        region, off = found
        if off & 3 == 0 and region.words is not None:
            region.words[off >> 2] = value & abi.U32_MASK
        else:
            _U32.pack_into(region.view, off, value & abi.U32_MASK)
        return True
