"""The Host's side of a guest hypercall (drivers/lguest/hypercalls.c), as pure logic.

Rules of this file: sans-IO like dma.py. It decides what a hypercall means for the Host and
returns what the caller must do about time (HALT, SET_CLOCKEVENT); the broker does the waiting.

In lgnet the guest's CPU lives in its launcher, so the calls that only change CPU state
(LOAD_GDT, NEW_PGTABLE, FLUSH_TLB, LOAD_IDT_ENTRY, SET_STACK, TS, SET_PTE, SET_PMD, LOAD_TLS)
are served there; if one reaches the Host (from the async ring) it is accepted and ignored.
Everything else follows lguest: the first call must be LGUEST_INIT, the async ring is drained
in order before every synchronous call, a pending DMA for the Launcher stops the drain and
defers the synchronous call, and an unknown call kills the guest.

A send that found no free buffer stops the drain too: the Outcome carries the engine's Restock
step, the caller lets the receiver run and calls `finish_restock`, then makes the same
hypercall again (the drain resumes at the Host's cursor) unless the send *was* the
synchronous call (`Restock.slot` is None), which is then done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from lgnet import abi
from lgnet.fabric.dma import Engine, Guest, Restock, Send

CPU_STATE_CALLS = frozenset({
    abi.LHCALL_LOAD_GDT, abi.LHCALL_NEW_PGTABLE, abi.LHCALL_FLUSH_TLB,
    abi.LHCALL_LOAD_IDT_ENTRY, abi.LHCALL_SET_STACK, abi.LHCALL_TS, abi.LHCALL_SET_PTE,
    abi.LHCALL_SET_PMD, abi.LHCALL_LOAD_TLS,
})


@dataclass
class Outcome:
    """What a hypercall asks of the caller besides its eax result."""
    result: int = 0
    halt: bool = False
    clockevent_ns: int | None = None    # arm (or, with 0, cancel) the guest's timer
    deferred: bool = False              # a pending DMA stopped the drain: call again later
    restock: Restock | None = None      # a send waits for its receiver's chance to restock


def hypercall(engine: Engine, guest: Guest, eax: int, edx: int, ebx: int, ecx: int) -> Outcome:
    """One synchronous hypercall, after draining the async ring."""
    if guest.lguest_data is None:
        if eax != abi.LHCALL_LGUEST_INIT:
            engine.kill_guest(guest, abi.MSG_NO_INIT % abi.signed_long(eax))
        else:
            lguest_init(engine, guest, edx)
        return Outcome()
    outcome = Outcome()
    drain_async(engine, guest, outcome)
    if outcome.restock is not None:
        return outcome
    if guest.pending_dma is not None:
        outcome.deferred = True
        return outcome
    do_hcall(engine, guest, eax, edx, ebx, ecx, outcome)
    return outcome


def lguest_init(engine: Engine, guest: Guest, addr: int) -> None:
    """LGUEST_INIT: remember struct lguest_data and fill in what the Host provides: the
    Switcher's reservation, the TSC rate and the guest id (the clock too, in lgnet)."""
    memory = guest.memory
    # lguest checked the whole struct against pfn_limit, then its get_user/put_user failed
    # on a hole: the same words either way.
    if not memory.accessible(addr, abi.LGUEST_DATA_SIZE):
        engine.kill_guest(guest, abi.MSG_BAD_LGUEST_DATA % addr)
        return
    guest.lguest_data = addr
    memory.write_u32(addr + abi.LGUEST_DATA_RESERVE_MEM, abi.SWITCHER_RESERVE)
    memory.write_u32(addr + abi.LGUEST_DATA_TSC_KHZ, engine.tsc_khz)
    memory.write(addr + abi.LGUEST_DATA_GUESTID,
                 (engine.first_guest_id + guest.id).to_bytes(2, "little"))
    # Regions never move: remember where the async ring is, so draining it finds no address
    # to check. It lies in one region but for a guest that puts lguest_data across two.
    found = memory.locate(addr, abi.LGUEST_DATA_SIZE)
    if found is not None:
        region, offset = found
        guest.ring = (region.view, offset + abi.LGUEST_DATA_HCALL_STATUS,
                      offset + abi.LGUEST_DATA_HCALLS, abi.ASYNC_HCALL.unpack_from)
    else:
        spanned = _Spanned(memory, addr)
        guest.ring = (spanned, abi.LGUEST_DATA_HCALL_STATUS, abi.LGUEST_DATA_HCALLS,
                      spanned.unpack_call)
    write_time(guest)


class _Spanned:
    """lguest_data over two regions: its ring's bytes through checked access (already known
    to be acceptable), indexed like a window onto the struct."""

    def __init__(self, memory, base: int):
        self.memory = memory
        self.base = base

    def __getitem__(self, offset: int) -> int:
        return self.memory.gather(self.base + offset, 1)[0]

    def __setitem__(self, offset: int, value: int) -> None:
        self.memory.scatter(self.base + offset, bytes([value]))

    def unpack_call(self, _window, offset: int) -> tuple[int, ...]:
        return abi.ASYNC_HCALL.unpack(self.memory.gather(self.base + offset,
                                                         abi.ASYNC_HCALL.size))


def write_time(guest: Guest) -> None:
    """lguest_data.time: the Host keeps the guest's wall clock current."""
    now = time.time_ns()
    guest.memory.write(guest.lguest_data + abi.LGUEST_DATA_TIME,
                       abi.TIMESPEC.pack(now // abi.NSEC_PER_SEC & abi.U32_MASK,
                                         now % abi.NSEC_PER_SEC))


def drain_async(engine: Engine, guest: Guest, outcome: Outcome,
                limit: int = abi.LHCALL_RING_SIZE) -> int:
    """Run the queued calls of the async ring in order, from the Host's cursor, at most
    `limit` of them (one ring's worth unless told); how many ran."""
    if guest.ring is None:
        engine.kill_guest(guest, abi.MSG_BAD_ASYNC_FETCH)
        return 0
    view, status_at, calls_at, unpack = guest.ring
    # The compiled path runs the SEND_DMAs it can, in order, and stops before the first it
    # does not take: that entry, and any other call, is run here, then it goes on. It takes
    # no frame while impairments are configured: asking it for each would only cost.
    compiled = (engine.compiled is not None and engine.impair is None
                and view.__class__ is memoryview)
    ran = 0
    while ran < limit:
        if compiled:
            fast = engine.drain_sends(guest, limit - ran)
            ran += fast
            if ran >= limit or fast and (guest.pending_dma is not None
                                         or guest.dead is not None):
                break
        n = guest.next_hcall
        if view[status_at + n] == abi.HCALL_STATUS_EMPTY:
            break
        guest.next_hcall = (n + 1) % abi.LHCALL_RING_SIZE
        eax, edx, ebx, ecx = unpack(view, calls_at + n * abi.ASYNC_HCALL.size)
        if eax == abi.LHCALL_SEND_DMA:
            sent = engine.send_dma(guest, edx, ebx)   # what the ring carries, frame after frame
            if sent.__class__ is Restock:
                sent.slot = n                 # freed by finish_restock, after the final try
                outcome.restock = sent
                return ran + 1
        else:
            do_hcall(engine, guest, eax, edx, ebx, ecx, outcome)
        view[status_at + n] = abi.HCALL_STATUS_EMPTY
        ran += 1
        # A DMA for the Launcher must be served before anything else runs.
        if guest.pending_dma is not None or guest.dead is not None:
            break
    return ran


def finish_restock(engine: Engine, restock: Restock) -> Send:
    """The final try of a send after its receiver's chance to restock; a ring entry that
    carried it is free afterwards."""
    sent = engine.retry_send(restock)
    if restock.slot is not None and restock.sender.ring is not None:
        view, status_at, _calls_at, _unpack = restock.sender.ring
        view[status_at + restock.slot] = abi.HCALL_STATUS_EMPTY
    return sent


def ring_empty(guest: Guest) -> bool:
    """Is the entry at the Host's cursor free (nothing queued for us to run)?"""
    if guest.ring is None:
        return True
    view, status_at, _calls_at, _unpack = guest.ring
    return view[status_at + guest.next_hcall] == abi.HCALL_STATUS_EMPTY


def do_hcall(engine: Engine, guest: Guest, eax: int, edx: int, ebx: int, ecx: int,
             outcome: Outcome) -> None:
    if eax == abi.LHCALL_SEND_DMA:
        sent = engine.send_dma(guest, edx, ebx)
        if sent.__class__ is Restock:
            outcome.restock = sent
    elif eax == abi.LHCALL_BIND_DMA:
        num, irq = abi.split_bind_arg(ecx)
        outcome.result = engine.bind_dma(guest, edx, ebx, num, irq)
    elif eax == abi.LHCALL_HALT:
        outcome.halt = True
    elif eax == abi.LHCALL_SET_CLOCKEVENT:
        outcome.clockevent_ns = edx
    elif eax == abi.LHCALL_CRASH:
        raw = guest.memory.read(edx, abi.CRASH_MESSAGE_MAX)
        message = raw[:abi.CRASH_MESSAGE_MAX - 1].split(b"\0", 1)[0]
        engine.kill_guest(guest, abi.MSG_CRASH % message.decode(errors="replace"))
    elif eax == abi.LHCALL_LGUEST_INIT:
        engine.kill_guest(guest, abi.MSG_DOUBLE_INIT)
    elif eax == abi.LHCALL_FLUSH_ASYNC or eax in CPU_STATE_CALLS:
        pass
    else:
        engine.kill_guest(guest, abi.MSG_BAD_HYPERCALL % abi.signed_long(eax))
