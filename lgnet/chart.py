"""A trace's deliveries, read back, and drawn as a message sequence chart (`lgnet trace`).

What this room is for: people who would rather look than read a timeline. The chart has one
lane per guest (in the scenario's order), time running down, and one arrow per delivery from
its sender's lane to its receiver's, labelled with the frame's summary (scapy's, from the
capture) and the lguest facts of the transfer: the key, the receive buffer, used_len, the
interrupt line and the send number. A frame that did not arrive whole is marked: truncated
(the receiver's buffer was shorter than the offer), or one whose interrupt the receiver never
took before the trace ended.

Rules of this file: it reads only the merged trace (lgnet.timeline), never a live lab; the
SVG is written by hand (a few elements: lines, paths, text), so it needs no plotting library.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from xml.sax.saxutils import escape

from lgnet import timeline
from lgnet.errors import LgnetError

LANE_GAP = 330                       # px between lanes
MARGIN_X = 130                       # room for the time column on the left
HEAD_Y = 50                          # the lane names' baseline
FIRST_ROW_Y = 100
ROW_GAP = 58
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
COLOURS = {"ok": "#1f5fa8", "marked": "#c0392b"}


@dataclass
class Delivery:
    """One transfer of the trace, with what the lab joined to it."""
    ts: float                         # µs, CLOCK_MONOTONIC
    offset_ms: float                  # since the trace's first event
    sender: str
    receiver: str
    send: int | None
    key: str
    buffer: int
    used_len: int
    offered: int
    irq: int
    summary: str
    taken: bool                       # the receiver took the interrupt (the flow was joined)

    @property
    def marks(self) -> list[str]:
        out = []
        if self.offered > self.used_len:
            out.append("truncated from %d" % self.offered)
        if not self.taken:
            out.append("interrupt never taken")
        return out

    def facts(self) -> str:
        send = "send %d" % self.send if self.send is not None else "send ?"
        return "%s  key %s  buffer %d  used_len %d  irq %d" % (send, self.key, self.buffer,
                                                                self.used_len, self.irq)

    def line(self) -> str:
        marks = "".join("  [%s]" % m for m in self.marks)
        return "%s -> %s  %s  [%s]%s" % (self.sender, self.receiver, self.summary,
                                          self.facts(), marks)


def load_trace(path: str) -> dict:
    """A trace file written by --trace; a missing or foreign file is the user's mistake."""
    if not os.path.isfile(path):
        raise LgnetError("no trace file %s (write one with `lgnet up --trace FILE`)" % path)
    try:
        trace = timeline.load(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LgnetError("%s: not a JSON trace (%s)" % (path, exc)) from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise LgnetError("%s: not a trace of lgnet's (no traceEvents list)" % path)
    return trace


def deliveries(trace: dict) -> list[Delivery]:
    events = trace["traceEvents"]
    start = min((e["ts"] for e in events if "ts" in e), default=0.0)
    out = []
    for e in events:
        if e.get("cat") != timeline.CAT_TRANSFER or e.get("ph") != timeline.PHASE_COMPLETE:
            continue
        a = e["args"]
        out.append(Delivery(
            ts=e["ts"], offset_ms=(e["ts"] - start) / 1000.0, sender=a["sender"],
            receiver=a["receiver"], send=a.get("send"), key=a["key"], buffer=a["buffer"],
            used_len=a["used_len"], offered=a["offered"], irq=a["irq"],
            summary=a.get("summary", "(no capture of this frame)"), taken="flow" in a))
    out.sort(key=lambda d: d.ts)
    return out


def lanes(trace: dict) -> list[str]:
    """The guests, in the scenario's order when the lab recorded it; then any other sender
    or receiver the transfers name."""
    names = list(trace.get("otherData", {}).get("guests", []))
    for d in deliveries(trace):
        for name in (d.sender, d.receiver):
            if name not in names:
                names.append(name)
    return names


def sequence_chart(trace: dict, frames: int) -> tuple[str, int]:
    """The SVG text of the first `frames` deliveries, and how many it shows."""
    shown = deliveries(trace)[:frames]
    names = lanes(trace)
    x = {name: MARGIN_X + LANE_GAP // 2 + i * LANE_GAP for i, name in enumerate(names)}
    width = MARGIN_X + LANE_GAP * max(len(names), 1)
    bottom = FIRST_ROW_Y + ROW_GAP * len(shown)
    height = bottom + 40
    out = ["<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' "
           "viewBox='0 0 %d %d' %s font-size='12'>" % (width, height, width, height, FONT),
           "<title>lgnet: the first %d deliveries</title>" % len(shown),
           "<defs>%s</defs>" % "".join(
               "<marker id='head-%s' markerWidth='10' markerHeight='8' refX='10' refY='4' "
               "orient='auto'><path d='M0,0 L10,4 L0,8 z' fill='%s'/></marker>" % (kind, colour)
               for kind, colour in COLOURS.items()),
           "<rect width='100%' height='100%' fill='white'/>",
           "<text x='10' y='%d' fill='#555'>ms from the first</text>" % HEAD_Y]
    first = shown[0].offset_ms if shown else 0.0
    for name in names:
        out.append("<g class='lane' data-guest='%s'>"
                   "<text x='%d' y='%d' text-anchor='middle' font-size='15' "
                   "font-weight='bold'>%s</text>"
                   "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='#999' "
                   "stroke-dasharray='4,4'/></g>"
                   % (escape(name, {"'": "&apos;"}), x[name], HEAD_Y, escape(name),
                      x[name], HEAD_Y + 12, x[name], bottom))
    for row, d in enumerate(shown):
        y = FIRST_ROW_Y + ROW_GAP * row
        kind = "marked" if d.marks else "ok"
        x1, x2 = x[d.sender], x[d.receiver]
        middle = (x1 + x2) / 2
        dash = " stroke-dasharray='6,3'" if d.marks else ""
        label = d.summary + "".join("  [%s]" % m for m in d.marks)
        out.append(
            "<g class='delivery' data-send='%s'>"
            "<text x='10' y='%d' fill='#555'>%.3f</text>"
            "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='%s' stroke-width='1.6'%s "
            "marker-end='url(#head-%s)'/>"
            "<text x='%.0f' y='%d' text-anchor='middle' fill='%s'>%s</text>"
            "<text x='%.0f' y='%d' text-anchor='middle' fill='#555' font-size='10'>%s</text>"
            "</g>" % (d.send, y + 4, d.offset_ms - first, x1, y, x2, y, COLOURS[kind], dash, kind,
                      middle, y - 7, COLOURS[kind], escape(label), middle, y + 15,
                      escape(d.facts())))
    out.append("</svg>")
    return "\n".join(out) + "\n", len(shown)


def write_chart(trace: dict, path: str, frames: int) -> int:
    """Write the chart to path; how many deliveries it shows."""
    svg, shown = sequence_chart(trace, frames)
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(svg)
    except OSError as exc:
        raise LgnetError("cannot write %s: %s" % (path, exc.strerror)) from None
    return shown
