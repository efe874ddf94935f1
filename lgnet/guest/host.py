"""The guest's line to the Host, as the running guest code sees it.

A guest — Unicorn CPU or Python driver — needs four things from outside: make a hypercall,
see which interrupts are pending, take one for delivery, and report its own fault. This room
defines that interface (HostLink) and the launcher's implementation over wire.py
(BrokerHost). The BrokerHost is also where the Launcher's run loop lives, because in lgnet
"the guest ran and came back" is a hypercall reply: a pending DMA to a private key is served
by the Launcher's devices before the guest resumes, a BREAK makes it service input, and a
dead guest stops with lguest's reason.
"""
from __future__ import annotations

from typing import Callable, Protocol

from lgnet import abi, wire
from lgnet.guest.physmem import InvalidAddress


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
                 handle_input: Callable[[], None]):
        self.channel = channel
        self.control = control
        self.handle_output = handle_output      # (dma address, key): a DMA for the Launcher
        self.handle_input = handle_input        # the Waker kicked us: service input

    def hypercall(self, call: int, arg1: int = 0, arg2: int = 0, arg3: int = 0) -> int:
        while True:
            reply = self.channel.call(wire.OP_HCALL, call, arg1, arg2, arg3)
            if reply.dead is not None:
                raise GuestStopped(reply.dead)
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
