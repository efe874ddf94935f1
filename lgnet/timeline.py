"""The timeline: what `--trace FILE` records, in Chrome's JSON trace-event format.

What this room is for: the broker and every launcher each write their own event stream (one
JSON event a line, into a per-process file in the lab's runtime directory), and at the end the
lab merges them into one file that the Perfetto UI (ui.perfetto.dev) and chrome://tracing open:
a track per process (pid) and thread (tid), named by process_name / thread_name metadata.

Rules of this file:
- Ground floor: both wings write streams through `EventStream`, the lab merges with `merge`;
  it knows the event vocabulary below and nothing of how the events come about.
- One clock: CLOCK_MONOTONIC (time.monotonic_ns on Linux), in microseconds, the trace-event
  format's unit — the same in every process, so the streams line up without adjustment.
- Adding an event never does I/O: it goes into a buffer, and `flush` writes the buffer when
  the caller is at a safe point (the broker: after a pass, outside lguest_lock). A stream is
  written with O_APPEND in whole lines, so a process killed mid-run leaves whole events.

The join (merge's theory of operation). A frame's life crosses three processes, and no one of
them sees all of it: the sender's launcher times its SEND_DMA, the broker performs the transfer
(and knows the capture's send number, the sender and the receiver), and the receiver's launcher
delivers the interrupt. The merge joins them on the one clock: the flow of a transfer starts
in the SEND_DMA slice on the sender's track that encloses the transfer's time, and ends in the
receiver's first delivery of the transfer's interrupt line at or after it (one interrupt may
answer several transfers, as in lguest).
"""
from __future__ import annotations

import bisect
import json
import os
import time

from lgnet import abi
from lgnet.errors import LgnetError

# --- the vocabulary: categories, names and the arguments the join reads -------------------

CAT_HYPERCALL = "hypercall"
CAT_INTERRUPT = "interrupt"
CAT_CONSOLE = "console"
CAT_TRANSFER = "transfer"
CAT_LOCK = "lguest_lock"
CAT_RESTOCK = "restock"
CAT_FRAME = "frame"                  # the flow arrows: one frame's life

SEND_DMA = "SEND_DMA"                # the hypercall slice a flow starts in (abi.HYPERCALL_NAMES)
INTERRUPT = "interrupt %d"           # the slice a flow ends in, by interrupt line
FLOW = "send %d"                     # a flow's name: the capture's send number

STREAM_SUFFIX = ".trace.jsonl"
FLUSH_EVENTS = 512                   # buffered events before a flush writes them
MIN_DURATION_US = 1.0                # a slice too short to see is drawn this long

PHASE_COMPLETE = "X"
PHASE_INSTANT = "i"
PHASE_METADATA = "M"
PHASE_FLOW_START = "s"
PHASE_FLOW_END = "f"


def now_us() -> float:
    """CLOCK_MONOTONIC in microseconds (the one clock of every stream)."""
    return time.monotonic_ns() / 1000.0


def seconds_to_us(monotonic_seconds: float) -> float:
    """A time.monotonic() reading on the same clock."""
    return monotonic_seconds * 1e6


class EventStream:
    """One process's events: buffered, appended to `path` on flush, one JSON object a line.

    Adding an event stores a tuple (no formatting: the broker adds them under lguest_lock);
    flush formats them — names and categories once each, arguments with json — and writes."""

    def __init__(self, path: str, process_name: str, pid: int | None = None):
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self.events: list[tuple] = []
        self.quoted: dict[str, str] = {}              # a name's JSON text, made once
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.metadata("process_name", self.pid, {"name": process_name})

    def metadata(self, what: str, tid: int, args: dict) -> None:
        self.events.append((PHASE_METADATA, tid, None, what, 0.0, 0.0, args))

    def thread(self, tid: int, name: str) -> int:
        """Name a track of this process; its tid."""
        self.metadata("thread_name", tid, {"name": name})
        return tid

    def complete(self, tid: int, cat: str, name: str, ts: float, dur: float,
                 args: dict | None = None) -> None:
        """A slice: `name` from ts for dur microseconds."""
        self.events.append((PHASE_COMPLETE, tid, cat, name, ts, dur, args))

    def instant(self, tid: int, cat: str, name: str, ts: float,
                args: dict | None = None) -> None:
        self.events.append((PHASE_INSTANT, tid, cat, name, ts, 0.0, args))

    def flush(self, force: bool = True) -> None:
        """Write what is buffered (without force: only once FLUSH_EVENTS have gathered)."""
        if self.fd is None or not self.events or (not force and len(self.events) < FLUSH_EVENTS):
            return
        events, self.events = self.events, []
        os.write(self.fd, "".join(map(self._line, events)).encode())

    def _quote(self, text: str) -> str:
        quoted = self.quoted.get(text)
        if quoted is None:
            quoted = json.dumps(text)
            if len(self.quoted) < FLUSH_EVENTS:       # names repeat; free text need not stay
                self.quoted[text] = quoted
        return quoted

    def _line(self, event: tuple) -> str:
        phase, tid, cat, name, ts, dur, args = event
        tail = ',"args":%s}\n' % json.dumps(args, separators=(",", ":")) if args else "}\n"
        if phase == PHASE_METADATA:
            return '{"ph":"M","name":"%s","pid":%d,"tid":%d%s' % (name, self.pid, tid, tail)
        head = '{"ph":"%s","cat":%s,"name":%s,"pid":%d,"tid":%d,"ts":%.3f' % (
            phase, self._quote(cat), self._quote(name), self.pid, tid, ts)
        if phase == PHASE_COMPLETE:
            return '%s,"dur":%.3f%s' % (head, max(dur, MIN_DURATION_US), tail)
        return '%s,"s":"t"%s' % (head, tail)

    def close(self) -> None:
        if self.fd is not None:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = None


def read_stream(path: str) -> list[dict]:
    """A stream's events; a last line cut short by a kill is left out."""
    events = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


# --- the merge --------------------------------------------------------------------------

def merge(stream_paths: list[str], out_path: str, process_names: dict[int, str] | None = None,
          annotate=None, guests: list[str] | None = None) -> dict:
    """Merge streams into one trace file at out_path; its {"traceEvents": [...]} object.

    process_names: pid -> the name its track should carry (the lab's guest names).
    annotate(transfer_args) -> extra arguments for a transfer (the lab's capture facts).
    guests: the guests' names in the scenario's order (kept for readers of the file)."""
    events: list[dict] = []
    for path in stream_paths:
        if os.path.exists(path):
            events += read_stream(path)
    for event in events:
        if event.get("ph") == PHASE_METADATA and event["name"] == "process_name" \
                and process_names and event["pid"] in process_names:
            event["args"] = {"name": process_names[event["pid"]]}
    if annotate is not None:
        for event in events:
            if event.get("cat") == CAT_TRANSFER:
                event.setdefault("args", {}).update(annotate(event["args"]))
    events += frame_flows(events)
    timed = sorted((e for e in events if "ts" in e), key=lambda e: (e["ts"], -e.get("dur", 0)))
    trace = {"traceEvents": [e for e in events if "ts" not in e] + timed,
             "displayTimeUnit": "ms",
             "otherData": {"clock": "CLOCK_MONOTONIC", "generator": "lgnet",
                           "guests": list(guests or [])}}
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(trace, out, separators=(",", ":"))
    os.replace(tmp, out_path)
    return trace


class _Track:
    """One track's slices of one kind, sorted by start, for "which slice holds time t"."""

    def __init__(self, slices: list[dict]):
        self.slices = sorted(slices, key=lambda e: e["ts"])
        self.starts = [e["ts"] for e in self.slices]

    def enclosing(self, t: float) -> dict | None:
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and t <= self.slices[i]["ts"] + self.slices[i]["dur"]:
            return self.slices[i]
        return None

    def first_from(self, t: float) -> dict | None:
        i = bisect.bisect_left(self.starts, t)
        return self.slices[i] if i < len(self.slices) else None


def frame_flows(events: list[dict]) -> list[dict]:
    """The flow events (ph s/f) of every transfer whose SEND_DMA and interrupt are found;
    each such transfer's arguments get its flow's id (`flow`), so a reader knows it arrived."""
    sends: dict[tuple[int, str], list[dict]] = {}
    interrupts: dict[tuple[int, int], list[dict]] = {}
    for e in events:
        if e.get("ph") != PHASE_COMPLETE:
            continue
        if e["cat"] == CAT_HYPERCALL and e["name"] == SEND_DMA:
            # By key too: the sends queued in the async ring share one span (that of the call
            # they went with), so the time alone would not tell a broadcast's apart.
            sends.setdefault((e["pid"], e["args"]["key"]), []).append(e)
        elif e["cat"] == CAT_INTERRUPT:
            interrupts.setdefault((e["pid"], e["args"]["irq"]), []).append(e)
    send_tracks = {pid: _Track(s) for pid, s in sends.items()}
    irq_tracks = {key: _Track(s) for key, s in interrupts.items()}
    flows = []
    for e in events:
        if e.get("cat") != CAT_TRANSFER or e.get("ph") != PHASE_COMPLETE:
            continue
        args = e["args"]
        if args.get("send") is None:
            continue
        t = e["ts"] + e["dur"]                 # the transfer is done when its slice ends
        start_track = send_tracks.get((args["sender_pid"], args["key"]))
        end_track = irq_tracks.get((args["receiver_pid"], args["irq"]))
        start = start_track.enclosing(t) if start_track else None
        end = end_track.first_from(t) if end_track else None
        if start is None or end is None:
            continue
        flow = {"cat": CAT_FRAME, "name": FLOW % args["send"],
                "id": flow_id(args["send"], args["receiver_guest"])}
        # Each end lies strictly inside its slice, so that a reader binds it to that slice
        # whatever order it reads events of equal time in; bp "e" binds the end to the
        # slice enclosing it (the interrupt), not to the next one to start.
        flows.append(dict(flow, ph=PHASE_FLOW_START, pid=start["pid"], tid=start["tid"],
                          ts=inside(start, t)))
        flows.append(dict(flow, ph=PHASE_FLOW_END, bp="e", pid=end["pid"], tid=end["tid"],
                          ts=inside(end, end["ts"])))
        args["flow"] = flow["id"]
    return flows


def inside(slice_: dict, t: float) -> float:
    """t, moved into the open interval of the slice if it is not in it."""
    first, last = slice_["ts"], slice_["ts"] + slice_["dur"]
    return t if first < t < last else (first + last) / 2


def flow_id(send: int, receiver_guest: int) -> int:
    """A broadcast is one send number for several deliveries: a flow per receiver (by the
    Host's guest id), numbered so that the send number reads off it."""
    return send * abi.MAX_GUESTS + receiver_guest


def check_trace_path(path) -> str:
    """A trace file must be writable where it is asked for: said before anything starts."""
    path = str(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise LgnetError("trace %s: no directory %s" % (path, directory))
    if os.path.isdir(path):
        raise LgnetError("trace %s: is a directory (give a file name)" % path)
    if not os.access(directory, os.W_OK) or (os.path.exists(path)
                                             and not os.access(path, os.W_OK)):
        raise LgnetError("trace %s: not writable here" % path)
    return path


def load(path: str) -> dict:
    """A merged trace file, as written by merge."""
    with open(path, encoding="utf-8") as trace:
        return json.load(trace)
