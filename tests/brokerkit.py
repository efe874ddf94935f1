"""A real `Broker` in the test's own process, and launchers made of a socketpair each.

The broker is lgnet.fabric.broker.Broker without a listener: every launcher is a socketpair
whose broker end is adopted (`Broker.adopt`), and the test turns the broker's loop by hand
(`Broker.step`). A kit launcher speaks wire.py like guest/host.py does: INITIALIZE with its
RAM and control page (a memfd) and a net page (a memfd shared by every kit launcher of the
same kit: one --sharenet file), then hypercalls. Its guest RAM is mapped here too, so the
test reads and writes what the guest would.

Layout of a kit guest (guest-physical): RAM at 0 (RAM_SIZE), the net page at NET_AT, and
lguest_data at LGUEST_DATA inside RAM.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import socket
import threading

from lgnet import abi, process, wire
from lgnet.fabric.broker import Broker

RAM_SIZE = 16 * abi.PAGE_SIZE
NET_AT = RAM_SIZE                         # the net page sits right above RAM
PFN_LIMIT = NET_AT // abi.PAGE_SIZE + 1
LGUEST_DATA = 0x1000
RX = 0x3000                               # receive array
TX = 0x4000                               # send descriptor
RX_BUF = 0x6000
TX_BUF = 0x8000
STEP_SECONDS = 0.01
MAX_STEPS = 200


class CheckedLock:
    """lguest_lock, recording whether it is held right now."""

    def __init__(self):
        self.inner = threading.Lock()
        self.held = False
        self.acquired = 0

    def __enter__(self):
        self.inner.acquire()
        self.held = True
        self.acquired += 1
        return self

    def __exit__(self, *exc):
        self.held = False
        self.inner.release()
        return False


class KitLauncher:
    """One launcher: its socket, its RAM and control page, and what it asks."""

    def __init__(self, kit: "BrokerKit", pid: int):
        self.kit = kit
        self.pid = pid
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.conn = kit.broker.adopt(theirs, pid)
        self.fd = os.memfd_create("kit-guest-%d" % pid, os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, RAM_SIZE + wire.CONTROL_PAGE_SIZE)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.ram = mmap.mmap(self.fd, RAM_SIZE + wire.CONTROL_PAGE_SIZE)
        self.control = memoryview(self.ram)[RAM_SIZE:]
        self.guest_id: int | None = None

    # --- the wire -----------------------------------------------------------------------

    def send(self, op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
             tail: bytes = b"", fds=()) -> None:
        wire.send_fds(self.sock, wire.encode_request(op, a, b, c, d, tail), list(fds))

    def answered(self) -> bool:
        return bool(process.readable([self.sock], 0))

    def reply(self) -> wire.Reply:
        """Turn the broker's loop until this launcher has its reply."""
        for _ in range(MAX_STEPS):
            if self.answered():
                return wire.decode_reply(self.sock.recv(wire.MAX_MESSAGE))
            self.kit.broker.step(STEP_SECONDS)
        raise AssertionError("launcher %d: no reply from the broker" % self.pid)

    def call(self, op: int, *args, **kwargs) -> wire.Reply:
        self.send(op, *args, **kwargs)
        return self.reply()

    def hcall(self, eax: int, edx: int = 0, ebx: int = 0, ecx: int = 0) -> wire.Reply:
        return self.call(wire.OP_HCALL, eax, edx, ebx, ecx)

    # --- a guest ------------------------------------------------------------------------

    def initialize(self) -> wire.Reply:
        layout = wire.encode_layout(
            [wire.Region(0, RAM_SIZE, 0, 0, False),
             wire.Region(NET_AT, abi.PAGE_SIZE, 0, 1, True)], 0, RAM_SIZE)
        reply = self.call(wire.OP_INITIALIZE, PFN_LIMIT, 0, 0, 0, layout,
                          fds=(self.fd, self.kit.net_fd))
        if reply.result >= 0:
            self.guest_id = reply.arg0
        return reply

    def boot(self) -> "KitLauncher":
        """INITIALIZE, then LGUEST_INIT with an empty async ring."""
        assert self.initialize().result == abi.INITIALIZE_RESULT
        self.ram[LGUEST_DATA + abi.LGUEST_DATA_HCALL_STATUS:
                 LGUEST_DATA + abi.LGUEST_DATA_HCALLS] = bytes([abi.HCALL_STATUS_EMPTY]) \
            * abi.LHCALL_RING_SIZE
        assert self.hcall(abi.LHCALL_LGUEST_INIT, LGUEST_DATA).flags == 0
        return self

    @property
    def guest(self):
        return self.kit.broker.engine.guests[self.guest_id]

    def key(self, slot: int) -> int:
        return NET_AT + abi.NET_PEER_KEY_STRIDE * slot

    def bind_rx(self, slot: int, count: int = 1, irq: int = 1, size: int = 256) -> list[int]:
        """Receive buffers bound at this guest's slot; the entries' addresses."""
        entries = []
        for i in range(count):
            entry = RX + i * abi.LGUEST_DMA_SIZE
            self.put(entry, abi.pack_dma([(RX_BUF + i * size, size)]))
            entries.append(entry)
        reply = self.hcall(abi.LHCALL_BIND_DMA, self.key(slot), RX,
                           abi.bind_dma_arg(count, irq))
        assert reply.result == 1, reply
        return entries

    def put_tx(self, payload: bytes) -> None:
        self.put(TX_BUF, payload)
        self.put(TX, abi.pack_dma([(TX_BUF, len(payload))]))

    def send_dma(self, slot: int) -> None:
        """SEND_DMA to a peer's slot, without waiting for the reply."""
        self.send(wire.OP_HCALL, abi.LHCALL_SEND_DMA, self.key(slot), TX)

    def halt(self) -> None:
        self.send(wire.OP_HCALL, abi.LHCALL_HALT)

    def block(self, mask: int) -> None:
        self.put_u32(LGUEST_DATA + abi.LGUEST_DATA_BLOCKED_INTERRUPTS, mask)

    def queue(self, *calls: tuple[int, int, int, int], start: int = 0) -> None:
        """Queue calls in the async ring from entry `start` (the guest's own cursor: the
        ring's start unless told)."""
        status = LGUEST_DATA + abi.LGUEST_DATA_HCALL_STATUS
        for n, call in enumerate(calls, start):
            at = LGUEST_DATA + abi.LGUEST_DATA_HCALLS + n * abi.ASYNC_HCALL.size
            self.put(at, abi.ASYNC_HCALL.pack(*call))
            self.ram[status + n] = abi.HCALL_STATUS_PENDING

    # --- its memory ---------------------------------------------------------------------

    def put(self, addr: int, data: bytes) -> None:
        self.ram[addr:addr + len(data)] = data

    def get(self, addr: int, length: int) -> bytes:
        return bytes(self.ram[addr:addr + length])

    def put_u32(self, addr: int, value: int) -> None:
        self.put(addr, value.to_bytes(4, "little"))

    def u32(self, addr: int) -> int:
        return int.from_bytes(self.get(addr, 4), "little")

    def irq_flag(self, irq: int) -> int:
        return self.control[wire.CONTROL_IRQ_FLAGS + irq]

    def close(self) -> None:
        self.sock.close()
        self.control.release()
        self.ram.close()
        os.close(self.fd)


class BrokerKit:
    def __init__(self, lock=None):
        self.lock = lock if lock is not None else CheckedLock()
        self.broker = Broker(None, lock=self.lock)
        self.net_fd = os.memfd_create("kit-net")
        os.ftruncate(self.net_fd, abi.PAGE_SIZE)
        self.launchers: list[KitLauncher] = []

    def launcher(self) -> KitLauncher:
        launcher = KitLauncher(self, 1000 + len(self.launchers))
        self.launchers.append(launcher)
        return launcher

    def settle(self, steps: int = 5) -> None:
        for _ in range(steps):
            self.broker.step(0)

    def close(self) -> None:
        self.broker.shutdown()
        for launcher in self.launchers:
            launcher.close()
        os.close(self.net_fd)
