"""One test per Host rule of ABI.md §3 (drivers/lguest/io.c as lgnet.fabric.dma)."""
import errno

import pytest

from enginekit import HOLE, RAM_SIZE, Kit, NetFile, RecordingLock
from lgnet import abi
from lgnet.fabric.dma import Engine, Send
from lgnet.fabric.memory import GuestMemory

# Every rule holds on both per-frame paths: the Python reference and the compiled one.
pytestmark = pytest.mark.usefixtures("both_paths")

NET_A = 0x10000                  # A maps the net page right above its RAM...
NET_B = 0x18000                  # ...B maps the same file elsewhere
SLOT = 0x10                      # the key's offset in the net page
KA, KB = NET_A + SLOT, NET_B + SLOT   # the same shared key, as A and B name it
UDMA = 0x100                     # the sender's struct lguest_dma
SRC = 0x1000                     # the sender's data
ARR = 0x2000                     # the receiver's array of struct lguest_dma
BUF = 0x4000                     # the receiver's buffers
IRQ = 5
PAYLOAD = bytes((i * 7 + 3) & 0xFF for i in range(4096))


def pair(**kw):
    """A and B sharing one net page (at different addresses); B is the receiver."""
    kit = Kit(**kw)
    net = NetFile()
    a = kit.guest(net, NET_A)
    b = kit.guest(net, NET_B)
    kit.net = net
    return kit, a, b


def send_from_a(kit, a, pieces, data=PAYLOAD, key=KA):
    """A writes `data` across its source pieces and sends them to key."""
    off = 0
    for addr, length in pieces:
        kit.put(a, addr, data[off:off + length])
        off += length
    kit.put_dma(a, UDMA, pieces)
    return kit.send(a, key, UDMA)


def rx(kit, b, buffers, irq=IRQ, key=KB, array=ARR):
    """B binds an array with one struct lguest_dma per piece list."""
    entries = kit.put_array(b, array, buffers)
    assert kit.bind(b, key, array, len(buffers), irq) == 1
    return entries


def binding_of(g, array=ARR):
    return next(bd for bd in g.dma if bd.interrupt and bd.dmas == array)


# --- a plain delivery, the base every other rule varies -----------------------------------

def test_shared_send_delivers_and_raises_the_receivers_irq():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 1514)]])
    assert send_from_a(kit, a, [(SRC, 60)]) is Send.DELIVERED
    assert kit.get(b, BUF, 60) == PAYLOAD[:60]
    assert kit.get(b, BUF + 60, 4) == bytes(4)
    assert kit.used_len(a, UDMA) == 60
    assert kit.used_len(b, entry) == 60
    assert b.irqs_pending == 1 << IRQ and a.irqs_pending == 0
    assert kit.wakes.woken == [b.id]
    assert a.dead is None and b.dead is None


# --- lguest_address_ok ---------------------------------------------------------------------

def test_address_ok_piece_ending_at_pfn_limit_kills_the_destination():
    kit, a, b = pair()
    limit = 0x20 * abi.PAGE_SIZE
    [entry] = rx(kit, b, [[(limit - 16, 16)]])
    assert send_from_a(kit, a, [(SRC, 16)]) is Send.FAILED
    assert b.dead == "bad DMA entry: 16@%#x" % (limit - 16) == "bad DMA entry: 16@0x1fff0"
    assert a.dead is None and kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 0


def test_address_wrap_around_kills():
    """(addr+len) wrapping past 2^32 is refused even when pfn_limit covers everything."""
    kit = Kit()
    net = NetFile()
    a = kit.guest(net, NET_A, pfn_limit=0x100000)
    b = kit.guest(net, NET_B)
    rx(kit, b, [[(BUF, 4096)]])
    kit.put_dma(a, UDMA, [(0xFFFFF800, 0x800)])   # in one page, ≤ PAGE_SIZE, but wraps to 0
    assert kit.send(a, KA, UDMA) is Send.FAILED
    assert a.dead == "bad DMA entry: 2048@0xfffff800"
    assert b.dead is None and b.irqs_pending == 0


# --- check_dma_list ------------------------------------------------------------------------

def test_check_dma_list_senders_piece_crossing_a_page_kills_the_sender():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 1514)]])
    assert send_from_a(kit, a, [(SRC, 10), (0x1F80, 0x100)]) is Send.FAILED
    assert a.dead == "bad DMA entry: 256@0x1f80"
    assert b.dead is None
    assert kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 0
    assert kit.get(b, BUF, 10) == bytes(10)          # nothing copied
    assert b.irqs_pending == 0 and binding_of(b).next_dma == 0


def test_check_dma_list_destinations_piece_crossing_a_page_kills_the_destination():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 100), (0x4F80, 0x100)]])
    assert send_from_a(kit, a, [(SRC, 50)]) is Send.FAILED
    assert b.dead == "bad DMA entry: 256@0x4f80"
    assert a.dead is None
    assert kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 0
    assert b.irqs_pending == 0


def test_check_dma_list_destination_is_checked_first():
    kit, a, b = pair()
    rx(kit, b, [[(0x4F80, 0x100)]])
    assert send_from_a(kit, a, [(0x1F80, 0x100)]) is Send.FAILED
    assert b.dead == "bad DMA entry: 256@0x4f80"
    assert a.dead is None


def test_check_dma_list_piece_longer_than_a_page_kills():
    kit, a, b = pair()
    rx(kit, b, [[(BUF, 1514)]])
    assert send_from_a(kit, a, [(SRC, abi.PAGE_SIZE + 1)]) is Send.FAILED
    assert a.dead == "bad DMA entry: 4097@0x1000"
    assert b.dead is None


def test_check_dma_list_stops_at_first_zero_len():
    """Pieces after a zero length are never looked at, however bad they are."""
    kit, a, b = pair()
    entries = kit.put_array(b, ARR, [[(BUF, 100)]])
    raw = bytearray(abi.pack_dma([(BUF, 100), (0, 0), (0xFFFFFF00, 0x900)]))
    kit.put(b, entries[0], bytes(raw))
    assert kit.bind(b, KB, ARR, 1, IRQ) == 1
    assert send_from_a(kit, a, [(SRC, 100)]) is Send.DELIVERED
    assert b.dead is None and kit.used_len(b, entries[0]) == 100


# --- kill_guest ----------------------------------------------------------------------------

def test_kill_guest_first_reason_wins_and_caller_carries_on():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(HOLE, 100)]])
    assert send_from_a(kit, a, [(SRC, 100)]) is Send.FAILED
    assert b.dead == "Error mapping DMA pages"
    kit.engine.kill_guest(b, "something later")
    assert b.dead == "Error mapping DMA pages"
    # The dead guest's binding stays until close: a later bad list does not change the reason.
    kit.put_dma(b, entry, [(0x4F80, 0x100)])
    assert send_from_a(kit, a, [(SRC, 100)]) is Send.FAILED
    assert b.dead == "Error mapping DMA pages"
    assert kit.wakes.woken.count(b.id) == 1          # woken once, by the first kill


# --- BIND_DMA ------------------------------------------------------------------------------

def test_bind_irq_32_or_more_is_refused():
    kit, a, b = pair()
    kit.put_array(b, ARR, [[(BUF, 100)]])
    assert kit.bind(b, KB, ARR, 1, abi.LGUEST_IRQS) == 0
    assert kit.bind(b, KB, ARR, 1, 255) == 0
    assert all(bd.interrupt == 0 for bd in b.dma)
    assert send_from_a(kit, a, [(SRC, 10)]) is Send.NO_RECEIVER
    assert b.dead is None
    assert kit.bind(b, KB, ARR, 1, abi.LGUEST_IRQS - 1) == 1


def test_bind_the_33rd_binding_is_refused():
    kit, a, b = pair()
    for n in range(abi.LGUEST_MAX_DMA):
        assert kit.bind(b, KB, ARR + n * 0x100, 1, 1) == 1
    assert kit.bind(b, KB, 0x8000, 1, 1) == 0
    assert b.dead is None
    # Freeing one entry makes room again: the first free entry is reused, cursor reset.
    b.dma[0].next_dma = 7
    assert kit.bind(b, KB, ARR, 0, 0) == 1
    assert b.dma[0].interrupt == 0
    assert kit.bind(b, KB, 0x8000, 3, 2) == 1
    assert (b.dma[0].dmas, b.dma[0].num_dmas, b.dma[0].interrupt, b.dma[0].next_dma) == (
        0x8000, 3, 2, 0)
    assert kit.bind(b, KB, 0x9000, 1, 1) == 0


def test_bind_unbind_needs_key_and_array_address():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 100)]])
    assert kit.bind(b, KB, ARR + abi.LGUEST_DMA_SIZE, 0, 0) == 0   # right key, wrong array
    assert kit.bind(b, KB + 4, ARR, 0, 0) == 0                     # right array, wrong key
    assert send_from_a(kit, a, [(SRC, 10)]) is Send.DELIVERED       # still bound
    assert kit.bind(b, KB, ARR, 0, 0) == 1
    assert kit.bind(b, KB, ARR, 0, 0) == 0                         # already gone
    kit.set_used_len(b, entry, 0)
    assert send_from_a(kit, a, [(SRC, 10)]) is Send.NO_RECEIVER
    assert kit.used_len(b, entry) == 0


def test_bind_duplicates_are_not_detected_and_arrays_are_checked_only_when_used():
    kit, a, b = pair()
    assert kit.bind(b, KB, HOLE, 4, IRQ) == 1          # an unbacked array binds fine
    assert kit.bind(b, KB, HOLE, 4, IRQ) == 1          # and twice
    assert sum(1 for bd in b.dma if bd.interrupt) == 2
    assert b.dead is None
    assert kit.bind(b, KB, HOLE, 0, 0) == 1            # unbind takes one of them
    assert sum(1 for bd in b.dma if bd.interrupt) == 1


def test_bind_key_is_not_checked_against_pfn_limit():
    """Keys are futex addresses, not DMA buffers: an aligned key with something mapped
    behind it binds, even above pfn_limit."""
    kit = Kit()
    b = kit.guest(NetFile(), NET_B, pfn_limit=NET_B // abi.PAGE_SIZE)   # the net page is above
    entries = kit.put_array(b, ARR, [[(BUF, 100)]])
    assert kit.bind(b, KB, ARR, 1, IRQ) == 1
    assert b.dead is None
    assert kit.engine.user_get_dma(b, KB) == entries[0]


def test_bind_key_with_nothing_mapped_behind_it_kills():
    """get_futex_key failed where the Launcher had no mapping: the hole above RAM."""
    kit, a, b = pair()
    kit.put_array(b, ARR, [[(BUF, 100)]])
    assert kit.bind(b, 0xC0000000, ARR, 1, IRQ) == 0
    assert b.dead == "bad dma key 0xc0000000"
    assert all(bd.interrupt == 0 for bd in b.dma)
    kit2, _, b2 = pair()
    assert kit2.bind(b2, HOLE, ARR, 1, IRQ) == 0
    assert b2.dead == "bad dma key 0x1c000"


def test_bind_misaligned_key_kills():
    kit, a, b = pair()
    assert kit.bind(b, KB + 2, ARR, 1, IRQ) == 0
    assert b.dead == "bad dma key 0x18012"
    assert all(bd.interrupt == 0 for bd in b.dma)
    kit2, _, b2 = pair()
    assert kit2.bind(b2, 0x301, ARR, 0, 0) == 0        # unbind resolves the key too
    assert b2.dead == "bad dma key 0x301"


# --- SEND_DMA ------------------------------------------------------------------------------

def test_send_misaligned_key_kills_the_sender():
    kit, a, b = pair()
    rx(kit, b, [[(BUF, 100)]])
    assert send_from_a(kit, a, [(SRC, 10)], key=KA + 1) is Send.BAD_KEY
    assert a.dead == "bad sending DMA key"
    assert b.dead is None and b.irqs_pending == 0 and a.pending_dma is None


def test_send_key_with_nothing_mapped_behind_it_kills_the_sender():
    kit, a, b = pair()
    rx(kit, b, [[(BUF, 100)]])
    assert send_from_a(kit, a, [(SRC, 10)], key=0xC0000000) is Send.BAD_KEY
    assert a.dead == "bad sending DMA key"
    assert a.pending_dma is None                        # nothing for its Launcher either
    assert b.dead is None and b.irqs_pending == 0


def test_dma_transfer_struct_lguest_dma_straddling_the_end_of_ram():
    """lgread/lgwrite_u32 were copy_*_user: the sender's struct lguest_dma may run from the
    end of RAM into the page mapped right after it (A's net page here), used_len too."""
    kit, a, b = pair()
    entries = rx(kit, b, [[(BUF, 100)]])
    udma = RAM_SIZE - 2
    kit.put(a, SRC, PAYLOAD[:10])
    assert a.memory.scatter(udma, abi.pack_dma([(SRC, 10)]))
    assert kit.send(a, KA, udma) is Send.DELIVERED
    assert a.dead is None and b.dead is None
    assert a.memory.read_u32(udma) == 10
    assert kit.used_len(b, entries[0]) == 10 and kit.get(b, BUF, 10) == PAYLOAD[:10]


def test_dma_transfer_receivers_entry_straddling_the_end_of_ram():
    kit, a, b = pair()
    b.memory.add_region(RAM_SIZE, bytearray(abi.PAGE_SIZE), name="descriptors")
    array = RAM_SIZE - abi.LGUEST_DMA_SIZE - 2          # entry 1 runs past the end of RAM
    kit.put_dma(b, array, [(BUF, 100)], used_len=7)
    assert b.memory.scatter(array + abi.LGUEST_DMA_SIZE, abi.pack_dma([(BUF + 200, 100)]))
    assert kit.bind(b, KB, array, 2, IRQ) == 1
    assert send_from_a(kit, a, [(SRC, 10)]) is Send.DELIVERED
    assert a.dead is None and b.dead is None
    assert b.memory.read_u32(array + abi.LGUEST_DMA_SIZE) == 10
    assert kit.get(b, BUF + 200, 10) == PAYLOAD[:10]


def test_send_private_key_goes_to_own_launcher_even_with_nothing_bound():
    kit, a, b = pair()
    assert send_from_a(kit, a, [(SRC, 10)], key=0x300) is Send.PENDING
    assert a.pending_dma == (UDMA, 0x300)
    assert kit.used_len(a, UDMA) == 0
    # Even a binding of A's own at that private key does not receive it.
    entries = kit.put_array(a, 0x3000, [[(0x5000, 100)]])
    assert kit.bind(a, 0x300, 0x3000, 1, IRQ) == 1
    assert send_from_a(kit, a, [(SRC, 10)], key=0x300) is Send.PENDING
    assert kit.used_len(a, entries[0]) == 0 and a.irqs_pending == 0
    assert b.irqs_pending == 0 and kit.wakes.woken == []


def test_send_nothing_bound_nothing_happens():
    kit, a, b = pair()
    kit.put_dma(a, UDMA, [(SRC, 10)], used_len=0)
    before = bytes(kit.ram[a.id]), bytes(kit.ram[b.id]), bytes(kit.net.buf)
    assert kit.send(a, KA, UDMA) is Send.NO_RECEIVER
    assert (bytes(kit.ram[a.id]), bytes(kit.ram[b.id]), bytes(kit.net.buf)) == before
    assert kit.used_len(a, UDMA) == 0
    assert a.irqs_pending == b.irqs_pending == 0 and kit.wakes.woken == []


def test_send_guest_never_receives_its_own_send():
    kit, a, b = pair()
    [b_entry] = rx(kit, b, [[(BUF, 100)]])                     # B binds first...
    a_entries = kit.put_array(a, 0x3000, [[(0x5000, 100)]])
    assert kit.bind(a, KA, 0x3000, 1, 9) == 1                  # ...A's binding is at the head
    assert send_from_a(kit, a, [(SRC, 20)]) is Send.DELIVERED
    assert kit.used_len(b, b_entry) == 20 and kit.get(b, BUF, 20) == PAYLOAD[:20]
    assert kit.used_len(a, a_entries[0]) == 0 and a.irqs_pending == 0
    assert b.irqs_pending == 1 << IRQ


def test_send_own_binding_only_is_no_receiver():
    kit, a, b = pair()
    a_entries = kit.put_array(a, 0x3000, [[(0x5000, 100)]])
    assert kit.bind(a, KA, 0x3000, 1, 9) == 1
    assert send_from_a(kit, a, [(SRC, 20)]) is Send.NO_RECEIVER
    assert kit.used_len(a, UDMA) == 0
    assert kit.used_len(a, a_entries[0]) == 0 and kit.get(a, 0x5000, 20) == bytes(20)
    assert a.irqs_pending == 0


def test_send_first_other_binding_on_the_chain_wins():
    kit, a, b = pair()
    c = kit.guest(kit.net, NET_A)                              # a third guest on the net
    [b_entry] = rx(kit, b, [[(BUF, 100)]], irq=3)
    [c_entry] = rx(kit, c, [[(BUF, 100)]], irq=4, key=KA)     # newest: head of the chain
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.DELIVERED
    assert kit.used_len(c, c_entry) == 30 and kit.used_len(b, b_entry) == 0
    assert c.irqs_pending == 1 << 4 and b.irqs_pending == 0
    # B's own send skips nothing but itself: C is first.
    kit.set_used_len(c, c_entry, 0)
    kit.put(b, SRC, b"from-b")
    kit.put_dma(b, UDMA, [(SRC, 6)])
    assert kit.send(b, KB, UDMA) is Send.DELIVERED
    assert kit.get(c, BUF, 6) == b"from-b"
    # C's send skips its own binding at the head and reaches B.
    kit.put(c, SRC, b"from-c")
    kit.put_dma(c, UDMA, [(SRC, 6)])
    assert kit.send(c, KA, UDMA) is Send.DELIVERED
    assert kit.get(b, BUF, 6) == b"from-c" and kit.used_len(b, b_entry) == 6
    # Once C unbinds, A's sends go to B.
    assert kit.bind(c, KA, ARR, 0, 0) == 1
    kit.set_used_len(b, b_entry, 0)
    assert send_from_a(kit, a, [(SRC, 8)]) is Send.DELIVERED
    assert kit.used_len(b, b_entry) == 8


def test_send_other_net_file_never_receives():
    kit, a, b = pair()
    c = kit.guest(NetFile(ino=43), NET_B)                      # a different --sharenet file
    [c_entry] = rx(kit, c, [[(BUF, 100)]], key=KB)
    ram_c = bytes(kit.ram[c.id])
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.NO_RECEIVER
    assert bytes(kit.ram[c.id]) == ram_c and c.irqs_pending == 0
    assert kit.used_len(a, UDMA) == 0


def test_send_no_free_buffer_raises_irq_and_leaves_used_len_zero():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 100)]])
    kit.set_used_len(b, entry, 77)                             # not yet consumed
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.NO_BUFFER
    assert kit.used_len(a, UDMA) == 0
    assert kit.used_len(b, entry) == 77 and kit.get(b, BUF, 30) == bytes(30)
    assert b.irqs_pending == 1 << IRQ
    assert binding_of(b).next_dma == 0
    assert a.dead is None and b.dead is None


def test_send_restock_once_succeeds_when_a_buffer_is_freed():
    lock = RecordingLock()
    calls = []

    def restock(guest):
        calls.append((guest, lock.held))
        kit.set_used_len(guest, entry, 0)      # the receiver drains its buffer

    kit, a, b = pair(restock=restock, lock=lock)
    [entry] = rx(kit, b, [[(BUF, 100)]])
    kit.set_used_len(b, entry, 77)
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.DELIVERED
    assert calls == [(b, False)]                                # lock dropped for the hook
    assert not lock.held
    assert kit.used_len(a, UDMA) == 30 and kit.used_len(b, entry) == 30
    assert kit.get(b, BUF, 30) == PAYLOAD[:30]
    assert b.irqs_pending == 1 << IRQ


def test_send_second_failure_after_restock_is_final():
    calls = []
    kit, a, b = pair(restock=calls.append)
    [entry] = rx(kit, b, [[(BUF, 100)]])
    kit.set_used_len(b, entry, 77)
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.NO_BUFFER
    assert calls == [b]
    assert kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 77
    assert b.irqs_pending == 1 << IRQ
    assert kit.wakes.woken == [b.id, b.id]                     # raised on both tries


def test_send_restock_not_called_when_delivered_or_no_receiver():
    calls = []
    kit, a, b = pair(restock=calls.append)
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.NO_RECEIVER
    rx(kit, b, [[(BUF, 100)]])
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.DELIVERED
    assert calls == []


# --- dma_transfer --------------------------------------------------------------------------

def test_dma_transfer_truncates_to_the_destination():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 100)]])
    assert send_from_a(kit, a, [(SRC, 500)]) is Send.DELIVERED
    assert kit.used_len(a, UDMA) == 100 and kit.used_len(b, entry) == 100
    assert kit.get(b, BUF, 100) == PAYLOAD[:100]
    assert kit.get(b, BUF + 100, 400) == bytes(400)


def test_dma_transfer_scatter_gather_across_unequal_pieces():
    kit, a, b = pair()
    src = [(SRC, 10), (SRC + 0x100, 300), (SRC + 0xF00, 50)]
    dst = [(BUF, 100), (BUF + 0x1000, 100), (BUF + 0x2000, 200)]
    [entry] = rx(kit, b, [dst])
    assert send_from_a(kit, a, src) is Send.DELIVERED
    assert kit.used_len(a, UDMA) == 360 and kit.used_len(b, entry) == 360
    got = kit.get(b, BUF, 100) + kit.get(b, BUF + 0x1000, 100) + kit.get(b, BUF + 0x2000, 160)
    assert got == PAYLOAD[:360]
    assert kit.get(b, BUF + 0x2000 + 160, 40) == bytes(40)
    assert kit.get(b, BUF + 100, 4) == bytes(4)


def test_dma_transfer_next_dma_cursor_advances_and_wraps():
    kit, a, b = pair()
    entries = rx(kit, b, [[(BUF + i * 0x100, 0x100)] for i in range(3)])
    bd = binding_of(b)

    def deliver(tag):
        kit.put(a, SRC, tag)
        kit.put_dma(a, UDMA, [(SRC, len(tag))])
        return kit.send(a, KA, UDMA)

    assert deliver(b"one") is Send.DELIVERED and bd.next_dma == 1
    assert deliver(b"two") is Send.DELIVERED and bd.next_dma == 2
    kit.set_used_len(b, entries[0], 0)                     # B consumed buffer 0 only
    assert deliver(b"three") is Send.DELIVERED and bd.next_dma == 3
    assert kit.get(b, BUF + 0x200, 5) == b"three"          # from the cursor, not from 0
    assert deliver(b"four") is Send.DELIVERED and bd.next_dma == 4
    assert kit.get(b, BUF, 4) == b"four"                   # 3 % 3: wrapped to entry 0
    assert [kit.used_len(b, e) for e in entries] == [4, 3, 5]
    kit.set_used_len(b, entries[2], 0)                     # cursor at 4 % 3 = 1: used, skip
    assert deliver(b"five!") is Send.DELIVERED and bd.next_dma == 5
    assert kit.get(b, BUF + 0x200, 5) == b"five!"


def test_dma_transfer_next_dma_is_a_u16_cursor():
    kit, a, b = pair()
    rx(kit, b, [[(BUF, 0x100)]])
    bd = binding_of(b)
    bd.next_dma = 0xFFFF
    assert send_from_a(kit, a, [(SRC, 4)]) is Send.DELIVERED
    assert bd.next_dma == 0


def test_dma_transfer_bad_array_address_kills_destination_without_interrupt():
    calls = []
    kit, a, b = pair(restock=calls.append)
    assert kit.bind(b, KB, HOLE, 2, IRQ) == 1
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.FAILED
    assert b.dead == "bad address in registered DMA struct"
    assert a.dead is None
    assert b.irqs_pending == 0                 # io.c's "goto fail" skips the interrupt
    assert calls == []                         # and is not a "no buffer": no restock
    assert kit.used_len(a, UDMA) == 0


def test_dma_transfer_bad_array_entry_after_used_ones_kills_destination():
    kit, a, b = pair()
    # Entry 0 is used; entry 1 would lie past the end of RAM.
    array = RAM_SIZE - abi.LGUEST_DMA_SIZE
    [entry] = kit.put_array(b, array, [[(BUF, 100)]])
    kit.set_used_len(b, entry, 1)
    assert kit.bind(b, KB, array, 2, IRQ) == 1
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.FAILED
    assert b.dead == "bad address in registered DMA struct"
    assert b.irqs_pending == 0 and a.dead is None


def test_dma_transfer_hole_in_destination_kills_destination():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 10), (HOLE, 100)]])
    assert send_from_a(kit, a, [(SRC, 50)]) is Send.FAILED
    assert b.dead == "Error mapping DMA pages"
    assert a.dead is None
    assert kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 0
    assert kit.get(b, BUF, 10) == bytes(10)    # pages are mapped before anything is copied
    assert b.irqs_pending == 0


def test_dma_transfer_unbacked_source_piece_kills_sender():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 200)]])
    kit.put(a, SRC, PAYLOAD[:50])
    kit.put_dma(a, UDMA, [(SRC, 50), (HOLE, 50)])
    assert kit.send(a, KA, UDMA) is Send.FAILED
    assert a.dead == "bad address in sending DMA"
    assert b.dead is None
    assert kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 0
    assert b.irqs_pending == 0 and binding_of(b).next_dma == 0


def test_dma_transfer_zero_bytes_from_nonempty_source_is_failure_without_interrupt():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[]])                 # a receive buffer with no pieces
    assert send_from_a(kit, a, [(SRC, 30)]) is Send.FAILED
    assert kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 0
    assert b.irqs_pending == 0 and binding_of(b).next_dma == 0
    assert a.dead is None and b.dead is None


def test_dma_transfer_zero_length_send_only_raises_the_interrupt():
    kit, a, b = pair()
    [entry] = rx(kit, b, [[(BUF, 100)]])
    kit.put(b, BUF, b"untouched")
    kit.put_dma(a, UDMA, [])
    assert kit.send(a, KA, UDMA) is Send.DELIVERED
    assert kit.get(b, BUF, 9) == b"untouched"
    assert kit.used_len(a, UDMA) == 0 and kit.used_len(b, entry) == 0
    assert b.irqs_pending == 1 << IRQ
    assert binding_of(b).next_dma == 1        # io.c still advances the cursor
    assert a.dead is None and b.dead is None


def test_dma_transfer_receivers_used_len_is_written_after_the_data():
    log = []

    class LoggingMemory(GuestMemory):
        """Records every 32-bit store with a snapshot of RAM taken just before it."""
        def write_u32(self, addr, value):
            log.append((self, addr, value, bytes(self.regions[0].view)))
            return super().write_u32(addr, value)

    kit = Kit(memory_class=LoggingMemory)
    net = NetFile()
    a = kit.guest(net, NET_A)
    b = kit.guest(net, NET_B)
    [entry] = rx(kit, b, [[(BUF, 64), (BUF + 0x1000, 64)]])
    assert send_from_a(kit, a, [(SRC, 100)]) is Send.DELIVERED
    assert [(m, addr, value) for m, addr, value, _ in log] == [
        (a.memory, UDMA, 100), (b.memory, entry, 100)]
    at_b_store = log[1][3]
    assert at_b_store[BUF:BUF + 64] + at_b_store[BUF + 0x1000:BUF + 0x1000 + 36] == PAYLOAD[:100]
    assert at_b_store[entry:entry + 4] == bytes(4)      # the length was still 0 then
    assert kit.used_len(b, entry) == 100


def test_dma_transfer_on_transfer_observer_sees_completed_transfers():
    kit, a, b = pair()
    seen = []
    kit.engine.on_transfer = lambda *args: seen.append(args)
    entries = rx(kit, b, [[(BUF, 100)], [(BUF + 0x100, 100)]])
    send_from_a(kit, a, [(SRC, 10)])
    send_from_a(kit, a, [(SRC, 20)])
    assert [(s, d.guest, i, e, n) for s, d, i, e, n, _ in seen] == [
        (a, b, 0, entries[0], 10), (a, b, 1, entries[1], 20)]


# --- get_dma_buffer / LHREQ_GETDMA ---------------------------------------------------------

def test_getdma_first_free_buffer_from_index_0_irq_stored_in_used_len():
    kit, a, b = pair()
    key = 0x300                                         # private: the Launcher's own device
    entries = kit.put_array(b, ARR, [[(BUF, 100)]] * 3)
    assert kit.bind(b, key, ARR, 3, 7) == 1
    kit.set_used_len(b, entries[0], 1)
    assert kit.engine.get_dma_buffer(b, key) == (entries[1], 7)
    assert kit.used_len(b, entries[1]) == 0             # get_dma_buffer alone writes nothing
    assert kit.engine.user_get_dma(b, key) == entries[1]
    assert kit.used_len(b, entries[1]) == 7
    assert kit.engine.user_get_dma(b, key) == entries[2]
    kit.set_used_len(b, entries[0], 0)
    assert kit.engine.user_get_dma(b, key) == entries[0]   # always from index 0, no cursor
    # All used: lgnet returns ENOENT (2.6.23 returned the last entry).
    assert kit.engine.user_get_dma(b, key) == -errno.ENOENT
    assert [kit.used_len(b, e) for e in entries] == [7, 7, 7]
    assert b.dead is None


def test_getdma_none_bound_or_not_own_binding_is_enoent():
    kit, a, b = pair()
    assert kit.engine.user_get_dma(b, 0x300) == -errno.ENOENT
    rx(kit, b, [[(BUF, 100)]])                          # B binds the shared key
    assert kit.engine.user_get_dma(a, KA) == -errno.ENOENT   # A never gets B's buffers
    assert a.dead is None


def test_getdma_uses_the_first_binding_of_this_guest_on_the_chain():
    kit, a, b = pair()
    key = 0x300
    free = kit.put_array(b, ARR, [[(BUF, 100)]])
    used = kit.put_array(b, 0x3000, [[(BUF, 100)]])
    kit.set_used_len(b, used[0], 9)
    assert kit.bind(b, key, ARR, 1, 2) == 1
    assert kit.bind(b, key, 0x3000, 1, 3) == 1          # newest: head of the chain, all used
    assert kit.engine.user_get_dma(b, key) == -errno.ENOENT
    assert kit.used_len(b, free[0]) == 0
    assert kit.bind(b, key, 0x3000, 0, 0) == 1
    assert kit.engine.user_get_dma(b, key) == free[0] and kit.used_len(b, free[0]) == 2


def test_getdma_unreadable_entry_kills_and_is_enoent():
    """lgread on the array kills the guest; lgnet does not hand the bad address back."""
    kit, a, b = pair()
    array = RAM_SIZE - abi.LGUEST_DMA_SIZE
    [entry] = kit.put_array(b, array, [[(BUF, 100)]])
    kit.set_used_len(b, entry, 1)
    assert kit.bind(b, 0x300, array, 2, IRQ) == 1       # entry 1 lies past the end of RAM
    assert kit.engine.user_get_dma(b, 0x300) == -errno.ENOENT
    assert b.dead == "bad read address 0x10000 len 100"     # lgread of the entry
    assert kit.used_len(b, entry) == 1


def test_getdma_misaligned_key_kills():
    kit, a, b = pair()
    assert kit.engine.user_get_dma(b, 0x302) == -errno.ENOENT
    assert b.dead == "bad registered DMA buffer"


def test_getdma_key_with_nothing_mapped_behind_it_kills():
    kit, a, b = pair()
    assert kit.engine.user_get_dma(b, 0xC0000000) == -errno.ENOENT
    assert b.dead == "bad registered DMA buffer"


def test_getdma_free_buffer_whose_array_sits_at_guest_physical_0_is_enoent():
    """get_dma_buffer answered with an address and 0 meant none: user_get_dma said ENOENT
    and wrote no irq at address 0."""
    kit, a, b = pair()
    kit.put_array(b, 0, [[(BUF, 100)]])
    assert kit.bind(b, 0x300, 0, 1, IRQ) == 1
    assert kit.engine.user_get_dma(b, 0x300) == -errno.ENOENT
    assert kit.used_len(b, 0) == 0 and b.dead is None


def test_getdma_entry_straddling_the_end_of_ram_is_found():
    kit, a, b = pair()
    b.memory.add_region(RAM_SIZE, bytearray(abi.PAGE_SIZE), name="descriptors")
    array = RAM_SIZE - 2
    assert b.memory.scatter(array, abi.pack_dma([(BUF, 100)]))
    assert kit.bind(b, 0x300, array, 1, IRQ) == 1
    assert kit.engine.user_get_dma(b, 0x300) == array
    assert b.memory.read_u32(array) == IRQ and b.dead is None


# --- LHREQ_IRQ, the guest table, release on close ------------------------------------------

def test_send_irq_sets_the_bit_or_einval():
    kit, a, b = pair()
    assert kit.engine.send_irq(b, abi.LGUEST_IRQS) == -errno.EINVAL
    assert b.irqs_pending == 0 and kit.wakes.woken == []
    assert kit.engine.send_irq(b, 31) == 0
    assert kit.engine.send_irq(b, 0) == 0
    assert b.irqs_pending == (1 << 31) | 1
    assert kit.wakes.woken == [b.id, b.id]


def test_initialize_returns_enospc_when_the_table_is_full():
    kit = Kit(max_guests=2)
    a = kit.guest()
    b = kit.guest()
    assert (a.id, b.id) == (0, 1)
    assert kit.engine.initialize(object(), GuestMemory(), 0x20, 0, 0, 0) == -errno.ENOSPC
    kit.engine.close(a)
    c = kit.guest()
    assert c.id == 0 and kit.engine.guests == [c, b]
    assert c.memory.pfn_limit == 0x20


def test_release_all_dma_on_close():
    kit, a, b = pair()
    rx(kit, b, [[(BUF, 100)]])
    rx(kit, b, [[(BUF, 100)]], array=0x3000)
    kit.engine.close(b)
    assert kit.engine.guests[b.id] is None
    assert all(bd.interrupt == 0 for bd in b.dma)
    assert all(chain == [] for chain in kit.engine.dma_hash)
    assert send_from_a(kit, a, [(SRC, 10)]) is Send.NO_RECEIVER
    assert kit.used_len(b, ARR) == 0 and b.irqs_pending == 0
    c = kit.guest(kit.net, NET_B)                        # the slot is reused
    assert c.id == b.id
    kit.engine.close(b)                                  # a stale second close is harmless
    assert kit.engine.guests[c.id] is c


def test_memory_faults_kill_through_the_engine():
    kit, a, b = pair()
    assert a.memory.read(HOLE, 4) == bytes(4)
    assert a.dead == "bad read address 0x1c000 len 4"
    assert kit.wakes.woken == [a.id]


def test_engine_defaults_need_no_callbacks():
    engine = Engine()
    mem = GuestMemory()
    mem.add_region(0, bytearray(4096))
    g = engine.initialize(None, mem, 1, 0, 0, 0)
    assert engine.send_irq(g, 3) == 0 and g.irqs_pending == 8
