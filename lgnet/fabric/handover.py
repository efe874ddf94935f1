"""What a launcher hands over at INITIALIZE, checked before the broker maps any of it.

Rules of this file: sans-IO. The broker looks at each descriptor (`FdFacts`, from fstat and
fcntl) and gives the facts and the layout tail here; `check_layout` either returns the layout
to map, or raises `Refused` with what is wrong — and then nothing was mapped, so a refused
INITIALIZE leaves the connection NEW, as lguest_user.c left a file whose initialize() failed.

lguest could trust its own page tables; the broker maps files a launcher chose, so each one is
checked the way the kernel would have checked a user pointer:
- the layout is well formed: a bounded count of regions, the exact number of bytes they need;
- every number fits where it goes: regions inside the guest's pfn_limit (itself inside the
  32-bit guest-physical space), page-aligned bases and file offsets, no two regions overlapping;
- every descriptor index names a descriptor that came with the request;
- every descriptor is memory: a regular file (a POSIX shared-memory object, a memfd, a net
  file), not a pipe, socket or device, open for reading and writing, and at least as long as
  the pieces mapped from it — a mapping past the end of a file faults (SIGBUS) when touched.
- guest RAM cannot shrink under the broker: a private region's descriptor (and the control
  page's) must carry F_SEAL_SHRINK, as a memfd can, so the size checked here stays true.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from lgnet import abi, wire

# Guest-physical addresses are 32 bits: pfn_limit pages must fit below 4 GiB.
MAX_PFN_LIMIT = (abi.U32_MASK + 1) // abi.PAGE_SIZE


class Refused(Exception):
    """An INITIALIZE the broker will not map: the reason, for the log and the test."""


class FdFacts(NamedTuple):
    """What the broker learnt of one handed-over descriptor (from fstat and fcntl)."""
    regular: bool          # S_ISREG: shared memory, a memfd or a file; not a pipe/socket/device
    size: int              # st_size
    read_write: bool       # opened O_RDWR: MAP_SHARED with PROT_WRITE needs it
    shrink_sealed: bool    # F_SEAL_SHRINK is set: its size can no longer go down


def _aligned(value: int) -> bool:
    return value % abi.PAGE_SIZE == 0


def _need(facts: list[FdFacts], index: int, offset: int, length: int, what: str,
          sealed: bool) -> None:
    """The descriptor at `index` must back [offset, offset + length) for good."""
    if index >= len(facts):
        raise Refused("%s: descriptor %d, but %d came" % (what, index, len(facts)))
    fd = facts[index]
    if not fd.regular:
        raise Refused("%s: descriptor %d is not shared memory or a file" % (what, index))
    if not fd.read_write:
        raise Refused("%s: descriptor %d is not open for reading and writing" % (what, index))
    if offset + length > fd.size:
        raise Refused("%s: needs %d bytes of descriptor %d, it has %d"
                      % (what, offset + length, index, fd.size))
    if sealed and not fd.shrink_sealed:
        raise Refused("%s: descriptor %d is not sealed against shrinking (F_SEAL_SHRINK)"
                      % (what, index))


def check_layout(tail: bytes, facts: list[FdFacts],
                 pfn_limit: int) -> tuple[list[wire.Region], int, int]:
    """The layout of an INITIALIZE, every part of it checked against what came with it."""
    if not 0 < pfn_limit <= MAX_PFN_LIMIT:
        raise Refused("pfn_limit %d is not in 1..%d" % (pfn_limit, MAX_PFN_LIMIT))
    if len(tail) < wire.LAYOUT_HEADER.size:
        raise Refused("layout of %d bytes has no header" % len(tail))
    count = wire.LAYOUT_HEADER.unpack_from(tail)[0]
    if count > wire.MAX_REGIONS:
        raise Refused("layout of %d regions (at most %d)" % (count, wire.MAX_REGIONS))
    try:
        regions, control_fd, control_offset = wire.decode_layout(tail)
    except (ValueError, struct.error) as exc:
        raise Refused(str(exc)) from None
    top = pfn_limit * abi.PAGE_SIZE
    for n, region in enumerate(regions):
        what = "region %d" % n
        if region.length == 0 or not _aligned(region.base) or not _aligned(region.file_offset):
            raise Refused("%s: empty, or its base or file offset is not page-aligned" % what)
        if region.base + region.length > top:
            raise Refused("%s: [%#x, +%#x) reaches above pfn_limit %d"
                          % (what, region.base, region.length, pfn_limit))
        _need(facts, region.fd_index, region.file_offset, region.length, what,
              sealed=not region.shared)
    ordered = sorted(regions, key=lambda r: r.base)
    for lower, upper in zip(ordered, ordered[1:]):
        if upper.base < lower.base + lower.length:
            raise Refused("regions at %#x and %#x overlap" % (lower.base, upper.base))
    if not _aligned(control_offset):
        raise Refused("control page offset %#x is not page-aligned" % control_offset)
    _need(facts, control_fd, control_offset, wire.CONTROL_PAGE_SIZE, "control page",
          sealed=True)
    return regions, control_fd, control_offset
