"""Tiny builders for the DMA engine tests (lgnet.fabric.dma).

Layout of a kit guest (guest-physical):
    [0, RAM_SIZE)                      RAM, a private bytearray
    [net_at, net_at + 4096)            optional: the shared net page (a NetFile's buffer)
    anything else below pfn_limit      a hole: below the limit, but nothing backs it
Two guests that map the same NetFile (wherever each maps it) resolve keys in it to equal
shared keys, exactly like two Launchers mmapping the same --sharenet file.
"""
from __future__ import annotations

from lgnet import abi
from lgnet.fabric import keys
from lgnet.fabric.dma import Engine, Guest, Restock, next_free_buffer
from lgnet.fabric.memory import GuestMemory

RAM_SIZE = 64 * 1024
PFN_LIMIT = 0x20                     # 128 KiB: [64 KiB, 128 KiB) minus the net page is a hole
HOLE = 0x1C000                       # below pfn_limit, never backed in kit guests
ABOVE_LIMIT = PFN_LIMIT * abi.PAGE_SIZE


class NetFile:
    """One --sharenet file: a page of memory and its (st_dev, st_ino) identity."""

    def __init__(self, ino: int = 42, dev: int = 7):
        self.buf = bytearray(abi.PAGE_SIZE)
        self.identity = (dev, ino)


class Recorder:
    """What the engine reported: the ids of woken guests, in order (never taken here)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def woken(self) -> list[int]:
        return [guest.id for guest in self.engine.woken]


class RecordingLock:
    """A context manager standing in for lguest_lock; records whether it is held."""

    def __init__(self):
        self.held = False
        self.acquired = 0

    def __enter__(self):
        assert not self.held, "lguest_lock taken twice"
        self.held = True
        self.acquired += 1
        return self

    def __exit__(self, *exc):
        self.held = False
        return False


class Kit:
    """An Engine plus the buffers behind each guest's memory."""

    def __init__(self, max_guests: int = 8, restock=None, lock=None,
                 memory_class=GuestMemory, compiled: bool | None = None):
        """`restock(receiver)` is what the caller does in a send's Restock step (by default
        nothing: the receiver did not restock); `compiled` picks the per-frame path (by
        default the process's, see the both_paths fixture)."""
        self.engine = Engine(lock=lock, max_guests=max_guests, compiled=compiled)
        self.wakes = Recorder(self.engine)
        self.restock = restock or (lambda receiver: None)
        self.memory_class = memory_class
        self.ram: dict[int, bytearray] = {}

    def guest(self, net: NetFile | None = None, net_at: int = RAM_SIZE,
              pfn_limit: int = PFN_LIMIT) -> Guest:
        """A new initialised guest with 64 KiB of RAM and, optionally, a net page."""
        ram = bytearray(RAM_SIZE)
        memory = self.memory_class()
        memory.add_region(0, ram, name="ram")
        if net is not None:
            memory.add_region(net_at, net.buf, shared=net.identity, name="net")
        g = self.engine.initialize(owner=object(), memory=memory, pfn_limit=pfn_limit,
                                   pgdir=0, start=0, page_offset=0)
        assert isinstance(g, Guest), g
        self.ram[g.id] = ram
        return g

    # --- guest memory --------------------------------------------------------------------

    def put(self, g: Guest, addr: int, data: bytes) -> None:
        """Write into g's memory without going through the engine's checks."""
        g.memory.view(addr, len(data))[:] = data

    def get(self, g: Guest, addr: int, length: int) -> bytes:
        return bytes(g.memory.view(addr, length))

    def put_dma(self, g: Guest, addr: int, pieces, used_len: int = 0) -> None:
        """A struct lguest_dma at addr."""
        self.put(g, addr, abi.pack_dma(list(pieces), used_len))

    def used_len(self, g: Guest, addr: int) -> int:
        return int.from_bytes(self.get(g, addr, 4), "little")

    def set_used_len(self, g: Guest, addr: int, value: int) -> None:
        self.put(g, addr, value.to_bytes(4, "little"))

    def put_array(self, g: Guest, addr: int, buffers) -> list[int]:
        """An array of struct lguest_dma, one per piece list; returns the entry addresses."""
        entries = []
        for i, pieces in enumerate(buffers):
            entry = addr + i * abi.LGUEST_DMA_SIZE
            self.put_dma(g, entry, pieces)
            entries.append(entry)
        return entries

    def bind(self, g: Guest, key: int, array: int, num: int, irq: int) -> int:
        return self.engine.bind_dma(g, key, array, num, irq)

    def send(self, g: Guest, key: int, dma: int):
        """SEND_DMA as the broker performs it: a Restock step, then the final try.

        On the compiled path the key's lookup is remembered first, as an earlier frame would
        have left it: a first lookup is always the Python path's, and the rule tests are
        there to meet the compiled one."""
        if self.engine.compiled is not None:
            warm(self.engine, g, key)
        sent = self.engine.send_dma(g, key, dma)
        if isinstance(sent, Restock):
            self.restock(sent.receiver)
            sent = self.engine.retry_send(sent)
        return sent


def warm(engine: Engine, g: Guest, key_addr: int) -> None:
    """What earlier frames to this key leave behind, none of it visible to a guest: the key's
    lookup remembered (guest.sends) and where the receiver's array lies (binding.where). The
    compiled path takes only such sends; a first frame is always the Python path's."""
    resolved = keys.resolve(g.memory, g.id, key_addr)
    if resolved is not None and resolved.shared:
        binding = engine.remember_send(g, key_addr, resolved)
        if binding is not None:
            next_free_buffer(binding)


def irq_bit(irq: int) -> int:
    return 1 << irq
