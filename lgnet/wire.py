"""What travels between a launcher and the broker: lgnet's /dev/lguest.

Rules of this file: both wings import it and it imports neither; it knows the shape of every
message and nothing of what the messages mean. Messages are fixed binary records over a UNIX
SOCK_SEQPACKET socket (one message per datagram, never pickled): payloads never travel here —
guest memory is shared, so a frame crosses the fabric as one copy inside the broker.

Theory of operation. A launcher connects, then writes INITIALIZE (lguest's LHREQ_INITIALIZE)
with its memory layout: the file descriptors of its guest RAM (POSIX shared memory) and of
each net file travel with the message (SCM_RIGHTS), so no name has to outlive the hand-over.
Afterwards every guest hypercall that needs the Host is one HCALL request and one reply;
GETDMA, IRQ and BREAK are lguest's requests of the same name. Interrupts raised while the
guest runs are not messages: the broker sets a byte per interrupt line in the launcher's
control page (shared memory), which the running guest polls; a guest waiting in HALT gets its
reply when something becomes pending. A reply may also carry "dead" (with lguest's reason),
"pending DMA" (the guest sent to a private key: the Launcher's devices must serve it; with
"deferred", the call itself has not run yet) or "again" (a BREAK kicked the guest out).
"""
from __future__ import annotations

import array
import errno
import os
import socket
import struct
from dataclasses import dataclass

from lgnet import abi

# --- requests: op + four u32 arguments (+ an op-specific tail) ----------------------------

REQUEST = struct.Struct("=IIIII")
OP_INITIALIZE = abi.LHREQ_INITIALIZE    # pfn_limit, pgdir, start, page_offset + layout
OP_GETDMA = abi.LHREQ_GETDMA            # key
OP_IRQ = abi.LHREQ_IRQ                  # irq
OP_BREAK = abi.LHREQ_BREAK              # 1 (kick out and wait) or 0 (release)
OP_HCALL = 16                           # eax, edx, ebx, ecx
OP_ATTACH = 17                          # act for guest <arg0> (the Waker's shared fd)
OP_KILL = 18                            # tail: the reason the launcher found (a guest fault)
OP_STATS = 19                           # the lab asks for per-guest counters (JSON reply)
OP_NAME = 20                            # the lab names the guest of launcher pid <arg0>: tail
OP_NOTIFY = 21                          # doorbell: run my async hypercall ring; no reply
OP_BROKER_STATS = 22                    # the broker's own counters and times (JSON reply)
OP_IMPAIR = 23                          # the lab changes impairments: JSON tail and reply
OP_BINDINGS = 24                        # the dma_hash view, read-only (JSON reply)
OP_NAMES = {OP_INITIALIZE: "INITIALIZE", OP_GETDMA: "GETDMA", OP_IRQ: "IRQ",
            OP_BREAK: "BREAK", OP_HCALL: "HCALL", OP_ATTACH: "ATTACH", OP_KILL: "KILL",
            OP_STATS: "STATS", OP_NAME: "NAME", OP_NOTIFY: "NOTIFY",
            OP_BROKER_STATS: "BROKER_STATS", OP_IMPAIR: "IMPAIR", OP_BINDINGS: "BINDINGS"}

# --- replies: result (negative errno on error) + flags + two u32 (+ tail) -----------------

REPLY = struct.Struct("=iIII")
FLAG_DEAD = 1            # tail: the reason
FLAG_PENDING_DMA = 2     # arg0 = dma address, arg1 = key
FLAG_AGAIN = 4           # EAGAIN: a BREAK kicked the guest out of run/HALT
FLAG_DEFERRED = 8        # with PENDING_DMA: the async ring stopped before this call ran;
                         # serve the DMA, then make the call again

# --- INITIALIZE's layout tail -------------------------------------------------------------

LAYOUT_HEADER = struct.Struct("=IIQ")    # region count, control fd index, control offset
REGION = struct.Struct("=QQQII")         # guest-physical base, length, file offset, fd, shared
MAX_FDS = 64
UCRED = struct.Struct("3i")              # struct ucred: pid, uid, gid (SO_PEERCRED)
MAX_REGIONS = MAX_FDS                    # a layout names at most this many regions
MAX_MESSAGE = 65536

# --- the control page (lgnet's, not lguest's): the broker's doorbell to a running guest ----

CONTROL_PAGE_SIZE = abi.PAGE_SIZE
CONTROL_IRQ_FLAGS = 0                    # one byte per interrupt line: 1 = pending
CONTROL_DEAD = abi.LGUEST_IRQS           # 1 = the Host killed this guest
# 1 = the broker has this guest's async ring on its list (a NOTIFY is on its way or being
# served): the guest rings the doorbell only while this is 0, the broker clears it once the
# ring is empty. One message per burst of queued calls, not one per call.
CONTROL_KICK = CONTROL_DEAD + 1
# 1 = a BREAK waits for this guest (lguest's break_out): a guest that runs without hypercalls
# makes one at its next exit, whose reply carries FLAG_AGAIN.
CONTROL_BREAK = CONTROL_KICK + 1
# 1 = a doorbell's run of the ring stopped at a DMA for the Launcher: the next call hears of it
# first. Set before CONTROL_KICK is cleared; with it set, a HALT is never answered in the
# launcher (guest/host.py), as lguest returned a pending DMA before the guest ran again.
CONTROL_PENDING_DMA = CONTROL_BREAK + 1


@dataclass(frozen=True)
class Region:
    """One piece of guest-physical memory backed by a file the launcher hands over."""
    base: int
    length: int
    file_offset: int
    fd_index: int
    shared: bool


@dataclass(frozen=True)
class Reply:
    result: int
    flags: int = 0
    arg0: int = 0
    arg1: int = 0
    tail: bytes = b""

    @property
    def dead(self) -> str | None:
        return self.tail.decode(errors="replace") if self.flags & FLAG_DEAD else None


def encode_request(op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
                   tail: bytes = b"") -> bytes:
    return REQUEST.pack(op, a & abi.U32_MASK, b & abi.U32_MASK, c & abi.U32_MASK,
                        d & abi.U32_MASK) + tail


def encode_layout(regions: list[Region], control_fd: int, control_offset: int) -> bytes:
    out = [LAYOUT_HEADER.pack(len(regions), control_fd, control_offset)]
    out += [REGION.pack(r.base, r.length, r.file_offset, r.fd_index, int(r.shared))
            for r in regions]
    return b"".join(out)


def decode_layout(tail: bytes) -> tuple[list[Region], int, int]:
    """Raises ValueError on a malformed layout (the broker refuses the launcher)."""
    count, control_fd, control_offset = LAYOUT_HEADER.unpack_from(tail)
    need = LAYOUT_HEADER.size + count * REGION.size
    if len(tail) != need:
        raise ValueError("layout of %d regions needs %d bytes, got %d" % (count, need, len(tail)))
    regions = []
    for i in range(count):
        base, length, off, fd_index, shared = REGION.unpack_from(
            tail, LAYOUT_HEADER.size + i * REGION.size)
        regions.append(Region(base, length, off, fd_index, bool(shared)))
    return regions, control_fd, control_offset


def encode_reply(reply: Reply) -> bytes:
    return REPLY.pack(reply.result, reply.flags, reply.arg0 & abi.U32_MASK,
                      reply.arg1 & abi.U32_MASK) + reply.tail


def decode_reply(data: bytes) -> Reply:
    result, flags, a0, a1 = REPLY.unpack_from(data)
    return Reply(result, flags, a0, a1, bytes(data[REPLY.size:]))


# --- the socket ---------------------------------------------------------------------------

def default_socket_path() -> str:
    """The per-user broker socket: $LGNET_BROKER, else under $XDG_RUNTIME_DIR or /tmp."""
    env = os.environ.get("LGNET_BROKER")
    if env:
        return env
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, "lgnet-%d" % os.getuid(), "broker.sock")


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it (b"" means the peer closed)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


QUERY_SECONDS = 5.0                      # how long a query waits for a broker's answer


class BrokerGone(Exception):
    """The broker closed the connection (it exited or was killed)."""


class BrokerRefuses(PermissionError):
    """The broker at this path runs as another user: it would close our connection."""

    def __init__(self, path: str, uid: int):
        super().__init__(errno.EACCES, "the broker at %s runs as uid %d and takes only its own "
                         "user's launchers (this is uid %d): start a broker of your own, or "
                         "point --broker elsewhere" % (path, uid, os.getuid()))
        self.uid = uid


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    pid, uid, _gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  UCRED.size))
    return pid, uid


class Channel:
    """A launcher's line to the broker: one request, one reply, in order."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.connect(path)
            # The broker serves its own user only (it checks our uid the same way): say so
            # now, rather than "the broker went away" when it closes on us.
            _pid, uid = peer_uid(self.sock)
        except OSError:
            self.sock.close()
            raise
        if uid != os.getuid():
            self.sock.close()
            raise BrokerRefuses(path, uid)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
             tail: bytes = b"", fds: list[int] | None = None) -> None:
        try:
            send_fds(self.sock, encode_request(op, a, b, c, d, tail), fds or [])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BrokerGone(str(exc)) from None

    def receive(self) -> Reply:
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except ConnectionResetError:
            data = b""
        if not data:
            raise BrokerGone("the broker closed the connection")
        return decode_reply(data)

    def call(self, op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0,
             tail: bytes = b"", fds: list[int] | None = None) -> Reply:
        self.send(op, a, b, c, d, tail, fds)
        return self.receive()

    def query(self, op: int, timeout: float = QUERY_SECONDS) -> Reply:
        """A request whose JSON reply may outgrow MAX_MESSAGE (STATS of a lab of hundreds
        of guests, BINDINGS): the reply's real size is peeked first (MSG_TRUNC reports it),
        so nothing is cut. A broker that does not answer within `timeout` (stopped, or busy
        elsewhere) is BrokerGone: whoever asks — `lgnet status` over every lab — goes on.
        Not for the hot path: it costs one more system call."""
        self.send(op)
        self.sock.settimeout(timeout)
        try:
            size = self.sock.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
            data = self.sock.recv(max(size, 1))
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            raise BrokerGone("the broker did not answer within %gs" % timeout) from None
        finally:
            self.sock.settimeout(None)
        if not data:
            raise BrokerGone("the broker closed the connection")
        return decode_reply(data)

    def close(self) -> None:
        self.sock.close()
