"""The broker: lgnet's Host, one process for the whole lab.

Rules of this file: it is the shell around the engine. It accepts launchers on a UNIX socket
in a private directory, maps what they hand over (guest RAM, net files, control pages), turns
their requests into engine calls under lguest_lock, and does the waiting the engine must not
do: HALT until an interrupt, the timer of SET_CLOCKEVENT, BREAK until released. It never
trusts a launcher: a malformed request closes that connection (lguest's close(): bindings
released, guest slot freed), a guest's misbehaviour kills that guest, everyone else goes on.

Each launcher connection is one state machine (fabric/connection.py): every request it
sends and everything the engine reports about its guest is an input, and the table names
the action — one of the methods below, grouped as the table is — and the state after it.

One thread serves every connection from a selector loop, so requests are handled one at a
time; lguest_lock is still taken around every engine operation, as io.c did, and nothing
else happens under it (DESIGN rule 8): the engine reports whom to wake (`Engine.woken`) and
the broker tells them — control-page flags, replies — after the operation. A send that found
no free buffer is a visible step too: its connection is parked (its requests wait), the
receiver gets the chance to run — woken if it sleeps, its own requests heard by the loop —
and the send is tried once more when the receiver has a free buffer or RESTOCK_SECONDS passed.

Where the speed comes from (lgnet's, not lguest's: lguest had a CPU per guest to spare).
- The doorbell. A guest that queued calls in its async ring sends NOTIFY (no reply) and goes
  on; its ring joins the run list, and each pass of the loop runs up to one ring's worth of
  every listed guest's calls between looks at the sockets, so one busy sender cannot starve
  anyone's requests. The guest rings only while CONTROL_KICK is 0; the broker clears it once
  the ring has run dry (and looks once more, for a call queued in between).
- Coalesced wake-ups. Waking a halted guest costs a reply and a context switch (tens of
  microseconds here). A wake-up due while the broker runs a batching guest's queued calls is
  held while that sender still runs (it is likely to send more) and let go when the receiver has
  half its receive buffers filled, the sender halts or leaves, or WAKE_MAX_SECONDS passed; a
  receiver about to be denied a buffer is woken at once (the one chance to restock). The
  interrupt flags themselves are set at once: a guest that is running sees them. The policy
  is fabric/wakeups.py's; this file only keeps the clock and sends the replies.
- HALTs that never come here. A guest that HALTs with an interrupt it may take already
  flagged, nothing in its async ring, no kick outstanding and no DMA for its Launcher pending
  is answered in its launcher (guest/host.py), as lguest's run_guest found such an interrupt
  at once: no message, no wake-up, and its connection rightly stays RUNNING. For the
  launcher's look to be right, a ring's run ends in this order: its entries marked empty,
  CONTROL_PENDING_DMA set if it stopped at a DMA for the Launcher, then CONTROL_KICK cleared.

Impairments (fabric/impair.py) are the lab's to set, live, with an IMPAIR request (JSON in,
JSON out; only our own user may connect at all). The engine applies them under lguest_lock
where each frame moves; a frame held for its due time waits in the impairments' queue, and
the loop delivers it when due — a timer like the guests' clock events, fired outside the lock,
the delivery itself one more engine operation. With nothing configured the engine's hook is
None.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import heapq
import json
import mmap
import os
import resource
import selectors
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections import Counter, deque

from lgnet import abi, netfile, process, wire
from lgnet.errors import LgnetError
from lgnet.fabric import dmahash, fastpath
from lgnet.fabric.capture import Capture, capture_size, net_source
from lgnet.fabric.connection import Input, State, running, transition
from lgnet.fabric.devlguest import LguestFile
from lgnet.fabric.handover import FdFacts, Refused, check_layout
from lgnet.fabric.dma import Engine, Guest, Restock, has_free_buffer
from lgnet.fabric.hypercalls import Outcome, drain_async, finish_restock, ring_empty
from lgnet.fabric.impair import ImpairError, Impairments, check_params
from lgnet.fabric.memory import GuestMemory
from lgnet.fabric.tsc import host_tsc_khz
from lgnet.fabric.trace import BrokerTrace
from lgnet.fabric.wakeups import HeldWakes, flag_bits, wakes_halted

RESTOCK_SECONDS = 0.0005             # how long "one chance to restock" waits for a free buffer
LISTEN_BACKLOG = 256
READY = b"ready\n"                  # written on --ready-fd once the socket listens
RING_PASS_CALLS = 16                 # queued calls run per guest per pass between socket looks
MAX_QUEUED_REPLIES = 64              # replies a launcher may leave unread before it is closed
ACCEPT_BACKOFF_SECONDS = 0.1         # out of descriptors: how long accept() rests
MAX_NAME_BYTES = 255                 # a guest's name, as the lab sends it (NAME)
MAX_NAMES = 2 * abi.MAX_GUESTS       # names held for guests running or about to connect
MAX_ENDED_ROWS = 4 * abi.MAX_GUESTS  # counters of closed guests kept for STATS
TIMERS_PER_CONNECTION = 4            # clock events kept, cancelled ones included


class BrokerStop(Exception):
    """SIGTERM or SIGINT: leave the loop, close every guest, remove the socket."""


def _stop(*_) -> None:
    raise BrokerStop()


class Connection:
    """One launcher's open /dev/lguest, its state, and everything the broker mapped for it.

    Its socket never blocks the broker: a reply the socket will not take now waits in the
    connection's outbox, sent when the socket is writable. The outbox is bounded: a launcher
    that leaves MAX_QUEUED_REPLIES replies unread is `overflowed`, and the loop closes it."""

    def __init__(self, sock: socket.socket, pid: int, engine: Engine, backlogged: set):
        sock.setblocking(False)
        self.sock = sock
        self.pid = pid
        self.state = State.NEW
        self.file = LguestFile(engine, pid)
        self.mappings: list[mmap.mmap] = []
        self.memory: GuestMemory | None = None
        self.control: memoryview | None = None
        self.timer_seq = 0            # bumps to cancel a scheduled clock event
        self.outbox: deque[bytes] = deque()
        self.backlogged = backlogged  # the broker's: connections whose outbox changed
        self.overflowed = False
        self.parked = False           # its requests wait unread (one chance to restock)
        self.events = 0               # what the selector watches for it now

    def reply(self, result: int, flags: int = 0, a: int = 0, b: int = 0,
              tail: bytes = b"") -> None:
        message = wire.encode_reply(wire.Reply(result, flags, a, b, tail))
        if not self.outbox:
            try:
                self.sock.send(message)
                return
            except BlockingIOError:
                pass
            except OSError:
                return                # the launcher is gone; its close comes from the loop
        if len(self.outbox) >= MAX_QUEUED_REPLIES:
            self.overflowed = True
        else:
            self.outbox.append(message)
        self.backlogged.add(self)

    def flush(self) -> None:
        """Send what waits in the outbox, as far as the socket takes it."""
        while self.outbox:
            try:
                self.sock.send(self.outbox[0])
            except BlockingIOError:
                return
            except OSError:
                self.outbox.clear()   # gone: its hangup comes from the loop
                return
            self.outbox.popleft()

    def release(self) -> None:
        """Views first, then the mappings they look into (closing a viewed mmap fails)."""
        if self.memory is not None:
            self.memory.release()
            self.memory = None
        if self.control is not None:
            self.control.release()
            self.control = None
        for m in self.mappings:
            m.close()
        self.mappings.clear()


def log(text: str) -> None:
    """The broker's own account of what it refused or gave up (the lab keeps its stderr)."""
    print(text, file=sys.stderr, flush=True)


def fd_facts(fd: int) -> FdFacts:
    """What a handed-over descriptor is, for fabric/handover.py to judge."""
    st = os.fstat(fd)
    regular = stat.S_ISREG(st.st_mode)
    read_write = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if regular else 0
    except OSError:
        seals = 0                 # a file that cannot be sealed (not a memfd)
    return FdFacts(regular, st.st_size, read_write, bool(seals & fcntl.F_SEAL_SHRINK))


class Request:
    """One wire request: op, four u32 arguments, its tail and the descriptors with it."""
    __slots__ = ("op", "a", "b", "c", "d", "tail", "fds")

    def __init__(self, op: int, a: int, b: int, c: int, d: int, tail: bytes, fds: list[int]):
        self.op, self.a, self.b, self.c, self.d = op, a, b, c, d
        self.tail = tail
        self.fds = fds


REQUEST_INPUTS = {wire.OP_INITIALIZE: Input.INITIALIZE, wire.OP_HCALL: Input.HCALL,
                  wire.OP_NOTIFY: Input.NOTIFY, wire.OP_GETDMA: Input.GETDMA,
                  wire.OP_IRQ: Input.IRQ, wire.OP_ATTACH: Input.ATTACH,
                  wire.OP_KILL: Input.KILL, wire.OP_STATS: Input.STATS,
                  wire.OP_BROKER_STATS: Input.BROKER_STATS, wire.OP_NAME: Input.NAME,
                  wire.OP_IMPAIR: Input.IMPAIR, wire.OP_BINDINGS: Input.BINDINGS}


def request_input(request: Request) -> Input:
    if request.op == wire.OP_BREAK:
        return Input.BREAK_ON if request.a else Input.BREAK_OFF
    return REQUEST_INPUTS.get(request.op, Input.UNKNOWN)


class Parked:
    """A connection whose send waits for its receiver's one chance to restock, and what
    comes after the final try: the same hypercall again, its reply, or the rest of the ring."""
    __slots__ = ("conn", "restock", "deadline", "started", "then")

    def __init__(self, conn: Connection, restock: Restock, now: float, seconds: float, then):
        self.conn = conn
        self.restock = restock
        self.started = now
        self.deadline = now + seconds
        self.then = then


class BrokerCounters:
    """Where the broker's time goes (seconds) and how often it did what: for `lgnet bench`."""
    __slots__ = ("idle_s", "busy_s", "engine_s", "restock_s", "messages", "notifies",
                 "ring_passes", "ring_calls", "hypercalls", "wakes", "wakes_deferred",
                 "restocks")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class Broker:
    """socket_path None: no listener; connections come through `adopt` (in-process tests)."""

    def __init__(self, socket_path: str | None, watch_fd: int | None = None,
                 capture: Capture | None = None, first_guest_id: int = 0, lock=None,
                 trace: BrokerTrace | None = None, seed: int = 0,
                 net_names: dict[str, str] | None = None, guest_names: tuple = ()):
        self.socket_path = socket_path
        self.watch_fd = watch_fd
        self.trace = trace
        if trace is not None:
            lock = trace.lock                            # each hold a slice on the timeline
        self.lock = lock if lock is not None else threading.Lock()
        self.engine = Engine(lock=self.lock, tsc_khz=host_tsc_khz(),
                             first_guest_id=first_guest_id)
        self.names: dict[int, str] = {}                  # launcher pid -> guest name (lab's)
        self.guest_names = set(guest_names)              # the lab's guests, before they run
        # net file path -> the lab's name for it; net file identity -> its name once seen
        self.net_names = {os.path.realpath(p): n for p, n in (net_names or {}).items()}
        self.nets: dict[tuple, str] = {}
        self.impair = Impairments(seed, time.monotonic, self.nets.get, self.guest_name)
        self.capture = capture
        if capture is not None:
            capture.names = self.names
            self.engine.on_transfer = capture.on_transfer
            self.engine.on_fault = capture.on_fault
        if trace is not None:
            self.engine.on_transfer = trace.on_transfer  # the capture's record, then its own
        # The connection table, resolved once: (state, input) -> (bound action, next state).
        self.actions = {(state, event): (getattr(self, "_" + transition(state, event)[0]),
                                         transition(state, event)[1])
                        for state in State for event in Input}
        self.selector = selectors.DefaultSelector()
        self.connections: set[Connection] = set()
        self.owners: dict[int, Connection] = {}          # guest id -> owning connection
        self.breakers: dict[int, list[Connection]] = {}  # guest id -> its BREAKING sharers
        self.ended: deque[dict] = deque(maxlen=MAX_ENDED_ROWS)  # counters of closed guests
        self.timers: list[tuple[float, int, int, Connection]] = []
        self.rings: dict[Connection, None] = {}          # rang the doorbell: rings to run
        self.held = HeldWakes()                          # wake-ups held back (coalescing)
        self.parked: list[Parked] = []                   # sends waiting for a restock
        self.restock_seconds = RESTOCK_SECONDS
        self.running_for: Connection | None = None       # whose ring or hypercall runs now
        self.counters = BrokerCounters()
        self.running = True
        self.backlogged: set[Connection] = set()         # outbox changed: watch for writable
        self.accept_resumes: float | None = None         # accept() rests until then (EMFILE)
        self.listener = self._listen() if socket_path is not None else None
        if self.watch_fd is not None:
            self.selector.register(self.watch_fd, selectors.EVENT_READ,
                                   lambda _mask: self._watched(self.watch_fd))

    # --- set-up and tear-down -----------------------------------------------------------

    def _listen(self) -> socket.socket:
        directory = os.path.dirname(self.socket_path)
        if not os.path.isdir(directory):
            # Ours, so private (makedirs' mode is subject to the umask). A directory that
            # was there already is the user's: its mode is none of our business (think /tmp).
            os.makedirs(directory, mode=0o700)
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
        return listener

    def _rest_accept(self) -> None:
        """Out of descriptors (EMFILE/ENFILE): stop accepting for a moment, serve the rest.
        The pending connections wait in the backlog; closes meanwhile free descriptors."""
        if self.accept_resumes is None:
            log("broker: out of file descriptors; not accepting for %.1f s"
                % ACCEPT_BACKOFF_SECONDS)
            self.selector.unregister(self.listener)
        self.accept_resumes = time.monotonic() + ACCEPT_BACKOFF_SECONDS

    def _resume_accept(self) -> None:
        if self.accept_resumes is not None and time.monotonic() >= self.accept_resumes:
            self.accept_resumes = None
            self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            while self.running:
                self.step()
        except BrokerStop:
            pass
        finally:
            # Already stopping: a second SIGTERM (a lab's teardown, then its process group's)
            # must not cut the shutdown or the runtime directory's removal short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.shutdown()

    def step(self, timeout: float | None = None) -> None:
        """One pass of the loop: wait for the sockets (at most `timeout`, or until the next
        thing due), serve them, run rings, retry parked sends, flush, let wake-ups and
        timers go."""
        clock = time.perf_counter
        counters = self.counters
        wait = timeout
        if self.rings or self.parked:
            wait = 0.0        # queued calls or a restock wait: look at the sockets, no sleep
        elif self.timers:
            due = max(0.0, self.timers[0][0] - time.monotonic())
            wait = due if wait is None else min(wait, due)
        for deadline in (None if self.rings else self.held.deadline(), self.impair.next_due(),
                         self.accept_resumes):
            if deadline is not None:
                due = max(0.0, deadline - time.monotonic())
                wait = due if wait is None else min(wait, due)
        started = clock()
        events = self.selector.select(wait)
        woke = clock()
        counters.idle_s += woke - started
        for key, mask in events:
            key.data(mask)
        if self.rings:
            self._run_rings()
        if self.parked:
            self._retry_parked(bool(events))
        if self.impair.late:
            self._deliver_due()
        if self.capture is not None:
            self.capture.flush()      # this pass's deliveries, before their wake-ups
        if self.trace is not None:
            self.trace.flush()
        if self.held:
            self._flush_wakes()
        self._fire_timers()
        if self.backlogged:
            self._watch_outboxes()
        if self.accept_resumes is not None:
            self._resume_accept()
        counters.busy_s += clock() - woke

    def shutdown(self) -> None:
        for conn in list(self.connections):
            self._close(conn)
        self.selector.close()
        if self.listener is not None:
            self.listener.close()
        if self.capture is not None:
            self.capture.close()
        if self.trace is not None:
            self.trace.close()
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def _watched(self, fd: int) -> None:
        # The lab holds the other end of this pipe: EOF means it is gone, so are we.
        if not os.read(fd, 64):
            self.running = False

    # --- connections: the state machine's inputs --------------------------------------------

    def _accept(self, _mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._rest_accept()
                return
            raise
        try:
            pid, uid = wire.peer_uid(sock)
        except OSError:
            sock.close()              # gone before we looked
            return
        if uid != os.getuid():
            sock.close()          # only our own user's launchers may join
            return
        self.adopt(sock, pid)

    def adopt(self, sock: socket.socket, pid: int) -> Connection:
        """Serve a connected launcher socket whose task is `pid`."""
        conn = Connection(sock, pid, self.engine, self.backlogged)
        self.connections.add(conn)
        self._listen_to(conn)
        return conn

    def _listen_to(self, conn: Connection) -> None:
        conn.parked = False
        self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        """Tell the selector what this connection waits for now: its requests unless
        it is parked, and a writable socket while replies wait in its outbox."""
        events = (0 if conn.parked else selectors.EVENT_READ) | \
            (selectors.EVENT_WRITE if conn.outbox else 0)
        if events == conn.events or conn.state is State.CLOSED:
            return
        if not conn.events:
            self.selector.register(conn.sock, events, lambda mask, c=conn: self._ready(c, mask))
        elif not events:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, lambda mask, c=conn: self._ready(c, mask))
        conn.events = events

    def _watch_outboxes(self) -> None:
        """After a pass: close the launchers that let their replies pile up, and watch the
        sockets of the others whose outbox changed."""
        backlogged = list(self.backlogged)
        self.backlogged.clear()
        for conn in backlogged:
            if conn.overflowed and conn.state is not State.CLOSED:
                log("broker: launcher %d left %d replies unread; closing it"
                    % (conn.pid, MAX_QUEUED_REPLIES))
                self._input(conn, Input.HANGUP)
            elif conn.state is not State.CLOSED:
                self._watch(conn)

    def _ready(self, conn: Connection, mask: int) -> None:
        if conn.state is State.CLOSED:
            return                    # closed earlier in this pass
        if mask & selectors.EVENT_WRITE:
            conn.flush()
            if not conn.outbox:
                self._watch(conn)
        if mask & selectors.EVENT_READ and not conn.parked:
            self._readable(conn)

    def _readable(self, conn: Connection) -> None:
        try:
            data, fds = wire.recv_fds(conn.sock)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if len(data) < wire.REQUEST.size:
            for fd in fds:
                os.close(fd)
            self._input(conn, Input.HANGUP)
            return
        self.counters.messages += 1
        request = Request(*wire.REQUEST.unpack_from(data), data[wire.REQUEST.size:], fds)
        try:
            self._input(conn, request_input(request), request)
        finally:
            for fd in fds:
                os.close(fd)
        self._tell_woken()

    def _input(self, conn: Connection, event: Input, arg=None) -> None:
        """One transition: the table's action for (state, input), then the next state."""
        action, after = self.actions[conn.state, event]
        new = action(conn, arg)
        if conn.state is not State.CLOSED:
            conn.state = after or new or conn.state

    # --- actions: requests any connection may make ------------------------------------------

    def _nothing(self, conn: Connection, _arg) -> None:
        return None

    def _reply_ok(self, conn: Connection, _arg) -> None:
        conn.reply(0)

    def _refuse_run(self, conn: Connection, _request: Request) -> None:
        conn.reply(conn.file.gate_run() or -errno.EPERM)

    def _refuse_busy(self, conn: Connection, _request: Request) -> None:
        conn.reply(-errno.EBUSY)

    def _refuse_unknown(self, conn: Connection, _request: Request) -> None:
        conn.reply(-errno.EINVAL)

    def _getdma(self, conn: Connection, request: Request) -> None:
        addr = conn.file.getdma(request.a)
        # Guest addresses do not fit a signed result: the address travels in arg0.
        conn.reply(min(addr, 0), a=max(addr, 0))

    def _irq(self, conn: Connection, request: Request) -> None:
        conn.reply(conn.file.irq(request.a))

    def _stats(self, conn: Connection, _request: Request) -> None:
        conn.reply(0, tail=json.dumps(self.stats()).encode())

    def _bindings(self, conn: Connection, _request: Request) -> None:
        conn.reply(0, tail=json.dumps(self.bindings(), separators=(",", ":")).encode())

    def _broker_stats(self, conn: Connection, _request: Request) -> None:
        conn.reply(0, tail=json.dumps(self.broker_stats()).encode())

    def _name(self, conn: Connection, request: Request) -> None:
        """The lab names the guest of launcher pid `a` (for the capture). Bounded: a name
        is at most MAX_NAME_BYTES, there are at most MAX_NAMES, and a name goes when its
        guest's connection closes."""
        if len(request.tail) > MAX_NAME_BYTES:
            conn.reply(-errno.ENAMETOOLONG)
            return
        if request.a not in self.names and len(self.names) >= MAX_NAMES:
            conn.reply(-errno.ENOSPC)
            return
        self.names[request.a] = request.tail.decode(errors="replace")
        if self.capture is not None:
            self.capture.named()
        self.impair.changed()
        conn.reply(0)

    def _impair(self, conn: Connection, request: Request) -> None:
        """IMPAIR: change the lab's impairments (JSON); the reply is what was there before
        and the whole state after, or -EINVAL with what is wrong."""
        try:
            asked = json.loads(request.tail or b"{}")
            previous = self.change_impairments(asked)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            conn.reply(-errno.EINVAL, tail=str(exc).encode())
            return
        conn.reply(0, tail=json.dumps({"previous": previous,
                                       "state": self.impair.state()}).encode())

    def change_impairments(self, asked: dict):
        """One change: {"do": "set", net, src, dst, params} | {"do": "link", net, guest,
        down} | {"do": "partition", groups} | {"do": "heal"} | {"do": "show"}. Returns what
        the changed thing was before (a rule's keys, a link's down, the groups)."""
        impair, do = self.impair, asked.get("do")
        if do == "show":
            return None
        if do == "set":
            net, src, dst = asked["net"], asked.get("src"), asked.get("dst")
            self._known(net=net, guests=[g for g in (src, dst) if g is not None])
            try:
                params = check_params(asked.get("params") or {})
            except ImpairError as exc:
                raise ValueError(str(exc)) from None
            old = impair.rules.get((net, src, dst))
            impair.set(net, src, dst, params)
            previous = old.as_dict() if old is not None else None
        elif do == "link":
            net, guest = asked["net"], asked["guest"]
            self._known(net=net, guests=[guest])
            previous = (net, guest) in impair.down
            impair.link(net, guest, bool(asked["down"]))
        elif do == "partition":
            groups = asked["groups"]
            if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
                raise ValueError("partition: wants a list of lists of guest names")
            self._known(guests=[name for group in groups for name in group])
            previous = [sorted(g) for g in impair.groups]
            impair.partition(groups)
        elif do == "heal":
            previous = [sorted(g) for g in impair.groups]
            impair.heal()
        else:
            raise ValueError("unknown impairment request %r (set, link, partition, heal, "
                             "show)" % (do,))
        self._impair_changed()
        return previous

    def _known(self, net: str | None = None, guests: list = ()) -> None:
        """A change names nets and guests this broker knows (the lab's names)."""
        nets = set(self.net_names.values()) | set(self.nets.values())
        if net is not None and net not in nets:
            raise ValueError("no network %r (networks: %s)" % (net, ", ".join(sorted(nets))
                                                               or "none yet"))
        known = set(self.names.values()) | self.guest_names
        for guest in guests:
            if guest not in known:
                raise ValueError("no guest %r (guests: %s)" % (guest, ", ".join(sorted(known))
                                                               or "none yet"))

    def _impair_changed(self) -> None:
        # The engine checks one attribute per frame: None while nothing is configured.
        self.engine.impair = self.impair if self.impair.active else None

    def _deliver_due(self) -> None:
        """The impaired frames whose due time has come, delivered; then their wake-ups."""
        due = self.impair.take_due(time.monotonic())
        if due:
            self.engine.deliver_late(due)
            self._tell_woken()
            if not self.impair.active:
                self._impair_changed()

    def guest_name(self, guest: Guest) -> str:
        """The lab's name for a guest (impairment rules name guests), else guest<id>."""
        return self.names.get(guest.owner) or "guest%d" % guest.id

    def _close(self, conn: Connection, _arg=None) -> State:
        """lguest's close(): bindings released, guest slot freed, mappings dropped."""
        if conn.events:
            try:
                self.selector.unregister(conn.sock)
            except KeyError:          # already left the selector: closing must still finish
                pass
            conn.events = 0
        conn.state = State.CLOSED
        conn.outbox.clear()
        self.backlogged.discard(conn)
        self.connections.discard(conn)
        self.rings.pop(conn, None)
        self.held.release(conn)
        self.parked = [p for p in self.parked if p.conn is not conn]
        guest = conn.file.guest
        if guest is not None and self.owners.get(guest.id) is conn:
            del self.owners[guest.id]
            # Its name goes with its row: the names table itself is freed with the connection.
            self.ended.append(dict(self.guest_stats(guest), ended=True,
                                   name=self.names.pop(conn.pid, None)))
            self._release_breakers(guest)
        elif guest is not None and conn in self._breakers_of(guest):
            self._breakers_of(guest).remove(conn)
            if not self._breakers_of(guest):
                self._release_breakers(guest)
        conn.file.close()
        conn.release()
        conn.sock.close()
        return State.CLOSED

    # --- actions: becoming an owner or a sharer ---------------------------------------------

    def _initialize(self, conn: Connection, request: Request) -> State | None:
        """INITIALIZE: lguest_user.c's gates first, then every part of the layout checked
        against the descriptors that came with it (fabric/handover.py), and only then is
        anything mapped. A refusal leaves the connection NEW, with nothing held."""
        pfn_limit, pgdir, start, page_offset = request.a, request.b, request.c, request.d
        fds = request.fds

        def make_memory() -> GuestMemory | None:
            # Only reached once lguest_user.c's checks (EPERM, EBUSY, ...) have passed.
            try:
                regions, control_fd, control_offset = check_layout(
                    request.tail, [fd_facts(fd) for fd in fds], pfn_limit)
            except Refused as refused:
                log("broker: launcher %d: INITIALIZE refused: %s" % (conn.pid, refused))
                return None
            try:
                self._map_layout(conn, fds, regions, control_fd, control_offset)
            except OSError as exc:
                log("broker: launcher %d: INITIALIZE: cannot map: %s"
                    % (conn.pid, exc.strerror or exc))
                conn.release()
                return None
            return conn.memory

        result = conn.file.initialize(pfn_limit, pgdir, start, page_offset, make_memory)
        if result < 0:
            if conn.file.guest is None:
                conn.release()        # what this attempt mapped (a guest table that was full)
            conn.reply(result)        # (EBUSY: the guest it has keeps its memory)
            return None
        self.owners[conn.file.guest.id] = conn
        conn.reply(result, a=conn.file.guest.id)
        return State.RUNNING

    def _learn_net(self, identity: tuple, fd: int) -> None:
        """A net file a launcher handed over: its name, for the capture and the rules."""
        if self.capture is not None:
            name = self.capture.learn_net(identity, fd)
        elif identity in self.nets:
            return
        else:
            source = net_source(identity, fd)
            name = self.net_names.get(os.path.realpath(source)) or netfile.net_name(source)
        if self.nets.get(identity) != name:
            self.nets[identity] = name
            self.impair.changed()

    def _map_layout(self, conn: Connection, fds: list[int], regions: list[wire.Region],
                    control_fd: int, control_offset: int) -> None:
        """Map a checked layout. Every mapping is made before any view of it, so a failed
        mmap (no memory, too many maps) closes plain mappings: nothing holds them."""
        def mapped(fd: int, length: int, offset: int) -> mmap.mmap:
            m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=offset)
            conn.mappings.append(m)
            return m

        maps = [mapped(fds[r.fd_index], r.length, r.file_offset) for r in regions]
        control = mapped(fds[control_fd], wire.CONTROL_PAGE_SIZE, control_offset)
        memory = conn.memory = GuestMemory()
        for region, m in zip(regions, maps):
            st = os.fstat(fds[region.fd_index])
            identity = (st.st_dev, st.st_ino) if region.shared else None
            memory.add_region(region.base, m, identity, "fd%d" % region.fd_index)
            if region.shared:
                self._learn_net(identity, fds[region.fd_index])
        conn.control = memoryview(control)

    def _attach(self, conn: Connection, request: Request) -> State | None:
        gid = request.a
        guest = self.engine.guests[gid] if gid < len(self.engine.guests) else None
        if guest is None:
            conn.reply(-errno.ENOENT)
            return None
        conn.file.attach(guest)
        conn.reply(0)
        return State.SHARING

    # --- actions: the owner's hypercalls ------------------------------------------------------

    def _hypercall(self, conn: Connection, request: Request) -> State:
        guest = conn.file.guest
        started = time.perf_counter()
        # Only a guest that batches (its async ring holds queued calls) gets its receivers'
        # wake-ups held; one that sends a frame per synchronous call has them at once.
        batching = not ring_empty(guest)
        running_for, self.running_for = self.running_for, conn if batching else None
        try:
            outcome = conn.file.hypercall(request.a, request.b, request.c, request.d)
            self._tell_woken()
        finally:
            self.running_for = running_for
        self.counters.hypercalls += 1
        self.counters.engine_s += time.perf_counter() - started
        if isinstance(outcome, int):
            conn.reply(outcome)
            return conn.state
        if outcome.restock is not None:
            if outcome.restock.slot is None:
                # The send was this very call: once tried again, it is answered.
                return self._park(conn, outcome.restock,
                                  lambda: self._finish_hypercall(conn, guest, outcome))
            # The ring's drain stopped at it: the same call again resumes the drain. A clock
            # event the drain met before it is armed now, or the call again would lose it.
            if outcome.clockevent_ns is not None:
                self._set_clockevent(conn, outcome.clockevent_ns)
            return self._park(conn, outcome.restock, lambda: self._hypercall(conn, request))
        return self._finish_hypercall(conn, guest, outcome)

    def _finish_hypercall(self, conn: Connection, guest: Guest, outcome: Outcome) -> State:
        if outcome.clockevent_ns is not None:
            self._set_clockevent(conn, outcome.clockevent_ns)
        if outcome.halt and guest.dead is None and not self._pending(conn, guest):
            return State.HALTED       # replied to when something becomes pending
        return self._reply_to_run(conn, guest, outcome)

    def _serve_pending_dma(self, conn: Connection, _request: Request) -> None:
        """A doorbell's run of the ring stopped at a DMA for the Launcher: it is served
        first, then the guest makes this call again (FLAG_DEFERRED), and that call runs the
        rest of the ring."""
        dma, key = conn.file.guest.pending_dma
        conn.control[wire.CONTROL_PENDING_DMA] = 0
        conn.reply(0, wire.FLAG_PENDING_DMA | wire.FLAG_DEFERRED, dma, key)

    def _kill(self, conn: Connection, request: Request) -> None:
        """The Launcher found its guest at fault (a bad pointer in a device request)."""
        self.engine.kill_guest(conn.file.guest, request.tail.decode(errors="replace"))
        self._tell_woken()
        conn.reply(0)

    def _answer(self, conn: Connection, _arg) -> State:
        return self._reply_to_run(conn, conn.file.guest)

    def _reply_to_run(self, conn: Connection, guest: Guest,
                      outcome: Outcome | None = None) -> State:
        """The reply that lets a guest run again — dead, pending DMA, or its result — and the
        state it leaves the connection in."""
        if guest.dead is not None:
            conn.reply(-errno.ENOENT, wire.FLAG_DEAD, tail=guest.dead.encode())
            return State.DEAD
        flags = wire.FLAG_AGAIN if self._breakers_of(guest) else 0
        result = outcome.result if outcome is not None else 0
        if outcome is not None and outcome.deferred:
            flags |= wire.FLAG_PENDING_DMA | wire.FLAG_DEFERRED
        if guest.pending_dma is not None:
            dma, key = guest.pending_dma
            conn.reply(result, flags | wire.FLAG_PENDING_DMA, dma, key)
        else:
            conn.reply(result, flags)
        return State.RUNNING

    def _pending(self, conn: Connection, guest: Guest) -> bool:
        """Would this halted guest wake now? (fabric.wakeups.wakes_halted)"""
        return wakes_halted(guest, flag_bits(conn.control[:abi.LGUEST_IRQS]),
                            bool(self._breakers_of(guest)))

    # --- actions: a halted guest --------------------------------------------------------

    def _wake(self, conn: Connection, woke: tuple[int, int]) -> State | None:
        """Something was raised for a halted guest (`woke`: the lines, and how many times):
        wake it if it has not blocked it, unless the wake-up is held while its sender runs."""
        guest = conn.file.guest
        if not self._pending(conn, guest):
            return None
        raised, frames = woke
        if self.running_for is not None and self.held.hold(
                conn, guest, raised, self.running_for, time.monotonic(), frames):
            self.counters.wakes_deferred += frames
            return None
        self.counters.wakes += 1
        return self._reply_to_run(conn, guest)

    def _let_go(self, conn: Connection, _arg) -> State:
        self.counters.wakes += 1
        return self._reply_to_run(conn, conn.file.guest)

    # --- actions: BREAK (the Waker kicks its guest out to service input) ---------------------

    def _break_on(self, conn: Connection, _request: Request) -> State | None:
        error = conn.file.gate(abi.LHREQ_BREAK)
        if error:
            conn.reply(error)
            return None
        guest = conn.file.guest
        self.breakers.setdefault(guest.id, []).append(conn)    # held until BREAK 0
        owner = self.owners.get(guest.id)
        if owner is not None and owner.control is not None:
            owner.control[wire.CONTROL_BREAK] = 1              # a running guest sees it
        if owner is not None and owner is not conn:
            self._input(owner, Input.BROKEN)
        return State.BREAKING

    def _break_off(self, conn: Connection, _request: Request) -> None:
        error = conn.file.gate(abi.LHREQ_BREAK)
        if not error:
            self._release_breakers(conn.file.guest)
        conn.reply(error)

    def _release_breakers(self, guest: Guest) -> None:
        owner = self.owners.get(guest.id)
        if owner is not None and owner.control is not None:
            owner.control[wire.CONTROL_BREAK] = 0
        for waiting in self.breakers.pop(guest.id, []):
            self._input(waiting, Input.RELEASED)

    def _breakers_of(self, guest: Guest) -> list[Connection]:
        return self.breakers.get(guest.id, [])

    # --- actions: the doorbell and its ring ---------------------------------------------------

    def _notify(self, conn: Connection, _request: Request) -> None:
        """NOTIFY: this guest queued calls in its async ring; run them soon. No reply."""
        self.counters.notifies += 1
        if conn.file.guest.ring is not None:
            self.rings[conn] = None

    def _run_rings(self) -> None:
        """One pass: up to one ring's worth of queued calls of every guest on the list."""
        self.counters.ring_passes += 1
        started = time.perf_counter()
        running_for = self.running_for
        try:
            for conn in list(self.rings):
                self._input(conn, Input.RING)
                if conn.state is not State.RUNNING:
                    self._leave_run_list(conn)
        finally:
            self.running_for = running_for
        self.counters.engine_s += time.perf_counter() - started

    def _leave_run_list(self, conn: Connection) -> None:
        """The doorbell's rule: CONTROL_KICK is 1 only while the guest's ring is on the run
        list, so a ring taken off it (its guest parked, pending a DMA, halted or dead) lets
        the guest ring again; else its next queued calls would wait for a synchronous one."""
        self.rings.pop(conn, None)
        if conn.control is not None:
            conn.control[wire.CONTROL_KICK] = 0

    def _decline_ring(self, conn: Connection, _request: Request) -> None:
        """NOTIFY while the connection cannot run its ring now (pending a DMA, restocking):
        nothing runs, and the kick the guest set is taken back, so it rings again later."""
        if conn.control is not None:
            conn.control[wire.CONTROL_KICK] = 0

    def _run_ring(self, conn: Connection, _arg) -> State | None:
        guest = conn.file.guest
        outcome = Outcome()
        self.running_for = conn
        self.counters.ring_calls += drain_async(self.engine, guest, outcome, RING_PASS_CALLS)
        self._tell_woken()
        if outcome.clockevent_ns is not None:
            self._set_clockevent(conn, outcome.clockevent_ns)
        if outcome.restock is not None:
            return self._park(conn, outcome.restock, lambda: self._ring_again(conn))
        if guest.dead is not None:
            return State.DEAD
        if guest.pending_dma is not None:
            # Its next call hears of it first; flagged before the kick is cleared, so a
            # launcher that sees no kick sees this too (it then sends its HALT).
            conn.control[wire.CONTROL_PENDING_DMA] = 1
            return State.PENDING_DMA
        if ring_empty(guest):
            # Dry: the guest may ring again. Look once more after saying so, for a call it
            # queued while the flag still told it we were on it.
            conn.control[wire.CONTROL_KICK] = 0
            if ring_empty(guest):
                del self.rings[conn]
            else:
                conn.control[wire.CONTROL_KICK] = 1
        return None

    def _ring_again(self, conn: Connection) -> State:
        """After a ring's send had its restock: the rest of the ring, on the next pass."""
        if conn.file.guest.dead is not None:
            return State.DEAD
        self.rings[conn] = None
        return State.RUNNING

    # --- held wake-ups --------------------------------------------------------------------

    def _flush_wakes(self) -> None:
        """Let held wake-ups go whose sender stopped running, or that waited too long."""
        for conn in self.held.due(time.monotonic(), self._still_running):
            self._input(conn, Input.LET_GO)

    @staticmethod
    def _still_running(sender: Connection | None) -> bool:
        return sender is not None and sender.file.guest is not None and running(sender.state)

    # --- what the engine reported -------------------------------------------------------

    def _tell_woken(self) -> None:
        """After an engine operation, outside lguest_lock: tell every guest it woke, once.
        A drained ring raises one receiver's interrupt frame after frame; the flags read the
        same after the first, so each guest is told once, in the order it first woke, with
        how many times it did (the held wake-ups count frames)."""
        if self.engine.woken:
            for guest, frames in Counter(self.engine.take_woken()).items():
                self._tell(guest, frames)

    def _tell(self, guest: Guest, frames: int) -> None:
        """An interrupt was raised for this guest (`frames` times), or it was killed: set
        the flags its launcher polls, then it is the connection's input."""
        conn = self.owners.get(guest.id)
        if conn is None or conn.control is None:
            return
        raised = bits = guest.irqs_pending
        guest.irqs_pending = 0
        control = conn.control
        while bits:
            low = bits & -bits
            control[wire.CONTROL_IRQ_FLAGS + low.bit_length() - 1] = 1
            bits ^= low
        if guest.dead is not None:
            control[wire.CONTROL_DEAD] = 1
            self._input(conn, Input.DIED)
        else:
            self._input(conn, Input.WAKE, (raised, frames))

    # --- one chance to restock ----------------------------------------------------------

    def _park(self, conn: Connection, restock: Restock, then) -> State:
        """A send of conn's found no free buffer: hold conn's requests, give the receiver
        its chance to run, and try again from the loop (`_retry_parked`)."""
        self.counters.restocks += 1
        self._leave_run_list(conn)
        conn.parked = True
        self._watch(conn)
        self.parked.append(Parked(conn, restock, time.monotonic(), self.restock_seconds, then))
        receiver = self.owners.get(restock.receiver.id)
        # In lguest the receiver ran on a CPU of its own meanwhile; here it may be asleep
        # with the wake-up the first try raised held back: asleep, it could not restock.
        if receiver is not None and self.held.release(receiver):
            self._input(receiver, Input.LET_GO)
        return State.RESTOCKING

    def _retry_parked(self, busy: bool) -> None:
        """The final try of every parked send whose receiver has a free buffer (or is
        gone), or whose RESTOCK_SECONDS are up; then what came after it."""
        now = time.monotonic()
        ready = []
        waiting = []
        for parked in self.parked:
            receiver = parked.restock.receiver
            if (now < parked.deadline and receiver.dead is None
                    and self.engine.guests[receiver.id] is receiver
                    and not has_free_buffer(receiver)):
                waiting.append(parked)
            else:
                ready.append(parked)
        self.parked = waiting
        for parked in ready:
            self.counters.restock_s += now - parked.started
            sent = finish_restock(self.engine, parked.restock)
            if self.trace is not None:
                self.trace.restock(parked.restock.sender, parked.restock.receiver,
                                   parked.started, now, sent.value)
            self._tell_woken()
            self._listen_to(parked.conn)
            self._input(parked.conn, Input.RESTOCKED, parked)
        if waiting and not busy:
            os.sched_yield()          # the receivers run on the other CPU (or on this one)

    def _resume(self, conn: Connection, parked: Parked) -> State:
        return parked.then()

    # --- the guest's clock --------------------------------------------------------------

    def _set_clockevent(self, conn: Connection, delta_ns: int) -> None:
        conn.timer_seq += 1           # any earlier event is cancelled
        if delta_ns:
            deadline = time.monotonic() + delta_ns / abi.NSEC_PER_SEC
            heapq.heappush(self.timers, (deadline, id(conn), conn.timer_seq, conn))
            if len(self.timers) > TIMERS_PER_CONNECTION * (len(self.connections) + 1):
                # Cancelled events wait in the heap until they are due: a guest that keeps
                # re-arming a long one would grow it without end. Keep the live ones only.
                self.timers = [t for t in self.timers
                               if t[2] == t[3].timer_seq and t[3].state is not State.CLOSED]
                heapq.heapify(self.timers)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, seq, conn = heapq.heappop(self.timers)
            guest = conn.file.guest
            if seq == conn.timer_seq and guest is not None and guest.dead is None:
                with self.lock:
                    self.engine.raise_irq(guest, abi.TIMER_IRQ)
                self._tell_woken()

    # --- what the lab asks --------------------------------------------------------------

    def stats(self) -> list[dict]:
        """Every guest this broker has served: the ended ones, then the live ones, each with
        the name the lab gave its launcher (None if it gave none)."""
        live = [self.guest_stats(g) for g in self.engine.guests if g is not None]
        for row in live:
            row["name"] = self.names.get(row["pid"])
        return list(self.ended) + live

    def broker_stats(self) -> dict:
        """The broker's own counters, with its CPU time and context switches so far."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        row = self.counters.as_dict()
        row.update(pid=os.getpid(), per_frame_path=fastpath.label(),
                   fast_frames=self.engine.fast_frames, user_s=usage.ru_utime, sys_s=usage.ru_stime,
                   voluntary_switches=usage.ru_nvcsw, involuntary_switches=usage.ru_nivcsw)
        return row

    def bindings(self) -> dict:
        """The dma_hash view (fabric/dmahash.py), taken under lguest_lock between two
        operations; each guest with its name, what its connection waits for, and the
        interrupt lines raised that its launcher has not yet taken."""
        with self.lock:
            view = dmahash.snapshot(self.engine)
        for row in view["guests"]:
            conn = self.owners.get(row["guest"])
            row["name"] = self.names.get(row["pid"])
            # What its connection waits for (fabric/connection.py's states), or why it has none
            row["state"] = "dead" if row["dead"] is not None else \
                "closing" if conn is None else conn.state.value
            row["irq_flags"] = [] if conn is None or conn.control is None else [
                line for line in range(abi.LGUEST_IRQS)
                if conn.control[wire.CONTROL_IRQ_FLAGS + line]]
        return view

    @staticmethod
    def guest_stats(guest: Guest) -> dict:
        row = {"guest": guest.id, "pid": guest.owner, "dead": guest.dead}
        row.update(guest.counters.as_dict())
        return row


def raise_fd_limit() -> None:
    """Every guest costs the broker a socket and a descriptor per mapping (mmap keeps one):
    a 1024 soft limit is about 200 guests. Take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_broker(socket_path: str, watch_fd: int | None = None, ready_fd: int | None = None,
               capture_dir: str | None = None, net_names: dict[str, str] | None = None,
               owns_directory: bool = False, on_listening=None,
               first_guest_id: int = 0, trace_stream: str | None = None, seed: int = 0,
               guest_names: tuple = (), capture_max: int | None = None) -> None:
    """Serve until told to stop. With owns_directory (a lab's private runtime directory),
    the directory goes with the broker, so even a SIGKILLed lab leaves nothing behind.
    on_listening() runs once the socket is bound (so "listening" is never said in vain).
    With trace_stream, the broker's timeline events go there (lgnet.timeline); a trace
    needs the capture (its send numbers key the flows). An OSError of the socket (in use,
    no permission) is the user's: an LgnetError."""
    if trace_stream is not None and capture_dir is None:
        raise LgnetError("broker: --trace-stream needs --capture (its send numbers key the "
                         "trace's flows)")
    raise_fd_limit()
    try:
        try:
            capture = Capture(capture_dir, net_names, seed=seed, max_bytes=capture_max) \
                if capture_dir is not None else None
            trace = BrokerTrace(trace_stream, capture) if trace_stream is not None else None
            broker = Broker(socket_path, watch_fd, capture, first_guest_id, trace=trace,
                            seed=seed, net_names=net_names, guest_names=guest_names)
        except OSError as exc:
            raise LgnetError("broker: %s" % (exc.strerror or exc)) from None
        if on_listening is not None:
            on_listening()
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)
        broker.serve_forever()
    finally:
        if owns_directory:
            shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)


def check_first_guest_id(first: int) -> int:
    if not 0 <= first <= abi.GUEST_ID_LIMIT - abi.MAX_GUESTS:
        raise LgnetError("--first-guest-id must be from 0 to %d, got %d"
                         % (abi.GUEST_ID_LIMIT - abi.MAX_GUESTS, first))
    return first


def parse_net_name(text: str) -> tuple[str, str]:
    """--net NAME=PATH -> (PATH, NAME)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise LgnetError("--net wants NAME=PATH, got %r" % text)
    return path, name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker's user options (`lgnet broker` has these and no others)."""
    parser.add_argument("--socket", help="socket path (default: $LGNET_BROKER or per-user)")
    parser.add_argument("--capture", metavar="DIR",
                        help="record every delivery: one pcapng per net file in DIR")
    parser.add_argument("--net", action="append", default=[], metavar="NAME=PATH",
                        help="name this net file, for its capture and impairments "
                             "(default: its file name)")
    parser.add_argument("--first-guest-id", type=int, default=0, metavar="N",
                        help="number guests from N (lguest_net's MAC is 02:00:<guest id>:00:00: "
                             "Hosts whose nets an uplink joins need ranges apart)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every impairment decision (default 0)")
    parser.add_argument("--guest", action="append", default=[], metavar="NAME",
                        help="a guest name impairment rules may use before it runs")
    parser.add_argument("--capture-max", type=capture_size, metavar="BYTES",
                        help="stop each capture file before it grows past BYTES "
                             "(suffix K, M or G); the lab goes on")


def main(argv: list[str] | None = None) -> int:
    """`python -m lgnet.fabric.broker`: the broker as a lab starts it — the user options and
    the lab's own (the pipe it watches, the pipe it says READY on, its directory)."""
    parser = argparse.ArgumentParser(prog="python -m lgnet.fabric.broker")
    add_arguments(parser)
    parser.add_argument("--watch-fd", type=int, help="exit when this pipe reaches EOF")
    parser.add_argument("--ready-fd", type=int, help="write READY here once listening")
    parser.add_argument("--owns-directory", action="store_true",
                        help="remove the socket's directory on the way out")
    parser.add_argument("--die-with-parent", action="store_true")
    parser.add_argument("--trace-stream", metavar="FILE",
                        help="write the broker's timeline events here (the lab merges them)")
    args = parser.parse_args(argv)

    def run() -> int:
        if args.die_with_parent:
            process.die_with_parent()
        run_broker(args.socket or wire.default_socket_path(), args.watch_fd, args.ready_fd,
                   args.capture, dict(parse_net_name(text) for text in args.net),
                   args.owns_directory, capture_max=args.capture_max,
                   first_guest_id=check_first_guest_id(args.first_guest_id),
                   trace_stream=args.trace_stream, seed=args.seed,
                   guest_names=tuple(args.guest))
        return 0
    return process.entry_main(run)


if __name__ == "__main__":
    sys.exit(main())
