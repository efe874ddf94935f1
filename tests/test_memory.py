"""lgnet.fabric.memory: lguest_address_ok and lgread/lgwrite (ABI.md §3, first rule)."""
import pytest

from lgnet import abi
from lgnet.fabric.memory import GuestMemory

LIMIT = 0x20                      # pfn_limit: 128 KiB


def _mem():
    kills = []
    mem = GuestMemory(pfn_limit=LIMIT, on_fault=kills.append)
    ram = bytearray(0x10000)
    mem.add_region(0, ram, name="ram")
    top = bytearray(4096)
    mem.add_region(0x1F000, top, name="top")   # the last page below pfn_limit
    return mem, ram, top, kills


def test_address_ok_end_must_lie_below_pfn_limit():
    mem, *_ = _mem()
    end = LIMIT * abi.PAGE_SIZE
    # (addr+len)/PAGE_SIZE < pfn_limit: the end is exclusive, yet ending exactly at the limit
    # is refused, as lguest_address_ok did.
    assert mem.address_ok(end - 8, 7)
    assert not mem.address_ok(end - 8, 8)
    assert not mem.address_ok(end, 0)
    assert mem.address_ok(0, 0)


def test_address_ok_refuses_32_bit_wrap_around():
    mem = GuestMemory(pfn_limit=0x100000)    # the whole 4 GiB below the limit
    assert mem.address_ok(0xFFFFF000, 0xFFF)
    assert not mem.address_ok(0xFFFFF000, 0x1000)      # ends at 2^32: wraps to 0
    assert not mem.address_ok(0xFFFFF000, 0x2000)      # wraps to 0x1000 < addr
    assert not mem.address_ok(0xFFFFFFFF, 2)


def test_hole_below_pfn_limit_is_refused():
    mem, *_ = _mem()
    assert mem.address_ok(0x14000, 4)
    assert mem.view(0x14000, 4) is None
    assert mem.locate(0x14000, 4) is None
    # A range that starts in RAM and runs into the hole is refused too.
    assert mem.view(0xFFFC, 8) is None
    assert mem.view(0xFFF8, 8) is not None


def test_failed_read_returns_zeros_and_kills_bad_read_address():
    mem, ram, _, kills = _mem()
    ram[0:4] = b"\x01\x02\x03\x04"
    assert mem.read(0, 4) == b"\x01\x02\x03\x04"
    assert kills == []
    assert mem.read(0x14000, 6) == bytes(6)
    assert kills == ["bad read address 0x14000 len 6"]        # lgread's words
    assert mem.read_u32(0x20000) == 0
    assert kills[-1] == "bad read address 0x20000"             # lgread_u32's


def test_failed_write_kills_bad_write_address_len_and_writes_nothing():
    mem, ram, top, kills = _mem()
    before = bytes(top)
    assert mem.write(0x1FFFC, b"abcd") is False       # ends at pfn_limit: refused
    assert kills == ["bad write address 0x1fffc len 4"]
    assert bytes(top) == before
    assert mem.write_u32(0x14000, 5) is False
    assert kills[-1] == "bad write address 0x14000"            # lgwrite_u32's words
    assert mem.write(0x10, b"xyz") is True
    assert ram[0x10:0x13] == b"xyz"


def test_without_on_fault_failures_are_silent():
    mem = GuestMemory(pfn_limit=LIMIT)
    assert mem.read(0, 3) == bytes(3)
    assert mem.write(0, b"x") is False


def test_write_u32_is_little_endian_aligned_or_not():
    mem, ram, _, kills = _mem()
    assert mem.write_u32(0x100, 0x11223344)
    assert ram[0x100:0x104] == bytes.fromhex("44332211")
    assert mem.write_u32(0x201, 0xAABBCCDD)           # unaligned: byte-wise store
    assert ram[0x201:0x205] == bytes.fromhex("ddccbbaa")
    assert mem.read_u32(0x100) == 0x11223344
    assert mem.read_u32(0x201) == 0xAABBCCDD
    assert mem.write_u32(0x104, -1) and mem.read_u32(0x104) == 0xFFFFFFFF   # masked to u32
    assert kills == []


def test_region_of_odd_size_has_no_word_view_but_works():
    mem = GuestMemory(pfn_limit=LIMIT)
    buf = bytearray(4098)
    region = mem.add_region(0, buf)
    assert region.words is None
    assert mem.write_u32(4, 0x01020304) and buf[4:8] == bytes.fromhex("04030201")


def test_regions_may_not_overlap_and_must_be_writable():
    mem, *_ = _mem()
    with pytest.raises(ValueError):
        mem.add_region(0xF000, bytearray(0x2000))
    with pytest.raises(ValueError):
        GuestMemory().add_region(0, bytes(16))


def test_views_are_live_windows():
    mem, ram, _, _ = _mem()
    window = mem.view(0x40, 4)
    window[:] = b"live"
    assert ram[0x40:0x44] == b"live"
    assert mem.region_at(0x1F800).name == "top"
    assert mem.region_at(0x14000) is None


def _adjacent():
    """RAM, the descriptor page right after it, a hole, then two device pages side by side."""
    kills = []
    mem = GuestMemory(pfn_limit=LIMIT, on_fault=kills.append)
    ram, desc = bytearray(0x10000), bytearray(4096)
    low, high = bytearray(4096), bytearray(4096)
    mem.add_region(0, ram, name="ram")
    mem.add_region(0x10000, desc, name="descriptors")
    mem.add_region(0x1E000, low, name="device 1")
    mem.add_region(0x1F000, high, name="device 0")
    return mem, ram, desc, low, high, kills


def test_access_across_adjacent_regions_succeeds_as_copy_user_did():
    mem, ram, desc, low, high, kills = _adjacent()
    # The end of RAM and the descriptor page: one contiguous range to copy_*_user.
    assert mem.write(0xFFFE, b"abcd") is True
    assert (ram[-2:], desc[:2]) == (b"ab", b"cd")
    assert mem.read(0xFFFC, 8) == bytes(2) + b"abcd" + bytes(2)
    assert mem.write_u32(0xFFFE, 0x11223344) and mem.read_u32(0xFFFE) == 0x11223344
    assert (ram[-2:], desc[:2]) == (b"\x44\x33", b"\x22\x11")
    # Two device pages side by side, written and read in one go.
    assert mem.write(0x1EFF0, bytes(range(32))) is True
    assert (low[-16:], high[:16]) == (bytes(range(16)), bytes(range(16, 32)))
    assert mem.read(0x1EFF0, 32) == bytes(range(32))
    assert mem.accessible(0xFFF0, 0x20) and mem.pieces(0xFFF0, 0x20) is not None
    assert kills == []


def test_access_over_a_real_hole_or_past_pfn_limit_still_fails():
    mem, ram, desc, low, high, kills = _adjacent()
    # The descriptor page ends at 0x11000; the device pages start at 0x1E000.
    assert mem.read(0x10FFE, 4) == bytes(4)
    assert kills == ["bad read address 0x10ffe len 4"]
    assert mem.write(0x10FFE, b"ab") is True and mem.write(0x10FFE, b"abc") is False
    assert desc[-2:] == b"ab"                                   # nothing of the refused write
    assert kills[-1] == "bad write address 0x10ffe len 3"
    assert mem.read_u32(0x1DFFE) == 0 and kills[-1] == "bad read address 0x1dffe"
    # The last device page ends exactly at pfn_limit: lguest_address_ok refuses the end.
    assert not mem.accessible(0x1FFFC, 4)
    assert mem.write_u32(0x1FFFC, 1) is False and kills[-1] == "bad write address 0x1fffc"
