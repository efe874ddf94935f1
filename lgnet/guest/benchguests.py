"""Benchmark guests: Python kernels that load the fabric and check every frame they get.

Run as `python:lgnet.guest.benchguests` with `role=` and options on the kernel command line:

    role=send  peers=K size=BYTES seconds=S [ring=0] [kick=0]   stream / fan-out sender
    role=recv  size=BYTES [rx=ENTRIES rxsize=BYTES] [poll=1]     receiver
    role=ping  size=BYTES seconds=S                              latency: sends, waits for echo
    role=pong  size=BYTES                                        latency: echoes what it gets
    every role: grace=S (how long past its work it waits before giving up), result=FILE (where
    it writes its report)

Rules of this file: like pvdriver's kernel, these use only what a real guest has — RAM, the
device page, hypercalls and interrupts — so every frame crosses the fabric as a Unicorn guest's
would. Each guest ends by writing its report, one JSON object, to the result= file the bench
gives it, saying on its console that it is done, and powering down. The report file is the one
thing a bench guest does that a real guest could not: it is the instrument's read-out, written
after the measured work and outside the fabric, so the bench reads structured figures and never
a console line.

Theory of operation. Every frame carries a sequence number (its last four bytes) and a CRC-32
(right after the Ethernet header) over the header, the body and the sequence number. A sender
prepares its frames once — a ring of buffers with random bodies, and the CRC of everything but
the sequence number — so sending frame n only stamps n and extends the CRC by four bytes. A
receiver recomputes the CRC over every byte it got: only frames of the right length and
checksum count as verified, so the benchmark cannot count a frame that did not arrive intact.

The sender queues its SEND_DMAs in lguest's asynchronous hypercall ring (lguest_data.hcalls)
and rings lgnet's doorbell, which costs a message only when the Host is not already running
the ring; a full ring falls back to a synchronous call, which runs the whole ring first. So a
send's used_len is known only once the ring has run: each buffer keeps one struct lguest_dma
per destination, and the result of a send is read when its buffer comes round again.
"""
from __future__ import annotations

import json
import os
import random
import struct
import time
import zlib

from lgnet import abi, process
from lgnet.guest.pvconsole import Console
from lgnet.guest.pvmachine import Machine, parse_cmdline
from lgnet.guest.pvnet import ETHERTYPE_LGNET, NetDevice, split_pages

# --- the frame: header | crc | body | seq ---------------------------------------------------

_U32 = struct.Struct("<I")
CRC_AT = abi.ETH_HLEN                  # the CRC-32 sits right after the Ethernet header
BODY_AT = CRC_AT + _U32.size
SEQ_SIZE = _U32.size                   # the sequence number ends the frame
MIN_FRAME = BODY_AT + SEQ_SIZE
END_SEQ = abi.U32_MASK                 # "the stream is over": not counted as data
NOT_VERIFIED = -1

TX_FRAMES = abi.LHCALL_RING_SIZE + 1   # a buffer is reused only after its sends have run
DEFAULT_SECONDS = 1.0
GRACE_SECONDS = 15.0                   # a guest gives up this long after its work should end
AWAIT_STEP = 0.01
END_RETRY_SECONDS = 0.001
PERCENTILES = (50, 90, 99)


def frame_template(dest: bytes, src: bytes, size: int, rng: random.Random) -> bytearray:
    """A frame of `size` bytes with a random body; crc and seq are stamped per send."""
    if size < MIN_FRAME:
        raise ValueError("a bench frame needs at least %d bytes" % MIN_FRAME)
    frame = bytearray(size)
    frame[0:abi.ETH_ALEN] = dest
    frame[abi.ETH_ALEN:2 * abi.ETH_ALEN] = src
    struct.pack_into("!H", frame, 2 * abi.ETH_ALEN, ETHERTYPE_LGNET)
    frame[BODY_AT:size - SEQ_SIZE] = rng.randbytes(size - MIN_FRAME)
    return frame


def prefix_crc(frame) -> int:
    """The CRC-32 of the header and the body: all the checksum covers but the seq."""
    return zlib.crc32(frame[BODY_AT:len(frame) - SEQ_SIZE], zlib.crc32(frame[:CRC_AT]))


def stamp(buf, at: int, size: int, seq: int, prefix: int) -> None:
    """Write seq into the frame of `size` bytes at buf[at:] and its CRC: four bytes' work."""
    end = at + size
    _U32.pack_into(buf, end - SEQ_SIZE, seq)
    _U32.pack_into(buf, at + CRC_AT, zlib.crc32(buf[end - SEQ_SIZE:end], prefix))


def verify(frame) -> int:
    """The sequence number of an intact frame, or NOT_VERIFIED."""
    n = len(frame)
    if n < MIN_FRAME:
        return NOT_VERIFIED
    if zlib.crc32(frame[BODY_AT:], zlib.crc32(frame[:CRC_AT])) != _U32.unpack_from(frame, CRC_AT)[0]:
        return NOT_VERIFIED
    return _U32.unpack_from(frame, n - SEQ_SIZE)[0]


# --- sending --------------------------------------------------------------------------------

class TxFrames:
    """`count` frame buffers of `size` bytes, each with one struct lguest_dma per destination
    key, so that every queued send has a used_len of its own."""

    def __init__(self, machine: Machine, src: bytes, dests: list[tuple[int, bytes]], size: int,
                 count: int = TX_FRAMES, seed: int = 0):
        phys = machine.phys
        rng = random.Random(seed)
        self.words = phys.ram_words
        self.ram = phys.ram
        self.size = size
        self.count = count
        self.keys = [key for key, _ in dests]
        dest_mac = dests[0][1] if len(dests) == 1 else abi.BROADCAST_MAC
        self.bufs = [machine.alloc_pages(size) for _ in range(count)]
        self.dma_block = machine.alloc(count * len(dests) * abi.LGUEST_DMA_SIZE, abi.KEY_ALIGN)
        self.prefix = []
        for b, buf in enumerate(self.bufs):
            frame = frame_template(dest_mac, src, size, rng)
            phys.write(buf, frame)
            self.prefix.append(prefix_crc(frame))
            desc = abi.pack_dma(split_pages(buf, size))
            for k in range(len(dests)):
                phys.write(self.dma(b, k), desc)
        self.inflight = [False] * count
        self.ok = self.lost = self.short = 0

    def dma(self, b: int, k: int) -> int:
        return self.dma_block + (b * len(self.keys) + k) * abi.LGUEST_DMA_SIZE

    def stamp(self, b: int, seq: int) -> None:
        stamp(self.ram, self.bufs[b], self.size, seq, self.prefix[b])

    def settle(self, b: int) -> None:
        """Read the results of buffer b's sends (they have run) and clear them for reuse.
        used_len == size: delivered; 0: nobody took it (no free buffer, even after the one
        chance to restock); anything else: truncated, a carrier error."""
        if not self.inflight[b]:
            return
        words = self.words
        at = self.dma(b, 0) >> 2
        step = abi.LGUEST_DMA_SIZE >> 2
        for _ in self.keys:
            used = words[at]
            if used == self.size:
                self.ok += 1
            elif used == 0:
                self.lost += 1
            else:
                self.short += 1
            words[at] = 0
            at += step
        self.inflight[b] = False


def blast(machine: Machine, tx: TxFrames, until: float, ring: bool, kick: bool) -> int:
    """Send frame after frame to every key until the monotonic deadline; the frames sent."""
    keys = tx.keys
    step = abi.LGUEST_DMA_SIZE
    count = tx.count
    send = machine.async_hcall if ring else machine.hcall
    seq = b = 0
    while seq % abi.LHCALL_RING_SIZE or time.monotonic() < until:
        tx.settle(b)
        tx.stamp(b, seq)
        dma = tx.dma(b, 0)
        for key in keys:
            send(abi.LHCALL_SEND_DMA, key, dma)
            dma += step
        tx.inflight[b] = True
        if ring and kick:
            machine.kick()
        seq += 1
        b = (b + 1) % count
    machine.hcall(abi.LHCALL_FLUSH_ASYNC)      # run what is queued: every used_len is known
    for b in range(count):
        tx.settle(b)
    return seq


def send_end(machine: Machine, tx: TxFrames, deadline: float) -> int:
    """One END frame to every key, retried until it is taken; how many got one."""
    tx.stamp(0, END_SEQ)
    got = 0
    for k, key in enumerate(tx.keys):
        used_at = tx.dma(0, k) >> 2
        while time.monotonic() < deadline:
            tx.words[used_at] = 0
            machine.hcall(abi.LHCALL_SEND_DMA, key, tx.dma(0, k))
            if tx.words[used_at] == tx.size:
                got += 1
                break
            machine.idle_until(time.monotonic() + END_RETRY_SECONDS)
        tx.words[used_at] = 0
    return got


# --- receiving ------------------------------------------------------------------------------

class RxCheck:
    """The receive interrupt of a bench receiver: take every used buffer from the cursor on,
    verify it, re-arm it (used_len = 0, one aligned store)."""

    def __init__(self, machine: Machine, net: NetDevice, size: int):
        self.words = machine.phys.ram_words
        self.ram = machine.phys.ram
        self.used_at = [(net.rx_array + i * abi.LGUEST_DMA_SIZE) >> 2 for i in range(net.num_rx)]
        self.bufs = net.rx_buffers
        self.num = net.num_rx
        self.size = size
        self.cursor = 0
        self.taken = self.verified = self.corrupt = self.reordered = 0
        self.last_seq = NOT_VERIFIED
        self.ended = False
        self.t_first = self.t_last = 0.0
        self.on_frame = None               # called with (seq, buffer address) when verified
        machine.handlers[net.irq] = self.take

    def take(self) -> None:
        words, ram, used_at, bufs = self.words, self.ram, self.used_at, self.bufs
        i = self.cursor
        n = 0
        while True:
            at = used_at[i]
            used = words[at]
            if not used:
                break
            buf = bufs[i]
            seq = verify(ram[buf:buf + used]) if used == self.size else NOT_VERIFIED
            if seq == NOT_VERIFIED:
                self.corrupt += 1
            elif seq == END_SEQ:
                self.ended = True
            else:
                self.verified += 1
                if seq < self.last_seq:
                    self.reordered += 1
                self.last_seq = seq
                if self.on_frame is not None:
                    self.on_frame(seq, buf)
            words[at] = 0                  # re-arm: the Host may fill it again
            i = (i + 1) % self.num
            n += 1
        self.cursor = i
        if n:
            self.taken += n
            self.t_last = time.monotonic()
            if not self.t_first:
                self.t_first = self.t_last

    def report(self) -> dict:
        return {"taken": self.taken, "verified": self.verified, "corrupt": self.corrupt,
                "reordered": self.reordered, "ended": self.ended,
                "t_first": self.t_first, "t_last": self.t_last}


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM), in KiB. Not ru_maxrss: Linux carries that
    over fork and exec, so a launcher started from a large process (a bench script, or its
    spawner) would report the starter's peak as its own."""
    return int(process.proc_field("/proc/self/status", "VmHWM"))


# --- the kernel -----------------------------------------------------------------------------

class Bench:
    """Boot: one net device with the receive array the command line asks for."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.options = parse_cmdline(machine.cmdline())
        self.console = Console(machine)
        self.size = int(self.options.get("size", abi.ETH_FRAME_LEN))
        self.seconds = float(self.options.get("seconds", DEFAULT_SECONDS))
        self.cpu0 = time.process_time()
        self.net: NetDevice | None = None
        nets = [d for d in machine.devices() if d[1] == abi.LGUEST_DEVICE_T_NET]
        if not nets:
            self.finish({"error": "no net device"})
        index, _type, features, _status, _pages, pfn = nets[0]
        self.net = NetDevice(machine, index, features, pfn,
                             num_rx=int(self.options.get("rx", abi.NUM_NET_RX_BUFFERS)),
                             rx_size=int(self.options.get("rxsize", abi.ETH_FRAME_LEN)))
        self.net.open()
        grace = float(self.options.get("grace", GRACE_SECONDS))
        self.hard_deadline = time.monotonic() + self.seconds + grace

    def flag(self, name: str, default: bool) -> bool:
        return self.options.get(name, "1" if default else "0") not in ("0", "no", "off")

    def await_peers(self, want: int) -> list[tuple[int, bytes]]:
        while time.monotonic() < self.hard_deadline:
            peers = self.net.peers()
            if len(peers) >= want:
                return peers
            self.machine.idle_until(time.monotonic() + AWAIT_STEP)
        self.finish({"error": "only %d of %d peers came up" % (len(self.net.peers()), want)})

    def dests(self, peers: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        return [(abi.peer_key(self.net.page, slot), bytes([mac[0] & ~abi.NET_PROMISC_BIT]) + mac[1:])
                for slot, mac in peers]

    def arm_timer(self) -> None:
        """A clock event towards the hard deadline, queued: it runs with our next HALT. The
        delta is a 32-bit count of ns (about 4 s), so each expiry arms the next one."""
        left = max(0.0, self.hard_deadline - time.monotonic())
        delta = min(abi.U32_MASK, max(1, int(left * abi.NSEC_PER_SEC)))
        self.machine.handlers[abi.TIMER_IRQ] = self.arm_timer
        self.machine.async_hcall(abi.LHCALL_SET_CLOCKEVENT, delta)

    def finish(self, result: dict) -> None:
        result.update(role=self.options.get("role"), guest=self.machine.guest_id,
                      cpu=time.process_time() - self.cpu0,
                      peak_rss_kb=peak_rss_kb())
        self.write_result(result)
        if self.net is not None:
            self.net.close()
        self.machine.power_down()

    def write_result(self, result: dict) -> None:
        """The report into result= (whole or not at all: written aside, then renamed); the
        console says the role is done, or the error, for whoever watches it."""
        path = self.options.get("result")
        if path:
            with open(path + ".part", "w") as out:
                json.dump(result, out)
            os.replace(path + ".part", path)
        self.console.write("bench: %s\n" % result.get("error", "%s done" % result["role"]))

    # --- roles ----------------------------------------------------------------------------

    def send(self) -> None:
        peers = self.await_peers(int(self.options.get("peers", 1)))
        t_peers = time.monotonic()
        tx = TxFrames(self.machine, self.net.mac, self.dests(peers), self.size,
                      seed=self.machine.guest_id)
        cpu0 = time.process_time()
        t_start = time.monotonic()
        frames = blast(self.machine, tx, t_start + self.seconds, self.flag("ring", True),
                       self.flag("kick", True))
        t_end = time.monotonic()
        cpu = time.process_time() - cpu0
        ends = send_end(self.machine, tx, self.hard_deadline)
        self.finish({"peers": len(peers), "frames": frames, "ok": tx.ok, "lost": tx.lost,
                     "short": tx.short, "t_peers": t_peers, "t_start": t_start, "t_end": t_end,
                     "send_cpu": cpu, "ends": ends})

    def recv(self) -> None:
        rx = RxCheck(self.machine, self.net, self.size)
        for buf in self.net.rx_buffers:        # fault the buffers in now, not mid-stream
            self.machine.phys.write(buf, bytes(self.net.rx_size))
        poll = self.flag("poll", False)
        self.arm_timer()
        halts = 0
        while not rx.ended and time.monotonic() < self.hard_deadline:
            if poll:
                rx.take()
            else:
                self.machine.hcall(abi.LHCALL_HALT)
                halts += 1
        result = rx.report()
        result.update(halts=halts, rx_cpu=time.process_time() - self.cpu0)
        self.finish(result)

    def ping(self) -> None:
        rx = RxCheck(self.machine, self.net, self.size)
        echoed = []
        rx.on_frame = lambda seq, buf: echoed.append(seq)
        peers = self.await_peers(1)
        tx = TxFrames(self.machine, self.net.mac, self.dests(peers[:1]), self.size, count=1)
        key, dma = tx.keys[0], tx.dma(0, 0)
        rtts = []
        self.arm_timer()
        until = time.monotonic() + self.seconds
        seq = 0
        while time.monotonic() < until:
            tx.stamp(0, seq)
            tx.words[dma >> 2] = 0
            t0 = time.perf_counter_ns()
            # Queued, so the HALT below carries it: one message to the Host per round trip.
            self.machine.async_hcall(abi.LHCALL_SEND_DMA, key, dma)
            while not echoed and time.monotonic() < self.hard_deadline:
                self.machine.hcall(abi.LHCALL_HALT)
            t1 = time.perf_counter_ns()
            if not echoed or echoed.pop() != seq:
                break
            rtts.append(t1 - t0)
            seq += 1
        send_end(self.machine, tx, self.hard_deadline)
        rtts.sort()
        result = {"rounds": len(rtts), "corrupt": rx.corrupt}
        if rtts:
            result.update({"rtt_p%d_ns" % p: rtts[min(len(rtts) - 1, len(rtts) * p // 100)]
                           for p in PERCENTILES})
            result["rtt_mean_ns"] = sum(rtts) // len(rtts)
        self.finish(result)

    def pong(self) -> None:
        # Our handler goes in first: a frame that came while we still waited for the peer
        # must not end up in lguest_net's default handler.
        rx = RxCheck(self.machine, self.net, self.size)
        ram = self.machine.phys.ram
        size = self.size
        state = {"next": 0, "tx": None}

        def echo(seq: int, buf: int) -> None:
            tx = state["tx"]
            if tx is None:                 # the sender is up: its MAC is in the net page
                tx = state["tx"] = TxFrames(self.machine, self.net.mac,
                                            self.dests(self.net.peers()[:1]), size,
                                            count=abi.NUM_NET_RX_BUFFERS)
            b = state["next"]
            state["next"] = (b + 1) % tx.count
            out = tx.bufs[b]
            ram[out:out + size] = ram[buf:buf + size]
            self.machine.async_hcall(abi.LHCALL_SEND_DMA, tx.keys[0], tx.dma(b, 0))

        rx.on_frame = echo
        self.await_peers(1)
        self.arm_timer()
        while not rx.ended and time.monotonic() < self.hard_deadline:
            self.machine.hcall(abi.LHCALL_HALT)       # runs the queued echo, then waits
        self.finish(rx.report())


ROLES = {"send": Bench.send, "recv": Bench.recv, "ping": Bench.ping, "pong": Bench.pong}


def main(machine: Machine) -> None:
    bench = Bench(machine)
    role = ROLES.get(bench.options.get("role", ""))
    if role is None:
        bench.finish({"error": "role= must be one of %s" % ", ".join(ROLES)})
    role(bench)
