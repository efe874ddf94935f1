"""A hostile-launcher fuzzer: random and mutated wire messages against a real broker, while a
good pair of guests streams checked frames beside them.

Rules of this file: it attacks only through what any launcher of the broker's user has — a
connection to its socket, the messages of wire.py, descriptors sent with them — and judges
only what a user would see: the broker process still running, still answering within
FREEZE_SECONDS, the good pair's frames all arriving intact (every frame the sender saw taken
is one the receiver verified by its CRC), and the broker's descriptors back where they were
once the hostile connections are closed. The pieces (`HostileLauncher`, `Lab`) are what the
property test in tests/ drives too; `python -m lgnet.fuzz --minutes N` runs them for longer.

What a hostile launcher sends, in any state it can reach: every request op and unknown ones,
arguments at the edges (0, 1, page boundaries, 2^31, 2^32-1), tails of random bytes or a
valid INITIALIZE layout mutated (a field replaced by an edge, a 64-bit value, a bit flipped,
cut short), and descriptors of every kind: a sealed memfd of the right size, one too small,
one unsealed, a pipe, a socket, /dev/null, none, more than the broker takes. Some become
guests first (a valid INITIALIZE) and then send random hypercalls; some never read their
replies. Left alone: the good pair's own guests. A launcher of the same user may ATTACH to
any guest and BREAK it (lguest's Waker could too) — that would stall the pair by design,
so hostile launchers ATTACH only to guest ids that are not the pair's.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from lgnet import abi, process, wire

FREEZE_SECONDS = 2.0                 # a broker that takes longer to answer is frozen
LEAK_SECONDS = 5.0                   # what the broker holds longer after a round is a leak
RAM_PAGES = 16                       # a hostile guest's RAM
LGUEST_DATA = abi.PAGE_SIZE          # where a hostile guest's lguest_data sits
EDGES = (0, 1, 2, 4, 0xFFF, abi.PAGE_SIZE, abi.PAGE_SIZE + 1, 0x7FFFFFFF, 0x80000000,
         abi.LGUEST_GUEST_TOP, abi.U32_MASK - abi.PAGE_SIZE + 1, abi.U32_MASK)
EDGES_64 = EDGES + (1 << 32, 1 << 63, (1 << 64) - 1, (1 << 64) - abi.PAGE_SIZE)
OPS = sorted(wire.OP_NAMES) + [0, 3, 15, 23, 255, abi.U32_MASK]
FD_KINDS = ("memfd", "small", "unsealed", "pipe", "socket", "devnull", "none", "many")
HYPERCALLS = (abi.LHCALL_LGUEST_INIT, abi.LHCALL_SEND_DMA, abi.LHCALL_BIND_DMA,
              abi.LHCALL_HALT, abi.LHCALL_SET_CLOCKEVENT, abi.LHCALL_CRASH, 0, 99)


def _memfd(size: int, sealed: bool = True) -> int:
    fd = os.memfd_create("lgnet-fuzz", os.MFD_ALLOW_SEALING if sealed else 0)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def make_fds(kind: str, rng: random.Random) -> list[int]:
    """Descriptors of one kind, for one message (the caller closes them after sending)."""
    ram = (RAM_PAGES + 1) * abi.PAGE_SIZE
    if kind == "memfd":
        return [_memfd(ram)]
    if kind == "small":
        return [_memfd(abi.PAGE_SIZE)]
    if kind == "unsealed":
        return [_memfd(ram, sealed=False)]
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return [r]
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return [a.detach()]
    if kind == "devnull":
        return [os.open("/dev/null", os.O_RDWR)]
    if kind == "many":
        return [os.open("/dev/null", os.O_RDONLY) for _ in range(wire.MAX_FDS + rng.randint(1, 8))]
    return []


def good_layout() -> bytes:
    """RAM at 0 and the control page right above it, both in descriptor 0."""
    ram = RAM_PAGES * abi.PAGE_SIZE
    return wire.encode_layout([wire.Region(0, ram, 0, 0, False)], 0, ram)


def mutate_layout(rng: random.Random) -> bytes:
    ram = RAM_PAGES * abi.PAGE_SIZE
    regions = [[0, ram, 0, 0, 0]]
    for _ in range(rng.choice((0, 0, 1, 2, 70))):
        regions.append([rng.choice(EDGES) & ~0xFFF, rng.choice((abi.PAGE_SIZE, ram)),
                        0, rng.randint(0, 3), rng.randint(0, 1)])
    region = rng.choice(regions)
    region[rng.randrange(5)] = rng.choice(EDGES_64 if rng.random() < 0.5 else EDGES)
    header = [len(regions), rng.choice((0, 0, 1, 9)), rng.choice((ram, 0, 1 << 63, 12))]
    data = bytearray(wire.LAYOUT_HEADER.pack(*[v & ((1 << (64 if i == 2 else 32)) - 1)
                                               for i, v in enumerate(header)]))
    for base, length, offset, fd_index, shared in regions:
        data += wire.REGION.pack(base & (1 << 64) - 1, length & (1 << 64) - 1,
                                 offset & (1 << 64) - 1, fd_index & abi.U32_MASK,
                                 shared & abi.U32_MASK)
    if rng.random() < 0.2:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.1:
        del data[rng.randrange(len(data)):]
    return bytes(data)


def random_tail(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 0, 1, 7, 24, 300))))


def arg(rng: random.Random) -> int:
    return rng.choice(EDGES) if rng.random() < 0.6 else rng.getrandbits(32)


@dataclass
class Counts:
    messages: int = 0
    connections: int = 0
    crashes: int = 0
    freezes: int = 0
    frames_sent: int = 0
    frames_verified: int = 0
    frames_lost: int = 0
    corrupt: int = 0
    fd_leak: int = 0
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class HostileLauncher:
    """One connection to the broker, sending what `rng` says."""

    def __init__(self, path: str, rng: random.Random, avoid_ids: set[int]):
        self.rng = rng
        self.avoid_ids = avoid_ids
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.reads = rng.random() < 0.8          # some never read their replies
        self.ram_fd: int | None = None

    def become_guest(self) -> int:
        """A valid INITIALIZE and LGUEST_INIT: the connection runs a guest with an async
        ring (RUNNING) from then on; the messages sent."""
        fd = _memfd((RAM_PAGES + 1) * abi.PAGE_SIZE)
        self.ram_fd = fd
        # An empty ring, as a guest's boot leaves it: a guest that stays alive, for a while.
        os.pwrite(fd, bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE,
                  LGUEST_DATA + abi.LGUEST_DATA_HCALL_STATUS)
        sent = self._send(wire.OP_INITIALIZE, abi.GUEST_PFN_LIMIT, 0, 0, 0, good_layout(), [fd])
        return sent + self._send(wire.OP_HCALL, abi.LHCALL_LGUEST_INIT, LGUEST_DATA, 0, 0,
                                 b"", [])

    def one(self) -> int:
        """Send one random message; how many were sent (0 if the socket would not take it)."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            op = wire.OP_INITIALIZE
            tail = mutate_layout(rng)
        elif roll < 0.55:
            op, tail = wire.OP_HCALL, b""
        else:
            op, tail = rng.choice(OPS), random_tail(rng)
        a, b, c, d = arg(rng), arg(rng), arg(rng), arg(rng)
        if op == wire.OP_HCALL:
            a = rng.choice(HYPERCALLS)
        if op == wire.OP_ATTACH and a in self.avoid_ids:
            a = abi.MAX_GUESTS - 1 - rng.randrange(8)
        if op == wire.OP_INITIALIZE and rng.random() < 0.5:
            a = abi.GUEST_PFN_LIMIT
        return self.send(op, a, b, c, d, tail, rng.choice(FD_KINDS))

    def send(self, op: int, a: int, b: int, c: int, d: int, tail: bytes, fd_kind: str) -> int:
        """One message with descriptors of `fd_kind`; 1 if the socket took it."""
        if op == wire.OP_ATTACH and a in self.avoid_ids:
            return 0
        fds = make_fds(fd_kind, self.rng)
        try:
            return self._send(op, a, b, c, d, tail, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _send(self, op, a, b, c, d, tail, fds) -> int:
        data = wire.encode_request(op, a, b, c, d, tail)[:wire.MAX_MESSAGE]
        if self.rng.random() < 0.05:
            data = data[:self.rng.randrange(len(data) + 1)]       # a short request
        try:
            wire.send_fds(self.sock, data, fds)
        except (BlockingIOError, OSError):
            return 0
        if self.reads:
            self.drain()
        return 1

    def drain(self) -> None:
        while True:
            try:
                if not self.sock.recv(wire.MAX_MESSAGE):
                    return
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        if self.ram_fd is not None:
            os.close(self.ram_fd)


def bench_result(path: str) -> dict:
    """A bench guest's report (its result= file), or {} if it wrote none."""
    try:
        with open(path) as report:
            return json.load(report)
    except (OSError, ValueError):
        return {}


class Lab:
    """A real broker process and a good pair of Python guests streaming checked frames."""

    def __init__(self, stream_seconds: float):
        self.dir = tempfile.mkdtemp(prefix="lgnet-fuzz-")
        self.path = os.path.join(self.dir, "broker.sock")
        self.net = os.path.join(self.dir, "lan0.net")
        ready_r, ready_w = os.pipe()
        self.log = os.path.join(self.dir, "broker.log")
        with open(self.log, "wb") as log:
            self.broker = subprocess.Popen(
                process.child_command("lgnet.fabric.broker", "--socket", self.path,
                                      "--ready-fd", str(ready_w)),
                pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stderr=log)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            if not process.readable([ready], 30) or not ready.readline():
                raise RuntimeError("the broker did not start")
        seconds = "seconds=%g" % stream_seconds
        self.results = [os.path.join(self.dir, role + ".json") for role in ("recv", "send")]
        self.pair = [self._guest("role=recv", seconds, "result=" + self.results[0]),
                     self._guest("role=send", "peers=1", seconds, "result=" + self.results[1])]
        self.pair_ids = self._wait_for_pair()
        self.baseline = self.fd_table()
        self.baseline_fds = len(self.baseline)

    def _guest(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            process.child_command("lgnet.guest.launcher", "--broker", self.path,
                                  "--no-console-input", "--sharenet", self.net, "16",
                                  "python:lgnet.guest.benchguests", *args),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def _wait_for_pair(self) -> set[int]:
        deadline = time.monotonic() + 30
        pids = {p.pid for p in self.pair}
        while time.monotonic() < deadline:
            rows = self.call(wire.OP_STATS)
            ids = {row["guest"] for row in rows or () if row["pid"] in pids}
            if len(ids) == 2:
                return ids
            time.sleep(0.05)
        raise RuntimeError("the good pair did not come up")

    def call(self, op: int):
        """A STATS-like request answered within FREEZE_SECONDS, or None (frozen)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(FREEZE_SECONDS)
            sock.connect(self.path)
            sock.send(wire.encode_request(op))
            return json.loads(wire.decode_reply(sock.recv(wire.MAX_MESSAGE)).tail)
        except (OSError, ValueError):
            return None
        finally:
            sock.close()

    def alive(self) -> bool:
        return self.broker.poll() is None

    def last_words(self) -> str:
        """The end of the broker's stderr: its traceback, if it died of one."""
        with open(self.log, "rb") as log:
            return log.read()[-3000:].decode(errors="replace")

    def fd_table(self) -> set[str]:
        """The broker's descriptors, each as "fd -> what it is"."""
        fds = "/proc/%d/fd" % self.broker.pid
        table = set()
        for name in os.listdir(fds):
            try:
                table.add("%s -> %s" % (name, os.readlink(os.path.join(fds, name))))
            except OSError:
                pass
        return table

    def broker_fds(self) -> int:
        return len(os.listdir("/proc/%d/fd" % self.broker.pid))

    def finish(self, counts: Counts) -> None:
        """Let the stream end, and count what the pair saw."""
        outs = []
        for guest in reversed(self.pair):           # the sender ends first, then its receiver
            try:
                outs.append(guest.communicate(timeout=120)[0].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                guest.kill()
                outs.append(guest.communicate()[0].decode(errors="replace"))
                counts.notes.append("a good guest did not end")
        got, sent = (bench_result(path) for path in self.results)
        counts.frames_sent += sent.get("ok", 0)
        counts.frames_verified += got.get("verified", 0)
        counts.corrupt += got.get("corrupt", 0)
        counts.frames_lost += max(0, sent.get("ok", 0) - got.get("verified", 0))
        if not sent or not got:
            counts.notes.append("the good pair did not report: %r" % outs)

    def close(self) -> None:
        for proc in self.pair + [self.broker]:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        shutil.rmtree(self.dir, ignore_errors=True)


def attack(lab: Lab, rng: random.Random, counts: Counts, messages: int,
           connections: int = 8) -> None:
    """`messages` hostile messages over `connections` connections at a time, then a look:
    alive, not frozen, and no descriptor left behind once they are closed."""
    hostile = []
    for _ in range(connections):
        try:
            h = HostileLauncher(lab.path, rng, lab.pair_ids)
        except OSError:
            continue
        counts.connections += 1
        if rng.random() < 0.4:
            counts.messages += h.become_guest()
        hostile.append(h)
    for _ in range(messages):
        if not hostile:
            break
        counts.messages += rng.choice(hostile).one()
    for h in hostile:
        h.close()
    check(lab, counts)


def check(lab: Lab, counts: Counts) -> None:
    if not lab.alive():
        counts.crashes += 1
        counts.notes.append("the broker died: %s" % lab.last_words())
        return
    if lab.call(wire.OP_BROKER_STATS) is None and lab.alive():
        counts.freezes += 1
    # The broker closes what it hears hung up on its next passes.
    deadline = time.monotonic() + LEAK_SECONDS
    while lab.broker_fds() > lab.baseline_fds and time.monotonic() < deadline:
        time.sleep(0.02)
    extra = lab.broker_fds() - lab.baseline_fds
    if extra > 0:
        counts.notes.append("%d descriptors above the baseline after %d messages: %s"
                            % (extra, counts.messages, sorted(lab.fd_table() - lab.baseline)))
    counts.fd_leak = max(counts.fd_leak, extra)


def run(minutes: float, seed: int | None = None, out=sys.stdout) -> Counts:
    seed = seed if seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    counts = Counts()
    lab = Lab(stream_seconds=minutes * 60 + 5)
    try:
        end = time.monotonic() + minutes * 60
        rounds = 0
        while time.monotonic() < end and lab.alive():
            attack(lab, rng, counts, messages=200)
            rounds += 1
            if rounds % 50 == 0 and out is not None:
                print("fuzz: %d messages, %d connections, crashes %d, freezes %d"
                      % (counts.messages, counts.connections, counts.crashes, counts.freezes),
                      file=out, flush=True)
        lab.finish(counts)
    finally:
        lab.close()
    counts.notes.append("seed %d" % seed)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lgnet.fuzz",
                                     description="hostile launchers against a real broker, "
                                     "a good pair streaming beside them")
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    counts = run(args.minutes, args.seed)
    print(json.dumps(counts.as_dict()))
    bad = counts.crashes or counts.freezes or counts.frames_lost or counts.corrupt \
        or counts.fd_leak or not counts.frames_sent
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
