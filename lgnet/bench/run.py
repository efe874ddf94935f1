"""`lgnet bench`'s measuring: `run(plan) -> Report`, the API scripts call. It composes lab.py
(a broker and one launcher process per guest, for every run), the bench guest kernels
(lgnet.guest.benchguests) and the anchors (lgnet.anchors); it runs each round's workloads and
their anchors interleaved, takes medians and computes ratios. Rules of this room: it prints
nothing (progress goes to a callback the face may give) and reads guests' results from the
structured reports they write, never from their consoles — save the bundled kernel's one
flood summary (`parse_flood_summary`, which says why).

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
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from lgnet import abi, anchors, process
from lgnet.fabric import fastpath
from lgnet.bench.plan import (DEEP_RX, LATENCY_SIZE, MAX_SIZE, TARGET_BRINGUP_S, TARGET_FANOUT,
                              TARGET_CAPTURE, TARGET_LATENCY, TARGET_RSS_MB, TARGET_SCALE_GUESTS,
                              TARGET_STREAM_1514, TARGET_STREAM_64K, TARGET_STREAM_LGUEST_NET,
                              TARGET_UNICORN, UNICORN_MEM_MB, Plan,
                              Workload, mem_mb)
from lgnet.lab import Lab
from lgnet.scenario import GuestSpec, Network, Scenario

KERNEL = "python:lgnet.guest.benchguests"
NET = "lan0"
LAB_TIMEOUT = 60.0                    # seconds a run may take beyond its measuring time
BRINGUP_SECONDS_PER_GUEST = 0.25      # ... and per guest to start
GRACE_PER_GUEST = 0.2                 # a receiver waits this much longer per guest in the run
PACKAGES = ("lgnet", "unicorn", "pyelftools", "PyYAML", "scapy", "matplotlib")
US = 1e6
MB = 1e6
UNICORN_KERNEL = "bundled"
UNICORN_FLOODER, UNICORN_ECHO = "10.0.0.1", "10.0.0.2"
UNICORN_SCALE_BUDGET_S = 20.0         # no larger N is tried once this much time has gone
UNICORN_READY_S = 60.0


class BenchError(RuntimeError):
    """A run did not produce its figures (a guest died, timed out, or said nothing)."""


def lab_run(w: Workload, guests: list[tuple[str, list[str]]], seconds: float) -> tuple[dict, dict, float]:
    """Start the guests (in order) on one net, wait for all; (reports by name, broker
    counters, monotonic time the first guest was started). Each guest is told on its command
    line where to write its report (result=FILE, one JSON object): the lab reads the files, not
    the consoles, which stay for people (and for the error message when a guest said nothing)."""
    scenario = Scenario(Path("<lgnet bench>"), None, {NET: Network(NET)}, [], [])
    timeout = seconds + LAB_TIMEOUT + BRINGUP_SECONDS_PER_GUEST * len(guests)
    with tempfile.TemporaryDirectory(prefix="lgnet-bench-") as results, \
            Lab(scenario, capture=w.capture,
                trace=os.path.join(results, "trace.json") if w.trace else None) as lab:
        if w.impair:
            lab.impair(NET, **dict(w.impair))
        started = time.monotonic()
        for name, args in guests:
            lab.start_guest(GuestSpec(name, mem_mb=mem_mb(w), kernel=KERNEL, nets=(NET,),
                                      args=tuple(args) + ("result=%s" % result_file(results, name),)))
        finished = lab.wait(timeout)
        broker = lab.broker_stats()
        reports = {run.name: read_result(result_file(results, run.name)) for run in lab.guests}
        missing = [run for run in lab.guests if reports[run.name] is None
                   or "error" in reports[run.name]]
        if not finished or missing:
            tails = "; ".join("%s: %s" % (r.name, " | ".join(r.console[-3:])) for r in missing)
            raise BenchError("%s: %s%s" % (w.key, "timed out; " if not finished else "",
                                          tails or "no report"))
    return reports, broker, started


def result_file(directory: str, guest: str) -> str:
    return os.path.join(directory, guest + ".json")


def read_result(path: str) -> dict | None:
    """A bench guest's report, or None when it wrote none (it died first, or hung)."""
    try:
        with open(path) as report:
            return json.load(report)
    except FileNotFoundError:
        return None


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
            # the share of deliveries the compiled per-frame path made (fabric/fastpath.py)
            "compiled_pct": 100.0 * broker.get("fast_frames", 0) / tx["ok"] if tx["ok"] else 0.0,
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
    rss = [r["peak_rss_kb"] / 1024 for r in rxs + [tx]]
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
            found = parse_flood_summary(list(flooder.console))
            if found is None:
                time.sleep(0.02)
        if status is None or found is None:
            raise BenchError("%s: %s%s" % (w.key, "timed out; " if status is None else "",
                                          " | ".join(flooder.console[-3:]) or "no report"))
    sent, received = found["sent"], found["received"]
    return {"replies_s": float(found["replies_s"]), "rtt_us": found["rtt_ms"] * 1000,
            "sent": sent, "received": received, "lost": sent - received,
            "lost_pct": 100.0 * (sent - received) / sent if sent else 0.0,
            "flood_s": flood_s}


FLOOD_LINE = re.compile(r"flood (?P<target>\S+): (?P<sent>\d+) sent, (?P<received>\d+) received, "
                        r"(?P<replies_s>\d+) replies/s, rtt avg (?P<rtt_ms>[0-9.]+) ms")


def parse_flood_summary(console: list[str]) -> dict | None:
    """The bundled kernel's flood summary (main.c's flood=, README documents the line):
    {"target", "sent", "received", "replies_s", "rtt_ms"}, or None before it is printed.

    The one console line the bench reads. The Python bench guests hand the lab a JSON file,
    but the bundled kernel is a real i386 guest kernel: like a Linux guest it has RAM, its
    devices and printk, no file to write and no channel to the lab but its console, and
    giving it one would make it less of a guest. So its one documented line is parsed here,
    and only here."""
    for line in console:
        found = FLOOD_LINE.search(line)
        if found:
            fields = found.groupdict()
            return {"target": fields["target"], "sent": int(fields["sent"]),
                    "received": int(fields["received"]),
                    "replies_s": int(fields["replies_s"]), "rtt_ms": float(fields["rtt_ms"])}
    return None


def rss_mb(pid: int) -> float | None:
    kib = process.proc_field("/proc/%d/status" % pid, "VmRSS")
    return None if kib is None else int(kib) / 1024


def mem_available_mb() -> float | None:
    kib = process.proc_field("/proc/meminfo", "MemAvailable")
    return None if kib is None else int(kib) / 1024


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


@dataclass
class Report:
    """What one `lgnet bench` measured: every figure, per row the medians, each round's
    figures, the anchors and the ratios; the machine, the options and the method. `to_dict()`
    is the --json document."""
    date: str
    machine: dict
    options: dict
    method: dict
    elapsed_s: float
    rows: list[dict]
    unicorn_scale: dict
    targets: list[dict]
    recording: dict | None = None     # what capture and --trace add per frame (None: not run)

    def row(self, workload: str) -> dict | None:
        return row_of(self.rows, workload)

    def to_dict(self) -> dict:
        return {"lgnet": "lgnet bench", **asdict(self)}


def run(plan: Plan, progress: Callable[[str], None] | None = None) -> Report:
    """Every workload of the plan and its anchors, `rounds` times interleaved, then the
    Unicorn scale; `progress` (if given) hears one line before each step. Prints nothing."""
    opts = plan.options
    netns_skip = anchors.netns_available()
    lgnet_rounds: dict[str, list[dict]] = {w.key: [] for w in plan.workloads}
    anchor_rounds: dict[tuple, list[dict]] = {}
    started = time.monotonic()
    for rnd in range(opts.rounds):
        measured: set[tuple] = set()
        for w in plan.workloads:
            note(progress, "round %d/%d: %s, %d B" % (rnd + 1, opts.rounds, w.label, w.size))
            lgnet_rounds[w.key].append(RUNNERS[w.kind](w, opts.seconds))
            for spec in w.anchors(netns_skip is None).values():
                if spec not in measured:      # an anchor shared by rows runs once a round
                    measured.add(spec)
                    anchor_rounds.setdefault(spec, []).append(
                        anchor_figures(spec[0], spec[1], opts.seconds, spec[2]))
    rows = [summarize(w, lgnet_rounds[w.key], anchor_rounds, netns_skip) for w in plan.workloads]
    compare_rows(rows)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    note(progress, "unicorn guests: how many fit (N = %s idle)"
         % ", ".join(map(str, plan.unicorn_scale)))
    scale = unicorn_scale(plan.unicorn_scale)
    return Report(date=date, machine=machine(), options=asdict(opts), method=METHOD,
                  elapsed_s=time.monotonic() - started, rows=rows, unicorn_scale=scale,
                  targets=targets(rows), recording=recording_cost(rows))


def recording_cost(rows: list[dict]) -> dict | None:
    """What capture and --trace add to a frame's wall time: the deep stream of the largest size
    up to 1514 B, plain, captured and traced; None without those rows."""
    traced = next((r for r in rows if r["workload"].endswith("-trace")), None)
    size = traced["size"] if traced else None
    plain, captured = (row_of(rows, "stream-deep-%s%s" % (size, tail)) for tail in ("", "-capture"))
    if not (plain and captured and traced):
        return None
    wall = [r["lgnet"]["wall_us"] for r in (plain, captured, traced)]
    return {"size": size, "capture_us": wall[1] - wall[0], "trace_over_capture_us": wall[2] - wall[1],
            "trace_us": wall[2] - wall[0]}


def summarize(w: Workload, rounds: list[dict], anchor_rounds: dict[tuple, list[dict]],
              netns_skip: str | None) -> dict:
    """One row: lgnet's medians beside its anchors' and the ratios of the row's metric."""
    fig, unit = metric(w)
    lg = median_of(rounds)
    row = {"workload": w.key, "kind": w.kind, "label": w.label, "size": w.size,
           "guests": w.guests, "rx_entries": w.rx, "rx_buffer": w.rxsize,
           "metric": fig, "unit": unit, "lgnet": lg, "rounds": rounds,
           "anchors": {}, "ratios": {}}
    for name, spec in w.anchors(netns_skip is None).items():
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
    return row


def compare_rows(rows: list[dict]) -> None:
    """The figures the tables set beside a row's metric: round trips for the latency row, the
    Unicorn flood against the Python-driver guests' ping-pong, fan-out against N=2."""
    lat = row_of(rows, "latency-%d" % LATENCY_SIZE)
    two = row_of(rows, "fanout-2")
    for row in rows:
        lg, sp = row["lgnet"], row["anchors"].get("socketpair", {})
        if row["kind"] == "latency" and "p50_us" in lg:
            lg["rtt_p50_us"] = 2 * lg["p50_us"]
            lg["round_trips_s"] = US / lg["rtt_p50_us"]
            add_ratio(row, "socketpair_p99", lg.get("p99_us"), sp.get("p99_us"))
        elif row["kind"] == "unicorn":
            add_ratio(row, "socketpair_rtt", lg.get("rtt_us"), sp.get("rtt_p50_us"))
            if lat and "rtt_p50_us" in lat["lgnet"]:
                lg["python_rtt_p50_us"] = lat["lgnet"]["rtt_p50_us"]
                lg["python_round_trips_s"] = lat["lgnet"]["round_trips_s"]
        elif row["kind"] == "fanout" and two:
            lg["vs_fanout_2"] = ratio(lg["deliveries_s"], two["lgnet"]["deliveries_s"])


def add_ratio(row: dict, name: str, a, b) -> None:
    r = ratio(a, b)
    if r is not None:
        row["ratios"][name] = r


def note(progress: Callable[[str], None] | None, text: str) -> None:
    if progress is not None:
        progress(text)


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
              "each guest's peak resident set (VmHWM; ru_maxrss would carry its starter's "
              "over fork and exec)",
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
            "root": os.geteuid() == 0, "packages": versions,
            "per_frame_path": fastpath.label()}


def row_of(rows: list[dict], workload: str) -> dict | None:
    return next((r for r in rows if r["workload"] == workload), None)


def targets(rows: list[dict]) -> list[dict]:
    """Issue 15's targets beside what this run measured (None: the run had no such row)."""
    out = []

    def add(name, measured, goal, met, note=""):
        out.append({"target": name, "measured": measured, "goal": goal,
                    "met": None if measured is None else met, "note": note})

    def at_least(name, measured, goal, note=""):
        add(name, measured, goal, measured is not None and measured >= goal, note)

    def vs(workload, anchor):
        row = row_of(rows, workload)
        return row["ratios"].get(anchor) if row else None

    at_least("stream 65,536 B MB/s >= %.1fx socketpair" % TARGET_STREAM_64K,
             vs("stream-deep-%d" % MAX_SIZE, "socketpair"), TARGET_STREAM_64K, "deep rx")
    for anchor in ("socketpair", "netns"):
        at_least("stream 1514 B frames/s >= %.1fx %s (deep rx)" % (TARGET_STREAM_1514, anchor),
                 vs("stream-deep-%d" % abi.ETH_FRAME_LEN, anchor), TARGET_STREAM_1514)
    at_least("stream 1514 B frames/s >= %.1fx socketpair (lguest_net rx)"
             % TARGET_STREAM_LGUEST_NET, vs("stream-lguest_net-%d" % abi.ETH_FRAME_LEN,
                                           "socketpair"), TARGET_STREAM_LGUEST_NET)
    r = vs("latency-%d" % LATENCY_SIZE, "socketpair")
    add("latency p50 <= %.1fx socketpair" % TARGET_LATENCY, r, TARGET_LATENCY,
        r is not None and r <= TARGET_LATENCY)
    two, many = row_of(rows, "fanout-2"), row_of(rows, "fanout-32")
    at_least("fan-out deliveries/s at 32 >= %.1fx at 2" % TARGET_FANOUT,
             ratio(many["lgnet"]["deliveries_s"], two["lgnet"]["deliveries_s"])
             if two and many else None, TARGET_FANOUT)
    off = row_of(rows, "stream-deep-%d" % abi.ETH_FRAME_LEN)
    on = row_of(rows, "stream-deep-%d-capture" % abi.ETH_FRAME_LEN)
    at_least("capture on >= %.1fx capture off (1514 B deep rx)" % TARGET_CAPTURE,
             ratio(on["lgnet"]["frames_s"], off["lgnet"]["frames_s"]) if on and off else None,
             TARGET_CAPTURE)
    at_least("unicorn ICMP round trips >= %.1fx socketpair ping-pong" % TARGET_UNICORN,
             vs("unicorn-icmp", "socketpair"), TARGET_UNICORN)
    scale = row_of(rows, "fanout-%d" % TARGET_SCALE_GUESTS)
    up = scale["lgnet"]["bringup_s"] if scale else None
    add("%d guests up < %.0f s" % (TARGET_SCALE_GUESTS, TARGET_BRINGUP_S), up, TARGET_BRINGUP_S,
        up is not None and up < TARGET_BRINGUP_S, "run with --guests %d" % TARGET_SCALE_GUESTS)
    rss = scale["lgnet"]["rss_mb_max"] if scale else None
    add("%d guests < %.0f MB RSS each" % (TARGET_SCALE_GUESTS, TARGET_RSS_MB), rss, TARGET_RSS_MB,
        rss is not None and rss < TARGET_RSS_MB, "peak RSS of the largest guest")
    return out
