"""What `lgnet bench` runs: the workloads, their sizes and guests, the rounds and seconds,
decided from the user's options. Rules of this room: data only, no I/O — a Plan can be built,
read and tested without starting anything; lgnet.bench.run measures it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.guest.benchguests import MIN_FRAME, TX_FRAMES

DEFAULT_SIZES = (60, abi.ETH_FRAME_LEN, abi.LGUEST_MAX_DMA_SECTIONS * abi.PAGE_SIZE)
MAX_SIZE = abi.LGUEST_MAX_DMA_SECTIONS * abi.PAGE_SIZE      # one struct lguest_dma's worth
DEFAULT_SECONDS = 1.0
DEFAULT_ROUNDS = 3
FANOUT = (2, 8, 32)
QUICK_SECONDS = 0.3
QUICK_ROUNDS = 1
QUICK_FANOUT = (2, 8)
DEEP_RX = 64                          # the deep receive array of the raw-DMA stream
LATENCY_SIZE = 60
FANOUT_SIZE = abi.ETH_FRAME_LEN
MEM_SLACK_MB = 2                      # guest RAM beyond its frame buffers
MIN_MEM_MB = 4

# Targets (issue 15's table): printed with the measured ratio, never asserted.
TARGET_STREAM_64K = 1.5               # stream 65,536 B MB/s vs socketpair
TARGET_STREAM_1514 = 1.0              # stream 1514 B frames/s, deep rx, vs socketpair and netns
TARGET_STREAM_LGUEST_NET = 0.5        # stream 1514 B frames/s, lguest_net's 8 buffers, vs socketpair
TARGET_LATENCY = 1.5                  # latency p50: at most this times the socketpair's
TARGET_FANOUT = 0.9                   # fan-out at 32 vs at 2
TARGET_CAPTURE = 0.8                  # stream 1514 B deep rx, capture on vs off
TARGET_UNICORN = 0.5                  # Unicorn ICMP round trips vs socketpair ping-pong
TARGET_SCALE_GUESTS = 128
TARGET_BRINGUP_S = 5.0
TARGET_RSS_MB = 40.0

# The unicorn workload: two guests running the bundled kernel under Unicorn, one flooding the
# other with ICMP echo requests (main.c's flood=), one request in flight at a time.
UNICORN_MEM_MB = 16
UNICORN_SIZE = 98                     # an echo request: 14 + 20 + 8 + 56 bytes of data
# How many Unicorn guests fit: idle bundled guests on one net, their launchers' RSS.
UNICORN_SCALE = (8, 16, 32)
QUICK_UNICORN_SCALE = (4,)
IMPAIR_LOSS = 1e-6                    # the bench's impairment: judged, (almost) never dropping


@dataclass
class BenchOptions:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    seconds: float = DEFAULT_SECONDS
    rounds: int = DEFAULT_ROUNDS
    fanout: tuple[int, ...] = FANOUT
    guests: int | None = None         # one more fan-out size: the scale run
    quick: bool = False

    def check(self) -> None:
        for size in self.sizes:
            if not MIN_FRAME <= size <= MAX_SIZE:
                raise LgnetError("--sizes: %d is not a frame size from %d to %d bytes"
                                 % (size, MIN_FRAME, MAX_SIZE))
        if not self.seconds > 0:
            raise LgnetError("--seconds must be more than 0")
        if self.rounds < 1:
            raise LgnetError("--rounds must be at least 1")
        if self.guests is not None and not 2 <= self.guests <= abi.MAX_GUESTS:
            raise LgnetError("--guests must be from 2 to %d" % abi.MAX_GUESTS)

    @classmethod
    def make(cls, sizes=None, seconds=None, rounds=None, guests=None, quick=False):
        opts = cls(quick=quick)
        if quick:
            opts.seconds, opts.rounds, opts.fanout = QUICK_SECONDS, QUICK_ROUNDS, QUICK_FANOUT
        if sizes is not None:
            opts.sizes = tuple(sizes)
        if seconds is not None:
            opts.seconds = seconds
        if rounds is not None:
            opts.rounds = rounds
        opts.guests = guests
        opts.check()
        return opts

    def fanouts(self) -> tuple[int, ...]:
        extra = (self.guests,) if self.guests and self.guests not in self.fanout else ()
        return self.fanout + extra


# --- workloads ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    key: str
    kind: str                         # stream | latency | fanout | unicorn
    label: str
    size: int
    rx: int = abi.NUM_NET_RX_BUFFERS
    rxsize: int = abi.ETH_FRAME_LEN
    guests: int = 2
    capture: bool = False             # the broker records every delivery (pcapng) meanwhile
    trace: bool = False               # --trace meanwhile (it captures too)
    impair: tuple = ()                # (key, value) of one impairment on the whole net

    def anchors(self, netns: bool) -> dict[str, tuple]:
        """anchor name -> (helper kind, size, hosts) measured beside this workload; the netns
        anchor only where the machine can build namespaces (the run finds out, not the plan)."""
        if self.kind == "stream":
            out = {"socketpair": ("socketpair-stream", self.size, None),
                   "copy": ("copy", self.size, None)}
            if netns:
                out["netns"] = ("netns-stream", self.size, None)
        elif self.kind in ("latency", "unicorn"):
            out = {"socketpair": ("socketpair-latency", self.size, None)}
            if netns:
                out["netns"] = ("netns-latency", self.size, None)
        else:
            out = {"socketpair": ("socketpair-fanout", self.size, self.guests),
                   "copy": ("copy", self.size, None)}
            if netns:
                out["netns"] = ("netns-fanout", self.size, self.guests)
        return out


def workloads(opts: BenchOptions) -> list[Workload]:
    out = []
    for size in opts.sizes:
        if size <= abi.ETH_FRAME_LEN:
            out.append(Workload("stream-lguest_net-%d" % size, "stream",
                                "stream, lguest_net rx (8 x 1514 B)", size))
    for size in opts.sizes:
        out.append(Workload("stream-deep-%d" % size, "stream",
                            "stream, deep rx (%d x frame)" % DEEP_RX, size, DEEP_RX,
                            max(size, abi.ETH_FRAME_LEN)))
    # The same deep stream with capture on: what recording every frame costs (issue 6).
    size = max((z for z in opts.sizes if z <= abi.ETH_FRAME_LEN), default=None)
    if size is not None:
        out.append(Workload("stream-deep-%d-capture" % size, "stream",
                            "stream, deep rx, capture on", size, DEEP_RX, abi.ETH_FRAME_LEN,
                            capture=True))
        # And with --trace: what the timeline costs on top of the capture it needs (issue 17).
        out.append(Workload("stream-deep-%d-trace" % size, "stream",
                            "stream, deep rx, --trace on", size, DEEP_RX, abi.ETH_FRAME_LEN,
                            capture=True, trace=True))
        # ... and with one impairment on (issue 14): every frame judged by a loss rule of
        # the whole net that (almost) never drops, so the stream stays lossless.
        out.append(Workload("stream-deep-%d-impair" % size, "stream",
                            "stream, deep rx, loss %g on" % IMPAIR_LOSS, size, DEEP_RX,
                            abi.ETH_FRAME_LEN, impair=(("loss", IMPAIR_LOSS),)))
    out.append(Workload("latency-%d" % LATENCY_SIZE, "latency", "latency, ping-pong",
                        LATENCY_SIZE))
    for n in opts.fanouts():
        out.append(Workload("fanout-%d" % n, "fanout", "fan-out, 1 -> %d (broadcast)" % (n - 1),
                            FANOUT_SIZE, guests=n))
    out.append(Workload("unicorn-icmp", "unicorn", "unicorn, ICMP echo flood (bundled kernel)",
                        UNICORN_SIZE))
    return out


@dataclass(frozen=True)
class Plan:
    """Everything one `lgnet bench` measures, in the order it runs each round."""
    options: BenchOptions
    workloads: tuple[Workload, ...]
    unicorn_scale: tuple[int, ...]    # how many idle bundled-kernel guests to try on one net


def make_plan(sizes=None, seconds=None, rounds=None, guests=None, quick=False) -> Plan:
    """The plan for `lgnet bench`'s options (None: the default); LgnetError for a bad one."""
    opts = BenchOptions.make(sizes=sizes, seconds=seconds, rounds=rounds, guests=guests,
                             quick=quick)
    return Plan(opts, tuple(workloads(opts)), QUICK_UNICORN_SCALE if quick else UNICORN_SCALE)


def pages(size: int) -> int:
    return -(-size // abi.PAGE_SIZE)


def mem_mb(w: Workload) -> int:
    """Guest RAM for this workload's buffers: the sender's frames, the receive array."""
    need = (TX_FRAMES * pages(w.size) + w.rx * pages(w.rxsize)) * abi.PAGE_SIZE
    return max(MIN_MEM_MB, -(-need // abi.MiB) + MEM_SLACK_MB)

