"""The guest's line to the Host, as the running guest code sees it.

A guest — Unicorn CPU or Python driver — needs four things from outside: make a hypercall,
see which interrupts are pending, take one for delivery, and report its own fault. This room
defines that interface (HostLink) and the launcher's implementation over wire.py
(BrokerHost). The BrokerHost is also where the Launcher's run loop lives, because in lgnet
"the guest ran and came back" is a hypercall reply: a pending DMA to a private key is served
by the Launcher's devices before the guest resumes, a BREAK makes it service input, and a
dead guest stops with lguest's reason.

A HALT is answered here, without a message, when lguest's Host would not have slept either:
an interrupt the guest has not blocked is already flagged in the control page, and the
synchronous call has nothing to run before it (the async ring is empty, the broker is not
running it, no DMA waits for the Launcher, no BREAK, not dead). lguest's run_guest found such
an interrupt at once (maybe_do_interrupt cleared `halted`) and went back into the guest; the
broker never heard of this HALT, so its connection stays RUNNING — which is the truth.
"""
from __future__ import annotations

from typing import Callable, Protocol

from lgnet import abi, wire
from lgnet.guest.physmem import InvalidAddress, PhysMap

_EMPTY_RING = bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE


class GuestStopped(Exception):
    """The guest will never run again; `reason` is lguest's (e.g. "CRASH: Power down")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class HostLink(Protocol):
    def hypercall(self, call: int, arg1: int = 0, arg2: int = 0, arg3: int = 0) -> int: ...
    def pending_irqs(self) -> int: ...
    def ack_irq(self, irq: int) -> None: ...
    def kill(self, reason: str) -> None: ...
    def notify(self) -> None: ...
    def break_pending(self) -> bool: ...


class BrokerHost:
    """HostLink over the broker connection, with the Launcher's device callbacks."""

    def __init__(self, channel: wire.Channel, control: memoryview,
                 handle_output: Callable[[int, int], None],
                 handle_input: Callable[[], None], phys: PhysMap | None = None):
        self.channel = channel
        self.control = control
        self.handle_output = handle_output      # (dma address, key): a DMA for the Launcher
        self.handle_input = handle_input        # the Waker kicked us: service input
        self.phys = phys                        # the guest's RAM, for its lguest_data
        self.lguest_data: int | None = None     # where LGUEST_INIT put it, once accepted

    def hypercall(self, call: int, arg1: int = 0, arg2: int = 0, arg3: int = 0) -> int:
        if call == abi.LHCALL_HALT and self.halt_returns_at_once():
            return 0
        while True:
            reply = self.channel.call(wire.OP_HCALL, call, arg1, arg2, arg3)
            if reply.dead is not None:
                raise GuestStopped(reply.dead)
            if call == abi.LHCALL_LGUEST_INIT and self.lguest_data is None:
                self._learn_lguest_data(arg1)
            if reply.flags & wire.FLAG_AGAIN:
                # EAGAIN: service input, then release the Waker (BREAK 0).
                self.serve(self.handle_input)
                self.channel.call(wire.OP_BREAK, 0)
            if reply.flags & wire.FLAG_PENDING_DMA:
                self.serve(self.handle_output, reply.arg0, reply.arg1)
                if reply.flags & wire.FLAG_DEFERRED:
                    continue          # the async ring stopped before this call: make it now
            elif reply.result < 0 and call != abi.LHCALL_HALT:
                raise GuestStopped("hypercall %d refused: error %d" % (call, -reply.result))
            return reply.result

    def _learn_lguest_data(self, addr: int) -> None:
        """The Host accepted LGUEST_INIT: its struct lguest_data is where the guest said. Only
        one that lies inside RAM is read here (anything else: every HALT goes to the Host)."""
        ram = self.phys.ram if self.phys is not None else None
        if ram is not None and addr + abi.LGUEST_DATA_SIZE <= len(ram):
            self.lguest_data = addr

    def halt_returns_at_once(self) -> bool:
        """Would the Host's HALT return at once? (See the module's docstring.) The order of
        the looks matters: the broker stops running a ring — its entries marked empty, a DMA
        for the Launcher flagged — before it clears CONTROL_KICK, so a kick seen clear means
        the ring's state and the pending-DMA flag read after it are the broker's last word."""
        data = self.lguest_data
        control = self.control
        if data is None or control[wire.CONTROL_KICK] or control[wire.CONTROL_PENDING_DMA] \
                or control[wire.CONTROL_BREAK] or control[wire.CONTROL_DEAD]:
            return False
        pending = self.pending_irqs()
        if not pending:
            return False
        ram = self.phys.ram
        status = data + abi.LGUEST_DATA_HCALL_STATUS
        if ram[status:status + abi.LHCALL_RING_SIZE] != _EMPTY_RING:
            return False              # queued calls: the Host runs them before this HALT
        blocked = data + abi.LGUEST_DATA_BLOCKED_INTERRUPTS
        return bool(pending & ~int.from_bytes(ram[blocked:blocked + 4], "little"))

    def serve(self, handler: Callable, *args) -> None:
        """Run a device's handler for the guest. A device that refuses the guest, or a
        pointer of the guest's the Launcher cannot use, is the guest's death: the Host
        records why (first reason wins) and the guest stops."""
        try:
            handler(*args)
        except InvalidAddress as bad:
            self.kill(str(bad))
            raise GuestStopped(str(bad)) from None
        except GuestStopped as stopped:
            self.kill(stopped.reason)
            raise

    def pending_irqs(self) -> int:
        bits = 0
        flags = self.control[wire.CONTROL_IRQ_FLAGS:wire.CONTROL_IRQ_FLAGS + abi.LGUEST_IRQS]
        if any(flags):
            for irq, flag in enumerate(flags):
                if flag:
                    bits |= 1 << irq
        return bits

    def ack_irq(self, irq: int) -> None:
        self.control[wire.CONTROL_IRQ_FLAGS + irq] = 0

    def notify(self) -> None:
        """The doorbell: ask the Host to run the async ring soon, never waiting for it. No
        message while the broker already has our ring on its list (CONTROL_KICK)."""
        control = self.control
        if control[wire.CONTROL_KICK]:
            return
        control[wire.CONTROL_KICK] = 1
        self.channel.send(wire.OP_NOTIFY)

    def break_pending(self) -> bool:
        """The Waker asked for a BREAK: the reply to our next call will say so (FLAG_AGAIN)."""
        return bool(self.control[wire.CONTROL_BREAK])

    def dead(self) -> bool:
        return bool(self.control[wire.CONTROL_DEAD])

    def kill(self, reason: str) -> None:
        self.channel.call(wire.OP_KILL, tail=reason.encode())
