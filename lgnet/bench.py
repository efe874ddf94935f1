"""`lgnet bench`: inter-guest DMA throughput, latency and scale, beside anchors measured in the
same run on the same machine.

Rules of this file: it is a face (DESIGN rule 4). It composes lab.py (a broker and one launcher
process per guest, for every run), the bench guest kernels (lgnet.guest.benchguests) and the
anchors (lgnet.anchors); it schedules runs, takes medians, computes ratios and formats the
table, the JSON and the plot. `run_bench()` is the Python API; cli.py parses and prints.

Method (written into the JSON as well):
- Every workload runs through the real broker; every guest is a launcher process of its own
  whose kernel is lgnet.guest.benchguests: only RAM, the net page and hypercalls.
- Every receiver, lgnet's and the anchors' alike, checks each frame's length, CRC-32 and
  sequence number; only intact frames count. Rates are verified frames over the window from
  the sender's first send to the receiver's last verified frame.
- Each round runs every workload followed by its anchors, so the two are interleaved; the
  figures are medians over the rounds (a 2-core machine is noisy: this is what ratios need).
- stream, lguest_net: the receiver binds lguest_net's 8 buffers of 1514 bytes: the faithful
  figure. stream, deep: raw DMA into a 64-entry receive array, each entry a buffer of the
  frame's size (65,536 bytes = 16 pieces of 4096). Senders queue SEND_DMAs in lguest's async
  hypercall ring and ring lgnet's doorbell; "lost" is sends whose used_len came back 0 (no
  free buffer even after the one chance to restock).
"""
from __future__ import annotations

import datetime
import json
import os
import math
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, TextIO

from lgnet import abi, anchors
from lgnet.errors import LgnetError
from lgnet.guest.benchguests import MIN_FRAME, TX_FRAMES
from lgnet.lab import Lab
from lgnet.scenario import GuestSpec, Network, Scenario

KERNEL = "python:lgnet.guest.benchguests"
NET = "lan0"
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
LAB_TIMEOUT = 60.0                    # seconds a run may take beyond its measuring time
BRINGUP_SECONDS_PER_GUEST = 0.25      # ... and per guest to start
GRACE_PER_GUEST = 0.2                 # a receiver waits this much longer per guest in the run
PACKAGES = ("lgnet", "unicorn", "posix_ipc", "pyelftools", "PyYAML", "scapy", "matplotlib")
US = 1e6
MB = 1e6

# Targets (issue 7): printed with the measured ratio, never asserted.
TARGET_STREAM_64K = 1.0               # stream 65,536 B MB/s vs socketpair
TARGET_STREAM_1514 = 0.5              # stream 1514 B frames/s vs socketpair
TARGET_LATENCY = 2.0                  # latency p50: at most this times the socketpair's
TARGET_FANOUT = 0.7                   # fan-out at 32 vs at 2
TARGET_SCALE_GUESTS = 128
TARGET_BRINGUP_S = 10.0
TARGET_RSS_MB = 40.0

# The unicorn workload: two guests running the bundled kernel under Unicorn, one flooding the
# other with ICMP echo requests (main.c's flood=), one request in flight at a time.
UNICORN_KERNEL = "bundled"
UNICORN_MEM_MB = 16
UNICORN_SIZE = 98                     # an echo request: 14 + 20 + 8 + 56 bytes of data
UNICORN_FLOODER, UNICORN_ECHO = "10.0.0.1", "10.0.0.2"
FLOOD_LINE = re.compile(r"flood (\S+): (\d+) sent, (\d+) received, (\d+) replies/s, "
                        r"rtt avg ([0-9.]+) ms")
# How many Unicorn guests fit: idle bundled guests on one net, their launchers' RSS.
UNICORN_SCALE = (8, 16, 32)
QUICK_UNICORN_SCALE = (4,)
UNICORN_SCALE_BUDGET_S = 20.0         # no larger N is tried once this much time has gone
UNICORN_READY_S = 60.0


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

    def anchors(self) -> dict[str, tuple]:
        """anchor name -> (helper kind, size, hosts) measured beside this workload."""
        netns = anchors.netns_available() is None
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
    out.append(Workload("latency-%d" % LATENCY_SIZE, "latency", "latency, ping-pong",
                        LATENCY_SIZE))
    for n in opts.fanouts():
        out.append(Workload("fanout-%d" % n, "fanout", "fan-out, 1 -> %d (broadcast)" % (n - 1),
                            FANOUT_SIZE, guests=n))
    out.append(Workload("unicorn-icmp", "unicorn", "unicorn, ICMP echo flood (bundled kernel)",
                        UNICORN_SIZE))
    return out


def pages(size: int) -> int:
    return -(-size // abi.PAGE_SIZE)


def mem_mb(w: Workload) -> int:
    """Guest RAM for this workload's buffers: the sender's frames, the receive array."""
    need = (TX_FRAMES * pages(w.size) + w.rx * pages(w.rxsize)) * abi.PAGE_SIZE
    return max(MIN_MEM_MB, -(-need // abi.MiB) + MEM_SLACK_MB)


class BenchError(RuntimeError):
    """A run did not produce its figures (a guest died, timed out, or said nothing)."""


def lab_run(w: Workload, guests: list[tuple[str, list[str]]], seconds: float) -> tuple[dict, dict, float]:
    """Start the guests (in order) on one net, wait for all; (reports by name, broker
    counters, monotonic time the first guest was started)."""
    scenario = Scenario(Path("<lgnet bench>"), None, {NET: Network(NET)}, [], [])
    timeout = seconds + LAB_TIMEOUT + BRINGUP_SECONDS_PER_GUEST * len(guests)
    with tempfile.TemporaryDirectory(prefix="lgnet-bench-") as scratch, \
            Lab(scenario, capture=w.capture,
                trace=os.path.join(scratch, "trace.json") if w.trace else None) as lab:
        started = time.monotonic()
        for name, args in guests:
            lab.start_guest(GuestSpec(name, mem_mb=mem_mb(w), kernel=KERNEL, nets=(NET,),
                                      args=tuple(args)))
        finished = lab.wait(timeout)
        broker = lab.broker_stats()
        reports = {}
        for run in lab.guests:
            for line in run.console:
                if line.startswith("bench "):
                    reports[run.name] = json.loads(line[len("bench "):])
        missing = [run for run in lab.guests if run.name not in reports
                   or "error" in reports[run.name]]
        if not finished or missing:
            tails = "; ".join("%s: %s" % (r.name, " | ".join(r.console[-3:])) for r in missing)
            raise BenchError("%s: %s%s" % (w.key, "timed out; " if not finished else "",
                                          tails or "no report"))
    return reports, broker, started


def guest_args(w: Workload, role: str, seconds: float, **extra) -> list[str]:
    args = ["role=" + role, "size=%d" % w.size, "seconds=%r" % seconds,
            "rx=%d" % w.rx, "rxsize=%d" % w.rxsize,
            "grace=%r" % (LAB_TIMEOUT / 2 + GRACE_PER_GUEST * w.guests)]
    return args + ["%s=%s" % kv for kv in extra.items()]


def run_stream(w: Workload, seconds: float) -> dict:
    reports, broker, _ = lab_run(w, [("rx", guest_args(w, "recv", seconds)),
                                     ("tx", guest_args(w, "send", seconds, peers=1))], seconds)
    tx, rx = reports["tx"], reports["rx"]
    frames = rx["verified"]
    window = rx["t_last"] - tx["t_start"]
    rate = frames / window if frames and window > 0 else 0.0
    per = US / frames if frames else 0.0
    return {"frames_s": rate, "mb_s": rate * w.size / MB, "sent": tx["frames"],
            "delivered": tx["ok"], "lost": tx["lost"], "short": tx["short"],
            "lost_pct": 100.0 * tx["lost"] / tx["frames"] if tx["frames"] else 0.0,
            "taken": rx["taken"], "verified": frames, "corrupt": rx["corrupt"],
            "wall_us": US / rate if rate else 0.0,
            "broker_engine_us": broker["engine_s"] * per,
            "broker_transport_us": (broker["busy_s"] - broker["engine_s"]) * per,
            "broker_wait_us": max(0.0, window - broker["busy_s"]) * per,
            "broker_cpu_us": (broker["user_s"] + broker["sys_s"]) * per,
            "sender_cpu_us": tx["send_cpu"] * per, "receiver_cpu_us": rx["rx_cpu"] * per,
            "broker": broker}


def run_latency(w: Workload, seconds: float) -> dict:
    reports, broker, _ = lab_run(w, [("pong", guest_args(w, "pong", seconds)),
                                     ("ping", guest_args(w, "ping", seconds))], seconds)
    ping = reports["ping"]
    if not ping.get("rounds"):
        raise BenchError("%s: no round trip completed" % w.key)
    out = {"rounds": ping["rounds"], "corrupt": ping["corrupt"] + reports["pong"]["corrupt"]}
    for key, value in ping.items():
        if key.startswith("rtt_p") and key.endswith("_ns"):
            out["p%s_us" % key[len("rtt_p"):-len("_ns")]] = value / 2 / 1000
    out["broker"] = broker
    return out


def run_fanout(w: Workload, seconds: float) -> dict:
    guests = [("rx%d" % i, guest_args(w, "recv", seconds)) for i in range(w.guests - 1)]
    guests.append(("tx", guest_args(w, "send", seconds, peers=w.guests - 1)))
    reports, broker, started = lab_run(w, guests, seconds)
    tx = reports.pop("tx")
    rxs = list(reports.values())
    total = sum(r["verified"] for r in rxs)
    window = max(r["t_last"] for r in rxs) - tx["t_start"]
    rate = total / window if total and window > 0 else 0.0
    rss = [r["maxrss_kb"] / 1024 for r in rxs + [tx]]
    return {"deliveries_s": rate, "mb_s": rate * w.size / MB, "frames": tx["frames"],
            "delivered": tx["ok"], "lost": tx["lost"], "verified": total,
            "corrupt": sum(r["corrupt"] for r in rxs),
            "lost_pct": 100.0 * tx["lost"] / (tx["ok"] + tx["lost"]) if tx["ok"] + tx["lost"] else 0.0,
            "bringup_s": tx["t_peers"] - started, "rss_mb_mean": statistics.fmean(rss),
            "rss_mb_max": max(rss), "broker": broker}


def run_unicorn(w: Workload, seconds: float) -> dict:
    """Two bundled-kernel guests: one answers, the other floods it with echo requests for
    the run's seconds (whole seconds: the kernel's flood= takes an integer) and prints one
    summary line, which is all we read."""
    flood_s = max(1, math.ceil(seconds))
    scenario = Scenario(Path("<lgnet bench>"), None, {NET: Network(NET)}, [], [])
    with Lab(scenario) as lab:
        lab.start_guest(GuestSpec("echo", mem_mb=UNICORN_MEM_MB, kernel=UNICORN_KERNEL,
                                  nets=(NET,), args=("ip=%s/24" % UNICORN_ECHO,)))
        flooder = lab.start_guest(GuestSpec(
            "flood", mem_mb=UNICORN_MEM_MB, kernel=UNICORN_KERNEL, nets=(NET,),
            args=("ip=%s/24" % UNICORN_FLOODER, "peers=1", "ping=" + UNICORN_ECHO,
                  "flood=%d" % flood_s)))
        status = flooder.wait(flood_s + LAB_TIMEOUT)
        found, until = None, time.monotonic() + 5   # the summary may still be on its way
        while found is None and time.monotonic() < until:
            found = next((m for m in map(FLOOD_LINE.search, list(flooder.console)) if m), None)
            if found is None:
                time.sleep(0.02)
        if status is None or found is None:
            raise BenchError("%s: %s%s" % (w.key, "timed out; " if status is None else "",
                                          " | ".join(flooder.console[-3:]) or "no report"))
    sent, received, rate, rtt_ms = (int(found[2]), int(found[3]), int(found[4]),
                                    float(found[5]))
    return {"replies_s": float(rate), "rtt_us": rtt_ms * 1000, "sent": sent,
            "received": received, "lost": sent - received,
            "lost_pct": 100.0 * (sent - received) / sent if sent else 0.0,
            "flood_s": flood_s}


def rss_mb(pid: int) -> float | None:
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def unicorn_scale(sizes: tuple[int, ...]) -> dict:
    """Bring up N idle bundled-kernel guests on one net for each N in `sizes` (until
    UNICORN_SCALE_BUDGET_S has gone), read each launcher's RSS once all are ready, and state
    how many would fit: the memory available now over the largest mean RSS, and never more
    than one net's MAX_GUESTS slots."""
    tried, skipped = [], None
    started = time.monotonic()
    scenario = Scenario(Path("<lgnet bench>"), None, {NET: Network(NET)}, [], [])
    for n in sizes:
        if time.monotonic() - started > UNICORN_SCALE_BUDGET_S:
            skipped = "N=%d and more not tried: %.0f s budget spent" % (n, UNICORN_SCALE_BUDGET_S)
            break
        with Lab(scenario) as lab:
            t0 = time.monotonic()
            runs = [lab.start_guest(GuestSpec("u%d" % i, mem_mb=UNICORN_MEM_MB,
                                              kernel=UNICORN_KERNEL, nets=(NET,),
                                              args=("ip=10.0.%d.%d/16" % divmod(i + 1, 256),)))
                    for i in range(n)]
            deadline = t0 + UNICORN_READY_S
            while (not all("lguest: ready" in r.console for r in runs)
                   and time.monotonic() < deadline
                   and all(r.process.poll() is None for r in runs)):
                time.sleep(0.05)
            if not all("lguest: ready" in r.console for r in runs):
                skipped = "N=%d did not come up within %.0f s" % (n, UNICORN_READY_S)
                break
            bringup = time.monotonic() - t0
            rss = [x for x in (rss_mb(r.process.pid) for r in runs) if x is not None]
        if rss:
            tried.append({"guests": n, "bringup_s": bringup, "rss_mb_mean": statistics.fmean(rss),
                          "rss_mb_max": max(rss)})
    out = {"tried": tried, "guest_mem_mb": UNICORN_MEM_MB, "mem_available_mb": mem_available_mb()}
    if skipped:
        out["skipped"] = skipped
    if tried and out["mem_available_mb"]:
        per = max(t["rss_mb_mean"] for t in tried)
        by_memory = int(out["mem_available_mb"] // per)
        out["fits"] = min(by_memory, abi.MAX_GUESTS)
        out["fits_limit"] = "memory" if by_memory < abi.MAX_GUESTS else "net slots (MAX_GUESTS)"
    return out


RUNNERS: dict[str, Callable[[Workload, float], dict]] = {
    "stream": run_stream, "latency": run_latency, "fanout": run_fanout,
    "unicorn": run_unicorn}


# --- anchors ------------------------------------------------------------------------------------

def anchor_figures(kind: str, size: int, seconds: float, hosts: int | None) -> dict:
    """One anchor measurement, reduced to the same figures as lgnet's."""
    raw = anchors.run(kind, size, seconds, hosts)
    if kind == "copy":
        rate = raw["frames"] / raw["elapsed"]
        # Each frame (each fan-out delivery) is one copy.
        return {"frames_s": rate, "deliveries_s": rate, "mb_s": rate * size / MB,
                "copy_us": US / rate}
    if kind.endswith("latency"):
        out = {k: v for k, v in raw.items() if k.endswith("_us") or k == "rounds"}
        # Beside the unicorn flood: round trips per second, one in flight at a time.
        out["replies_s"] = raw.get("rounds", 0) / seconds
        if "p50_us" in out:
            out["rtt_p50_us"] = 2 * out["p50_us"]
        return out
    receivers = raw.get("receivers") or [raw]
    total = sum(r["verified"] for r in receivers)
    window = max(r["t_last"] for r in receivers) - raw["t_start"]
    rate = total / window if total and window > 0 else 0.0
    key = "deliveries_s" if kind.endswith("fanout") else "frames_s"
    out = {key: rate, "mb_s": rate * size / MB, "sent": raw["sent"],
           "corrupt": sum(r["corrupt"] for r in receivers)}
    if "payload" in raw:
        out["udp_payload"] = raw["payload"]
    if "build_s" in raw:
        out["build_s"] = raw["build_s"]
    return out


# --- the run ------------------------------------------------------------------------------------

def median_of(rounds: list[dict]) -> dict:
    """Median of every number that every round has; the rest from the last round."""
    out = {}
    for key, value in rounds[-1].items():
        values = [r.get(key) for r in rounds]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
        elif not isinstance(value, dict):
            out[key] = value
    return out


def metric(w: Workload) -> tuple[str, str]:
    """(figure, unit) the table and the ratios use for this workload."""
    if w.kind == "latency":
        return "p50_us", "us"
    if w.kind == "fanout":
        return "deliveries_s", "deliveries/s"
    if w.kind == "unicorn":
        return "replies_s", "round trips/s"
    return ("mb_s", "MB/s") if w.size > abi.ETH_FRAME_LEN else ("frames_s", "frames/s")


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def run_bench(opts: BenchOptions, progress: TextIO | None = None) -> dict:
    """Every workload and its anchors, `opts.rounds` times interleaved; the whole result."""
    plan = workloads(opts)
    netns_skip = anchors.netns_available()
    lgnet_rounds: dict[str, list[dict]] = {w.key: [] for w in plan}
    anchor_rounds: dict[tuple, list[dict]] = {}
    started = time.monotonic()
    for rnd in range(opts.rounds):
        measured: set[tuple] = set()
        for w in plan:
            note(progress, "round %d/%d: %s, %d B" % (rnd + 1, opts.rounds, w.label, w.size))
            lgnet_rounds[w.key].append(RUNNERS[w.kind](w, opts.seconds))
            for spec in w.anchors().values():
                if spec not in measured:      # an anchor shared by rows runs once a round
                    measured.add(spec)
                    anchor_rounds.setdefault(spec, []).append(
                        anchor_figures(spec[0], spec[1], opts.seconds, spec[2]))
    rows = []
    for w in plan:
        fig, unit = metric(w)
        lg = median_of(lgnet_rounds[w.key])
        row = {"workload": w.key, "kind": w.kind, "label": w.label, "size": w.size,
               "guests": w.guests, "rx_entries": w.rx, "rx_buffer": w.rxsize,
               "metric": fig, "unit": unit, "lgnet": lg, "rounds": lgnet_rounds[w.key],
               "anchors": {}, "ratios": {}}
        for name, spec in w.anchors().items():
            row["anchors"][name] = median_of(anchor_rounds[spec])
            r = ratio(lg.get(fig), row["anchors"][name].get(fig))
            if r is not None:
                row["ratios"][name] = r
        if netns_skip:
            row["anchors"]["netns"] = {"skipped": netns_skip}
        if w.kind == "stream":
            copy_us = row["anchors"]["copy"]["copy_us"]
            lg["copy_us"] = copy_us
            lg["engine_work_us"] = max(0.0, lg["broker_engine_us"] - copy_us)
        rows.append(row)
    result = {"lgnet": "lgnet bench", "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "machine": machine(), "options": asdict(opts),
        "method": METHOD, "elapsed_s": time.monotonic() - started, "rows": rows}
    scale_sizes = QUICK_UNICORN_SCALE if opts.quick else UNICORN_SCALE
    note(progress, "unicorn guests: how many fit (N = %s idle)" % ", ".join(map(str, scale_sizes)))
    result["unicorn_scale"] = unicorn_scale(scale_sizes)
    result["elapsed_s"] = time.monotonic() - started
    result["targets"] = targets(result)
    return result


def note(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        progress.write("  %s\n" % text)
        progress.flush()


METHOD = {
    "workloads": "real broker; every guest a launcher process running the Python kernel "
                 "lgnet.guest.benchguests (RAM, net page and hypercalls only)",
    "verification": "every receiver (lgnet and anchors) checks length, CRC-32 and sequence "
                    "number of each frame; only intact frames count",
    "rate": "verified frames / (receiver's last verified frame - sender's first send)",
    "rounds": "each round runs every workload then its anchors (interleaved); figures are "
              "medians over rounds",
    "stream lguest_net": "receiver binds lguest_net's 8 buffers of 1514 B (the faithful figure)",
    "stream deep": "raw DMA into a %d-entry receive array, each entry one frame's size "
                   "(65,536 B = 16 pieces of 4096)" % DEEP_RX,
    "sender": "SEND_DMAs queued in lguest_data's async hypercall ring; lgnet's doorbell "
              "(NOTIFY) only while the broker is not already running the ring; a full ring "
              "makes the call synchronously",
    "lost": "sends whose used_len came back 0: no free buffer even after the one chance to "
            "restock",
    "latency": "one frame ping-pong; one-way = round trip / 2",
    "fanout": "one guest sends each frame to every other guest (N-1 SEND_DMAs, lguest_net "
              "receivers of 8 x 1514 B); deliveries/s = verified frames at all receivers / "
              "window; bring-up = first launcher started -> sender sees all N-1 peers; RSS = "
              "each guest's peak resident set (ru_maxrss)",
    "unicorn": "two guests running lgnet's bundled i386 kernel under Unicorn, each its own "
               "launcher process, through the real broker: one answers (ip= only), the other "
               "floods it (ping= flood=SECONDS, whole seconds >= the run's): the next ICMP "
               "echo request as soon as the last reply is back, or after 100 ms; the kernel "
               "prints sent, received, replies/s and mean RTT, parsed from its console. "
               "Anchors: the socketpair/netns ping-pong of a frame of the same size, round "
               "trips/s = rounds / seconds",
    "unicorn scale": "N idle bundled-kernel guests on one net (N = 8, 16, 32 within a 20 s "
                     "budget; 4 with --quick); each launcher's VmRSS once all printed "
                     "'lguest: ready'; fits = MemAvailable / largest mean RSS, at most "
                     "MAX_GUESTS per net",
    "socketpair": "AF_UNIX SOCK_SEQPACKET socketpair between two processes (fan-out: one to "
                  "each receiver process), same frames, same verification",
    "copy": "one process copying frames between two shared-memory buffers, one slice "
            "assignment each: the one-copy limit",
    "netns": "network namespaces joined by veth pairs to a Linux bridge (as Mininet builds "
             "them), UDP datagrams carrying the same frames (size - 42 B of headers), "
             "broadcast for fan-out",
    "breakdown": "per delivered frame: broker engine (SEND_DMA work incl. the copy), copy "
                 "(the one-copy limit at that size), broker transport (sockets, doorbells, "
                 "wake-ups), broker waiting (idle while the frame's window ran); CPU of each "
                 "process per frame",
}


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info
                          if line.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cores": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "kernel": platform.release(),
            "root": os.geteuid() == 0, "packages": versions}


def row_of(result: dict, workload: str) -> dict | None:
    return next((r for r in result["rows"] if r["workload"] == workload), None)


def targets(result: dict) -> list[dict]:
    out = []

    def add(name, measured, goal, met, note=""):
        out.append({"target": name, "measured": measured, "goal": goal,
                    "met": None if measured is None else met, "note": note})

    big = row_of(result, "stream-deep-%d" % MAX_SIZE)
    r = big["ratios"].get("socketpair") if big else None
    add("stream 65,536 B MB/s >= %.1fx socketpair" % TARGET_STREAM_64K, r, TARGET_STREAM_64K,
        r is not None and r >= TARGET_STREAM_64K, "deep rx (64 entries)")
    for mode in ("deep", "lguest_net"):
        row = row_of(result, "stream-%s-%d" % (mode, abi.ETH_FRAME_LEN))
        r = row["ratios"].get("socketpair") if row else None
        add("stream 1514 B frames/s >= %.1fx socketpair (%s rx)" % (TARGET_STREAM_1514, mode),
            r, TARGET_STREAM_1514, r is not None and r >= TARGET_STREAM_1514)
    lat = row_of(result, "latency-%d" % LATENCY_SIZE)
    r = lat["ratios"].get("socketpair") if lat else None
    add("latency p50 <= %.0fx socketpair" % TARGET_LATENCY, r, TARGET_LATENCY,
        r is not None and r <= TARGET_LATENCY)
    two, many = row_of(result, "fanout-2"), row_of(result, "fanout-32")
    r = ratio(many["lgnet"]["deliveries_s"], two["lgnet"]["deliveries_s"]) if two and many else None
    add("fan-out deliveries/s at 32 >= %.1fx at 2" % TARGET_FANOUT, r, TARGET_FANOUT,
        r is not None and r >= TARGET_FANOUT)
    scale = row_of(result, "fanout-%d" % TARGET_SCALE_GUESTS)
    up = scale["lgnet"]["bringup_s"] if scale else None
    add("%d guests up < %.0f s" % (TARGET_SCALE_GUESTS, TARGET_BRINGUP_S), up, TARGET_BRINGUP_S,
        up is not None and up < TARGET_BRINGUP_S, "run with --guests %d" % TARGET_SCALE_GUESTS)
    rss = scale["lgnet"]["rss_mb_max"] if scale else None
    add("%d guests < %.0f MB RSS each" % (TARGET_SCALE_GUESTS, TARGET_RSS_MB), rss, TARGET_RSS_MB,
        rss is not None and rss < TARGET_RSS_MB, "peak RSS of the largest guest")
    return out


# --- output -------------------------------------------------------------------------------------

def human(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "us":
        return "%.1f us" % value
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return "%.3g%s" % (value / scale, suffix)
    return "%.3g" % value


def table(result: dict) -> str:
    m = result["machine"]
    head = ("lgnet bench: %s cores (%s), Python %s, %s; %d round(s) of %gs, medians"
            % (m["cores"], m["cpu_model"], m["python"], result["date"][:10],
               result["options"]["rounds"], result["options"]["seconds"]))
    cols = ("workload", "size B", "unit", "lgnet", "socketpair", "netns", "copy limit",
            "lgnet/sp", "lgnet/copy", "lost")
    rows = [cols]
    for r in result["rows"]:
        fig, unit = r["metric"], r["unit"]
        a = r["anchors"]
        lost = "%.1f%%" % r["lgnet"]["lost_pct"] if "lost_pct" in r["lgnet"] else ""
        unit_text = unit
        if r["kind"] == "latency":
            unit_text = "us p50"
        rows.append((r["label"], str(r["size"]), unit_text, human(r["lgnet"].get(fig), unit),
                     human(a.get("socketpair", {}).get(fig), unit),
                     human(a.get("netns", {}).get(fig), unit) if "skipped" not in a.get("netns", {}) else "skipped",
                     human(a.get("copy", {}).get(fig), unit) if "copy" in a else "",
                     fmt_ratio(r["ratios"].get("socketpair")), fmt_ratio(r["ratios"].get("copy")),
                     lost))
        if r["kind"] == "unicorn":
            lat = row_of(result, "latency-%d" % LATENCY_SIZE)
            py = 2 * lat["lgnet"]["p50_us"] if lat and "p50_us" in lat["lgnet"] else None
            sp = a.get("socketpair", {}).get("rtt_p50_us")
            rows.append(("  (python-driver rtt p50 %s)" % human(py, "us"), "", "us rtt avg",
                         human(r["lgnet"].get("rtt_us"), "us"), human(sp, "us"),
                         human(a.get("netns", {}).get("rtt_p50_us"), "us")
                         if "skipped" not in a.get("netns", {}) else "skipped",
                         "", fmt_ratio(ratio(r["lgnet"].get("rtt_us"), sp)), "", ""))
        if r["kind"] == "latency":
            rows.append(("", "", "us p99", human(r["lgnet"].get("p99_us"), "us"),
                         human(a.get("socketpair", {}).get("p99_us"), "us"),
                         human(a.get("netns", {}).get("p99_us"), "us") if "skipped" not in a.get("netns", {}) else "skipped",
                         "", fmt_ratio(ratio(r["lgnet"].get("p99_us"),
                                             a.get("socketpair", {}).get("p99_us"))), "", ""))
    return head + "\n" + grid(rows)


def fmt_ratio(value) -> str:
    return "" if value is None else "%.2fx" % value


def grid(rows: list[tuple]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breakdown(result: dict) -> str:
    rows = [("per frame (us)", "size B", "wall", "engine", "of it copy", "transport", "waiting",
             "broker cpu", "sender cpu", "receiver cpu")]
    for r in result["rows"]:
        if r["kind"] != "stream":
            continue
        lg = r["lgnet"]
        rows.append(("%s" % r["label"], str(r["size"]), "%.2f" % lg["wall_us"],
                     "%.2f" % lg["broker_engine_us"], "%.2f" % lg["copy_us"],
                     "%.2f" % lg["broker_transport_us"], "%.2f" % lg["broker_wait_us"],
                     "%.2f" % lg["broker_cpu_us"], "%.2f" % lg["sender_cpu_us"],
                     "%.2f" % lg["receiver_cpu_us"]))
    return ("Where a frame's time goes (broker: engine = SEND_DMA work incl. the copy; transport"
            " = sockets, doorbells, wake-ups; waiting = idle):\n" + grid(rows))


def scaling(result: dict) -> str:
    rows = [("fan-out", "guests", "deliveries/s", "vs N=2", "lost", "bring-up s",
             "RSS MB mean", "RSS MB max", "socketpair", "netns")]
    two = row_of(result, "fanout-2")
    base = two["lgnet"]["deliveries_s"] if two else None
    for r in result["rows"]:
        if r["kind"] != "fanout":
            continue
        lg, a = r["lgnet"], r["anchors"]
        rows.append((r["label"], str(r["guests"]), human(lg["deliveries_s"]),
                     fmt_ratio(ratio(lg["deliveries_s"], base)), "%.1f%%" % lg["lost_pct"],
                     "%.2f" % lg["bringup_s"], "%.1f" % lg["rss_mb_mean"], "%.1f" % lg["rss_mb_max"],
                     human(a["socketpair"].get("deliveries_s")),
                     human(a["netns"].get("deliveries_s")) if "skipped" not in a["netns"] else "skipped"))
    return "Fan-out and scale:\n" + grid(rows)


def unicorn_lines(result: dict) -> str:
    lines = ["Unicorn guests (bundled kernel, one launcher process each):"]
    row = row_of(result, "unicorn-icmp")
    lat = row_of(result, "latency-%d" % LATENCY_SIZE)
    if row:
        lg = row["lgnet"]
        line = ("  ICMP echo flood %s -> %s: %s round trips/s, rtt avg %s (%d sent, %d received "
                "in %d s)" % (UNICORN_FLOODER, UNICORN_ECHO, human(lg["replies_s"]),
                              human(lg["rtt_us"], "us"), lg["sent"], lg["received"],
                              lg["flood_s"]))
        if lat and lat["lgnet"].get("p50_us"):
            line += ("; Python-driver guests: %s round trips/s (rtt p50 %s)"
                     % (human(US / (2 * lat["lgnet"]["p50_us"])),
                        human(2 * lat["lgnet"]["p50_us"], "us")))
        lines.append(line)
    scale = result.get("unicorn_scale") or {}
    for t in scale.get("tried", []):
        lines.append("  %d idle on one net: up in %.2f s, RSS %.1f MB per guest on average "
                     "(%.1f MB at most)" % (t["guests"], t["bringup_s"], t["rss_mb_mean"],
                                            t["rss_mb_max"]))
    if "fits" in scale:
        lines.append("  largest number that fits: %d (limit: %s; %.0f MB available, %d MB of "
                     "guest RAM each)" % (scale["fits"], scale["fits_limit"],
                                          scale["mem_available_mb"], scale["guest_mem_mb"]))
    if scale.get("skipped"):
        lines.append("  %s" % scale["skipped"])
    return "\n".join(lines)


def target_lines(result: dict) -> str:
    lines = ["Targets (printed, not asserted):"]
    for t in result["targets"]:
        if t["measured"] is None:
            state, value = "not run", "-"
        else:
            state = "met" if t["met"] else "NOT met"
            value = "%.2f" % t["measured"]
        lines.append("  %-52s %8s  %s%s" % (t["target"], value, state,
                                            " (%s)" % t["note"] if t["note"] else ""))
    return "\n".join(lines)


def recording_cost(result: dict) -> str:
    """What capture and --trace add to a frame's wall time (the deep stream of the largest
    size up to 1514 B)."""
    traced = next((r for r in result["rows"] if r["workload"].endswith("-trace")), None)
    size = traced["size"] if traced else None
    plain, captured = (row_of(result, "stream-deep-%s%s" % (size, tail))
                       for tail in ("", "-capture"))
    if not (plain and captured and traced):
        return "Recording costs: not measured (needs a frame size of at most 1514 B)"
    wall = [r["lgnet"]["wall_us"] for r in (plain, captured, traced)]
    return ("Recording costs per frame (deep %d B stream, wall time): capture on %+.2f us; "
            "--trace on %+.2f us more than capture alone (%+.2f us in all)"
            % (size, wall[1] - wall[0], wall[2] - wall[1], wall[2] - wall[0]))


def report(result: dict) -> str:
    parts = [table(result), "", breakdown(result), "", recording_cost(result), "",
             scaling(result), "", unicorn_lines(result), "", target_lines(result)]
    skipped = next((r["anchors"]["netns"]["skipped"] for r in result["rows"]
                    if "skipped" in r["anchors"].get("netns", {})), None)
    if skipped:
        parts += ["", "netns anchor skipped: %s" % skipped]
    return "\n".join(parts)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as out:
        json.dump(result, out, indent=1, sort_keys=False)
        out.write("\n")


PLOT_NEEDS = "matplotlib is not installed (pip install 'lgnet[bench]')"


def plot_unavailable(path: str) -> str | None:
    """Why `plot(result, path)` could not write its file, known before any benchmark runs:
    no matplotlib, or no directory to write into; None when it can."""
    import importlib
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return "%s is not a directory we may write into" % directory
    try:
        importlib.import_module("matplotlib")          # what plot() will need
    except ImportError:
        return PLOT_NEEDS
    return None


def plot(result: dict, path: str) -> str | None:
    """Throughput vs frame size for lgnet and the anchors; None, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_NEEDS
    series: dict[str, dict[int, float]] = {}
    for r in result["rows"]:
        if r["kind"] != "stream":
            continue
        mode = "deep" if "deep" in r["workload"] else "lguest_net"
        series.setdefault("lgnet, %s rx" % mode, {})[r["size"]] = r["lgnet"]["mb_s"]
        for name, fig in r["anchors"].items():
            if "mb_s" in fig:
                series.setdefault(ANCHOR_NAMES[name], {})[r["size"]] = fig["mb_s"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=80)
    for name, points in series.items():
        sizes = sorted(points)
        ax.plot(sizes, [points[s] for s in sizes], marker="o", label=name,
                linestyle="--" if not name.startswith("lgnet") else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("frame size (bytes)")
    ax.set_ylabel("verified MB/s")
    m = result["machine"]
    ax.set_title("lgnet stream vs anchors (%s cores, %s)" % (m["cores"], result["date"][:10]),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


ANCHOR_NAMES = {"socketpair": "socketpair (AF_UNIX seqpacket)", "copy": "one-copy limit",
                "netns": "netns + veth + bridge (UDP)"}
