"""The anchors of `lgnet bench`: what this machine does without lgnet, measured the same way.

- socketpair: an AF_UNIX SOCK_SEQPACKET socketpair between two processes, what a user would
  write instead of lgnet. Stream (messages/s, MB/s) and ping-pong (one-way latency).
- copy: one process copying frames between two shared-memory buffers. lgnet copies every
  frame exactly once, so this is the most it could ever do: the one-copy limit.
- netns: network namespaces joined by veth pairs to a Linux bridge, as Mininet builds them,
  with UDP (stream, ping-pong, broadcast fan-out). Root only.

Rules of this file: every endpoint does what a bench guest does. Senders stamp a sequence
number and a CRC-32 into prepared frames; receivers verify every message with
benchguests.verify and count only intact ones. So the anchors and lgnet do the same work at
both ends and only the transport differs.

Each measurement runs in a helper process of its own (`python -m lgnet.anchors KIND ...`,
one JSON line out), which forks the endpoints: the helper has no threads, so forking is safe
whatever the caller runs. The namespace lab is built and torn down by that helper, in a
`finally`, under names carrying its pid; nothing of it outlives the run.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import socket
import subprocess
import sys
import time

from lgnet import abi, process
from lgnet.guest.benchguests import (END_SEQ, MIN_FRAME, NOT_VERIFIED, PERCENTILES,
                                     TX_FRAMES, frame_template, prefix_crc, stamp, verify)

HELPER_TIMEOUT_GRACE = 30.0           # seconds a helper may take beyond its measuring time
END_MESSAGE = b"\0"                   # one byte: the stream is over (never a valid frame)
START_BYTE = b"s"
UDP_PORT = 7077
UDP_OVERHEAD = abi.ETH_HLEN + 20 + 8  # Ethernet + IPv4 + UDP headers around a datagram
UDP_MAX_PAYLOAD = 65507               # the largest UDP datagram over IPv4
NETNS_SUBNET = "10.77.%d.%d"          # hosts are 10.77.0.1, 10.77.0.2, ... on one bridge
NETNS_PREFIX = 16
NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
RCVBUF_BYTES = 4 * 1024 * 1024        # as a tuned Mininet host would have
LATENCY_TIMEOUT = 1.0                 # a lost UDP ping-pong frame ends the measurement
ROOT_UID = 0


# --- frames, as the bench guests make them ----------------------------------------------------

class Frames:
    """TX_FRAMES prepared frames of `size` bytes; next(seq) stamps one and returns it."""

    def __init__(self, size: int, seed: int = 1):
        rng = random.Random(seed)
        self.size = size
        self.bufs = [frame_template(abi.BROADCAST_MAC, bytes(abi.ETH_ALEN), size, rng)
                     for _ in range(TX_FRAMES)]
        self.prefix = [prefix_crc(buf) for buf in self.bufs]

    def next(self, seq: int) -> bytearray:
        b = seq % TX_FRAMES
        stamp(self.bufs[b], 0, self.size, seq, self.prefix[b])
        return self.bufs[b]


class Counter:
    """A receiver's tally, as RxCheck keeps it in a bench guest."""

    def __init__(self, size: int):
        self.size = size
        self.buf = bytearray(max(size, MIN_FRAME))
        self.view = memoryview(self.buf)
        self.verified = self.corrupt = 0
        self.t_first = self.t_last = 0.0
        self.ended = False

    def take(self, n: int) -> int:
        seq = verify(self.view[:n]) if n == self.size else NOT_VERIFIED
        if seq == END_SEQ or (n == len(END_MESSAGE) and self.buf[0] == 0):
            self.ended = True
        elif seq == NOT_VERIFIED:
            self.corrupt += 1
        else:
            self.verified += 1
            self.t_last = time.monotonic()
            if not self.t_first:
                self.t_first = self.t_last
        return seq

    def report(self) -> dict:
        return {"verified": self.verified, "corrupt": self.corrupt, "t_first": self.t_first,
                "t_last": self.t_last}


def percentiles(rtts: list[int]) -> dict:
    """One-way latency from round trips (ns): half of each, in microseconds."""
    rtts = sorted(rtts)
    if not rtts:
        return {"rounds": 0}
    out = {"rounds": len(rtts)}
    for p in PERCENTILES:
        out["p%d_us" % p] = rtts[min(len(rtts) - 1, len(rtts) * p // 100)] / 2 / 1000
    return out


# --- forked endpoints -------------------------------------------------------------------------

def fork_endpoint(body, *args) -> tuple[int, int]:
    """Run body(*args) in a child; it returns a dict that comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        status = 0
        try:
            result = body(*args)
        except BaseException as exc:           # report, never unwind into the parent's code
            result = {"error": "%s: %s" % (type(exc).__name__, exc)}
            status = 1
        with os.fdopen(w, "w") as out:
            out.write(json.dumps(result))
        os._exit(status)
    os.close(w)
    return pid, r


def collect(pid: int, fd: int) -> dict:
    with os.fdopen(fd) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(text or "{}")
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


# --- socketpair -------------------------------------------------------------------------------

def _sp_receiver(sock: socket.socket, size: int) -> dict:
    counter = Counter(size)
    while not counter.ended:
        counter.take(sock.recv_into(counter.buf))
    return counter.report()


def socketpair_stream(size: int, seconds: float) -> dict:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid, fd = fork_endpoint(lambda: (mine.close(), _sp_receiver(theirs, size))[1])
    theirs.close()
    frames = Frames(size)
    send = mine.send
    seq = 0
    t_start = time.monotonic()
    until = t_start + seconds
    while seq % abi.LHCALL_RING_SIZE or time.monotonic() < until:
        send(frames.next(seq))
        seq += 1
    mine.send(END_MESSAGE)
    result = collect(pid, fd)
    mine.close()
    result.update(sent=seq, t_start=t_start)
    return result


def socketpair_fanout(size: int, seconds: float, hosts: int) -> dict:
    """One process sending every message to hosts-1 others, a socketpair to each."""
    ends, kids = [], []
    for _ in range(hosts - 1):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        kids.append(fork_endpoint(lambda: ([e.close() for e in ends + [mine]],
                                           _sp_receiver(theirs, size))[1]))
        theirs.close()
        ends.append(mine)
    frames = Frames(size)
    sends = [end.send for end in ends]
    seq = 0
    t_start = time.monotonic()
    until = t_start + seconds
    while seq % abi.LHCALL_RING_SIZE or time.monotonic() < until:
        frame = frames.next(seq)
        for send in sends:
            send(frame)
        seq += 1
    for end in ends:
        end.send(END_MESSAGE)
    results = [collect(pid, fd) for pid, fd in kids]
    for end in ends:
        end.close()
    return {"sent": seq, "t_start": t_start, "receivers": results}


def _sp_echo(sock: socket.socket, size: int) -> dict:
    counter = Counter(size)
    while True:
        n = sock.recv_into(counter.buf)
        if counter.take(n) == NOT_VERIFIED or counter.ended:
            return counter.report()
        sock.send(counter.view[:n])


def socketpair_latency(size: int, seconds: float) -> dict:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid, fd = fork_endpoint(lambda: (mine.close(), _sp_echo(theirs, size))[1])
    theirs.close()
    frames = Frames(size)
    counter = Counter(size)
    rtts = []
    until = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < until:
        t0 = time.perf_counter_ns()
        mine.send(frames.next(seq))
        got = counter.take(mine.recv_into(counter.buf))
        t1 = time.perf_counter_ns()
        if got != seq:
            break
        rtts.append(t1 - t0)
        seq += 1
    mine.send(END_MESSAGE)
    collect(pid, fd)
    mine.close()
    return percentiles(rtts)


# --- the one-copy limit -------------------------------------------------------------------------

def copy_limit(size: int, seconds: float) -> dict:
    """Frames of `size` copied from one shared-memory buffer into another, one slice
    assignment each (as the broker copies a frame's runs), round-robin over TX_FRAMES."""
    slots = TX_FRAMES
    src = mmap.mmap(-1, size * slots)
    dst = mmap.mmap(-1, size * slots)
    src.write(random.Random(0).randbytes(size * slots))
    s, d = memoryview(src), memoryview(dst)
    n = 0
    t_start = time.perf_counter()
    until = t_start + seconds
    while True:
        for i in range(slots):
            at = i * size
            d[at:at + size] = s[at:at + size]
        n += slots
        if time.perf_counter() >= until:
            break
    elapsed = time.perf_counter() - t_start
    ok = bytes(d[:size]) == bytes(s[:size])
    s.release()
    d.release()
    src.close()
    dst.close()
    return {"frames": n, "elapsed": elapsed, "intact": ok}


# --- the kernel's own lab: network namespaces, veth, a bridge -------------------------------------

def netns_available() -> str | None:
    """None when the namespace lab can run here, else why not."""
    if os.geteuid() != ROOT_UID:
        return "not root: network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN"
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "the `ip` command (iproute2) is not installed"
    return None


class NetnsLab:
    """`hosts` namespaces h0.. with one veth each into a bridge in a switch namespace."""

    def __init__(self, hosts: int):
        tag = "lgb%d" % os.getpid()
        self.switch = tag + "s"
        self.hosts = ["%sh%d" % (tag, i) for i in range(hosts)]
        self.made: list[str] = []

    def address(self, i: int) -> str:
        return NETNS_SUBNET % ((i + 1) >> 8, (i + 1) & 0xFF)

    def broadcast(self) -> str:
        return NETNS_SUBNET % (255, 255)

    def _ip(self, commands: list[str], netns: str | None = None) -> None:
        cmd = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
        done = subprocess.run(cmd, input="\n".join(commands) + "\n", capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError("ip: %s" % done.stderr.strip())

    def up(self) -> float:
        """Build it; the seconds that took."""
        started = time.monotonic()
        self._ip(["netns add %s" % self.switch])
        self.made.append(self.switch)
        self._ip(["netns add %s" % h for h in self.hosts])
        self.made += self.hosts
        self._ip(["link add eth0 netns %s type veth peer name p%d netns %s" % (h, i, self.switch)
                  for i, h in enumerate(self.hosts)])
        self._ip(["link add br0 type bridge", "link set br0 up"]
                 + ["link set p%d master br0\nlink set p%d up" % (i, i)
                    for i in range(len(self.hosts))], self.switch)
        for i, h in enumerate(self.hosts):
            self._ip(["link set lo up", "addr add %s/%d brd + dev eth0" % (self.address(i), NETNS_PREFIX),
                      "link set eth0 up"], h)
        return time.monotonic() - started

    def down(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made.clear()

    def enter(self, i: int) -> None:
        """Move the calling (forked) process into host i's network namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(os.path.join(NETNS_DIR, self.hosts[i]), os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)


def udp_payload(size: int) -> int:
    """The datagram of a frame of `size` bytes (at least a bench frame's minimum)."""
    return min(UDP_MAX_PAYLOAD, max(MIN_FRAME, size - UDP_OVERHEAD))


def _udp_socket(broadcast: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
    if broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    return sock


def _udp_listener(lab: NetnsLab, i: int, payload: int, ready: int,
                  timeout: float) -> tuple[socket.socket, "Counter"]:
    """Host i's UDP socket on the bench port, and the counter that verifies what it gets;
    tells the parent (through `ready`) that it listens."""
    lab.enter(i)
    sock = _udp_socket()
    sock.bind(("", UDP_PORT))
    sock.settimeout(timeout)
    os.write(ready, START_BYTE)
    return sock, Counter(payload)


def _udp_receiver(lab: NetnsLab, i: int, payload: int, ready: int, stop_after: float) -> dict:
    sock, counter = _udp_listener(lab, i, payload, ready, stop_after)
    try:
        while not counter.ended:
            counter.take(sock.recv_into(counter.buf))
    except socket.timeout:
        pass
    return counter.report()


def _udp_sender(lab: NetnsLab, dest: str, payload: int, seconds: float) -> dict:
    lab.enter(0)
    sock = _udp_socket(broadcast=True)
    frames = Frames(payload)
    send = sock.sendto
    address = (dest, UDP_PORT)
    seq = 0
    t_start = time.monotonic()
    until = t_start + seconds
    while seq % abi.LHCALL_RING_SIZE or time.monotonic() < until:
        try:
            send(frames.next(seq), address)
        except OSError:                         # ENOBUFS: the kernel dropped it
            pass
        seq += 1
    for _ in range(abi.NUM_NET_RX_BUFFERS):    # UDP may lose one: send the end a few times
        send(END_MESSAGE, address)
    return {"sent": seq, "t_start": t_start}


def netns_stream(lab: NetnsLab, receivers: int, size: int, seconds: float,
                 broadcast: bool) -> dict:
    """h0 sends to h1 (or broadcasts to h1..hN): receivers' verified datagrams."""
    payload = udp_payload(size)
    ready_r, ready_w = os.pipe()
    stop_after = LATENCY_TIMEOUT          # silence this long after the stream: it is over
    kids = [fork_endpoint(_udp_receiver, lab, i, payload, ready_w, stop_after)
            for i in range(1, receivers + 1)]
    os.close(ready_w)
    for _ in kids:
        os.read(ready_r, 1)
    os.close(ready_r)
    dest = lab.broadcast() if broadcast else lab.address(1)
    sender = collect(*fork_endpoint(_udp_sender, lab, dest, payload, seconds))
    results = [collect(pid, fd) for pid, fd in kids]
    return {"payload": payload, "sent": sender["sent"], "t_start": sender["t_start"],
            "receivers": results}


def _udp_echo(lab: NetnsLab, payload: int, ready: int) -> dict:
    sock, counter = _udp_listener(lab, 1, payload, ready, LATENCY_TIMEOUT)
    try:
        while True:
            n, peer = sock.recvfrom_into(counter.buf)
            if counter.take(n) == NOT_VERIFIED or counter.ended:
                break
            sock.sendto(counter.view[:n], peer)
    except socket.timeout:
        pass
    return counter.report()


def _udp_ping(lab: NetnsLab, payload: int, seconds: float) -> dict:
    lab.enter(0)
    sock = _udp_socket()
    sock.settimeout(LATENCY_TIMEOUT)
    sock.connect((lab.address(1), UDP_PORT))
    frames = Frames(payload)
    counter = Counter(payload)
    rtts = []
    seq = 0
    until = time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            t0 = time.perf_counter_ns()
            sock.send(frames.next(seq))
            got = counter.take(sock.recv_into(counter.buf))
            t1 = time.perf_counter_ns()
            if got == seq:
                rtts.append(t1 - t0)
            seq += 1
    except socket.timeout:
        pass
    sock.send(END_MESSAGE)
    return percentiles(rtts)


def netns_latency(lab: NetnsLab, size: int, seconds: float) -> dict:
    payload = udp_payload(size)
    ready_r, ready_w = os.pipe()
    echo = fork_endpoint(_udp_echo, lab, payload, ready_w)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    result = collect(*fork_endpoint(_udp_ping, lab, payload, seconds))
    collect(*echo)
    result["payload"] = payload
    return result


# --- the helper process ---------------------------------------------------------------------------

def helper_main(argv: list[str]) -> dict:
    kind, size, seconds = argv[0], int(argv[1]), float(argv[2])
    if kind == "socketpair-stream":
        return socketpair_stream(size, seconds)
    if kind == "socketpair-latency":
        return socketpair_latency(size, seconds)
    if kind == "copy":
        return copy_limit(size, seconds)
    hosts = int(argv[3]) if len(argv) > 3 else 2
    if kind == "socketpair-fanout":
        return socketpair_fanout(size, seconds, hosts)
    lab = NetnsLab(hosts)
    try:
        built = lab.up()
        if kind == "netns-stream":
            result = netns_stream(lab, 1, size, seconds, broadcast=False)
        elif kind == "netns-latency":
            result = netns_latency(lab, size, seconds)
        elif kind == "netns-fanout":
            result = netns_stream(lab, hosts - 1, size, seconds, broadcast=True)
        elif kind == "netns-up":
            result = {}
        else:
            raise ValueError("unknown anchor %r" % kind)
        result["build_s"] = built
        return result
    finally:
        lab.down()


def run(kind: str, size: int, seconds: float, hosts: int | None = None) -> dict:
    """Measure one anchor in a helper process of its own; its figures as a dict."""
    argv = [kind, str(size), repr(seconds)] + ([str(hosts)] if hosts else [])
    done = subprocess.run(process.child_command("lgnet.anchors", *argv), capture_output=True,
                          text=True, timeout=seconds + HELPER_TIMEOUT_GRACE,
                          stdin=subprocess.DEVNULL)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError("anchor %s failed: %s" % (kind, (done.stderr or done.stdout).strip()
                                                     [-500:]))
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(helper_main(sys.argv[1:])), flush=True)
