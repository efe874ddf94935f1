"""The Host's DMA engine: drivers/lguest/io.c, as pure logic.

Rules of this file:
- It is sans-IO. It never opens a socket, forks, starts a thread, sleeps or prints. The
  caller hands in each guest's memory (fabric.memory.GuestMemory), a `wake` callback, a
  `restock` hook and the lock to hold; everything else is data in, data out.
- Everything that touches dma_hash or moves bytes between guests lives here.
- A guest's misbehaviour is *recorded*, never raised: kill_guest keeps the first reason and the
  caller carries on (lguest's shape, which keeps the happy path straight). Error codes that
  lguest_user.c returned are returned here as negative errno values.
- This file does not know whether a guest is a Unicorn CPU or a Python driver, nor how the
  Launcher reaches the Host.

Theory of operation. A guest *binds* an array of `struct lguest_dma` receive buffers to a key;
the binding goes at the head of one of 61 hash chains. A peer *sends* one `struct lguest_dma`
to a key. A private key (not inside a shared net page) never reaches another guest: the DMA
is left pending for the sender's own Launcher. A shared key is looked up: the first binding
on the chain with that key and a different owner receives it. dma_transfer finds the
receiver's next free buffer (used_len == 0, starting at the next_dma cursor), checks both
lists, copies piece by piece, writes the count to the sender's used_len, then — after the
data — to the receiver's, and always raises the receiver's interrupt. All of it happens under
one big lock, lguest_lock; the only moment the lock is dropped is lguest's "one chance to
restock" when the receiver had no free buffer.
"""
from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ContextManager

from lgnet import abi
from lgnet.fabric import keys
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


class Binding:
    """One of a guest's 32 `struct lguest_dma_info` entries; interrupt 0 means free."""
    __slots__ = ("guest", "key", "dmas", "num_dmas", "next_dma", "interrupt")

    def __init__(self, guest: "Guest"):
        self.guest = guest
        self.key: Key | None = None
        self.dmas = 0
        self.num_dmas = 0
        self.next_dma = 0
        self.interrupt = 0


class Counters:
    """What the fabric saw of one guest's traffic on shared keys (for `lgnet up`'s table)."""
    __slots__ = ("tx_packets", "tx_bytes", "tx_carrier_errors", "rx_packets", "rx_bytes",
                 "rx_dropped")

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
    dma: list[Binding] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self):
        self.dma = [Binding(self) for _ in range(abi.LGUEST_MAX_DMA)]


def _nothing(_guest: Guest) -> None:
    return None


_BAD_ARRAY = -1                        # _find_free_buffer: the array itself was unreadable


class Engine:
    """dma_hash, the guest table and every operation of io.c."""

    def __init__(self, wake: Callable[[Guest], None] = _nothing,
                 restock: Callable[[Guest], None] = _nothing,
                 lock: ContextManager | None = None,
                 max_guests: int = abi.MAX_GUESTS):
        self.wake = wake
        self.restock = restock
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.guests: list[Guest | None] = [None] * max_guests
        self.dma_hash: list[list[Binding]] = [[] for _ in range(abi.DMA_HASH_BUCKETS)]
        # Optional observer of every completed transfer (capture); None costs nothing.
        self.on_transfer: Callable[..., None] | None = None

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
            self.wake(guest)

    def raise_irq(self, guest: Guest, irq: int) -> None:
        guest.irqs_pending |= 1 << irq
        self.wake(guest)

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
                binding.interrupt = interrupt
                # list_add: the newest binding goes at the head of its chain.
                self.dma_hash[keys.bucket(key)].insert(0, binding)
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

    def _release_all_dma(self, guest: Guest) -> None:
        for binding in guest.dma:
            if binding.interrupt:
                self._unlink(binding)

    # --- SEND_DMA -----------------------------------------------------------------------

    def send_dma(self, guest: Guest, key_addr: int, udma: int) -> Send:
        """The result goes into the sender's used_len; the return value is for statistics."""
        with self.lock:
            outcome, receiver = self._send_once(guest, key_addr, udma)
        if outcome is Send.NO_BUFFER:
            # One chance to restock: drop the lock, let the receiver refill, try the whole
            # lookup once more. A second failure is final.
            self.restock(receiver)
            with self.lock:
                outcome, receiver = self._send_once(guest, key_addr, udma)
        if outcome is Send.NO_BUFFER or outcome is Send.NO_RECEIVER:
            # The sender's used_len stays 0: lguest_net counts a carrier error.
            guest.counters.tx_carrier_errors += 1
            if receiver is not None:
                receiver.counters.rx_dropped += 1
        return outcome

    def _send_once(self, guest: Guest, key_addr: int, udma: int) -> tuple[Send, Guest | None]:
        key = keys.resolve(guest.memory, guest.id, key_addr)
        if key is None:
            self.kill_guest(guest, abi.MSG_BAD_SEND_KEY)
            return Send.BAD_KEY, None
        if not key.shared:
            # Private mapping: the guest is talking to its own Launcher.
            guest.pending_dma = (udma, key_addr)
            return Send.PENDING, None
        for binding in self.dma_hash[keys.bucket(key)]:
            # A guest never receives its own send; the first other binder gets it.
            if binding.guest is guest or binding.key != key:
                continue
            return self._dma_transfer(guest, udma, binding), binding.guest
        return Send.NO_RECEIVER, None

    def _dma_transfer(self, src: Guest, udma: int, dst: Binding) -> Send:
        src_dma = abi.unpack_dma(src.memory.read(udma, abi.LGUEST_DMA_SIZE))
        dstg = dst.guest
        index = self._find_free_buffer(dst)
        if index == _BAD_ARRAY:
            # io.c's "goto fail": the destination was killed; no interrupt, and it is not a
            # "no free buffer", so there is no second try.
            return Send.FAILED
        if index is not None:
            entry = dst.dmas + index * abi.LGUEST_DMA_SIZE
            dst_dma = abi.unpack_dma(dstg.memory.view(entry, abi.LGUEST_DMA_SIZE))
            copied = self._do_dma(src, src_dma, dstg, dst_dma)
            src.memory.write_u32(udma + abi.DMA_USED_LEN_OFFSET, copied)
            self._count(src, dstg, copied, src_dma.total)
            # Transferring 0 bytes is fine only if the source was empty.
            if copied == 0 and src_dma.len[0] != 0:
                return Send.FAILED
            # The receiver must see the data before the length (lguest's wmb()): the copy
            # above is complete before this single 32-bit store.
            if not dstg.memory.write_u32(entry + abi.DMA_USED_LEN_OFFSET, copied):
                return Send.FAILED
            dst.next_dma = (dst.next_dma + 1) & abi.BIND_NUM_MASK
            if self.on_transfer is not None:
                self.on_transfer(src, dst, index, entry, copied, src_dma)
        # The receiver's interrupt is raised even when it had no free buffer.
        self.raise_irq(dstg, dst.interrupt)
        return Send.DELIVERED if index is not None else Send.NO_BUFFER

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

    def _find_free_buffer(self, dst: Binding) -> int | None:
        """Scan from next_dma (with wrap) for used_len == 0: its index, None when every
        entry is used, _BAD_ARRAY when an entry is unreadable (its owner is killed)."""
        memory = dst.guest.memory
        for i in range(dst.num_dmas):
            index = (dst.next_dma + i) % dst.num_dmas
            entry = dst.dmas + index * abi.LGUEST_DMA_SIZE
            if memory.view(entry, abi.LGUEST_DMA_SIZE) is None:
                self.kill_guest(dst.guest, abi.MSG_BAD_REGISTERED_READ)
                return _BAD_ARRAY
            if memory.read_u32(entry + abi.DMA_USED_LEN_OFFSET) == 0:
                return index
        return None

    def _do_dma(self, src: Guest, src_dma: abi.LguestDma, dst: Guest,
                dst_dma: abi.LguestDma) -> int:
        """Check both lists, map the receiver's pieces, copy; the byte count or 0."""
        if not self.check_dma_list(dst, dst_dma) or not self.check_dma_list(src, src_dma):
            return 0
        targets = []
        for addr, length in dst_dma.pieces():
            window = dst.memory.view(addr, length)
            if window is None:
                self.kill_guest(dst, abi.MSG_BAD_DMA_PAGES)
                return 0
            targets.append(window)
        return self._copy_data(src, src_dma, targets)

    def _copy_data(self, src: Guest, src_dma: abi.LguestDma, targets: list) -> int:
        """Copy min(rest of source piece, rest of destination piece) at a time until either
        list ends; extra source bytes are truncated."""
        sources = src_dma.pieces()
        total = si = di = soff = doff = 0
        while si < len(sources) and di < len(targets):
            saddr, slen = sources[si]
            target = targets[di]
            n = min(slen - soff, len(target) - doff)
            chunk = src.memory.view(saddr + soff, n)
            if chunk is None:
                # If a copy fails, it is the sender's fault.
                self.kill_guest(src, abi.MSG_BAD_SEND_ADDRESS)
                return 0
            target[doff:doff + n] = chunk
            total += n
            soff += n
            doff += n
            if soff == slen:
                si, soff = si + 1, 0
            if doff == len(target):
                di, doff = di + 1, 0
        return total

    def check_dma_list(self, guest: Guest, dma: abi.LguestDma) -> bool:
        """Each piece: address ok, at most a page, and not crossing a page boundary."""
        for addr, length in dma.pieces():
            if (not guest.memory.address_ok(addr, length) or length > abi.PAGE_SIZE
                    or addr % abi.PAGE_SIZE + length > abi.PAGE_SIZE):
                self.kill_guest(guest, abi.MSG_BAD_DMA_ENTRY % (length, addr))
                return False
        return True

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
                for j in range(binding.num_dmas):
                    addr = binding.dmas + j * abi.LGUEST_DMA_SIZE
                    if guest.memory.view(addr, abi.LGUEST_DMA_SIZE) is None:
                        guest.memory.fault(abi.MSG_BAD_READ % addr)
                        return None
                    if guest.memory.read_u32(addr + abi.DMA_USED_LEN_OFFSET) == 0:
                        return addr, binding.interrupt
                return None
            return None

    def user_get_dma(self, guest: Guest, key_addr: int) -> int:
        """LHREQ_GETDMA: the buffer's address with the irq stored in its used_len; -ENOENT."""
        found = self.get_dma_buffer(guest, key_addr)
        if found is None:
            return -errno.ENOENT
        addr, irq = found
        guest.memory.write_u32(addr + abi.DMA_USED_LEN_OFFSET, irq)
        return addr
