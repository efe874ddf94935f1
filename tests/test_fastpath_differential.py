"""The compiled per-frame path against the Python reference (DESIGN rule 9), byte for byte.

Two identical worlds — one Engine(compiled=False), one Engine(compiled=True) — get the same
guests, net pages, rings and hostile inputs: descriptors with pieces crossing pages, over a
page, above pfn_limit, wrapping, in holes and in the shared page, zero lengths, full and
empty receive arrays, odd used_len values, private, unaligned and unmapped keys, unbinds and
rebinds in between, several receivers on one chain, an impaired link, a capture hook; sends
made directly and through the async ring. After every step both worlds must agree on every
guest's memory and net page, interrupts, kill reasons, counters, cursors, the ring, the
order of the guests to wake, what each call returned and what the capture hook saw.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enginekit import ABOVE_LIMIT, HOLE, RAM_SIZE, Kit, NetFile, warm
from lgnet import abi
from lgnet.fabric import fastpath, hypercalls
from lgnet.fabric.dma import Restock

pytestmark = pytest.mark.skipif(fastpath.compiled_module() is None,
                                reason="the compiled per-frame path was not built: %s"
                                % fastpath.describe()[1])

NET_AT = (0x10000, 0x18000, 0x10000)      # where A, B and C map their net page
DATA = 0x800                              # each guest's struct lguest_data (its ring)
DESC = 0x2000                             # receive arrays
TX = 0x3000                               # send descriptors
BUFS = 0x4000                             # where good pieces go
SIZE = abi.LGUEST_DMA_SIZE
PAGE = abi.PAGE_SIZE
PRIVATE_KEY = 0x300
B_PFN_LIMIT = 0xF                         # 60 KiB, below the end of B's 64 KiB of RAM


class PassAll:
    """An impairment configured on some link, that judges every frame untouched: the
    compiled path must still leave impaired engines to Python."""

    def judge(self, src, dst, space, length):
        return None


class World:
    """Three guests: A and B share one net page; C maps it too, or a file of its own."""

    def __init__(self, compiled: bool, c_shares: bool):
        self.kit = Kit(restock=self.restock, compiled=compiled)
        self.engine = self.kit.engine
        net, other = NetFile(), NetFile(ino=43)
        self.nets = [net, other]
        # B's pfn_limit lies inside its RAM: its last pages are backed but out of bounds.
        self.guests = [self.kit.guest(net, NET_AT[0]),
                       self.kit.guest(net, NET_AT[1], pfn_limit=B_PFN_LIMIT),
                       self.kit.guest(net if c_shares else other, NET_AT[2])]
        for g in self.guests:
            g.memory.scatter(DATA + abi.LGUEST_DATA_HCALL_STATUS,
                             bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE)
            hypercalls.hypercall(self.engine, g, abi.LHCALL_LGUEST_INIT, DATA, 0, 0)
            # lguest_data.time is the wall clock: the one thing the two worlds cannot share.
            g.memory.scatter(DATA + abi.LGUEST_DATA_TIME, bytes(abi.TIMESPEC.size))
        self.seen = []                    # what the capture hook was handed
        self.rearm = None                 # the restock step: re-arm this entry, or nothing

    def restock(self, receiver):
        if self.rearm is not None:
            self.kit.set_used_len(receiver, self.rearm, 0)

    def prime(self, g, key):
        """What earlier sends to this key would have left (enginekit.warm), so that the
        compiled path meets this send, not only its successors."""
        warm(self.engine, g, self.address(g, key))

    def address(self, g, where):
        kind, value = where
        return NET_AT[g.id] + value if kind == "net" else value

    def on_transfer(self, src, dst, index, entry, copied, dma, *fault):
        self.seen.append((src.id, dst.guest.id, dst.dmas, index, entry, copied, dma, fault))

    # --- the steps -----------------------------------------------------------------------

    def do(self, step):
        op, gi, *args = step
        g = self.guests[gi]
        if op == "put_dma":
            where, pieces, used = args
            pieces = [(self.address(g, a), n) for a, n in pieces]
            return g.memory.scatter(self.address(g, where), abi.pack_dma(pieces, used))
        if op == "poke":
            where, value = args
            return g.memory.scatter(self.address(g, where), value.to_bytes(4, "little"))
        if op == "bind":
            key, array, num, irq = args
            return self.engine.bind_dma(g, self.address(g, key), array, num, irq)
        if op == "send":
            key, udma, rearm = args
            self.rearm = rearm
            self.prime(g, key)
            sent = self.engine.send_dma(g, self.address(g, key), self.address(g, udma))
            if isinstance(sent, Restock):
                self.restock(sent.receiver)
                return ("restock", sent.receiver.id, self.engine.retry_send(sent))
            return sent
        if op == "queue":
            calls, = args
            view, status_at, calls_at, _unpack = g.ring
            for i, (eax, edx, ebx, ecx) in enumerate(calls):
                slot = (g.next_hcall + i) % abi.LHCALL_RING_SIZE
                if eax == abi.LHCALL_SEND_DMA:
                    self.prime(g, edx)
                if eax in (abi.LHCALL_SEND_DMA, abi.LHCALL_BIND_DMA):
                    edx = self.address(g, edx)
                if eax == abi.LHCALL_SEND_DMA:
                    ebx = self.address(g, ebx)
                abi.ASYNC_HCALL.pack_into(view, calls_at + slot * abi.ASYNC_HCALL.size,
                                          eax, edx, ebx, ecx)
                view[status_at + slot] = abi.HCALL_STATUS_PENDING
            return len(calls)
        if op == "drain":
            limit, rearm = args
            self.rearm = rearm
            outcome = hypercalls.Outcome()
            ran = hypercalls.drain_async(self.engine, g, outcome, limit)
            done = None
            if outcome.restock is not None:
                self.restock(outcome.restock.receiver)
                done = hypercalls.finish_restock(self.engine, outcome.restock)
            return ran, outcome.halt, outcome.result, outcome.clockevent_ns, done
        if op == "burst":
            calls, limit, rearm = args
            self.do(("queue", gi, calls))
            return self.do(("drain", gi, limit, rearm))
        if op == "rearm":
            for i in range(4):                 # the receiver took its frames
                g.memory.scatter(DESC + SIZE * i, bytes(4))
            return None
        if op == "cursor":
            at, = args                          # next_dma near its u16 wrap
            for b in g.dma:
                if b.interrupt:
                    b.next_dma = at
            return None
        if op == "clear_pending":
            g.pending_dma = None               # the Launcher read its DMA
            return None
        if op == "impair":
            on, = args
            self.engine.impair = PassAll() if on else None
            return None
        if op == "capture":
            on, = args
            self.engine.on_transfer = self.on_transfer if on else None
            return None
        raise AssertionError(op)

    def state(self) -> dict:
        out = {"woken": [g.id for g in self.engine.woken], "seen": list(self.seen),
               "nets": [bytes(n.buf) for n in self.nets]}
        for g in self.guests:
            view, status_at, _calls_at, _unpack = g.ring
            out[g.id] = {
                "ram": bytes(self.kit.ram[g.id]), "irqs": g.irqs_pending, "dead": g.dead,
                "counters": g.counters.as_dict(), "next_hcall": g.next_hcall,
                "pending_dma": g.pending_dma,
                "ring": bytes(view[status_at:status_at + abi.LHCALL_RING_SIZE]),
                "bindings": [(b.key, b.dmas, b.num_dmas, b.next_dma, b.interrupt)
                             for b in g.dma if b.interrupt],
            }
        return out


# --- hostile inputs ------------------------------------------------------------------------

guest_st = st.integers(0, 2)
good_addr = st.builds(lambda page, off: ("abs", BUFS + page * PAGE + off),
                      st.integers(0, 11), st.integers(0, PAGE - 1))
hostile_addr = st.one_of(
    st.sampled_from([("abs", a) for a in (0, 4, PAGE - 2, RAM_SIZE - 8, RAM_SIZE, HOLE,
                                          ABOVE_LIMIT - 16, ABOVE_LIMIT, 0xB8000000,
                                          0xFFFFFFF0, 0xFFFFFFFF, DATA, DESC, TX)]),
    st.tuples(st.just("net"), st.integers(0, PAGE - 1)),
    st.tuples(st.just("abs"), st.integers(0, 0xFFFFFFFF)),
)
# Pieces that end at a page boundary, or one byte past it (check_dma_list's edge).
edge_piece = st.builds(lambda page, k, past: (("abs", BUFS + page * PAGE + PAGE - k), k + past),
                       st.integers(0, 11), st.integers(1, 1514), st.integers(0, 1))
# Pieces about B's pfn_limit: lguest_address_ok's edge (the end must lie below it).
limit_piece = st.builds(lambda k, shift: (("abs", B_PFN_LIMIT * PAGE - k + shift), k),
                        st.integers(1, 1514), st.integers(-1, 1))
length_st = st.one_of(st.integers(1, 1514), st.sampled_from([0, 1, PAGE, PAGE + 1, 0xFFFF]))
piece_st = st.one_of(st.tuples(st.one_of(good_addr, good_addr, hostile_addr), length_st),
                     edge_piece)
pieces_st = st.lists(piece_st, min_size=0, max_size=abi.LGUEST_MAX_DMA_SECTIONS)
array_entry = st.integers(0, 7).map(lambda i: ("abs", DESC + SIZE * i))
tx_entry = st.integers(0, 3).map(lambda i: ("abs", TX + SIZE * i))
desc_where = st.one_of(array_entry, array_entry, tx_entry, tx_entry,
                       st.tuples(st.just("net"), st.integers(0, 7).map(lambda i: 0x400 + SIZE * i)),
                       st.sampled_from([("abs", RAM_SIZE - 40), ("abs", HOLE), ("abs", 0x3002)]))
used_st = st.sampled_from([0, 0, 0, 1, 1514, 0xFFFFFFFF])
key_st = st.one_of(st.integers(0, 3).map(lambda k: ("net", 4 * k)),
                   st.sampled_from([("abs", PRIVATE_KEY), ("net", 2), ("abs", HOLE),
                                    ("abs", 0xC0000000)]))
array_st = st.one_of(st.just(DESC), st.just(DESC + 2), st.just(DESC + SIZE * 4),
                     st.sampled_from([RAM_SIZE - SIZE, HOLE, NET_AT[0] + 0x400]))
rearm_st = st.one_of(st.none(), array_entry.map(lambda w: w[1]))

send_call = st.builds(lambda key, udma: (abi.LHCALL_SEND_DMA, key, udma, 0), key_st, tx_entry)
ring_call = st.one_of(
    send_call, send_call, send_call, send_call,
    st.builds(lambda key, num, irq: (abi.LHCALL_BIND_DMA, key, DESC, abi.bind_dma_arg(num, irq)),
              key_st, st.integers(0, 8), st.integers(0, 33)),
    st.just((abi.LHCALL_HALT, 0, 0, 0)), st.just((abi.LHCALL_FLUSH_ASYNC, 0, 0, 0)),
    st.just((abi.LHCALL_SET_CLOCKEVENT, 1000, 0, 0)), st.just((99, 0, 0, 0)))

slot_st = st.sampled_from([("net", 0), ("net", 4)])
plain_send = st.builds(lambda key, udma: (abi.LHCALL_SEND_DMA, key, udma, 0), slot_st, tx_entry)
hostile_steps = st.one_of(
    st.tuples(st.just("put_dma"), guest_st, desc_where, pieces_st, used_st),
    st.tuples(st.just("put_dma"), guest_st, array_entry, pieces_st, used_st),
    st.tuples(st.just("put_dma"), guest_st, tx_entry, pieces_st, st.just(0)),
    st.tuples(st.just("poke"), guest_st, desc_where, used_st),
    st.tuples(st.just("bind"), guest_st, key_st, array_st, st.integers(0, 9), st.integers(0, 33)),
    st.tuples(st.just("bind"), guest_st, key_st, array_st, st.integers(0, 9), st.just(0)),
    st.tuples(st.just("send"), guest_st, key_st, desc_where, rearm_st),
    st.tuples(st.just("queue"), guest_st, st.lists(ring_call, min_size=1, max_size=12)),
    st.tuples(st.just("clear_pending"), guest_st),
    st.tuples(st.just("impair"), st.just(0), st.booleans()),
    st.tuples(st.just("capture"), st.just(0), st.booleans()),
)
# Traffic that should flow, so the hostile steps meet a busy engine: sends on the slot keys
# the prologue bound, through the ring too, receivers re-arming entries, good lists.
plain_steps = st.one_of(
    st.tuples(st.just("send"), guest_st, slot_st, tx_entry, rearm_st),
    st.tuples(st.just("queue"), guest_st, st.lists(plain_send, min_size=1, max_size=20)),
    st.tuples(st.just("drain"), guest_st, st.integers(1, abi.LHCALL_RING_SIZE), rearm_st),
    st.tuples(st.just("burst"), guest_st, st.lists(plain_send, min_size=1, max_size=20),
              st.integers(1, abi.LHCALL_RING_SIZE), rearm_st),
    st.tuples(st.just("rearm"), guest_st),
    st.tuples(st.just("cursor"), guest_st, st.sampled_from([abi.BIND_NUM_MASK - 1,
                                                            abi.BIND_NUM_MASK])),
    st.tuples(st.just("poke"), guest_st, array_entry, st.just(0)),
    st.tuples(st.just("put_dma"), guest_st, st.one_of(tx_entry, array_entry),
              st.lists(st.one_of(st.tuples(good_addr, st.integers(1, 1514)), edge_piece,
                                 limit_piece),
                       min_size=1, max_size=3),
              st.just(0)),
)
step_st = st.one_of(plain_steps, plain_steps, hostile_steps)


def bound_world(ops):
    """A prologue that makes deliveries likely: every guest has four good receive buffers,
    bound on a slot key (B and C on slot 0, A on slot 1), and four good send descriptors."""
    steps = []
    for gi in range(3):
        for i in range(4):
            steps.append(("put_dma", gi, ("abs", DESC + SIZE * i),
                          [(("abs", BUFS + PAGE * i), 1514)], 0))
            steps.append(("put_dma", gi, ("abs", TX + SIZE * i),
                          [(("abs", BUFS + PAGE * (4 + i)), 60 + 500 * i)], 0))
        steps.append(("bind", gi, ("net", 4 if gi == 0 else 0), DESC, 4, 3 + gi))
    return steps + ops


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(c_shares=st.booleans(), ops=st.lists(step_st, min_size=1, max_size=40))
def test_both_paths_agree_byte_for_byte(c_shares, ops):
    python, compiled = World(False, c_shares), World(True, c_shares)
    assert python.state() == compiled.state()
    for n, step in enumerate(bound_world(ops)):
        assert python.do(step) == compiled.do(step), (n, step)
        assert python.state() == compiled.state(), (n, step)
    assert python.engine.fast_frames == 0


# --- the compiled path really runs ---------------------------------------------------------

def ring_of_sends(compiled: bool, frames: int) -> World:
    """B binds `frames` good buffers on slot 0 and alone receives there; A queues `frames`
    SEND_DMAs to it, never looked up before, and drains its ring."""
    w = World(compiled, c_shares=False)
    for i in range(frames):
        w.do(("put_dma", 1, ("abs", DESC + SIZE * i), [(("abs", BUFS + 1024 * i), 1000)], 0))
    w.do(("put_dma", 0, ("abs", TX), [(("abs", BUFS), 1000)], 0))
    assert w.do(("bind", 1, ("net", 0), DESC, frames, 5)) == 1
    view, status_at, calls_at, _unpack = w.guests[0].ring
    for slot in range(frames):
        abi.ASYNC_HCALL.pack_into(view, calls_at + slot * abi.ASYNC_HCALL.size,
                                  abi.LHCALL_SEND_DMA, NET_AT[0], TX, 0)
        view[status_at + slot] = abi.HCALL_STATUS_PENDING
    assert w.do(("drain", 0, abi.LHCALL_RING_SIZE, None))[0] == frames
    return w


def test_a_ring_of_plain_sends_runs_compiled_after_its_first():
    """The first send looks its key up and finds where the array lies (Python's); every
    later one of the ring is the compiled path's, and the two worlds end the same."""
    frames = 16
    compiled, python = ring_of_sends(True, frames), ring_of_sends(False, frames)
    assert compiled.engine.fast_frames == frames - 1 and python.engine.fast_frames == 0
    assert compiled.guests[1].counters.rx_packets == frames
    assert compiled.state() == python.state()


def test_a_capture_hook_that_raises_leaves_what_the_python_path_leaves():
    """An exception out of the hook (an lgnet bug: a traceback) stops both paths at the same
    point: that frame copied and counted, its ring entry not yet freed, no interrupt."""
    states = []
    for compiled in (False, True):
        w = ring_of_sends(compiled, 4)
        calls = []

        def hook(*args):
            calls.append(args)
            if len(calls) == 3:
                raise RuntimeError("capture bug")

        w.engine.on_transfer = hook
        w.do(("rearm", 1))
        w.do(("queue", 0, [(abi.LHCALL_SEND_DMA, ("net", 0), ("abs", TX), 0)] * 4))
        with pytest.raises(RuntimeError, match="capture bug"):
            w.do(("drain", 0, abi.LHCALL_RING_SIZE, None))
        states.append(w.state())
    assert states[0] == states[1]
