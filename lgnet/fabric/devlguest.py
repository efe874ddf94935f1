"""One open /dev/lguest: lguest_user.c's rules, as pure logic.

Rules of this file: sans-IO. A `LguestFile` is what one launcher connection holds; the broker
feeds it requests and turns its answers into replies. Errors are negative errno values, as
lguest_user.c returned them: before INITIALIZE every other request is EINVAL; INITIALIZE on
an initialised file is EBUSY (ENOSPC when the guest table is full); once the guest is dead
every write is ENOENT and reading tells why; a file held by another task than the one that
initialised it (lguest's Waker shared the fd) may only BREAK — anything else is EPERM.
"""
from __future__ import annotations

import errno
from typing import Any, Callable

from lgnet import abi
from lgnet.fabric import hypercalls
from lgnet.fabric.dma import Engine, Guest
from lgnet.fabric.memory import GuestMemory


class LguestFile:
    def __init__(self, engine: Engine, task: Any):
        self.engine = engine
        self.task = task                 # who holds this file (lguest's `current`)
        self.guest: Guest | None = None

    def attach(self, guest: Guest) -> None:
        """Share another launcher's guest, as lguest's forked Waker shared the fd."""
        self.guest = guest

    def gate(self, op: int) -> int:
        """write()'s checks before any request: 0 to go on, or -errno."""
        if op != abi.LHREQ_INITIALIZE and self.guest is None:
            return -errno.EINVAL
        if self.guest is not None and self.guest.dead is not None:
            return -errno.ENOENT
        if self.guest is not None and self.task != self.guest.owner and op != abi.LHREQ_BREAK:
            return -errno.EPERM
        return 0

    def gate_run(self) -> int:
        """read()'s checks: running the guest is for its owner only."""
        if self.guest is None:
            return -errno.EINVAL
        if self.task != self.guest.owner:
            return -errno.EPERM
        return 0

    def initialize(self, pfn_limit: int, pgdir: int, start: int, page_offset: int,
                   make_memory: Callable[[], GuestMemory | None]) -> int:
        """make_memory maps what the launcher handed over, or returns None: it would not
        do (EINVAL, as lguest's initialize() refused a bad argument)."""
        error = self.gate(abi.LHREQ_INITIALIZE)
        if error:
            return error
        if self.guest is not None:
            return -errno.EBUSY
        memory = make_memory()
        if memory is None:
            return -errno.EINVAL
        result = self.engine.initialize(self.task, memory, pfn_limit, pgdir, start,
                                        page_offset)
        if isinstance(result, int):
            return result
        self.guest = result
        return abi.INITIALIZE_RESULT

    def getdma(self, key: int) -> int:
        return self.gate(abi.LHREQ_GETDMA) or self.engine.user_get_dma(self.guest, key)

    def irq(self, irq: int) -> int:
        return self.gate(abi.LHREQ_IRQ) or self.engine.send_irq(self.guest, irq)

    def hypercall(self, eax: int, edx: int, ebx: int, ecx: int) -> hypercalls.Outcome | int:
        error = self.gate_run()
        if error:
            return error
        # Once the Launcher has read a pending DMA it is served: clear it (read()'s rule).
        self.guest.pending_dma = None
        if self.guest.dead is not None:
            return hypercalls.Outcome()
        return hypercalls.hypercall(self.engine, self.guest, eax, edx, ebx, ecx)

    def close(self) -> None:
        """close(): the owner's close releases the guest; a sharer's close releases nothing."""
        if self.guest is not None and self.task == self.guest.owner:
            self.engine.close(self.guest)
        self.guest = None
