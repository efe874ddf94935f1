"""The Host's DMA engine: drivers/lguest/io.c, as pure logic.

Rules of this file:
- It is sans-IO. It never opens a socket, forks, starts a thread, sleeps or prints. The
  caller hands in each guest's memory (fabric.memory.GuestMemory) and the lock to hold;
  everything else is data in, data out.
- It reports, the caller acts (DESIGN rule 8: no I/O under lguest_lock). Every guest whose
  interrupt was raised or who was killed is appended to `Engine.woken`, for the caller to take
  (`take_woken`) and tell once the operation is over; a send that found no free buffer returns
  a `Restock` step instead of waiting for the receiver itself.
- Everything that touches dma_hash or moves bytes between guests lives here.
- A guest's misbehaviour is *recorded*, never raised: kill_guest keeps the first reason and the
  caller carries on (lguest's shape, which keeps the happy path straight). Error codes that
  lguest_user.c returned are returned here as negative errno values.
- This file does not know whether a guest is a Unicorn CPU or a Python driver, nor how the
  Launcher reaches the Host.
- It is the reference. The compiled per-frame path (fabric/_fastdma.c, chosen by
  fabric/fastpath.py) only accelerates its plain SEND_DMA: send_dma and drain_sends offer it
  each frame first, and whatever it declines, untouched, is done here from scratch.

Theory of operation. A guest *binds* an array of `struct lguest_dma` receive buffers to a key;
the binding goes at the head of one of 61 hash chains. A peer *sends* one `struct lguest_dma`
to a key. A private key (not inside a shared net page) never reaches another guest: the DMA
is left pending for the sender's own Launcher. A shared key is looked up: the first binding
on the chain with that key and a different owner receives it. dma_transfer finds the
receiver's next free buffer (used_len == 0, starting at the next_dma cursor), checks both
lists, copies piece by piece, writes the count to the sender's used_len, then — after the
data — to the receiver's, and always raises the receiver's interrupt. All of it happens under
one big lock, lguest_lock; the only moment the lock is dropped is lguest's "one chance to
restock" when the receiver had no free buffer. That moment is a visible step here: send_dma
returns `Restock(receiver)` with the lock dropped, the caller lets the receiver run, then calls
`retry_send` — the whole lookup once more, and a second failure is final.

Impairments (fabric/impair.py) are applied here, where the frame moves, and only while one is
configured: `Engine.impair` is None otherwise, and a send checks that one attribute. An
impaired frame is judged once its lists are checked: a `down` one leaves the sender's used_len
0 (lguest_net's dead peer: a carrier error); a dropped one is copied nowhere but the sender's
used_len says it went (a wire lost it); a delayed, duplicated or corrupted one is copied out
of the sender at send time and delivered from that copy — now, or at its due time into
whatever receive buffer is then free (`deliver_due`, none free: dropped, as lguest drops).
Every such frame is reported to `on_fault` or `on_transfer` with what happened and why.
"""
from __future__ import annotations

import contextlib
import errno
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ContextManager

from lgnet import abi
from lgnet.fabric import fastpath, keys
from lgnet.fabric.impair import flip_bits
from lgnet.fabric.keys import Key
from lgnet.fabric.memory import GuestMemory


class Send(Enum):
    """What one SEND_DMA came to (lguest returned nothing; lgnet reports it for stats)."""
    DELIVERED = "delivered"            # copied into a receive buffer
    NO_RECEIVER = "no receiver"        # nothing else bound to that shared key
    NO_BUFFER = "no free buffer"       # the receiver had no free buffer, even after restocking
    FAILED = "failed"                  # a list was bad or the copy faulted: someone was killed
    PENDING = "pending"                # private key: handed to the sender's own Launcher
    BAD_KEY = "bad key"                # the sender was killed for its key
    LINK_DOWN = "link down"            # an impairment: the link or a partition is down
    LOST = "lost"                      # an impairment dropped it after the sender's used_len
    HELD = "held"                      # an impairment holds its copy until its due time


class Binding:
    """One of a guest's 32 `struct lguest_dma_info` entries; interrupt 0 means free."""
    __slots__ = ("guest", "key", "dmas", "num_dmas", "next_dma", "interrupt", "where")

    def __init__(self, guest: "Guest"):
        self.guest = guest
        self.key: Key | None = None
        self.dmas = 0
        self.num_dmas = 0
        self.next_dma = 0
        self.interrupt = 0
        # (memory layout, region, offset) when the whole array lies in one region, so its
        # used_len words can be read in place; region None when it does not.
        self.where: tuple | None = None


class Counters:
    """What the fabric saw of one guest's traffic on shared keys (for `lgnet up`'s table)."""
    __slots__ = ("tx_packets", "tx_bytes", "tx_carrier_errors", "rx_packets", "rx_bytes",
                 "rx_dropped", "tx_lost", "rx_late", "rx_duplicates", "rx_corrupted")
    # tx_lost: sent (used_len said so) but dropped by an impairment; rx_late, rx_duplicates,
    # rx_corrupted: deliveries an impairment delayed, repeated or damaged.

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(eq=False)
class Guest:
    """What the Host knows about one guest (struct lguest, the parts io.c uses)."""
    id: int
    owner: Any                         # the Launcher that initialised it (lg->tsk)
    memory: GuestMemory
    pfn_limit: int
    pgdir: int
    start: int
    page_offset: int
    dead: str | None = None
    irqs_pending: int = 0
    pending_dma: tuple[int, int] | None = None   # (dma address, key) for the Launcher
    lguest_data: int | None = None
    next_hcall: int = 0                # cursor into the async hypercall ring
    ring: tuple | None = None          # (window, status offset, calls offset, unpack): the ring
    dma: list[Binding] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    # key address -> (dma_hash generation, memory layout, Key, first other binder or None):
    # the lookup of a shared key, remembered until a bind/unbind or a new layout.
    sends: dict = field(default_factory=dict)
    # a struct lguest_dma's pieces (raw fields) -> (memory layout, runs, bytes): lists that
    # passed check_dma_list and are wholly backed, so the next frame through the same
    # descriptor costs one lookup, however many pieces it has.
    lists: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dma = [Binding(self) for _ in range(abi.LGUEST_MAX_DMA)]


@dataclass(eq=False)
class Restock:
    """A send found no free buffer: the receiver's one chance to restock comes next.

    The caller lets `receiver` run (it may be asleep in HALT with the interrupt the first try
    raised), then hands this back to `Engine.retry_send`. `slot` is for the async ring's
    drain: the ring entry that carried the send, freed once the retry is done."""
    sender: Guest
    key_addr: int
    udma: int
    receiver: Guest
    slot: int | None = None


@dataclass(eq=False)
class Late:
    """An impaired frame's copy on its way: to the first other binder of `key` when due."""
    src: Guest
    key: Key
    data: bytes
    sent: abi.LguestDma                # the sender's descriptor at send time (for the record)
    why: str                           # the record's words ("delayed: delay 20ms (...)")
    verdict: Any                       # fabric.impair.Verdict
    copy: bool = False                 # the duplicate


class Unreadable:
    """next_free_buffer met an entry its owner's memory does not back, at `addr`."""
    __slots__ = ("addr",)

    def __init__(self, addr: int):
        self.addr = addr


SEND_CACHE_MAX = 1024                  # remembered send lookups per guest
LIST_CACHE_MAX = 256                   # remembered checked lists per guest

# A struct lguest_dma's list, raw: its addr[16] and len[16] as bytes. Bytes are cheap to take
# and to hash, so they key the cache of checked lists; unpacked (addr[0..15], len[0..15])
# only when a list is checked.
_N = abi.LGUEST_MAX_DMA_SECTIONS
_SIZE = abi.LGUEST_DMA_SIZE
_USED = abi.DMA_USED_LEN_OFFSET
_LIST = abi.DMA_ADDR_OFFSET                       # the list starts after used_len
_LEN0 = abi.DMA_LEN_OFFSET - _LIST                # len[0] in the raw list
_UNPACK_LIST = struct.Struct("<%dI%dH" % (_N, _N)).unpack
_PAGE = abi.PAGE_SIZE
_U32 = struct.Struct("<I")


def _as_lguest_dma(used_len: int, raw: bytes) -> abi.LguestDma:
    fields = _UNPACK_LIST(raw)
    return abi.LguestDma(used_len, fields[:_N], fields[_N:])


def _empty(raw: bytes) -> bool:
    """len[0] == 0: the list has no pieces."""
    return raw[_LEN0] == 0 and raw[_LEN0 + 1] == 0


class Engine:
    """dma_hash, the guest table and every operation of io.c."""

    def __init__(self, lock: ContextManager | None = None, max_guests: int = abi.MAX_GUESTS,
                 tsc_khz: int = 0, first_guest_id: int = 0, compiled: bool | None = None):
        """compiled: run the common SEND_DMA in C (True), on this file alone (False), or
        as fabric/fastpath.py decides for the process (None)."""
        # What LGUEST_INIT tells a guest is its id: the table index from this base (lgnet's
        # own, for labs on several hosts; lguest's was the index).
        self.first_guest_id = first_guest_id
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.guests: list[Guest | None] = [None] * max_guests
        self.dma_hash: list[list[Binding]] = [[] for _ in range(abi.DMA_HASH_BUCKETS)]
        self.generation = 0            # bumped by every change to dma_hash
        # What LGUEST_INIT tells guests of the host's TSC: its rate, or 0 for "do not trust
        # it" (the caller measures; see fabric/tsc.py).
        self.tsc_khz = tsc_khz
        # Guests to tell, in the order it happened: an interrupt was raised, or it was killed.
        self.woken: list[Guest] = []
        # Optional observer of every completed transfer (capture); None costs nothing.
        self.on_transfer: Callable[..., None] | None = None
        # fabric.impair.Impairments while any impairment is configured; None costs one check.
        self.impair = None
        # Optional observer of every frame an impairment kept from its receiver (capture).
        self.on_fault: Callable[..., None] | None = None
        # The compiled per-frame path (fabric/_fastdma.c), or None: this file does it all.
        # It takes a send only when it is the plain case and leaves every other to us.
        if compiled is None:
            self.compiled = fastpath.default()
        elif compiled:
            self.compiled = fastpath.compiled_module()
            if self.compiled is None:
                raise ValueError("Engine(compiled=True): %s" % fastpath.describe()[1])
        else:
            self.compiled = None
        self.fast_frames = 0           # sends the compiled path delivered

    # --- the guest table ----------------------------------------------------------------

    def initialize(self, owner: Any, memory: GuestMemory, pfn_limit: int, pgdir: int,
                   start: int, page_offset: int) -> Guest | int:
        """LHREQ_INITIALIZE's Host half: a free guest slot, or -ENOSPC."""
        with self.lock:
            for gid, slot in enumerate(self.guests):
                if slot is None:
                    break
            else:
                return -errno.ENOSPC
            memory.pfn_limit = pfn_limit
            guest = Guest(gid, owner, memory, pfn_limit, pgdir, start, page_offset)
            memory.on_fault = lambda reason: self.kill_guest(guest, reason)
            self.guests[gid] = guest
            return guest

    def close(self, guest: Guest) -> None:
        """close() of /dev/lguest: release every binding and free the guest slot."""
        with self.lock:
            self._release_all_dma(guest)
            if self.guests[guest.id] is guest:
                self.guests[guest.id] = None

    def kill_guest(self, guest: Guest, reason: str) -> None:
        """Only the first reason is kept; the caller carries on; the guest never runs again."""
        if guest.dead is None:
            guest.dead = reason
            self.woken.append(guest)

    def raise_irq(self, guest: Guest, irq: int) -> None:
        guest.irqs_pending |= 1 << irq
        self.woken.append(guest)

    def take_woken(self) -> list[Guest]:
        """The guests to tell since the last call, oldest first (a guest may repeat)."""
        woken, self.woken = self.woken, []
        return woken

    def send_irq(self, guest: Guest, irq: int) -> int:
        """LHREQ_IRQ: 0, or -EINVAL for an interrupt line that does not exist."""
        if not 0 <= irq < abi.LGUEST_IRQS:
            return -errno.EINVAL
        with self.lock:
            self.raise_irq(guest, irq)
        return 0

    # --- BIND_DMA -----------------------------------------------------------------------

    def bind_dma(self, guest: Guest, key_addr: int, dmas: int, num_dmas: int,
                 interrupt: int) -> int:
        """1 on success, 0 on failure; interrupt 0 unbinds (key *and* array must match)."""
        if interrupt >= abi.LGUEST_IRQS:
            return 0
        with self.lock:
            key = keys.resolve(guest.memory, guest.id, key_addr)
            if key is None:
                self.kill_guest(guest, abi.MSG_BAD_BIND_KEY % key_addr)
                return 0
            if interrupt == 0:
                return self._unbind_dma(guest, key, dmas)
            for binding in guest.dma:
                if binding.interrupt:
                    continue
                binding.key = key
                binding.dmas = dmas
                binding.num_dmas = num_dmas
                binding.next_dma = 0
                binding.where = None
                binding.interrupt = interrupt
                # list_add: the newest binding goes at the head of its chain.
                self.dma_hash[keys.bucket(key)].insert(0, binding)
                self.generation += 1
                return 1
            return 0

    def _unbind_dma(self, guest: Guest, key: Key, dmas: int) -> int:
        for binding in guest.dma:
            if binding.interrupt and binding.key == key and binding.dmas == dmas:
                self._unlink(binding)
                return 1
        return 0

    def _unlink(self, binding: Binding) -> None:
        self.dma_hash[keys.bucket(binding.key)].remove(binding)
        binding.interrupt = 0
        self.generation += 1

    def _release_all_dma(self, guest: Guest) -> None:
        for binding in guest.dma:
            if binding.interrupt:
                self._unlink(binding)

    # --- SEND_DMA -----------------------------------------------------------------------

    def send_dma(self, guest: Guest, key_addr: int, udma: int) -> Send | Restock:
        """The result goes into the sender's used_len; the return value is for statistics,
        or, when the receiver had no free buffer, the Restock step that comes before the
        final try."""
        with self.lock:
            if self.compiled is not None and self.impair is None:
                sent = self.compiled.send(self, guest, key_addr, udma)
                if sent is not None:
                    self.fast_frames += 1
                    return sent
            outcome, receiver = self._send_once(guest, key_addr, udma)
        if outcome is Send.NO_BUFFER:
            # One chance to restock: the lock is dropped; the caller lets the receiver run.
            return Restock(guest, key_addr, udma, receiver)
        return self._account(guest, outcome, receiver)

    def drain_sends(self, guest: Guest, limit: int) -> int:
        """The compiled path's share of the async ring (hypercalls.drain_async): from the
        guest's cursor, the SEND_DMAs in a row that are the plain case, at most `limit`,
        under one hold of the lock; how many it ran. It stops before the first entry it
        does not take, untouched, for the caller to run."""
        with self.lock:
            ran = self.compiled.drain(self, guest, limit)
        self.fast_frames += ran
        return ran

    def retry_send(self, restock: Restock) -> Send:
        """After the receiver's chance to restock: the whole lookup once more, and a second
        failure is final."""
        with self.lock:
            # The same frame: the impairments judged it on the first try (it passed).
            outcome, receiver = self._send_once(restock.sender, restock.key_addr, restock.udma,
                                                judged=True)
        return self._account(restock.sender, outcome, receiver)

    @staticmethod
    def _account(guest: Guest, outcome: Send, receiver: Guest | None) -> Send:
        if outcome is Send.NO_BUFFER or outcome is Send.NO_RECEIVER or outcome is Send.LINK_DOWN:
            # The sender's used_len stays 0: lguest_net counts a carrier error.
            guest.counters.tx_carrier_errors += 1
            if receiver is not None and outcome is not Send.LINK_DOWN:
                receiver.counters.rx_dropped += 1
        return outcome

    def _send_once(self, guest: Guest, key_addr: int, udma: int,
                   judged: bool = False) -> tuple[Send, Guest | None]:
        memory = guest.memory
        found = guest.sends.get(key_addr)
        if found is not None and found[0] == self.generation and found[1] == memory.layout:
            binding = found[3]
        else:
            key = keys.resolve(memory, guest.id, key_addr)
            if key is None:
                self.kill_guest(guest, abi.MSG_BAD_SEND_KEY)
                return Send.BAD_KEY, None
            if not key.shared:
                # Private mapping: the guest is talking to its own Launcher.
                guest.pending_dma = (udma, key_addr)
                return Send.PENDING, None
            binding = self.remember_send(guest, key_addr, key)
        if binding is None:
            return Send.NO_RECEIVER, None
        if self.impair is not None and not judged:
            return self._impaired(guest, udma, binding), binding.guest
        return self._dma_transfer(guest, udma, binding), binding.guest

    def remember_send(self, guest: Guest, key_addr: int, key: Key) -> Binding | None:
        """The receiver of a shared key, looked up and remembered in guest.sends until
        dma_hash or the layout changes: a first send does it, and only a remembered send
        can take the compiled path. (Looking up writes nothing a guest can see.)"""
        binding = self._first_other(guest, key)
        if len(guest.sends) >= SEND_CACHE_MAX:
            guest.sends.clear()
        guest.sends[key_addr] = (self.generation, guest.memory.layout, key, binding)
        return binding

    def _first_other(self, guest: Guest, key: Key) -> Binding | None:
        """The first binding on the key's chain owned by another guest: a guest never
        receives its own send, and only the first other binder gets it."""
        for binding in self.dma_hash[keys.bucket(key)]:
            if binding.guest is not guest and binding.key == key:
                return binding
        return None

    def _dma_transfer(self, src: Guest, udma: int, dst: Binding, read=None) -> Send:
        """`read`: the sender's descriptor when the caller has read it already."""
        src_used, src_dma = self._read_dma(src, udma) if read is None else read
        dstg = dst.guest
        found = self._find_free_buffer(dst)
        if found.__class__ is Unreadable:
            # io.c's "goto fail": the destination was killed; no interrupt, and it is not a
            # "no free buffer", so there is no second try.
            return Send.FAILED
        if found is not None:
            index, dst_dma = found
            entry = dst.dmas + index * _SIZE
            copied, offered = self._do_dma(src, src_dma, dstg, dst_dma)
            src.memory.write_u32(udma + _USED, copied)
            self._count(src, dstg, copied, offered)
            # Transferring 0 bytes is fine only if the source was empty.
            if copied == 0 and not _empty(src_dma):
                return Send.FAILED
            # The receiver must see the data before the length (lguest's wmb()): the copy
            # above is complete before this single 32-bit store.
            if not dstg.memory.write_u32(entry + _USED, copied):
                return Send.FAILED
            dst.next_dma = (dst.next_dma + 1) & abi.BIND_NUM_MASK
            if self.on_transfer is not None:
                self.on_transfer(src, dst, index, entry, copied,
                                 _as_lguest_dma(src_used, src_dma))
        # The receiver's interrupt is raised even when it had no free buffer.
        self.raise_irq(dstg, dst.interrupt)
        return Send.DELIVERED if found is not None else Send.NO_BUFFER

    # --- impairments (only while one is configured) ---------------------------------------

    def _impaired(self, src: Guest, udma: int, dst: Binding) -> Send:
        """A send judged by the impairments, then applied (see the top of this file)."""
        read = self._read_dma(src, udma)
        if src.dead is not None:
            return Send.FAILED
        verdict = self.impair.judge(src, dst.guest, dst.key.space, _offered(read[1]))
        if verdict is None:
            return self._dma_transfer(src, udma, dst, read)
        src_used, src_dma = read
        sources = self.map_dma_list(src, src_dma)
        if sources is None:
            return Send.FAILED
        data = self._copy_out(src, sources[0])
        if data is None:
            return Send.FAILED
        if verdict.down:
            self._fault(src, dst.guest, dst.key, data, verdict.fault())
            return Send.LINK_DOWN
        src.memory.write_u32(udma + _USED, len(data))
        if data:
            src.counters.tx_packets += 1
            src.counters.tx_bytes += len(data)
        if verdict.dropped:
            src.counters.tx_lost += 1
            self._fault(src, dst.guest, dst.key, data, verdict.fault())
            return Send.LOST
        if verdict.corrupt:
            data = flip_bits(data, verdict.corrupt)
        sent = _as_lguest_dma(src_used, src_dma)
        copies = [Late(src, dst.key, data, sent, verdict.fault(), verdict)]
        if verdict.duplicate:
            copies.append(Late(src, dst.key, data, sent, verdict.fault(copy=True), verdict,
                               copy=True))
        if verdict.due is None:
            for late in copies:               # under the lock already: this send's own
                self._deliver_copy(late)
            return Send.DELIVERED
        for late in copies:
            self.impair.hold(verdict.due, late)
        return Send.HELD

    def _copy_out(self, src: Guest, runs: list) -> bytes | None:
        """The sender's frame as bytes (an impaired frame travels as a copy); None once the
        sender was killed for a piece nothing backs."""
        out = []
        for view, at, length in runs:
            piece = view[at:at + length] if view is not None else src.memory.gather(at, length)
            if piece is None:
                self.kill_guest(src, abi.MSG_BAD_SEND_ADDRESS)
                return None
            out.append(piece)
        return b"".join(out)

    def _fault(self, src: Guest, receiver: Guest | None, key: Key, data: bytes,
               why: str) -> None:
        if self.on_fault is not None:
            self.on_fault(src, receiver, key, data, why)

    def deliver_late(self, copies: list["Late"]) -> None:
        """Deliver impaired copies into their receivers' next free buffers: those an
        impairment held until now (the broker calls this when they are due), or those of
        a send that was not delayed."""
        with self.lock:
            for late in copies:
                self._deliver_copy(late)

    def _deliver_copy(self, late: "Late") -> None:
        binding = self._first_other(late.src, late.key)
        if binding is None:
            self._fault(late.src, None, late.key, late.data, "dropped: no receiver; " + late.why)
            return
        dstg = binding.guest
        found = self._find_free_buffer(binding)
        if found.__class__ is Unreadable:
            return
        if found is None:
            # A late frame has no one chance to restock: lguest dropped what found no buffer.
            dstg.counters.rx_dropped += 1
            self._fault(late.src, dstg, late.key, late.data,
                        "dropped: no free buffer; " + late.why)
            self.raise_irq(dstg, binding.interrupt)
            return
        index, dst_dma = found
        entry = binding.dmas + index * _SIZE
        targets = self._mapped_targets(dstg, dst_dma)
        if targets is None:
            return
        copied = self._copy_data(late.src, [(late.data, 0, len(late.data))], targets)
        if not dstg.memory.write_u32(entry + _USED, copied):
            return
        binding.next_dma = (binding.next_dma + 1) & abi.BIND_NUM_MASK
        counters = dstg.counters
        counters.rx_packets += 1
        counters.rx_bytes += copied
        counters.rx_late += late.verdict.due is not None
        counters.rx_duplicates += late.copy
        counters.rx_corrupted += bool(late.verdict.corrupt)
        if self.on_transfer is not None:
            self.on_transfer(late.src, binding, index, entry, copied, late.sent, late.why)
        self.raise_irq(dstg, binding.interrupt)

    @staticmethod
    def _read_dma(guest: Guest, addr: int) -> tuple[int, bytes]:
        """lgread of a struct lguest_dma: (used_len, raw list), or zeros after killing the
        guest."""
        found = guest.memory.locate(addr, _SIZE)
        if found is None:
            # Across two regions (the end of RAM and the descriptor page), or zeros after
            # lgread killed the guest.
            raw = guest.memory.read(addr, _SIZE)
            return _U32.unpack_from(raw)[0], raw[_LIST:]
        region, off = found
        view = region.view
        return _U32.unpack_from(view, off)[0], view[off + _LIST:off + _SIZE].tobytes()

    @staticmethod
    def _count(src: Guest, dst: Guest, copied: int, offered: int) -> None:
        if copied != offered:
            # lguest_net: used_len != length is a carrier error.
            src.counters.tx_carrier_errors += 1
        if copied:
            src.counters.tx_packets += 1
            src.counters.tx_bytes += copied
            dst.counters.rx_packets += 1
            dst.counters.rx_bytes += copied

    def _find_free_buffer(self, dst: Binding):
        """next_free_buffer, and an unreadable entry kills its owner (lgread's rule)."""
        found = next_free_buffer(dst)
        if found.__class__ is Unreadable:
            self.kill_guest(dst.guest, abi.MSG_BAD_REGISTERED_READ)
        return found

    def _do_dma(self, src: Guest, src_dma: bytes, dst: Guest, dst_dma: bytes) -> tuple[int, int]:
        """Check both lists (the receiver's first), map the receiver's pieces, copy: (bytes
        copied or 0, bytes the source offered)."""
        targets = self.map_dma_list(dst, dst_dma)
        if targets is None:
            return 0, _offered(src_dma)
        sources = self.map_dma_list(src, src_dma)
        if sources is None:
            return 0, _offered(src_dma)
        if not self._all_backed(dst, targets[0]):
            return 0, sources[1]
        return self._copy_data(src, sources[0], targets[0]), sources[1]

    def _mapped_targets(self, dst: Guest, dst_dma: bytes) -> list | None:
        """The receiver's checked, fully backed runs, or None once it was killed."""
        targets = self.map_dma_list(dst, dst_dma)
        if targets is None or not self._all_backed(dst, targets[0]):
            return None
        return targets[0]

    def _all_backed(self, dst: Guest, runs: list) -> bool:
        """Every receiving piece must be backed before anything is copied (io.c mapped them
        all with get_user_pages first); else the receiver dies."""
        for view, _at, _length in runs:
            if view is None:
                self.kill_guest(dst, abi.MSG_BAD_DMA_PAGES)
                return False
        return True

    def _copy_data(self, src: Guest, sources: list, targets: list) -> int:
        """Copy min(rest of source run, rest of destination run) at a time until either list
        ends; extra source bytes are truncated. One slice assignment per chunk: the only
        copy a frame gets."""
        total = si = di = soff = doff = 0
        n_src, n_dst = len(sources), len(targets)
        while si < n_src and di < n_dst:
            sview, sat, slen = sources[si]
            dview, dat, dlen = targets[di]
            n = min(slen - soff, dlen - doff)
            if sview is None:
                # Nothing backs this source piece as a whole: look chunk by chunk, as io.c
                # copied; the first chunk nothing backs is the sender's fault.
                found = src.memory.locate(sat + soff, n)
                if found is None:
                    self.kill_guest(src, abi.MSG_BAD_SEND_ADDRESS)
                    return 0
                dview[dat + doff:dat + doff + n] = found[0].view[found[1]:found[1] + n]
            else:
                dview[dat + doff:dat + doff + n] = sview[sat + soff:sat + soff + n]
            total += n
            soff += n
            doff += n
            if soff == slen:
                si, soff = si + 1, 0
            if doff == dlen:
                di, doff = di + 1, 0
        return total

    def map_dma_list(self, guest: Guest, dma: bytes) -> tuple[list, int] | None:
        """check_dma_list on a struct lguest_dma's raw list — each piece: address ok, at
        most a page, not crossing a page boundary — and where the pieces lie: (runs, bytes)
        with runs of (view, offset, length), or (None, address, length) for a piece nothing
        backs (whose fault that is depends on the side). None once the guest is killed.

        Pieces that follow each other in one private region become one run: a frame spread
        over 16 pages of RAM is then one copy. Only private memory is merged: a shared page
        may be the other side's too, and there the copy must go chunk by chunk as io.c's."""
        memory = guest.memory
        known = guest.lists.get(dma)
        if known is not None and known[0] == memory.layout:
            return known[1], known[2]
        fields = _UNPACK_LIST(dma)
        address_ok = memory.address_ok
        hint = memory.regions[0] if memory.regions else None    # RAM, almost always
        runs: list = []
        total = 0
        backed = True
        last = None                    # [region, offset, length] of a run that may grow
        for i in range(_N):
            length = fields[_N + i]
            if not length:
                break
            addr = fields[i]
            if (not address_ok(addr, length) or length > _PAGE
                    or addr % _PAGE + length > _PAGE):
                self.kill_guest(guest, abi.MSG_BAD_DMA_ENTRY % (length, addr))
                return None
            total += length
            if hint is None or addr < hint.base or addr + length > hint.end:
                found = memory.locate(addr, length)
                if found is None:
                    runs.append([None, addr, length])
                    backed = False
                    last = None
                    continue
                hint = found[0]
            off = addr - hint.base
            if (last is not None and last[0] is hint and hint.shared is None
                    and last[1] + last[2] == off):
                last[2] += length
            else:
                last = [hint, off, length]
                runs.append(last)
        runs = [(r[0] if r[0] is None else r[0].view, r[1], r[2]) for r in runs]
        if backed:
            if len(guest.lists) >= LIST_CACHE_MAX:
                guest.lists.clear()
            guest.lists[dma] = (memory.layout, runs, total)
        return runs, total

    # --- the Launcher's side: GETDMA ----------------------------------------------------

    def get_dma_buffer(self, guest: Guest, key_addr: int) -> tuple[int, int] | None:
        """(address, irq) of the guest's first free buffer bound at key_addr, or None.

        lgnet returns None when every buffer is used (2.6.23 returned the last one), and when
        an entry cannot be read: lgread kills the guest, and 2.6.23 then took its zeros for a
        free entry and handed the unreadable address to the Launcher."""
        with self.lock:
            key = keys.resolve(guest.memory, guest.id, key_addr)
            if key is None:
                self.kill_guest(guest, abi.MSG_BAD_GETDMA_KEY)
                return None
            for binding in self.dma_hash[keys.bucket(key)]:
                if binding.guest is not guest or binding.key != key:
                    continue
                found = next_free_buffer(binding, start=0)     # lguest looked from the first
                if found is None:
                    return None
                if found.__class__ is Unreadable:
                    guest.memory.fault(abi.MSG_BAD_READ_LEN % (found.addr, _SIZE))
                    return None
                return binding.dmas + found[0] * _SIZE, binding.interrupt
            return None

    def user_get_dma(self, guest: Guest, key_addr: int) -> int:
        """LHREQ_GETDMA: the buffer's address with the irq stored in its used_len; -ENOENT."""
        found = self.get_dma_buffer(guest, key_addr)
        # get_dma_buffer answered with an address, 0 meaning none: a free buffer whose array
        # sits at guest-physical 0 was "none" to user_get_dma too, and got no irq written.
        if found is None or found[0] == 0:
            return -errno.ENOENT
        addr, irq = found
        guest.memory.write_u32(addr + abi.DMA_USED_LEN_OFFSET, irq)
        return addr


def next_free_buffer(dst: Binding, start: int | None = None):
    """A bound array's next free buffer: scan from `start` (by default the next_dma cursor),
    with wrap, for used_len == 0. (index, raw list) of that entry, None when every entry is
    used, Unreadable when an entry is not backed. No side effects: the transfer kills its
    owner, GETDMA kills with lgread's reason, the restock check just looks."""
    memory = dst.guest.memory
    num = dst.num_dmas
    if start is None:
        start = dst.next_dma
    where = dst.where
    if where is None or where[0] != memory.layout:
        found = memory.locate(dst.dmas, num * _SIZE) if num else None
        if found is None or found[1] & 3 or found[0].words is None:
            found = (None, 0)
        where = dst.where = (memory.layout,) + found
    _layout, region, base = where
    if region is not None:
        # The whole array lies in one region: every entry is readable, and its used_len
        # is an aligned word we can read in place.
        words = region.words
        for i in range(num):
            off = base + (start + i) % num * _SIZE
            if words[off >> 2] == 0:
                return (start + i) % num, region.view[off + _LIST:off + _SIZE].tobytes()
        return None
    for i in range(num):
        # lgread_other of each entry: it may lie across two regions.
        index = (start + i) % num
        raw = memory.gather(dst.dmas + index * _SIZE, _SIZE)
        if raw is None:
            return Unreadable(dst.dmas + index * _SIZE)
        if _U32.unpack_from(raw)[0] == 0:
            return index, raw[_LIST:]
    return None


def has_free_buffer(guest: Guest) -> bool:
    """Could a send to this guest land now? Any bound receive array with a free entry."""
    for binding in guest.dma:
        if binding.interrupt:
            found = next_free_buffer(binding)
            if found is not None and found.__class__ is not Unreadable:
                return True
    return False


def _offered(dma: bytes) -> int:
    """LguestDma.total on a raw list: the lengths up to the first zero."""
    total = 0
    for length in _UNPACK_LIST(dma)[_N:]:
        if not length:
            break
        total += length
    return total
