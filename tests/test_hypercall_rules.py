"""One test per Host rule of hypercalls.c (ABI.md §4) as lgnet.fabric.hypercalls, in one
process: LGUEST_INIT's checks and what it writes, the kill reasons in lguest's words, Host
reads that run over the end of RAM into the page after it; and fabric.tsc's decision."""
import struct

import pytest

from enginekit import HOLE, RAM_SIZE, Kit, NetFile
from lgnet import abi
from lgnet.fabric import hypercalls, tsc

# Every rule holds on both per-frame paths: the Python reference and the compiled one.
pytestmark = pytest.mark.usefixtures("both_paths")

DATA = 0x800                          # where a kit guest keeps its struct lguest_data
NET = 0x18000
TSC_KHZ = 2596134


def guest(kit, data=DATA, descriptor_page=False):
    """A guest with the ring of its lguest_data empty; with a page right after its RAM (the
    descriptor page) if asked."""
    g = kit.guest(NetFile(), NET)
    if descriptor_page:
        g.memory.add_region(RAM_SIZE, bytearray(abi.PAGE_SIZE), name="descriptors")
    g.memory.scatter(data + abi.LGUEST_DATA_HCALL_STATUS,
                     bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE)
    return g


def call(kit, g, eax, edx=0, ebx=0, ecx=0):
    return hypercalls.hypercall(kit.engine, g, eax, edx, ebx, ecx)


def init(kit, g, data=DATA):
    call(kit, g, abi.LHCALL_LGUEST_INIT, data)


def u32(g, addr):
    return g.memory.read_u32(addr)


# --- LGUEST_INIT -------------------------------------------------------------------------

def test_lguest_init_writes_reserve_mem_tsc_khz_and_guestid():
    kit = Kit()
    kit.engine.tsc_khz = TSC_KHZ
    kit.guest()                                        # so that ours is guest 1
    g = guest(kit)
    init(kit, g)
    assert g.dead is None and g.lguest_data == DATA
    assert u32(g, DATA + abi.LGUEST_DATA_RESERVE_MEM) == abi.SWITCHER_RESERVE == 4 * abi.MiB
    assert u32(g, DATA + abi.LGUEST_DATA_TSC_KHZ) == TSC_KHZ
    assert struct.unpack("<H", g.memory.read(DATA + abi.LGUEST_DATA_GUESTID, 2)) == (1,)


def test_lguest_init_tsc_khz_is_0_when_the_host_does_not_trust_its_tsc():
    kit = Kit()                                        # Engine's default: tsc_khz 0
    g = guest(kit)
    g.memory.write_u32(DATA + abi.LGUEST_DATA_TSC_KHZ, 0xDEAD)
    init(kit, g)
    assert u32(g, DATA + abi.LGUEST_DATA_TSC_KHZ) == 0


def test_lguest_init_outside_guest_memory_kills_bad_guest_page():
    kit = Kit()
    g = guest(kit)
    init(kit, g, HOLE)
    assert g.dead == "bad guest page 0001c000"         # 2.6.23's %p: 8 hex digits, no 0x
    assert g.lguest_data is None


def test_lguest_init_across_the_end_of_ram_works_and_its_ring_drains():
    """lguest_data may run from the end of RAM into the descriptor page: copy_*_user saw
    one range. Its async ring then lies across the two, and still runs in order."""
    kit = Kit()
    data = RAM_SIZE - 600                              # the ring's calls cross the boundary
    g = guest(kit, data, descriptor_page=True)
    init(kit, g, data)
    assert g.dead is None
    assert u32(g, data + abi.LGUEST_DATA_RESERVE_MEM) == abi.SWITCHER_RESERVE
    array = 0x2000
    g.memory.write(array, abi.pack_dma([(0x4000, 100)]))
    for n, key in enumerate((0x300, 0x304)):
        g.memory.write(data + abi.LGUEST_DATA_HCALLS + n * abi.ASYNC_HCALL.size,
                       abi.ASYNC_HCALL.pack(abi.LHCALL_BIND_DMA, key, array,
                                            abi.bind_dma_arg(1, 3)))
        g.memory.write(data + abi.LGUEST_DATA_HCALL_STATUS + n,
                       bytes([abi.HCALL_STATUS_PENDING]))
    assert not hypercalls.ring_empty(g)
    call(kit, g, abi.LHCALL_FLUSH_ASYNC)
    assert g.dead is None and hypercalls.ring_empty(g)
    assert sorted(bd.key.offset for bd in g.dma if bd.interrupt) == [0x300, 0x304]
    assert g.memory.read(data + abi.LGUEST_DATA_HCALL_STATUS, 2) == b"\xff\xff"


def test_hypercall_before_lguest_init_kills_with_the_call_as_a_signed_long():
    kit = Kit()
    g = guest(kit)
    call(kit, g, abi.LHCALL_FLUSH_TLB)
    assert g.dead == "hypercall 5 before LGUEST_INIT"
    g2 = guest(kit)
    call(kit, g2, 0xFFFFFFFF)
    assert g2.dead == "hypercall -1 before LGUEST_INIT"


def test_bad_hypercall_kills_with_the_call_as_a_signed_long():
    kit = Kit()
    g = guest(kit)
    init(kit, g)
    call(kit, g, 99)
    assert g.dead == "Bad hypercall 99"
    g2 = guest(kit)
    init(kit, g2)
    call(kit, g2, 0x80000000)
    assert g2.dead == "Bad hypercall -2147483648"


# --- CRASH: lgread of 128 bytes ----------------------------------------------------------

def test_crash_message_in_the_last_128_bytes_of_ram():
    kit = Kit()
    g = guest(kit, descriptor_page=True)
    init(kit, g)
    at = RAM_SIZE - 20
    g.memory.write(at, b"the end of RAM\0")
    call(kit, g, abi.LHCALL_CRASH, at)
    assert g.dead == "CRASH: the end of RAM"


def test_crash_message_running_into_a_hole_kills_with_lgreads_words():
    kit = Kit()
    g = guest(kit)                                     # nothing is mapped after its RAM
    init(kit, g)
    at = RAM_SIZE - 20
    g.memory.write(at, b"the end of RAM\0")
    call(kit, g, abi.LHCALL_CRASH, at)
    assert g.dead == "bad read address 0xffec len 128"  # first reason wins over "CRASH: "


# --- fabric.tsc: constant and trusted, or 0 ----------------------------------------------

CPUINFO = """processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2596.134
flags\t\t: fpu tsc msr constant_tsc nonstop_tsc tsc_known_freq
processor\t: 1
cpu MHz\t\t: 1200.000
flags\t\t: fpu tsc msr
"""


def test_tsc_khz_is_the_hosts_rate_when_constant_and_trusted():
    assert tsc.tsc_khz_from(CPUINFO, "tsc\n") == TSC_KHZ


def test_tsc_khz_is_0_without_constant_tsc_or_when_the_kernel_left_the_tsc():
    assert tsc.tsc_khz_from(CPUINFO.replace(" constant_tsc", ""), "tsc\n") == 0
    assert tsc.tsc_khz_from(CPUINFO, "hpet\n") == 0
    assert tsc.tsc_khz_from(CPUINFO.replace("cpu MHz\t\t: 2596.134\n", ""), "tsc") == 0
    assert tsc.tsc_khz_from("", "") == 0


def test_host_tsc_khz_reads_this_hosts_files():
    with open(tsc.CPUINFO) as f, open(tsc.CURRENT_CLOCKSOURCE) as g:
        assert tsc.host_tsc_khz() == tsc.tsc_khz_from(f.read(), g.read())
