"""When the Host wakes a halted guest: lguest's rule, and lgnet's coalescing of wake-ups.

Rules of this file: sans-IO, like dma.py. It decides; the broker sends the replies. Time is
an argument (`now`), never read here, so every decision is tested in one process.

Theory of operation. A guest that HALTs sleeps until an interrupt it has not blocked is
pending (lguest_data.blocked_interrupts), or a BREAK kicks it out: `wakes_halted` is that
rule. Waking costs a reply and a context switch (tens of microseconds here, where lguest had
a CPU per guest to spare), so while the Host runs a batching sender's queued calls a due
wake-up may be *held* (`HeldWakes`): until half the receive buffers behind the raised
interrupts are filled (each transfer raises one), until its sender halts or leaves, or for
at most WAKE_MAX_SECONDS. A receiver about to be denied a buffer is let go at once (the one
chance to restock), by the caller taking its entry (`release`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

from lgnet import abi
from lgnet.fabric.dma import Guest

WAKE_MAX_SECONDS = 0.010             # a held wake-up waits at most this long


def flag_bits(flags) -> int:
    """The interrupt lines whose byte is set in a control page's flags (one byte a line)."""
    bits = 0
    if any(flags):
        for irq, flag in enumerate(flags):
            if flag:
                bits |= 1 << irq
    return bits


def wakes_halted(guest: Guest, flagged: int, breaking: bool) -> bool:
    """Would a halted guest wake? `flagged`: the lines raised and not yet taken by it (its
    control page); `breaking`: a BREAK waits for it. lguest slept on through interrupts the
    guest had blocked in lguest_data.blocked_interrupts."""
    if breaking or guest.dead is not None:
        return True
    pending = guest.irqs_pending | flagged
    if not pending or guest.lguest_data is None:
        return bool(pending)
    blocked = guest.memory.read_u32(guest.lguest_data + abi.LGUEST_DATA_BLOCKED_INTERRUPTS)
    return bool(pending & ~blocked)


@dataclass
class Held:
    """One held wake-up: how many transfers it covers, how many it waits for, since when,
    and the sender whose queued calls raised it last."""
    count: int
    due: int
    since: float
    sender: Hashable


class HeldWakes:
    """Wake-ups held back while their sender runs: keyed by whatever names a receiver (the
    broker's connection)."""

    def __init__(self, max_seconds: float = WAKE_MAX_SECONDS):
        self.max_seconds = max_seconds
        self.held: dict[Hashable, Held] = {}

    def __bool__(self) -> bool:
        return bool(self.held)

    def hold(self, receiver: Hashable, guest: Guest, raised: int, sender: Hashable,
             now: float, frames: int = 1) -> bool:
        """`frames` wake-ups are due for `receiver` while `sender` runs queued calls: hold
        them (True), or let them go now (False: half the buffers behind the raised lines are
        filled)."""
        entry = self.held.get(receiver)
        if entry is None:
            sizes = [b.num_dmas for b in guest.dma if b.interrupt and raised >> b.interrupt & 1]
            due = max(1, min(sizes) // 2) if sizes else 1
            entry = self.held[receiver] = Held(0, due, now, sender)
        entry.count += frames
        entry.sender = sender
        if entry.count < entry.due:
            return True
        del self.held[receiver]
        return False

    def release(self, receiver: Hashable) -> bool:
        """Let this receiver's held wake-up go now (or forget it): was one held?"""
        return self.held.pop(receiver, None) is not None

    def due(self, now: float, still_running: Callable[[Hashable], bool]) -> list[Hashable]:
        """The receivers to wake now: their sender stopped running (halted or gone), or
        they have waited max_seconds. A sender still running is likely to send more."""
        out = []
        for receiver, entry in list(self.held.items()):
            if still_running(entry.sender) and now - entry.since < self.max_seconds:
                continue
            del self.held[receiver]
            out.append(receiver)
        return out

    def deadline(self) -> float | None:
        """When the oldest held wake-up must go at the latest."""
        if not self.held:
            return None
        return min(e.since for e in self.held.values()) + self.max_seconds
