"""The loader (lgnet/guest/loader.py): kernels, bzImages, initrd, page tables, boot header.

Every rejection the reference Launcher made is tried with a crafted image and must come back
as an LgnetError carrying lguest's own words; what a good image produces is checked byte by
byte against ABI.md §7.
"""
from __future__ import annotations

import random
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.guest import loader
from lgnet.guest.loader import boot_guest, load_kernel, write_device_descriptors

BUNDLED = Path(loader.__file__).parent / "images" / "lguest-vmlinux"
PAGE_OFFSET = abi.DEFAULT_PAGE_OFFSET
LOAD = abi.KERNEL_LOAD_ADDRESS
MAGIC = abi.LGUEST_MAGIC

ET_EXEC, ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
PHDR = struct.Struct("<IIIIIIII")

# A tiny "kernel": a few bytes, the magic, then the entry code (nop; jmp .).
KERNEL_CODE = b"\x90" * 16 + MAGIC + b"\x90\xeb\xfe"


def elf(segments, e_type=ET_EXEC, e_machine=EM_386, phentsize=PHDR.size, phnum=None,
        truncate=None) -> bytes:
    """An ELF32 executable: segments are (p_type, vaddr, paddr, data, memsz)."""
    phoff = EHDR.size
    data_off = phoff + PHDR.size * len(segments)
    phdrs, blobs = b"", b""
    for p_type, vaddr, paddr, data, memsz in segments:
        phdrs += PHDR.pack(p_type, data_off + len(blobs), vaddr, paddr, len(data),
                           max(memsz, len(data)), 7, 4096)
        blobs += data
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    header = EHDR.pack(ident, e_type, e_machine, 1, 0, phoff, 0, 0, EHDR.size, phentsize,
                       len(segments) if phnum is None else phnum, 0, 0, 0)
    image = header + phdrs + blobs
    return image[:truncate] if truncate is not None else image


def good_segments(offset=PAGE_OFFSET):
    return [(PT_LOAD, offset + LOAD, LOAD, KERNEL_CODE, 0x2000),
            (PT_NOTE, 0, 0, b"note", 0),
            (PT_LOAD, offset + LOAD + 0x3000, LOAD + 0x3000, b"data" * 8, 0x100)]


def write(tmp_path, name, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def gzip_stream(payload: bytes, os_byte: int = abi.BZIMAGE_GZIP_OS_UNIX) -> bytes:
    """A gzip member written by hand, so that we choose its OS byte (Python writes 255)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(payload) + deflate.flush()
    header = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00" + bytes([os_byte])
    return header + body + struct.pack("<II", zlib.crc32(payload), len(payload))


def movl(address: int) -> bytes:
    return bytes([abi.MOVL_ABS_OPCODE]) + struct.pack("<I", address)


def bzimage(payload: bytes, os_byte: int = abi.BZIMAGE_GZIP_OS_UNIX, decoy: bytes = b"\x1f\x8c",
            stream: bytes | None = None) -> bytes:
    """A setup sector of junk, a decoy (by default a 0x1F that starts no header), then the
    kernel's gzip stream and some trailing bytes."""
    stream = gzip_stream(payload, os_byte) if stream is None else stream
    return b"MZ" + bytes(510) + b"HdrS" + bytes(100) + decoy + bytes(50) + stream + b"trailing"


def real_gzip(payload: bytes) -> bytes:
    """What a kernel build does: GNU gzip, which marks its streams "compressed under Unix"."""
    return subprocess.run(["gzip", "-9", "-n", "-c"], input=payload, stdout=subprocess.PIPE,
                          check=True, timeout=60).stdout


def big_kernel(size: int) -> bytes:
    """A kernel of `size` bytes: PAGE_OFFSET sighted four times, the magic and entry code, then
    seeded noise without a single 0xA1 to vote (so the guess cannot depend on the noise)."""
    head = movl(0xC0101234) * 4 + MAGIC + b"\xeb\xfe"
    noise = random.Random(10).randbytes(size - len(head))
    return head + noise.translate(bytes.maketrans(b"\xa1", b"\xa0"))


BZ_KERNEL = (b"\x55" * 32 + movl(0xC0101234) + b"\x90" * 7 + movl(0xC0345678) + b"\x90"
             + movl(0xC0000010) + movl(0xC0000020) + b"\x90" * 100 + MAGIC + b"\xeb\xfe")


# --- vmlinux ----------------------------------------------------------------------------------

def test_good_elf_is_placed_at_physical_addresses(tmp_path):
    kernel = load_kernel(write(tmp_path, "vmlinux", elf(good_segments())))
    assert kernel.page_offset == PAGE_OFFSET
    assert kernel.segments == [(LOAD, KERNEL_CODE), (LOAD + 0x3000, b"data" * 8)]
    assert kernel.entry == PAGE_OFFSET + LOAD + KERNEL_CODE.index(MAGIC) + len(MAGIC)
    assert kernel.end == LOAD + 0x3000 + 0x100     # p_memsz counts: bss must fit too


@pytest.mark.parametrize("image", [
    elf(good_segments(), e_type=ET_DYN),
    elf(good_segments(), e_machine=EM_X86_64),
    elf(good_segments(), phentsize=40),
    elf(good_segments(), phnum=0),
    elf(good_segments(), phnum=65536 // 32 + 1),
], ids=["e_type", "e_machine", "phentsize", "no-phdrs", "too-many-phdrs"])
def test_malformed_elf_header(tmp_path, image):
    with pytest.raises(LgnetError, match="Malformed elf header"):
        load_kernel(write(tmp_path, "vmlinux", image))


def test_page_offsets_must_agree(tmp_path):
    segments = good_segments()
    segments[2] = (PT_LOAD, 0x80000000 + LOAD + 0x3000, LOAD + 0x3000, b"data", 0)
    with pytest.raises(LgnetError, match="Page offset of section 2 different"):
        load_kernel(write(tmp_path, "vmlinux", elf(segments)))


def test_no_magic_is_not_a_genuine_lguest(tmp_path):
    segments = [(PT_LOAD, PAGE_OFFSET + LOAD, LOAD, b"\x90" * 64, 0)]
    with pytest.raises(LgnetError, match=r"Is this image a genuine lguest\?"):
        load_kernel(write(tmp_path, "vmlinux", elf(segments)))


def test_truncated_files(tmp_path):
    image = elf(good_segments())
    with pytest.raises(LgnetError, match="Reading kernel"):
        load_kernel(write(tmp_path, "short", image[:30]))
    with pytest.raises(LgnetError, match="Reading program headers"):
        load_kernel(write(tmp_path, "no-phdrs", image[:EHDR.size + 10]))
    with pytest.raises(LgnetError, match="Reading kernel: section 2 runs past"):
        load_kernel(write(tmp_path, "cut", image[:-5]))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(LgnetError, match="Reading kernel .*nothing-here"):
        load_kernel(tmp_path / "nothing-here")
    with pytest.raises(LgnetError, match="Reading kernel"):
        load_kernel(tmp_path)                       # a directory


def test_bundled_image():
    kernel = load_kernel(BUNDLED)
    assert kernel.page_offset == PAGE_OFFSET
    assert kernel.entry > PAGE_OFFSET + LOAD
    assert min(paddr for paddr, _ in kernel.segments) == LOAD
    # The magic sits immediately before the entry point.
    text = dict(kernel.segments)[LOAD]
    at = kernel.entry - PAGE_OFFSET - LOAD
    assert text[at - len(MAGIC):at] == MAGIC


# --- bzImage ----------------------------------------------------------------------------------

def test_bzimage_is_inflated_at_1mib(tmp_path):
    kernel = load_kernel(write(tmp_path, "bzImage", bzimage(BZ_KERNEL)))
    assert kernel.segments == [(LOAD, BZ_KERNEL)]
    assert kernel.page_offset == 0xC0000000
    assert kernel.entry == PAGE_OFFSET + LOAD + BZ_KERNEL.index(MAGIC) + len(MAGIC)
    assert kernel.end == LOAD + len(BZ_KERNEL)


def test_bzimage_page_offset_is_the_first_byte_sighted_a_fourth_time(tmp_path):
    # intuit_page_offset: `++possibilities[...] > 3`. 0x80 is sighted three times first, but
    # 0xC0 is the first to be sighted a fourth time.
    payload = (movl(0xC0000000) * 2 + movl(0x80000000) * 3 + movl(0xC0000000) * 2
               + movl(0x80000000) + MAGIC + b"\xeb\xfe")
    kernel = load_kernel(write(tmp_path, "bzImage", bzimage(payload)))
    assert kernel.page_offset == 0xC0000000


def test_bzimage_without_a_fourth_sighting(tmp_path):
    payload = movl(0xC0000000) * 3 + movl(0x80000000) * 3 + MAGIC
    with pytest.raises(LgnetError, match="could not determine page offset"):
        load_kernel(write(tmp_path, "bzImage", bzimage(payload)))


def test_bzimage_without_magic(tmp_path):
    payload = movl(0xC0000000) * 4 + b"\x90" * 10
    with pytest.raises(LgnetError, match=r"Is this image a genuine lguest\?"):
        load_kernel(write(tmp_path, "bzImage", bzimage(payload)))


def test_bzimage_without_a_unix_gzip_stream(tmp_path):
    with pytest.raises(LgnetError, match="Could not find kernel in bzImage"):
        load_kernel(write(tmp_path, "bzImage", b"MZ" + bytes(1000)))
    with pytest.raises(LgnetError, match="Could not find kernel in bzImage"):
        load_kernel(write(tmp_path, "bzImage", bzimage(BZ_KERNEL, os_byte=0)))


def test_bzimage_search_gives_up_at_the_first_header_not_compressed_under_unix(tmp_path):
    # load_bzimage's state machine: a header "compressed" elsewhere ends the search, even
    # with a good Unix stream right after it.
    elsewhere = b"\x1f\x8b\x08\x00" + bytes(5) + b"\x0b"
    with pytest.raises(LgnetError, match="Could not find kernel in bzImage"):
        load_kernel(write(tmp_path, "bzImage", bzimage(BZ_KERNEL, decoy=elsewhere)))


def test_bzimage_search_never_checks_the_method_byte(tmp_path):
    # 1F 8B <method 7> ... OS 3 is *the* header: the search stops there and unpacking fails
    # (gzread's error), rather than looking on for a deflate stream.
    other_method = b"\x1f\x8b\x07\x00" + bytes(5) + b"\x03"
    with pytest.raises(LgnetError, match="reading image from bzImage"):
        load_kernel(write(tmp_path, "bzImage", bzimage(BZ_KERNEL, decoy=other_method)))


def test_bzimage_search_reads_each_byte_once(tmp_path):
    # A 0x1F right before the header is taken as the header's start; the 0x1F that breaks
    # the pair is consumed, not looked at again: the Launcher never sees this header.
    with pytest.raises(LgnetError, match="Could not find kernel in bzImage"):
        load_kernel(write(tmp_path, "bzImage",
                          bzimage(BZ_KERNEL, decoy=b"", stream=b"\x1f" + gzip_stream(BZ_KERNEL))))
    # Nor does it see a header inside the 52 bytes it read as a would-be ELF header.
    early = gzip_stream(BZ_KERNEL)
    with pytest.raises(LgnetError, match="Could not find kernel in bzImage"):
        load_kernel(write(tmp_path, "bzImage", b"MZ" + early + bytes(100)))
    assert load_kernel(write(tmp_path, "bzImage", bytes(52) + early)).segments \
        == [(LOAD, BZ_KERNEL)]


def test_bzimage_inflates_to_its_end_at_1mib_whatever_its_size(tmp_path):
    # Real kernels inflate to several MiB: all of it goes at 1 MiB, as gzread() put it.
    payload = big_kernel(6 * abi.MiB + 123)
    path = write(tmp_path, "bzImage", bzimage(b"", stream=real_gzip(payload)))
    mem = 16 * abi.MiB
    ram = bytearray(mem)
    boot = boot_guest(ram, mem, path, [])
    assert ram[LOAD:LOAD + len(payload)] == payload
    assert boot.page_offset == 0xC0000000
    assert boot.start == PAGE_OFFSET + LOAD + payload.index(MAGIC) + len(MAGIC)


def test_bzimage_that_does_not_fit_in_guest_ram_is_refused(tmp_path):
    payload = big_kernel(6 * abi.MiB)
    path = write(tmp_path, "bzImage", bzimage(b"", stream=real_gzip(payload)))
    with pytest.raises(LgnetError, match=r"inflates to more than 3145728 bytes at 0x100000: "
                                         r"it does not fit in 4 MiB of memory"):
        boot_guest(bytearray(4 * abi.MiB), 4 * abi.MiB, path, [])


def test_bzimage_with_a_truncated_stream(tmp_path):
    stream = real_gzip(big_kernel(abi.MiB))
    with pytest.raises(LgnetError, match="reading image from bzImage: the gzip stream ends"):
        load_kernel(write(tmp_path, "bzImage", bzimage(b"", stream=stream[:len(stream) // 2])))


def test_bzimage_with_a_corrupt_stream(tmp_path):
    image = bytearray(bzimage(BZ_KERNEL))
    start = image.index(b"\x1f\x8b\x08\x00" + bytes(5) + b"\x03")
    image[start + 10:start + 20] = b"\xff" * 10
    with pytest.raises(LgnetError, match="reading image from bzImage"):
        load_kernel(write(tmp_path, "bzImage", bytes(image)))


# --- laying a guest out in RAM ----------------------------------------------------------------

MEM = 16 * abi.MiB


def u32(ram, addr):
    return struct.unpack_from("<I", ram, addr)[0]


def test_boot_header_and_page_tables(tmp_path):
    ram = bytearray(MEM)
    initrd = write(tmp_path, "initrd", b"I" * 5000)            # rounds up to 2 pages
    info = boot_guest(ram, MEM, BUNDLED, ["ip=10.0.0.1/24", "ping=10.0.0.2"], initrd)
    kernel = load_kernel(BUNDLED)

    assert (info.start, info.page_offset) == (kernel.entry, PAGE_OFFSET)
    for paddr, data in kernel.segments:
        assert ram[paddr:paddr + len(data)] == data

    # initrd at the top of RAM, announced in the boot header.
    assert info.initrd_size == 2 * abi.PAGE_SIZE
    start = MEM - info.initrd_size
    assert ram[start:start + 5000] == b"I" * 5000
    assert u32(ram, abi.BOOT_INITRD_START) == start
    assert u32(ram, abi.BOOT_INITRD_SIZE) == info.initrd_size
    assert ram[abi.BOOT_LOADER_TYPE] == abi.BOOT_LOADER_UNKNOWN

    # E820: one entry {0, mem, RAM}; the command line at 4096; paravirt type 1.
    assert ram[abi.BOOT_E820_COUNT] == 1
    assert abi.E820_ENTRY.unpack_from(ram, abi.BOOT_E820_MAP) == (0, MEM, abi.E820_RAM)
    assert u32(ram, abi.BOOT_CMDLINE_PTR) == abi.BOOT_CMDLINE
    assert ram[abi.BOOT_CMDLINE:abi.BOOT_CMDLINE + 29] == b"ip=10.0.0.1/24 ping=10.0.0.2\0"
    assert u32(ram, abi.BOOT_PARAVIRT_TYPE) == abi.PARAVIRT_LGUEST

    # The page directory one page below the initrd, the linear PTE pages below it.
    assert info.pgdir == MEM - info.initrd_size - abi.PAGE_SIZE
    pages = MEM // abi.PAGE_SIZE
    pte_pages = pages // abi.PTES_PER_PAGE
    linear = info.pgdir - pte_pages * abi.PAGE_SIZE
    first = PAGE_OFFSET >> abi.PGDIR_SHIFT
    pgdir = struct.unpack_from("<1024I", ram, info.pgdir)
    for index, entry in enumerate(pgdir):
        if first <= index < first + pte_pages:
            assert entry == (linear + (index - first) * abi.PAGE_SIZE) | abi.PAGE_PRESENT
        else:
            assert entry == 0, index
    ptes = struct.unpack_from("<%dI" % pages, ram, linear)
    assert ptes == tuple(i * abi.PAGE_SIZE | abi.PAGE_PRESENT for i in range(pages))


def test_without_initrd(tmp_path):
    ram = bytearray(MEM)
    info = boot_guest(ram, MEM, BUNDLED, [])
    assert info.initrd_size == 0
    assert info.pgdir == MEM - abi.PAGE_SIZE
    assert u32(ram, abi.BOOT_INITRD_START) == u32(ram, abi.BOOT_INITRD_SIZE) == 0
    assert ram[abi.BOOT_LOADER_TYPE] == 0
    assert ram[abi.BOOT_CMDLINE] == 0                     # an empty command line


def test_only_what_fits_below_4gib_is_mapped(tmp_path):
    """page_offset 0xFFC00000 leaves room for 4 MiB: an 8 MiB guest gets one PTE page."""
    offset = 0xFFC00000
    path = write(tmp_path, "vmlinux",
                 elf([(PT_LOAD, offset + LOAD, LOAD, KERNEL_CODE, 0)]))
    mem = 8 * abi.MiB
    ram = bytearray(mem)
    info = boot_guest(ram, mem, path, [])
    assert info.page_offset == offset
    pgdir = struct.unpack_from("<1024I", ram, info.pgdir)
    linear = info.pgdir - abi.PAGE_SIZE
    assert pgdir[1023] == linear | abi.PAGE_PRESENT
    assert sum(1 for entry in pgdir if entry) == 1
    assert u32(ram, linear + 4 * 1023) == 1023 * abi.PAGE_SIZE | abi.PAGE_PRESENT
    assert u32(ram, linear - 4) == 0                      # nothing beyond the first 4 MiB


def test_too_little_memory(tmp_path):
    with pytest.raises(LgnetError, match="does not fit in 1 MiB"):
        boot_guest(bytearray(abi.MiB), abi.MiB, BUNDLED, [])
    big = write(tmp_path, "initrd", bytes(15 * abi.MiB))
    with pytest.raises(LgnetError, match="initrd .* does not fit"):
        boot_guest(bytearray(MEM), MEM, BUNDLED, [], big)
    # An initrd just above the kernel leaves no room for the page tables below it.
    above_kernel = loader.page_align(load_kernel(BUNDLED).end)
    small = write(tmp_path, "initrd2", bytes(MEM - above_kernel))
    with pytest.raises(LgnetError, match="too little"):
        boot_guest(bytearray(MEM), MEM, BUNDLED, [], small)


def test_bad_arguments(tmp_path):
    with pytest.raises(LgnetError, match="Reading initrd .*missing"):
        boot_guest(bytearray(MEM), MEM, BUNDLED, [], tmp_path / "missing")
    with pytest.raises(LgnetError, match="Reading kernel"):
        boot_guest(bytearray(MEM), MEM, tmp_path / "no-kernel", [])
    with pytest.raises(LgnetError, match="holds"):
        boot_guest(bytearray(MEM // 2), MEM, BUNDLED, [])


def test_device_descriptors():
    page = bytearray(b"\xee" * abi.PAGE_SIZE)
    descs = [(abi.LGUEST_DEVICE_T_NET, 3 | abi.LGUEST_NET_F_NOCSUM, 1, 0xB7FFF),
             (abi.LGUEST_DEVICE_T_BLOCK, 0, 1, 0xB7FFE),
             (abi.LGUEST_DEVICE_T_CONSOLE, 0, 0, 0)]
    write_device_descriptors(page, descs)
    assert page[:36] == (struct.pack("<HHHHI", 2, 0x4003, 0, 1, 0xB7FFF)
                         + struct.pack("<HHHHI", 3, 0, 0, 1, 0xB7FFE)
                         + struct.pack("<HHHHI", 1, 0, 0, 0, 0))
    assert page[36:] == bytes(abi.PAGE_SIZE - 36)
    with pytest.raises(LgnetError, match="too many devices"):
        write_device_descriptors(page, descs * 200)
