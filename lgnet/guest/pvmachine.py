"""What a Python guest kernel has: its RAM, the boot header, the device page, hypercalls and
interrupts — the machine lguest gave a guest, seen from Python.

Rules of this file: only what a real guest has. Memory goes through the Launcher's PhysMap
(the guest's own RAM and device pages), the Host only through hypercalls (guest/host.py's
HostLink), interrupts only as the flags the Host raised. The rest of a Python guest (its
console, lguest_net, the script runner, the default kernel) is built on this.
"""
from __future__ import annotations

import struct
import time
from typing import Callable

from lgnet import abi
from lgnet.guest.host import GuestStopped, HostLink
from lgnet.guest.physmem import PhysMap

FIRST_FREE_RAM = 0x10000            # below: boot header and command line


class Machine:
    """What a Python guest has: RAM, the boot header, devices, hypercalls, interrupts."""

    def __init__(self, phys: PhysMap, mem: int, host: HostLink):
        self.phys = phys
        self.mem = mem
        self.host = host
        self.trace = getattr(host, "trace", None)   # a TracedHost's (--trace): handlers timed
        self.next_free = FIRST_FREE_RAM
        self.handlers: dict[int, Callable[[], None]] = {}
        self.in_interrupt = False
        self.lguest_data = self.alloc(abi.LGUEST_DATA_SIZE)
        self.phys.write(self.lguest_data + abi.LGUEST_DATA_HCALL_STATUS,
                        bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE)
        self.next_call = 0                  # our cursor into the async hypercall ring
        self.hcall(abi.LHCALL_LGUEST_INIT, self.lguest_data)
        self.guest_id = struct.unpack_from(
            "<H", self.phys.read(self.lguest_data + abi.LGUEST_DATA_GUESTID, 2))[0]

    # --- memory -------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self.next_free // align) * align
        if addr + size > self.mem:
            raise GuestStopped("out of memory")
        self.next_free = addr + size
        return addr

    def alloc_pages(self, size: int) -> int:
        return self.alloc(size, abi.PAGE_SIZE)

    def cmdline(self) -> str:
        ptr = self.phys.read_u32(abi.BOOT_CMDLINE_PTR)
        raw = self.phys.read(ptr, abi.CMDLINE_MAX)
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def devices(self) -> list[tuple[int, int, int, int, int, int]]:
        """(index, type, features, status, num_pages, pfn) of every descriptor present."""
        out = []
        for i in range(abi.MAX_DEVICES):
            desc = abi.LGUEST_DEVICE_DESC.unpack(
                self.phys.read(self.mem + i * abi.LGUEST_DEVICE_DESC_SIZE,
                               abi.LGUEST_DEVICE_DESC_SIZE))
            if desc[0] == abi.LGUEST_DEVICE_T_NONE:
                break
            out.append((i,) + desc)
        return out

    # --- the CPU's part: hypercalls and interrupts ----------------------------------------

    def hcall(self, call: int, a1: int = 0, a2: int = 0, a3: int = 0) -> int:
        result = self.host.hypercall(call, a1, a2, a3)
        self.deliver_interrupts()
        return result

    def async_hcall(self, call: int, a1: int = 0, a2: int = 0, a3: int = 0) -> None:
        """lguest's async_hcall(): queue the call in lguest_data's ring for the Host to run,
        in order, before our next synchronous call (or when kicked). When the ring is full, a
        normal hcall does it, and that runs the whole ring first."""
        n = self.next_call
        status = self.lguest_data + abi.LGUEST_DATA_HCALL_STATUS + n
        ram = self.phys.ram
        if ram[status] != abi.HCALL_STATUS_EMPTY:
            self.hcall(call, a1, a2, a3)
            return
        words = self.phys.ram_words
        w = (self.lguest_data + abi.LGUEST_DATA_HCALLS + n * abi.ASYNC_HCALL.size) >> 2
        words[w] = call                     # registers are 32 bits wide
        words[w + 1] = a1 & abi.U32_MASK
        words[w + 2] = a2 & abi.U32_MASK
        words[w + 3] = a3 & abi.U32_MASK
        # The arguments are written before the call is marked to go (lguest's wmb()).
        ram[status] = abi.HCALL_STATUS_PENDING
        self.next_call = (n + 1) % abi.LHCALL_RING_SIZE

    def kick(self) -> None:
        """Let the Host run our async ring soon, without waiting for it (lgnet's doorbell;
        lguest ran the ring at the guest's next exit)."""
        self.host.notify()

    def deliver_interrupts(self) -> None:
        # Handlers run with interrupts off, as behind an interrupt gate: a hypercall made by a
        # handler (a reply it transmits) does not deliver a nested interrupt.
        if self.in_interrupt:
            return
        self.in_interrupt = True
        try:
            pending = self.host.pending_irqs()
            while pending:
                irq = (pending & -pending).bit_length() - 1
                self.host.ack_irq(irq)
                handler = self.handlers.get(irq)
                if handler is None:
                    pass
                elif self.trace is None:
                    handler()
                else:
                    started = self.trace.now()
                    handler()
                    self.trace.interrupt(irq, started)
                pending = self.host.pending_irqs()
        finally:
            self.in_interrupt = False

    def idle_until(self, deadline: float, done: Callable[[], bool] = lambda: False) -> None:
        """Take interrupts until `done()` or the monotonic deadline: HALT with a timer."""
        armed = False
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # Armed with no interrupt taken before the HALT (as a kernel arms its clock with
            # interrupts off): a timer that fires before the HALT reaches the Host is still
            # flagged there and ends the HALT at once. Taken in between, it was gone, and the
            # guest slept with no timer left.
            self.host.hypercall(abi.LHCALL_SET_CLOCKEVENT, max(1, int(left * abi.NSEC_PER_SEC)))
            armed = True
            self.hcall(abi.LHCALL_HALT)
        if armed:
            # A HALT that something else ended leaves the timer armed: cancel it and take
            # what it raised meanwhile, or it would end some later HALT at once.
            self.hcall(abi.LHCALL_SET_CLOCKEVENT, 0)

    def power_down(self) -> None:
        msg = self.alloc(len(abi.MSG_POWER_DOWN) + 1)
        self.phys.write(msg, abi.MSG_POWER_DOWN.encode() + b"\0")
        self.hcall(abi.LHCALL_CRASH, msg)


def parse_cmdline(cmdline: str) -> dict[str, str]:
    return dict(word.split("=", 1) if "=" in word else (word, "")
                for word in cmdline.split())
