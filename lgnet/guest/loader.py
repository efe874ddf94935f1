"""Loading a guest: kernel, initrd, page tables, boot header and device descriptors.

Rules of this file: it does what the reference Launcher's main() did between mapping zeroed
memory and telling the Host to initialise the guest (lguest-launcher-2007.txt, L:140-L:180),
in the same order and with the same checks, and writes nothing but the guest's RAM buffer it
is handed (and a device-descriptor page). A bad image, a missing file or too little memory is
the user's mistake: an LgnetError with the reference Launcher's message, never a traceback.

Theory of operation. A kernel is either a vmlinux (ELF) or a bzImage:

* vmlinux: an i386 executable whose PT_LOAD segments are placed at their *physical*
  addresses. Each segment's virtual minus physical address is the kernel's PAGE_OFFSET and
  must be the same for all. The entry point is not e_entry but just after the
  "GenuineLguest" magic, plus page_offset: lguest's Guest entry code follows that string.
* bzImage: the self-decompressing wrapper is skipped; we look for the gzip stream inside
  as load_bzimage's state machine did (the first "1f 8b" header; its OS byte must be 3,
  "Unix", or there is no kernel), inflate all of it *at* physical 1 MiB (as far as guest
  RAM goes) and, with no ELF header to tell us, guess PAGE_OFFSET from the code itself:
  "movl addr, %eax" is "A1 <addr>", and the top byte of those addresses is PAGE_OFFSET's.

Then the initrd goes at the top of RAM, the page directory one page below it, and the linear
page tables (every page of RAM at page_offset) below that; the boot header at physical 0 gets
the E820 map, the initrd, the command line (at 4096) and "paravirt type: lguest". RAM is
assumed zeroed, as the Launcher's map_zeroed_pages() left it.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass

from lgnet import abi
from lgnet.errors import LgnetError

__all__ = ["KernelImage", "BootInfo", "load_kernel", "boot_guest", "write_boot_header",
           "write_device_descriptors", "page_align"]

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_ELF32_EHDR_SIZE = 52
_ELF32_PHDR_SIZE = 32
_ELF_MAGIC = b"\x7fELF"
_ADDRESS_SPACE = 1 << 32


@dataclass(frozen=True)
class KernelImage:
    """A kernel ready to be placed: what goes where, and where it starts."""
    segments: list[tuple[int, bytes]]   # (guest-physical address, contents)
    entry: int                          # virtual: just after the magic, plus page_offset
    page_offset: int
    end: int = 0                        # first physical byte after the kernel (bss included)


@dataclass(frozen=True)
class BootInfo:
    """What the Launcher tells the Host at LHREQ_INITIALIZE (with pfn_limit)."""
    start: int
    pgdir: int
    page_offset: int
    initrd_size: int


def page_align(addr: int) -> int:
    """Round up to a page: add upwards and truncate downwards."""
    return (addr + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)


def _read_file(path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise LgnetError("%s %s: %s" % (what, os.fsdecode(path), error.strerror or error)) \
            from None


def _fail(path, message: str) -> LgnetError:
    return LgnetError("%s: %s" % (os.fsdecode(path), message))


# --- the kernel -------------------------------------------------------------------------------

def _entry_point(segments: list[tuple[int, bytes]], page_offset: int, path) -> int:
    """Just after the first "GenuineLguest", scanning up from the lowest address."""
    for paddr, data in sorted(segments, key=lambda s: s[0]):
        found = data.find(abi.LGUEST_MAGIC)
        if found >= 0:
            return (paddr + found + len(abi.LGUEST_MAGIC) + page_offset) % _ADDRESS_SPACE
    raise _fail(path, abi.MSG_NOT_LGUEST)


def _map_elf(data: bytes, path) -> KernelImage:
    # Imported here: a Python guest never needs pyelftools, and 128 of them start faster.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        elf = ELFFile(io.BytesIO(data))
        header = elf.header
        # An x86 executable with a reasonable number of correctly-sized program headers.
        if (header.e_type != "ET_EXEC" or header.e_machine != "EM_386"
                or header.e_phentsize != _ELF32_PHDR_SIZE
                or not 1 <= header.e_phnum <= 65536 // _ELF32_PHDR_SIZE):
            raise _fail(path, abi.MSG_MALFORMED_ELF)
    except ELFError:
        raise _fail(path, abi.MSG_MALFORMED_ELF) from None
    if header.e_phoff + header.e_phnum * _ELF32_PHDR_SIZE > len(data):
        raise _fail(path, abi.MSG_READING_PHDRS)

    page_offset = 0
    segments: list[tuple[int, bytes]] = []
    end = 0
    try:
        for i in range(header.e_phnum):
            phdr = elf.get_segment(i).header
            if phdr.p_type != "PT_LOAD":
                continue
            # A simple linear address space: the same virtual - physical for everyone.
            # (As in the reference, a first offset of 0 is "not known yet".)
            offset = (phdr.p_vaddr - phdr.p_paddr) % _ADDRESS_SPACE
            if not page_offset:
                page_offset = offset
            elif page_offset != offset:
                raise _fail(path, abi.MSG_PAGE_OFFSET_DIFFERENT % i)
            contents = data[phdr.p_offset:phdr.p_offset + phdr.p_filesz]
            if len(contents) != phdr.p_filesz:
                raise _fail(path, "%s: section %i runs past the end of the file"
                            % (abi.MSG_READING_KERNEL, i))
            segments.append((phdr.p_paddr, contents))
            end = max(end, phdr.p_paddr + max(phdr.p_memsz, phdr.p_filesz))
    except ELFError:
        raise _fail(path, abi.MSG_READING_PHDRS) from None
    return KernelImage(segments, _entry_point(segments, page_offset, path), page_offset, end)


def _intuit_page_offset(image: bytes, path) -> int:
    """Tally the byte four after each 0xA1 ("movl addr, %eax"); the first byte sighted a
    fourth time is the top byte of PAGE_OFFSET. "This is amazingly reliable." """
    votes = [0] * 256
    opcode = bytes([abi.MOVL_ABS_OPCODE])
    i = image.find(opcode)
    while 0 <= i < len(image) - 4:
        top = image[i + 4]
        votes[top] += 1
        if votes[top] == abi.PAGE_OFFSET_SIGHTINGS:
            return top << 24
        i = image.find(opcode, i + 1)
    raise _fail(path, abi.MSG_NO_PAGE_OFFSET)


def _find_gzip_header(data: bytes) -> int | None:
    """Where load_bzimage's byte-at-a-time state machine starts unpacking, or None.

    Its rules, kept exactly: 0x1F then 0x8B starts a header (a byte that breaks the pair is
    consumed, not looked at again as a new 0x1F); the method and the next six bytes are
    skipped unseen; byte 9 must be 3, "compressed under UNIX", and if it is not the search
    gives up for good rather than trying the next header. The search starts after the
    52 bytes load_kernel had already read to see whether the file was an ELF."""
    at = data.find(abi.GZIP_ID1, _ELF32_EHDR_SIZE)
    while 0 <= at < len(data) - 1:
        if data[at + 1] != abi.GZIP_ID2:
            at = data.find(abi.GZIP_ID1, at + 2)
            continue
        if at + abi.GZIP_OS_OFFSET >= len(data):
            return None                    # the file ends inside the header
        return at if data[at + abi.GZIP_OS_OFFSET] == abi.BZIMAGE_GZIP_OS_UNIX else None
    return None


def _load_bzimage(data: bytes, path, room: int, mem: int | None) -> KernelImage:
    """Skip the decompressor: find the gzip stream and inflate all of it at physical 1 MiB."""
    at = _find_gzip_header(data)
    if at is None:
        raise _fail(path, abi.MSG_NO_BZIMAGE_KERNEL)
    # The Launcher gzread() to the end of the stream with no limit but the memory behind
    # 1 MiB; we ask for one byte more than fits, so a kernel too big for the guest (or a
    # stream that inflates forever) is refused without inflating the rest.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)      # a gzip wrapper around deflate
    try:
        image = inflater.decompress(memoryview(data)[at:], max(room, 0) + 1)
    except zlib.error as error:
        raise _fail(path, "%s: %s" % (abi.MSG_READING_BZIMAGE, error)) from None
    if len(image) > room:
        where = ("%d MiB of memory" % (mem // abi.MiB) if mem is not None
                 else "guest-physical memory (below %#x)" % abi.LGUEST_GUEST_TOP)
        raise _fail(path, "the kernel inflates to more than %d bytes at %#x: it does not fit "
                    "in %s" % (room, abi.KERNEL_LOAD_ADDRESS, where))
    if not inflater.eof:
        raise _fail(path, "%s: the gzip stream ends early" % abi.MSG_READING_BZIMAGE)
    if not image:
        raise _fail(path, abi.MSG_NO_BZIMAGE_KERNEL)
    # A bzImage is always loaded at physical 1 MiB (CONFIG_PHYSICAL_START).
    segments = [(abi.KERNEL_LOAD_ADDRESS, image)]
    page_offset = _intuit_page_offset(image, path)
    return KernelImage(segments, _entry_point(segments, page_offset, path), page_offset,
                       abi.KERNEL_LOAD_ADDRESS + len(image))


def load_kernel(path, mem: int | None = None) -> KernelImage:
    """Read a vmlinux or bzImage; raise LgnetError with lguest's words if it will not do.

    A bzImage inflates from 1 MiB up to the end of `mem` bytes of RAM (without `mem`, up to
    LGUEST_GUEST_TOP); whether a vmlinux fits is boot_guest's check."""
    data = _read_file(path, abi.MSG_READING_KERNEL)
    if len(data) < _ELF32_EHDR_SIZE:
        raise _fail(path, "%s: the file is too short" % abi.MSG_READING_KERNEL)
    if data.startswith(_ELF_MAGIC):
        return _map_elf(data, path)
    top = abi.LGUEST_GUEST_TOP if mem is None else mem
    return _load_bzimage(data, path, top - abi.KERNEL_LOAD_ADDRESS, mem)


# --- memory layout ----------------------------------------------------------------------------

def _put(ram: memoryview, addr: int, data: bytes) -> None:
    ram[addr:addr + len(data)] = data


def _setup_pagetables(ram: memoryview, mem: int, initrd_size: int, page_offset: int,
                      lowest: int) -> int:
    """Linear page tables just below the initrd: all of RAM at page_offset, flags 0x7.

    If page_offset is 0xC0000000 only 1 GiB fits below 4 GiB, so only that is mapped.
    Returns the page directory's physical address."""
    if mem <= _ADDRESS_SPACE - page_offset:
        mapped_pages = mem // abi.PAGE_SIZE
    else:
        mapped_pages = (_ADDRESS_SPACE - page_offset) // abi.PAGE_SIZE
    linear_pages = -(-mapped_pages // abi.PTES_PER_PAGE)
    pgdir = mem - initrd_size - abi.PAGE_SIZE
    linear = pgdir - linear_pages * abi.PAGE_SIZE
    if linear < lowest:
        raise LgnetError("%d MiB of memory is too little for this kernel, its initrd and its "
                         "page tables" % (mem // abi.MiB))

    ptes = array("I", range(abi.PAGE_PRESENT, mapped_pages * abi.PAGE_SIZE, abi.PAGE_SIZE))
    if sys.byteorder != "little":
        ptes.byteswap()
    _put(ram, linear, ptes.tobytes())
    # The directory entry for page_offset points at the first PTE page, and so on.
    for i in range(0, mapped_pages, abi.PTES_PER_PAGE):
        index = (i + page_offset // abi.PAGE_SIZE) // abi.PTES_PER_PAGE
        _U32.pack_into(ram, pgdir + 4 * index, (linear + 4 * i) | abi.PAGE_PRESENT)
    return pgdir


def _command_line(args: list[str]) -> bytes:
    line = " ".join(args).encode("utf-8", "surrogateescape")
    if b"\0" in line:
        raise LgnetError("the kernel command line cannot contain a NUL character")
    if len(line) + 1 > abi.CMDLINE_MAX:
        raise LgnetError("the kernel command line is %d bytes; it has one page, %d bytes "
                         "with its NUL" % (len(line), abi.CMDLINE_MAX))
    return line + b"\0"


def boot_guest(ram, mem: int, kernel_path, args: list[str],
               initrd_path=None) -> BootInfo:
    """Lay a guest out in its (zeroed) RAM, as the reference Launcher's main() did."""
    ram = memoryview(ram).cast("B")
    if mem % abi.PAGE_SIZE or mem <= 0:
        raise LgnetError("guest memory must be a positive number of pages, not %d bytes" % mem)
    if len(ram) < mem:
        raise LgnetError("the guest's RAM buffer holds %d bytes, not %d" % (len(ram), mem))

    kernel = load_kernel(kernel_path, mem)
    cmdline = _command_line(args)
    lowest_kernel = min(paddr for paddr, _ in kernel.segments)
    kernel_end = max([kernel.end] + [paddr + len(data) for paddr, data in kernel.segments])
    if lowest_kernel < abi.BOOT_CMDLINE + len(cmdline):
        raise _fail(kernel_path, "the kernel at %#x would overwrite the boot header and "
                    "command line" % lowest_kernel)
    if kernel_end > mem:
        raise _fail(kernel_path, "the kernel (up to %#x) does not fit in %d MiB of memory"
                    % (kernel_end, mem // abi.MiB))
    for paddr, data in kernel.segments:
        _put(ram, paddr, data)

    initrd_size = 0
    boot = ram[:abi.PAGE_SIZE]
    if initrd_path is not None:
        initrd = _read_file(initrd_path, "Reading initrd")
        initrd_size = page_align(len(initrd))
        start = mem - initrd_size
        if start < kernel_end:
            raise LgnetError("initrd %s (%d bytes) does not fit above the kernel in %d MiB "
                             "of memory" % (os.fsdecode(initrd_path), len(initrd),
                                            mem // abi.MiB))
        _put(ram, start, initrd)
        # Where Linux's boot protocol expects the initrd; loader type 0xFF is "unknown".
        _U32.pack_into(boot, abi.BOOT_INITRD_START, start)
        _U32.pack_into(boot, abi.BOOT_INITRD_SIZE, initrd_size)
        _U8.pack_into(boot, abi.BOOT_LOADER_TYPE, abi.BOOT_LOADER_UNKNOWN)

    pgdir = _setup_pagetables(ram, mem, initrd_size, kernel.page_offset, kernel_end)

    write_boot_header(ram, mem, args)
    return BootInfo(kernel.entry, pgdir, kernel.page_offset, initrd_size)


def write_boot_header(ram, mem: int, args: list[str]) -> None:
    """The parts of the Linux boot header every guest reads (a Python guest too)."""
    ram = memoryview(ram).cast("B")
    boot = ram[:abi.PAGE_SIZE]
    # The E820 memory map: one simple region of RAM.
    _U8.pack_into(boot, abi.BOOT_E820_COUNT, 1)
    abi.E820_ENTRY.pack_into(boot, abi.BOOT_E820_MAP, 0, mem, abi.E820_RAM)
    # The command line goes after the boot header, at 4096.
    _U32.pack_into(boot, abi.BOOT_CMDLINE_PTR, abi.BOOT_CMDLINE)
    _put(ram, abi.BOOT_CMDLINE, _command_line(args))
    # Paravirt type 1: "you are under lguest".
    _U32.pack_into(boot, abi.BOOT_PARAVIRT_TYPE, abi.PARAVIRT_LGUEST)


def write_device_descriptors(page, descs) -> None:
    """The device descriptor page: (type, features, num_pages, pfn) each, status 0.

    The Guest finds its devices here (in the page just above RAM); a device's irq is its
    index + 1, so the order is the order the Launcher chose."""
    page = memoryview(page).cast("B")
    if len(descs) > abi.MAX_DEVICES:
        raise LgnetError(abi.MSG_TOO_MANY_DEVICES)
    page[:abi.PAGE_SIZE] = bytes(abi.PAGE_SIZE)
    for i, (type_, features, num_pages, pfn) in enumerate(descs):
        abi.LGUEST_DEVICE_DESC.pack_into(page, i * abi.LGUEST_DEVICE_DESC_SIZE,
                                         type_, features, 0, num_pages, pfn)
