"""The broker: lgnet's Host, one process for the whole lab.

Rules of this file: it is the shell around the engine. It accepts launchers on a UNIX socket
in a private directory, maps what they hand over (guest RAM, net files, control pages), turns
their requests into engine calls under lguest_lock, and does the waiting the engine must not
do: HALT until an interrupt, the timer of SET_CLOCKEVENT, BREAK until released. It never
trusts a launcher: a malformed request closes that connection (lguest's close(): bindings
released, guest slot freed), a guest's misbehaviour kills that guest, everyone else goes on.

One thread serves every connection from a selector loop, so requests are handled one at a
time; lguest_lock is still taken around every engine operation, as io.c did.
"""
from __future__ import annotations

import errno
import heapq
import json
import mmap
import os
import selectors
import signal
import socket
import struct
import threading
import time

from lgnet import abi, wire
from lgnet.fabric.devlguest import LguestFile
from lgnet.fabric.dma import Engine, Guest
from lgnet.fabric.hypercalls import Outcome
from lgnet.fabric.memory import GuestMemory

UCRED = struct.Struct("3i")          # struct ucred: pid, uid, gid
RESTOCK_SECONDS = 0.0005             # how long "one chance to restock" waits for a free buffer
LISTEN_BACKLOG = 256


class BrokerStop(Exception):
    """SIGTERM or SIGINT: leave the loop, close every guest, remove the socket."""


def _stop(*_) -> None:
    raise BrokerStop()


class Connection:
    """One launcher's open /dev/lguest, and everything the broker mapped for it."""

    def __init__(self, sock: socket.socket, pid: int, engine: Engine):
        self.sock = sock
        self.pid = pid
        self.file = LguestFile(engine, pid)
        self.mappings: list[mmap.mmap] = []
        self.memory: GuestMemory | None = None
        self.control: memoryview | None = None
        self.halted = False           # a HALT is waiting for its reply
        self.timer_seq = 0            # bumps to cancel a scheduled clock event

    def reply(self, result: int, flags: int = 0, a: int = 0, b: int = 0,
              tail: bytes = b"") -> None:
        try:
            self.sock.send(wire.encode_reply(wire.Reply(result, flags, a, b, tail)))
        except OSError:
            pass                      # the launcher is gone; its close comes from the loop

    def release(self) -> None:
        if self.memory is not None:
            self.memory.release()
        if self.control is not None:
            self.control.release()
        for m in self.mappings:
            m.close()
        self.mappings.clear()


class Broker:
    def __init__(self, socket_path: str, watch_fd: int | None = None):
        self.socket_path = socket_path
        self.watch_fd = watch_fd
        self.lock = threading.Lock()
        self.engine = Engine(wake=self._wake, restock=self._restock, lock=self.lock)
        self.selector = selectors.DefaultSelector()
        self.owners: dict[int, Connection] = {}          # guest id -> owning connection
        self.breakers: dict[int, list[Connection]] = {}  # guest id -> BREAKs waiting for 0
        self.ended: list[dict] = []                      # counters of guests already closed
        self.timers: list[tuple[float, int, int, Connection]] = []
        self.running = True
        self.listener = self._listen()

    # --- set-up and tear-down -----------------------------------------------------------

    def _listen(self) -> socket.socket:
        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        if os.path.exists(self.socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.socket_path)
                probe.close()
                raise OSError(errno.EADDRINUSE, "a broker is already listening on %s"
                              % self.socket_path)
            except ConnectionRefusedError:
                os.unlink(self.socket_path)      # a dead broker's socket
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.socket_path)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        if self.watch_fd is not None:
            self.selector.register(self.watch_fd, selectors.EVENT_READ, self._watched)
        return listener

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            while self.running:
                timeout = None
                if self.timers:
                    timeout = max(0.0, self.timers[0][0] - time.monotonic())
                for key, _ in self.selector.select(timeout):
                    key.data(key.fileobj)
                self._fire_timers()
        except BrokerStop:
            pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, Connection):
                self._close(key.data)
        self.selector.close()
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _watched(self, fd: int) -> None:
        # The lab holds the other end of this pipe: EOF means it is gone, so are we.
        if not os.read(fd, 64):
            self.running = False

    # --- connections --------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        pid, uid, _gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      UCRED.size))
        if uid != os.getuid():
            sock.close()          # only our own user's launchers may join
            return
        conn = Connection(sock, pid, self.engine)
        self.selector.register(sock, selectors.EVENT_READ, lambda s, c=conn: self._readable(c))

    def _readable(self, conn: Connection) -> None:
        try:
            data, fds = wire.recv_fds(conn.sock)
        except OSError:
            data, fds = b"", []
        if len(data) < wire.REQUEST.size:
            for fd in fds:
                os.close(fd)
            self._close(conn)
            return
        op, a, b, c, d = wire.REQUEST.unpack_from(data)
        tail = data[wire.REQUEST.size:]
        try:
            self._dispatch(conn, op, a, b, c, d, tail, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _close(self, conn: Connection) -> None:
        """lguest's close(): bindings released, guest slot freed, mappings dropped."""
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        guest = conn.file.guest
        if guest is not None and self.owners.get(guest.id) is conn:
            del self.owners[guest.id]
            self.ended.append(self.guest_stats(guest))
            self._release_breakers(guest)
        elif guest is not None and conn in self._breakers_of(guest):
            self._breakers_of(guest).remove(conn)
        conn.file.close()
        conn.release()
        conn.sock.close()

    def _breakers_of(self, guest: Guest) -> list[Connection]:
        return self.breakers.get(guest.id, [])

    # --- requests -----------------------------------------------------------------------

    def _dispatch(self, conn: Connection, op: int, a: int, b: int, c: int, d: int,
                  tail: bytes, fds: list[int]) -> None:
        f = conn.file
        if op == wire.OP_HCALL:
            self._hypercall(conn, a, b, c, d)
        elif op == wire.OP_INITIALIZE:
            self._initialize(conn, a, b, c, d, tail, fds)
        elif op == wire.OP_GETDMA:
            addr = f.getdma(a)
            # Guest addresses do not fit a signed result: the address travels in arg0.
            conn.reply(min(addr, 0), a=max(addr, 0))
        elif op == wire.OP_IRQ:
            conn.reply(f.irq(a))
        elif op == wire.OP_BREAK:
            self._break(conn, a)
        elif op == wire.OP_ATTACH:
            guest = self.engine.guests[a] if a < len(self.engine.guests) else None
            if guest is None:
                conn.reply(-errno.ENOENT)
            else:
                f.attach(guest)
                conn.reply(0)
        elif op == wire.OP_KILL:
            error = f.gate_run()
            if not error:
                self.engine.kill_guest(f.guest, tail.decode(errors="replace"))
            conn.reply(error)
        elif op == wire.OP_STATS:
            conn.reply(0, tail=json.dumps(self.stats()).encode())
        else:
            conn.reply(-errno.EINVAL)

    def _initialize(self, conn: Connection, pfn_limit: int, pgdir: int, start: int,
                    page_offset: int, tail: bytes, fds: list[int]) -> None:
        def make_memory() -> GuestMemory:
            # Only reached once lguest_user.c's checks (EPERM, EBUSY, ...) have passed.
            regions, control_fd, control_offset = wire.decode_layout(tail)
            memory = GuestMemory(pfn_limit)
            for region in regions:
                fd = fds[region.fd_index]
                m = mmap.mmap(fd, region.length, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=region.file_offset)
                conn.mappings.append(m)
                st = os.fstat(fd)
                memory.add_region(region.base, m, (st.st_dev, st.st_ino) if region.shared
                                  else None, "fd%d" % region.fd_index)
            control = mmap.mmap(fds[control_fd], wire.CONTROL_PAGE_SIZE, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=control_offset)
            conn.mappings.append(control)
            conn.control = memoryview(control)
            conn.memory = memory
            return memory

        try:
            result = conn.file.initialize(pfn_limit, pgdir, start, page_offset, make_memory)
        except (ValueError, OSError, IndexError, struct.error):
            conn.release()
            result = -errno.EINVAL
        if result >= 0:
            self.owners[conn.file.guest.id] = conn
            conn.reply(result, a=conn.file.guest.id)
        else:
            conn.reply(result)

    def _hypercall(self, conn: Connection, eax: int, edx: int, ebx: int, ecx: int) -> None:
        guest = conn.file.guest
        if guest is not None and guest.dead is not None and conn.file.gate_run() == 0:
            conn.reply(-errno.ENOENT, wire.FLAG_DEAD, tail=guest.dead.encode())
            return
        outcome = conn.file.hypercall(eax, edx, ebx, ecx)
        if isinstance(outcome, int):
            conn.reply(outcome)
            return
        if outcome.clockevent_ns is not None:
            self._set_clockevent(conn, outcome.clockevent_ns)
        if outcome.halt and guest.dead is None and not self._pending(conn, guest):
            conn.halted = True        # replied to by _wake when something becomes pending
            return
        self._answer(conn, guest, outcome)

    def _answer(self, conn: Connection, guest: Guest, outcome: Outcome | None = None) -> None:
        """The reply that lets a guest run again: dead, pending DMA, or its result."""
        conn.halted = False
        if guest.dead is not None:
            conn.reply(-errno.ENOENT, wire.FLAG_DEAD, tail=guest.dead.encode())
            return
        flags = wire.FLAG_AGAIN if self._breakers_of(guest) else 0
        result = outcome.result if outcome is not None else 0
        if outcome is not None and outcome.deferred:
            flags |= wire.FLAG_PENDING_DMA
        if guest.pending_dma is not None:
            dma, key = guest.pending_dma
            conn.reply(result, flags | wire.FLAG_PENDING_DMA, dma, key,
                       b"deferred" if outcome is not None and outcome.deferred else b"")
            return
        conn.reply(result, flags)

    def _pending(self, conn: Connection, guest: Guest) -> bool:
        return bool(guest.irqs_pending) or any(conn.control[:abi.LGUEST_IRQS]) \
            or bool(self._breakers_of(guest))

    def _break(self, conn: Connection, on: int) -> None:
        guest = conn.file.guest
        error = conn.file.gate(abi.LHREQ_BREAK)
        if error:
            conn.reply(error)
            return
        if on:
            # Kick the guest out of run, and hold this request until BREAK 0.
            self.breakers.setdefault(guest.id, []).append(conn)
            owner = self.owners.get(guest.id)
            if owner is not None and owner.halted:
                self._answer(owner, guest)
            return
        self._release_breakers(guest)
        conn.reply(0)

    def _release_breakers(self, guest: Guest) -> None:
        for waiting in self.breakers.pop(guest.id, []):
            waiting.reply(0)

    # --- the engine's callbacks ---------------------------------------------------------

    def _wake(self, guest: Guest) -> None:
        """An interrupt was raised for this guest, or it was killed: tell its launcher."""
        conn = self.owners.get(guest.id)
        if conn is None or conn.control is None:
            return
        bits = guest.irqs_pending
        guest.irqs_pending = 0
        irq = 0
        while bits:
            if bits & 1:
                conn.control[wire.CONTROL_IRQ_FLAGS + irq] = 1
            bits >>= 1
            irq += 1
        if guest.dead is not None:
            conn.control[wire.CONTROL_DEAD] = 1
        if conn.halted:
            self._answer(conn, guest)

    def _restock(self, guest: Guest | None) -> None:
        """One chance to restock: give the receiver a moment to re-arm a buffer."""
        if guest is None:
            return
        deadline = time.monotonic() + RESTOCK_SECONDS
        while time.monotonic() < deadline:
            os.sched_yield()
            if self._has_free_buffer(guest):
                return

    @staticmethod
    def _has_free_buffer(guest: Guest) -> bool:
        for binding in guest.dma:
            if not binding.interrupt:
                continue
            for i in range(binding.num_dmas):
                addr = binding.dmas + i * abi.LGUEST_DMA_SIZE
                if guest.memory.locate(addr, 4) and guest.memory.read_u32(addr) == 0:
                    return True
        return False

    # --- the guest's clock --------------------------------------------------------------

    def _set_clockevent(self, conn: Connection, delta_ns: int) -> None:
        conn.timer_seq += 1           # any earlier event is cancelled
        if delta_ns:
            deadline = time.monotonic() + delta_ns / 1e9
            heapq.heappush(self.timers, (deadline, id(conn), conn.timer_seq, conn))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, seq, conn = heapq.heappop(self.timers)
            guest = conn.file.guest
            if seq == conn.timer_seq and guest is not None and guest.dead is None:
                with self.lock:
                    self.engine.raise_irq(guest, abi.TIMER_IRQ)

    # --- what the lab asks --------------------------------------------------------------

    def stats(self) -> list[dict]:
        """Every guest this broker has served: the ended ones, then the live ones."""
        return self.ended + [self.guest_stats(g) for g in self.engine.guests if g is not None]

    @staticmethod
    def guest_stats(guest: Guest) -> dict:
        row = {"guest": guest.id, "pid": guest.owner, "dead": guest.dead}
        row.update(guest.counters.as_dict())
        return row


def run_broker(socket_path: str, watch_fd: int | None = None, ready_fd: int | None = None) -> None:
    broker = Broker(socket_path, watch_fd)
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    broker.serve_forever()
