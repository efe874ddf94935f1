"""lgnet.abi layouts (ABI.md §1, §4, §6) and lgnet.fabric.keys (ABI.md §2)."""
import struct

import pytest

from lgnet import abi
from lgnet.fabric import keys
from lgnet.fabric.keys import Key
from lgnet.fabric.memory import GuestMemory


# --- struct sizes and offsets ------------------------------------------------------------

def test_struct_lguest_dma_is_100_bytes_with_fields_at_0_4_68():
    assert abi.LGUEST_DMA.size == abi.LGUEST_DMA_SIZE == 100
    assert (abi.DMA_USED_LEN_OFFSET, abi.DMA_ADDR_OFFSET, abi.DMA_LEN_OFFSET) == (0, 4, 68)
    raw = abi.pack_dma([(0x11223344, 0x5566)], used_len=0xAABBCCDD)
    assert raw[0:4] == bytes.fromhex("ddccbbaa")
    assert raw[4:8] == bytes.fromhex("44332211")
    assert raw[68:70] == bytes.fromhex("6655")
    assert raw[8:68] == bytes(60) and raw[70:] == bytes(30)


def test_limits_of_section_1():
    assert abi.LGUEST_MAX_DMA_SECTIONS == 16
    assert abi.LGUEST_MAX_DMA == 32
    assert abi.LGUEST_IRQS == 32
    assert abi.DMA_HASH_BUCKETS == 61
    assert abi.LGUEST_CONSOLE_DMA_KEY == 0


def test_device_desc_is_12_bytes():
    assert abi.LGUEST_DEVICE_DESC.size == abi.LGUEST_DEVICE_DESC_SIZE == 12
    raw = abi.LGUEST_DEVICE_DESC.pack(abi.LGUEST_DEVICE_T_NET, 0x4001, 5, 1, 0xB7FFF)
    assert raw == bytes.fromhex("0200 0140 0500 0100 ff7f0b00".replace(" ", ""))
    assert raw[abi.DESC_STATUS_OFFSET] == 5


def test_net_slot_is_6_bytes_and_682_fit_a_page():
    assert abi.ETH_ALEN == 6
    assert abi.NET_SLOTS == 682
    assert abi.peer_key(0x1000, 3) == 0x100C
    assert abi.guest_mac(0x0102) == bytes.fromhex("020002010000")


def test_block_page_is_20_bytes_result_at_12():
    assert abi.LGUEST_BLOCK_PAGE.size == 20
    raw = abi.LGUEST_BLOCK_PAGE.pack(1, 2, 3, 4, 5)
    assert struct.unpack_from("<i", raw, abi.BLOCK_RESULT_OFFSET)[0] == 4


def test_lguest_data_offsets_of_section_4():
    assert abi.LGUEST_DATA_IRQ_ENABLED == 0
    assert abi.LGUEST_DATA_BLOCKED_INTERRUPTS == 4
    assert abi.LGUEST_DATA_CR2 == 8
    assert abi.LGUEST_DATA_TIME == 12
    assert abi.LGUEST_DATA_HCALL_STATUS == 20
    assert abi.LGUEST_DATA_HCALLS == 84
    assert abi.LGUEST_DATA_RESERVE_MEM == 1108
    assert abi.LGUEST_DATA_GUESTID == 1112
    assert abi.LGUEST_DATA_TSC_KHZ == 1116
    assert abi.LGUEST_DATA_NOIRQ_START == 1120
    assert abi.LGUEST_DATA_NOIRQ_END == 1124
    assert abi.ASYNC_HCALL.size == 16 and abi.LHCALL_RING_SIZE == 64


# --- pack / unpack ------------------------------------------------------------------------

def test_pack_unpack_round_trip_and_pieces_stop_at_first_zero_len():
    pieces = [(0x1000, 10), (0x2000, 300), (0xFFFFF000, 4096)]
    dma = abi.unpack_dma(abi.pack_dma(pieces, used_len=7))
    assert dma.used_len == 7
    assert dma.pieces() == pieces
    assert dma.total == 4406
    assert dma.addr[:3] == (0x1000, 0x2000, 0xFFFFF000) and dma.addr[3:] == (0,) * 13
    # A zero length ends the list even if later pieces are non-zero.
    raw = bytearray(abi.pack_dma([(1, 1), (2, 0), (3, 3)]))
    assert abi.unpack_dma(raw).pieces() == [(1, 1)]
    full = [(i * 16, i + 1) for i in range(16)]
    assert abi.unpack_dma(abi.pack_dma(full)).pieces() == full
    with pytest.raises(ValueError):
        abi.pack_dma([(0, 1)] * 17)


def test_bind_arg_packs_num_and_irq():
    arg = abi.bind_dma_arg(8, 3)
    assert arg == 0x803
    assert abi.split_bind_arg(arg) == (8, 3)
    assert abi.split_bind_arg(0xFFFFFFFF) == (0xFFFF, 0xFF)


# --- jhash2 and buckets -------------------------------------------------------------------

def test_jhash2_matches_the_kernels_jhash2():
    # Values printed by include/linux/jhash.h's jhash2() compiled with gcc.
    assert keys.jhash2([]) == 0xBD49D10D
    assert keys.jhash2([1, 2, 3]) == 0x23A7138F
    assert keys.jhash2([1, 2, 3, 4, 5]) == 0xFA249D85
    assert keys.jhash2([0xDEADBEEF], 0x1234) == 0x72836386


def test_bucket_is_deterministic_in_range_and_spreads_keys():
    shared = Key(True, (7, 42), 0x10)
    assert shared.words() == [7, 0, 42, 0, 0x21]
    assert keys.bucket(shared) == 58              # regression value (checked with gcc)
    assert keys.bucket(Key(True, (7, 42), 0x10)) == keys.bucket(shared)
    buckets = {keys.bucket(Key(True, (7, 42), 4 * n)) for n in range(200)}
    assert buckets <= set(range(61))
    assert len(buckets) > 40                     # 200 keys spread over most of the 61 chains
    # The shared bit and the space take part in the hash.
    assert Key(False, 7, 0x10).words() != shared.words()


# --- key resolution (ABI.md §2) -----------------------------------------------------------

def _memory():
    mem = GuestMemory(pfn_limit=0x20)
    mem.add_region(0, bytearray(0x10000), name="ram")
    mem.add_region(0x18000, bytearray(4096), shared=(7, 42), name="net")
    return mem


def test_key_in_shared_region_is_file_identity_and_offset():
    mem = _memory()
    assert keys.resolve(mem, 3, 0x18010) == Key(True, (7, 42), 0x10)
    # Another guest mapping the same file elsewhere gets the same key.
    other = GuestMemory(pfn_limit=0x20)
    other.add_region(0x10000, bytearray(4096), shared=(7, 42))
    assert keys.resolve(other, 5, 0x10010) == keys.resolve(mem, 3, 0x18010)


def test_key_elsewhere_is_private_to_the_guest():
    mem = _memory()
    assert keys.resolve(mem, 3, 0x100) == Key(False, 3, 0x100)
    assert keys.resolve(mem, 4, 0x100) != keys.resolve(mem, 3, 0x100)
    # Keys are not checked against pfn_limit: a mapping above it still names a key.
    mem.add_region(0x40000, bytearray(4096), name="above pfn_limit")
    assert keys.resolve(mem, 3, 0x40010) == Key(False, 3, 0x40010)


@pytest.mark.parametrize("addr", [0x10000, 0x1C000, 0xB8000000, 0xC0000000])
def test_key_with_nothing_mapped_behind_it_resolves_to_none(addr):
    """get_futex_key fails where there is no mapping: the hole above RAM, the top."""
    assert keys.resolve(_memory(), 3, addr) is None


@pytest.mark.parametrize("addr", [1, 2, 3, 0x18001, 0x18FFE])
def test_misaligned_key_resolves_to_none(addr):
    assert keys.resolve(_memory(), 3, addr) is None
