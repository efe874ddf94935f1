"""Hostile guests against the DMA engine (ABI.md §3): what may change, and who may die.

Three guests A, B, C. A and B share one net page (mapped at different addresses); C maps
the same file or a different one. Random operations — binds with any key, arrays anywhere,
struct lguest_dma with any addresses and lengths, sends, unbinds, GETDMA, guests re-arming
or scribbling over their own memory — and after every engine operation:

- the engine did not raise, and lguest_lock is not held;
- memory changed only where io.c may write: the sender's used_len; for the guests bound at
  the key, the pieces listed in their bound arrays and those entries' used_len; for GETDMA
  the used_len of the caller's own entries;
- only the actor (sender, binder, GETDMA caller) or the send's destination (the first other
  binder on the chain) was killed, a guest whose own lists were valid was not, and a dead
  guest's first reason never changes;
- a send that found no receiver, no buffer or a private key wrote nothing; a delivery wrote
  `copied` = min(source bytes, destination buffer bytes) to both used_len fields;
- dma_hash holds exactly the active bindings, each in its key's bucket.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enginekit import ABOVE_LIMIT, HOLE, RAM_SIZE, Kit, NetFile, RecordingLock
from lgnet import abi
from lgnet.fabric import keys
from lgnet.fabric.dma import Send

# Every rule holds on both per-frame paths: the Python reference and the compiled one.
pytestmark = pytest.mark.usefixtures("both_paths")

NET_AT = (0x10000, 0x18000, 0x10000)      # where A, B and C map their net page
DESC = 0x2000                             # receive arrays cluster here so binds find them
TX = 0x3000                               # and the send descriptors here
SIZE = abi.LGUEST_DMA_SIZE

# --- strategies: addresses are ("abs", a) or ("net", offset in the guest's own net page) ---

interesting = st.sampled_from([
    0, 4, RAM_SIZE - SIZE, RAM_SIZE - 4, RAM_SIZE, HOLE, ABOVE_LIMIT - SIZE, ABOVE_LIMIT,
    0xB8000000, 0xFFFFF000, 0xFFFFFF9C, 0xFFFFFFFC, 0xFFFFFFFF])
addr_st = st.one_of(
    st.tuples(st.just("abs"), st.integers(0x4000, RAM_SIZE - 1)),
    st.tuples(st.just("abs"), interesting),
    st.tuples(st.just("abs"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("net"), st.integers(0, 4095)),
)
desc_st = st.one_of(
    st.tuples(st.just("abs"), st.integers(0, 7).map(lambda i: DESC + SIZE * i)),
    st.tuples(st.just("abs"), st.integers(0, 3).map(lambda i: TX + SIZE * i)),
    st.tuples(st.just("abs"), st.integers(0, 3).map(lambda i: TX + SIZE * i)),
    st.tuples(st.just("net"), st.integers(0, 7).map(lambda i: 0x400 + SIZE * i)),
    addr_st,
)
slot_key = st.tuples(st.just("net"), st.integers(0, 3).map(lambda k: 4 * k))
key_st = st.one_of(
    slot_key, slot_key, slot_key, slot_key, slot_key,
    st.tuples(st.just("net"), st.integers(0, 4095)),
    st.tuples(st.just("abs"), st.sampled_from([0, 0x300, 0x302])),
    st.tuples(st.just("abs"), st.integers(0, 0xFFFFFFFF).map(lambda a: a & ~3)),
    st.tuples(st.just("abs"), st.integers(0, 0xFFFFFFFF)),
)
len_st = st.one_of(st.integers(1, 300), st.sampled_from([0, 1, 4095, 4096, 4097, 0xFFFF]),
                   st.integers(0, 0xFFFF))
good_piece = st.integers(0, 4095).flatmap(lambda off: st.tuples(
    st.tuples(st.just("abs"), st.integers(8, 15).map(lambda page: page * 0x1000 + off)),
    st.integers(1, 4096 - off)))
odd_piece = st.integers(0, 4095).flatmap(lambda off: st.tuples(   # in a hole or the net page
    st.sampled_from([("abs", HOLE + off), ("net", off)]), st.integers(1, 4096 - off)))
pieces_st = st.lists(st.one_of(good_piece, good_piece, odd_piece, st.tuples(addr_st, len_st)),
                     max_size=5)
guest_st = st.integers(0, 2)

peer_key = st.tuples(st.just("peer"), st.integers(0, 1))
send_slot = st.tuples(st.just("send"), guest_st, st.one_of(peer_key, peer_key, slot_key), desc_st)
op_st = st.one_of(
    send_slot, send_slot, send_slot, send_slot,
    st.tuples(st.just("poke_rx"), guest_st, st.sampled_from([0, 0, 0, 1]), pieces_st),
    st.tuples(st.just("bind"), guest_st, st.one_of(key_st, peer_key), desc_st,
              st.one_of(st.integers(0, 8), st.just(0xFFFF)),
              st.one_of(st.integers(1, 8), st.integers(0, 255))),
    st.tuples(st.just("unbind"), guest_st, st.integers(0, 40)),
    st.tuples(st.just("send"), guest_st, key_st, desc_st),
    st.tuples(st.just("getdma"), guest_st, key_st),
    st.tuples(st.just("poke"), guest_st, desc_st, st.sampled_from([0, 0, 0, 1, 0xFFFFFFFF]),
              pieces_st),
    st.tuples(st.just("rearm"), guest_st),
    st.tuples(st.just("irq"), guest_st, st.integers(0, 40)),
)


# --- the model's view of guest memory ------------------------------------------------------

def absolute(gi, tagged):
    kind, value = tagged
    if kind == "peer":                 # the slot key of another guest (value 0 or 1)
        return NET_AT[gi] + 4 * ((gi + 1 + value) % 3)
    return NET_AT[gi] + value if kind == "net" else value


def readable(g, addr, length):
    return g.memory.view(addr, length) is not None


def entries_of(binding):
    """(index, address) of every readable entry of a bound array."""
    g, out = binding.guest, []
    for region in g.memory.regions:
        lo = max(0, -(-(region.base - binding.dmas) // SIZE))
        hi = min(binding.num_dmas, (region.end - SIZE - binding.dmas) // SIZE + 1)
        for j in range(lo, hi):
            entry = binding.dmas + j * SIZE
            if readable(g, entry, SIZE):
                out.append((j, entry))
    return out


def list_ok(g, dma):
    """check_dma_list passes and every piece is backed: this list can hurt nobody."""
    for addr, length in dma.pieces():
        if (not g.memory.address_ok(addr, length) or length > abi.PAGE_SIZE
                or addr % abi.PAGE_SIZE + length > abi.PAGE_SIZE or not readable(g, addr, length)):
            return False
    return True


def binding_ok(binding):
    if binding.num_dmas * SIZE > RAM_SIZE:
        return False
    ents = entries_of(binding)
    if len(ents) != binding.num_dmas:
        return False
    g = binding.guest
    return all(list_ok(g, abi.unpack_dma(g.memory.read(e, SIZE))) for _, e in ents)


class Allowed:
    """Per backing buffer, a mask of the bytes an operation may change."""

    def __init__(self, buffers):
        self.mask = {id(buf): bytearray(len(buf)) for buf in buffers}

    def add(self, g, addr, length):
        for region in g.memory.regions:
            lo, hi = max(addr, region.base), min(addr + length, region.end)
            if lo < hi:
                m = self.mask[id(region.view.obj)]
                m[lo - region.base:hi - region.base] = b"\1" * (hi - lo)

    def add_binding(self, binding, pieces=True):
        g = binding.guest
        for _, entry in entries_of(binding):
            self.add(g, entry, 4)
            if pieces:
                for addr, length in abi.unpack_dma(g.memory.read(entry, SIZE)).pieces():
                    self.add(g, addr, length)


def changed(before: bytes, after: bytes):
    if before == after:
        return []
    out = []
    for c in range(0, len(before), 1024):
        if before[c:c + 1024] != after[c:c + 1024]:
            out += [i for i in range(c, min(c + 1024, len(before))) if before[i] != after[i]]
    return out


def active(g):
    return [bd for bd in g.dma if bd.interrupt]


# --- the test ------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(same_net=st.booleans(), restock_frees=st.booleans(),
       ops=st.lists(op_st, min_size=10, max_size=40))
def test_hostile_guests_only_touch_what_io_c_allows(same_net, restock_frees, ops):
    lock = RecordingLock()
    hook = {"calls": []}

    def restock(guest):
        # The receiver drains: the buffer at the cursor of each of its bindings on the key
        # being sent to becomes free again.
        assert not lock.held
        hook["calls"].append(guest)
        for bd in active(guest) if restock_frees else []:
            if bd.num_dmas and bd.key == hook["key"]:
                entry = bd.dmas + (bd.next_dma % bd.num_dmas) * SIZE
                if readable(guest, entry, SIZE):
                    guest.memory.view(entry, 4)[:] = bytes(4)

    kit = Kit(restock=restock, lock=lock)
    net = NetFile(ino=42)
    other = net if same_net else NetFile(ino=43)
    guests = [kit.guest(net, NET_AT[0]), kit.guest(net, NET_AT[1]),
              kit.guest(other, NET_AT[2])]
    buffers = [kit.ram[g.id] for g in guests]
    buffers += [net.buf] if same_net else [net.buf, other.buf]
    # Distinct non-zero contents, so every copy shows up as a change.
    for n, buf in enumerate(buffers):
        buf[:] = bytes((i * 131 + n * 61 + 17) & 0xFF for i in range(len(buf)))
    recorded_binds = []
    for gi, g in enumerate(guests):
        # Start like lguest_net: four receive buffers bound at the guest's own slot (4*gi),
        # and four sane send descriptors.
        for i in range(4):
            kit.put_dma(g, DESC + SIZE * i, [(0x8000 + 0x800 * i, 0x400)])
            kit.put_dma(g, TX + SIZE * i, [(0xA000 + 0x200 * i, 60 * (i + 1)),
                                           (0xB000 + 0x200 * i, 40)])
        assert kit.bind(g, NET_AT[gi] + 4 * gi, DESC, 4, gi + 1) == 1
        recorded_binds.append((g, NET_AT[gi] + 4 * gi, DESC))
    transfers = []
    kit.engine.on_transfer = lambda *args: transfers.append(args)

    for op in ops:
        kind, gi = op[0], op[1]
        g = guests[gi]
        if kind == "poke":             # the guest writes a descriptor into its own memory
            at = absolute(gi, op[2])
            if readable(g, at, SIZE):
                kit.put(g, at, abi.pack_dma([(absolute(gi, a), n) for a, n in op[4]], op[3]))
            continue
        if kind == "poke_rx":          # ... or over the receive entry at its cursor
            for bd in active(g)[:1]:
                entry = bd.dmas + (bd.next_dma % bd.num_dmas if bd.num_dmas else 0) * SIZE
                if readable(g, entry, SIZE):
                    kit.put(g, entry,
                            abi.pack_dma([(absolute(gi, a), n) for a, n in op[3]], op[2]))
            continue
        if kind == "rearm":            # the guest's receive interrupt: free every buffer
            for bd in active(g):
                for _, entry in entries_of(bd)[:16]:
                    kit.set_used_len(g, entry, 0)
            continue

        before = [bytes(buf) for buf in buffers]
        dead_before = [x.dead for x in guests]
        irqs_before = [x.irqs_pending for x in guests]
        allowed = Allowed(buffers)
        killable = {g.id}
        must_live = set()
        del hook["calls"][:]
        del transfers[:]
        outcome = None

        if kind == "bind" or kind == "unbind":
            if kind == "bind":
                key_addr, array = absolute(gi, op[2]), absolute(gi, op[3])
                num, irq = op[4], op[5]
            else:
                mine = [r for r in recorded_binds if r[0] is g]
                if not mine:
                    continue
                _, key_addr, array = mine[op[2] % len(mine)]
                num, irq = 0, 0
            n_active = len(active(g))
            result = kit.bind(g, key_addr, array, num, irq)
            if result and irq:
                recorded_binds.append((g, key_addr, array))
                assert len(active(g)) == n_active + 1
            elif result:
                assert len(active(g)) == n_active - 1
            else:
                assert len(active(g)) == n_active
            if irq >= abi.LGUEST_IRQS:
                assert result == 0 and g.dead == dead_before[gi]
        elif kind == "getdma":
            key_addr = absolute(gi, op[2])
            for bd in active(g):
                allowed.add_binding(bd, pieces=False)
            got = kit.engine.user_get_dma(g, key_addr)
            assert got < 0 or any(got == e for bd in active(g) for _, e in entries_of(bd))
        elif kind == "irq":
            result = kit.engine.send_irq(g, op[2])
            assert result == (0 if op[2] < abi.LGUEST_IRQS else -22)
        elif kind == "send":
            key_addr, udma = absolute(gi, op[2]), absolute(gi, op[3])
            allowed.add(g, udma, 4)
            key = hook["key"] = keys.resolve(g.memory, g.id, key_addr)
            dest = None
            if key is not None and key.shared:
                for bd in kit.engine.dma_hash[keys.bucket(key)]:
                    if bd.key == key and bd.guest is not g:
                        dest = dest or bd
                        allowed.add_binding(bd)
            if dest is not None:
                killable.add(dest.guest.id)
                if binding_ok(dest) and dest.guest.dead is None:
                    must_live.add(dest.guest.id)
            if (key is not None and readable(g, udma, SIZE)
                    and list_ok(g, abi.unpack_dma(g.memory.read(udma, SIZE)))):
                must_live.add(g.id)
            src_total = (abi.unpack_dma(g.memory.read(udma, SIZE)).total
                         if readable(g, udma, SIZE) else 0)
            dest_entries = ({e: abi.unpack_dma(dest.guest.memory.read(e, SIZE)).total
                             for _, e in entries_of(dest)} if dest is not None else {})
            outcome = kit.send(g, key_addr, udma)
            assert isinstance(outcome, Send)
            if key is None:
                assert outcome is Send.BAD_KEY
            elif not key.shared:
                assert outcome is Send.PENDING and g.pending_dma == (udma, key_addr)
            elif dest is None:
                assert outcome is Send.NO_RECEIVER
            assert len(hook["calls"]) <= 1
            if hook["calls"]:
                assert hook["calls"] == [dest.guest]
        else:                                             # pragma: no cover
            raise AssertionError(kind)

        # lguest_lock is balanced.
        assert not lock.held

        # Who may die, and who may not; the first reason sticks.
        for x, was in zip(guests, dead_before):
            if was is not None:
                assert x.dead == was
            elif x.dead is not None:
                assert x.id in killable, (kind, x.id, x.dead)
                assert x.id not in must_live, (kind, x.id, x.dead)

        # Memory: every changed byte lies where io.c may write.
        for buf, old in zip(buffers, before):
            mask = allowed.mask[id(buf)]
            bad = [i for i in changed(old, bytes(buf)) if not mask[i]]
            assert not bad, (kind, op, hex(bad[0]))

        # Interrupts: only a send's destination (or LHREQ_IRQ's target) gets one.
        for x, irqs in zip(guests, irqs_before):
            if x.irqs_pending != irqs:
                assert kind == "irq" and x is g or (
                    kind == "send" and dest is not None and x is dest.guest
                    # (a first try that found no buffer raised it before the restock)
                    and (outcome in (Send.DELIVERED, Send.NO_BUFFER) or hook["calls"])), (
                        kind, x.id)

        if kind == "send":
            if outcome in (Send.NO_RECEIVER, Send.PENDING, Send.BAD_KEY) or (
                    outcome is Send.NO_BUFFER and not hook["calls"]):
                assert [bytes(buf) for buf in buffers] == before
            if outcome is Send.NO_BUFFER:
                assert transfers == []
            if outcome in (Send.DELIVERED, Send.NO_BUFFER):
                assert dest.guest.irqs_pending & (1 << dest.interrupt)
            for src, dst, index, entry, copied, src_dma in transfers:
                assert src is g and dst.guest is dest.guest
                assert copied == min(src_total, dest_entries[entry])
                assert src_dma.total == src_total
                assert g.memory.read_u32(udma) == copied
                assert dst.guest.memory.read_u32(entry) == copied
            if outcome is Send.DELIVERED and src_total:
                assert len(transfers) == 1

        # dma_hash holds exactly the active bindings, each in its key's bucket.
        chained = [(i, bd) for i, chain in enumerate(kit.engine.dma_hash) for bd in chain]
        assert len({id(bd) for _, bd in chained}) == len(chained)
        assert {id(bd) for _, bd in chained} == {id(bd) for x in guests for bd in active(x)}
        assert all(keys.bucket(bd.key) == i for i, bd in chained)
        assert all(len(active(x)) <= abi.LGUEST_MAX_DMA for x in guests)
