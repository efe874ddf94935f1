"""Impairments: the decisions that break a net on cue — loss, delay, jitter, duplicates,
corruption, a rate limit, links down, partitions — as pure logic.

Rules of this file: it is sans-IO like dma.py. It never reads a clock (the caller hands one
in), never sleeps, never touches guest memory: it *decides* what happens to one frame and
keeps the frames that wait for their due time; the engine applies the decision exactly where
the frame moves, and the broker fires the due times. It knows guests and nets only by name.
Every value a user can give is checked here (`check_params`), once, for the scenario file,
the Python API and the CLI alike.

Theory of operation. Rules are set per direction: for a sender->receiver pair on a net
(`src` and `dst`), for everything a guest sends on a net (`src`), everything it receives
(`dst`), or the whole net; the most specific rule that exists applies to a frame (pair, then
sender, then receiver, then net). A link (a guest's attachment to a net) may be down, and a
partition splits the guests into groups: both make a frame a `down` one, whatever the rules
say. Each (net, sender, receiver) stream has its own generator, seeded from the lab's seed and
the three names, so the same seed makes the same decisions for the same sequence of frames on
every stream, however the streams interleave. A frame's draws come in a fixed order: loss,
rate, jitter, duplicate, corrupt.
"""
from __future__ import annotations

import heapq
import math
import random
import re
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable

MAX_DELAY_MS = 60_000
MAX_BURST = 1_000_000
MAX_LIMIT = 1 << 20
DEFAULT_LIMIT = 1000                 # frames a rate limit queues before it drops (netem's)
BITS_PER_BYTE = 8
MS = 1e-3

# rate: a number of bit/s, or a string "<n>[k|m|g]bit" or "<n>fps" (frames per second)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|fps)\s*$", re.IGNORECASE)
_RATE_SCALE = {"bit": 1, "kbit": 10 ** 3, "mbit": 10 ** 6, "gbit": 10 ** 9}


class ImpairError(ValueError):
    """A bad impairment value: `key` and what is wrong (the caller says where)."""

    def __init__(self, key: str, what: str):
        super().__init__("%s: %s" % (key, what))
        self.key = key
        self.what = what


@dataclass(frozen=True)
class Params:
    """What one rule does to the frames it applies to (every field off by default)."""
    loss: float = 0.0          # probability a frame is lost
    burst: float | None = None # mean length of a loss burst (Gilbert-Elliott); None: independent
    delay: float = 0.0         # ms
    jitter: float = 0.0        # ms, uniform in [-jitter, +jitter] around delay
    reorder: bool = False      # may jitter reorder frames? (default: no, like a wire)
    duplicate: float = 0.0     # probability of a second delivery
    corrupt: float = 0.0       # probability of one flipped bit in the delivered copy
    rate: float | None = None  # bit/s, or frames/s with rate_fps
    rate_fps: bool = False
    limit: int = DEFAULT_LIMIT # frames waiting at the rate before one is dropped
    down: bool = False

    def describe(self) -> str:
        """The rule in the words of its keys, e.g. "loss 0.1 delay 20ms"."""
        parts = []
        if self.down:
            parts.append("down")
        if self.loss:
            parts.append("loss %g" % self.loss + (" burst %g" % self.burst if self.burst else ""))
        if self.delay or self.jitter:
            parts.append("delay %gms" % self.delay
                         + (" jitter %gms" % self.jitter if self.jitter else "")
                         + (" reorder" if self.reorder else ""))
        if self.duplicate:
            parts.append("duplicate %g" % self.duplicate)
        if self.corrupt:
            parts.append("corrupt %g" % self.corrupt)
        if self.rate:
            parts.append("rate %s limit %d" % (rate_text(self.rate, self.rate_fps), self.limit))
        return " ".join(parts) or "nothing"

    @property
    def off(self) -> bool:
        return self == Params()

    def as_dict(self) -> dict:
        """The keys a user would write for this rule (what `check_params` takes back)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "rate_fps" or value == f.default:
                continue
            out[f.name] = rate_text(value, self.rate_fps) if f.name == "rate" else value
        if self.rate and "limit" not in out:
            out["limit"] = self.limit
        return out


KEYS = ("loss", "burst", "delay", "jitter", "reorder", "duplicate", "corrupt", "rate",
        "limit", "down")


def rate_text(rate: float, fps: bool) -> str:
    if fps:
        return "%gfps" % rate
    for unit in ("gbit", "mbit", "kbit"):
        if rate >= _RATE_SCALE[unit] and rate % _RATE_SCALE[unit] == 0:
            return "%d%s" % (rate // _RATE_SCALE[unit], unit)
    return "%gbit" % rate


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _probability(key: str, v) -> float:
    if not (_number(v) and 0 <= v <= 1):
        raise ImpairError(key, "must be a probability from 0 to 1, got %r" % (v,))
    return float(v)


def _milliseconds(key: str, v) -> float:
    if not (_number(v) and 0 <= v <= MAX_DELAY_MS):
        raise ImpairError(key, "must be a number of milliseconds from 0 to %d, got %r"
                          % (MAX_DELAY_MS, v))
    return float(v)


def _flag(key: str, v) -> bool:
    if not isinstance(v, bool):
        raise ImpairError(key, "must be true or false, got %r" % (v,))
    return v


def parse_rate(key: str, v) -> tuple[float, bool]:
    """(amount, per frame?) of a rate: bit/s as a number, or "10mbit", "500kbit", "100fps"."""
    if _number(v) and v > 0:
        return float(v), False
    m = _RATE.match(v) if isinstance(v, str) else None
    if m is None or float(m[1]) <= 0:
        raise ImpairError(key, "must be a rate above 0: bit/s as a number, or a string like "
                          "'10mbit', '500kbit', '100fps'; got %r" % (v,))
    unit = m[2].lower()
    if unit == "fps":
        return float(m[1]), True
    return float(m[1]) * _RATE_SCALE[unit], False


def check_value(key: str, value) -> dict:
    """One key's value, checked alone: the Params fields it sets."""
    if key not in KEYS:
        raise ImpairError(key, "unknown impairment (allowed: %s)" % ", ".join(KEYS))
    if key in ("loss", "duplicate", "corrupt"):
        return {key: _probability(key, value)}
    if key in ("delay", "jitter"):
        return {key: _milliseconds(key, value)}
    if key in ("reorder", "down"):
        return {key: _flag(key, value)}
    if key == "burst":
        if not (_number(value) and 1 <= value <= MAX_BURST):
            raise ImpairError(key, "must be a mean burst length in frames from 1 to %d, "
                              "got %r" % (MAX_BURST, value))
        return {key: float(value)}
    if key == "rate":
        rate, fps = parse_rate(key, value)
        return {"rate": rate, "rate_fps": fps}
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_LIMIT):
        raise ImpairError(key, "must be a whole number of frames from 1 to %d, got %r"
                          % (MAX_LIMIT, value))
    return {key: value}


def check_params(given: dict) -> Params:
    """A rule from its keys (loss, burst, delay, jitter, reorder, duplicate, corrupt, rate,
    limit, down), every value checked, then the rules between keys; ImpairError names the
    first bad key."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        out.update(check_value(key, value))
    if "burst" in out and not out.get("loss"):
        raise ImpairError("burst", "only allowed with a 'loss' above 0")
    if "burst" in out and out["loss"] >= 1:
        raise ImpairError("burst", "needs a 'loss' below 1 (a burst must end)")
    if "limit" in out and "rate" not in out:
        raise ImpairError("limit", "only allowed with 'rate'")
    if "reorder" in out and "jitter" not in out:
        raise ImpairError("reorder", "only allowed with 'jitter'")
    return Params(**out)


# --- one frame's fate -----------------------------------------------------------------------

@dataclass
class Verdict:
    """What happens to one frame. `down`: the sender's used_len stays 0 (a carrier error);
    `dropped`: the sender believes it sent, nobody receives it; otherwise it is delivered
    at `due` (None: now), once more if `duplicate`, with the bits `corrupt` flipped."""
    why: str                           # "loss 0.1 (link alpha->beta on lan0)"
    down: bool = False
    dropped: bool = False
    due: float | None = None
    duplicate: bool = False
    corrupt: tuple[int, ...] = ()

    def fault(self, copy: bool = False) -> str:
        """The record's words for it, e.g. "dropped: loss 0.1 (link alpha->beta on lan0)";
        for a delivery (the first, or with `copy` the duplicate), "" when nothing happened
        to it."""
        if self.down:
            return "down: " + self.why
        if self.dropped:
            return "dropped: " + self.why
        done = [w for w, on in (("duplicated", copy), ("delayed", self.due is not None),
                                ("corrupted", bool(self.corrupt))) if on]
        return "%s: %s" % (" ".join(done), self.why) if done else ""


def scope_text(net: str, src: str | None, dst: str | None) -> str:
    """Where a rule applies, in the records' words."""
    if src is None and dst is None:
        return "net %s" % net
    return "link %s->%s on %s" % (src or "*", dst or "*", net)


class Stream:
    """One (net, sender, receiver) direction: its generator and what its rule remembers
    (Gilbert-Elliott's state, the rate's queue, the last due time)."""

    def __init__(self, seed: int, net: str, src: str, dst: str):
        self.random = random.Random("%d/%s/%s/%s" % (seed, net, src, dst))
        self.bad = False               # Gilbert-Elliott: in a loss burst
        self.departures: deque[float] = deque()   # when each frame queued at the rate leaves
        self.last_due = 0.0
        self.frames = 0                # frames judged (the index of the next one)

    def judge(self, params: Params, why: str, length: int, now: float) -> Verdict | None:
        """The fate of the next frame of `length` bytes sent at `now`; None: untouched."""
        self.frames += 1
        rnd = self.random.random
        if params.down:
            return Verdict(why, down=True)
        if params.loss and self._lost(params, rnd):
            return Verdict(why, dropped=True)
        due = None
        if params.rate:
            leaves = self._rate(params, length, now)
            if leaves is None:
                return Verdict(why, dropped=True)
            due = leaves if leaves > now else None
        if params.delay or params.jitter:
            wait = params.delay
            if params.jitter:
                wait += (rnd() * 2 - 1) * params.jitter
            due = (due if due is not None else now) + max(0.0, wait) * MS
        if due is not None and not params.reorder:
            # A wire keeps order: a frame never overtakes the one before it.
            due = max(due, self.last_due)
            self.last_due = due
        duplicate = bool(params.duplicate) and rnd() < params.duplicate
        corrupt = ()
        if params.corrupt and rnd() < params.corrupt and length:
            corrupt = (self.random.randrange(length * BITS_PER_BYTE),)
        if due is None and not duplicate and not corrupt:
            return None
        return Verdict(why, due=due, duplicate=duplicate, corrupt=corrupt)

    def _lost(self, params: Params, rnd) -> bool:
        if params.burst is None:
            return rnd() < params.loss
        # Gilbert's two states: bad loses every frame, good none. Leaving bad has
        # probability r = 1/burst (so bursts last `burst` frames on average); entering it p,
        # chosen so the long-run loss is `loss`: p / (p + r) = loss.
        r = 1.0 / params.burst
        p = min(1.0, params.loss * r / (1.0 - params.loss))
        self.bad = rnd() < (1.0 - r if self.bad else p)
        return self.bad

    def _rate(self, params: Params, length: int, now: float) -> float | None:
        """A token bucket of one frame: when this frame leaves, or None when `limit` frames
        already wait (the frame is dropped)."""
        waiting = self.departures
        while waiting and waiting[0] <= now:
            waiting.popleft()
        if len(waiting) >= params.limit:
            return None
        cost = 1.0 / params.rate if params.rate_fps else length * BITS_PER_BYTE / params.rate
        leaves = max(now, waiting[-1] if waiting else now) + cost
        waiting.append(leaves)
        return leaves


# --- the lab's rules -----------------------------------------------------------------------

Key = tuple  # (net, src or None, dst or None)


class Impairments:
    """Every rule, link state and partition of a lab, and the frames that wait.

    The engine asks `judge(src, dst, net_space, length)` for each frame while anything is
    configured (`active`); `net_of` and `name_of` turn the engine's net identities and guests
    into the names rules use (the broker provides them)."""

    def __init__(self, seed: int, clock: Callable[[], float],
                 net_of: Callable[[Any], str | None] = lambda space: None,
                 name_of: Callable[[Any], str] = str):
        self.seed = seed
        self.clock = clock
        self.net_of = net_of
        self.name_of = name_of
        self.rules: dict[Key, Params] = {}
        self.down: set[tuple[str, str]] = set()          # (net, guest) links that are down
        self.groups: list[frozenset[str]] = []           # a partition; [] when healed
        self.streams: dict[tuple[str, str, str], Stream] = {}
        self.version = 0
        self._cache: dict[tuple, tuple] = {}
        self.late: list[tuple[float, int, Any]] = []     # (due, order, frame): the due queue
        self._order = 0

    @property
    def active(self) -> bool:
        return bool(self.rules or self.down or self.groups or self.late)

    def changed(self) -> None:
        """A rule, link, partition or name changed: every cached lookup is stale."""
        self.version += 1
        self._cache.clear()

    # --- changing them (the lab's requests) ---------------------------------------------

    def set(self, net: str, src: str | None, dst: str | None, params: Params) -> None:
        if params.off:
            self.rules.pop((net, src, dst), None)
        else:
            self.rules[(net, src, dst)] = params
        self.changed()

    def link(self, net: str, guest: str, down: bool) -> None:
        (self.down.add if down else self.down.discard)((net, guest))
        self.changed()

    def partition(self, groups: list[list[str]]) -> None:
        self.groups = [frozenset(g) for g in groups]
        self.changed()

    def heal(self) -> None:
        self.groups = []
        self.changed()

    def state(self) -> dict:
        """Every rule, down link and group, as plain data (what `lgnet impair --show` prints)."""
        return {"seed": self.seed,
                "rules": [{"net": net, "src": src, "dst": dst, **params.as_dict()}
                          for (net, src, dst), params in sorted(
                              self.rules.items(), key=lambda kv: tuple(map(str, kv[0])))],
                "down": [{"net": net, "guest": guest} for net, guest in sorted(self.down)],
                "partition": [sorted(g) for g in self.groups]}

    # --- one frame -----------------------------------------------------------------------

    def rule_for(self, net: str, src: str, dst: str) -> tuple[Params, str] | None:
        """The rule that applies to src->dst on net and the words for where it came from."""
        if (net, src) in self.down or (net, dst) in self.down:
            guest = src if (net, src) in self.down else dst
            return Params(down=True), "link %s on %s is down" % (guest, net)
        if self.groups and self._cut(src, dst):
            return Params(down=True), "partition %s" % " | ".join(
                ",".join(sorted(g)) for g in self.groups)
        for key in ((net, src, dst), (net, src, None), (net, None, dst), (net, None, None)):
            params = self.rules.get(key)
            if params is not None:
                return params, "%s (%s)" % (params.describe(), scope_text(*key))
        return None

    def _cut(self, src: str, dst: str) -> bool:
        """Are src and dst on different sides? A guest no group names is on every side."""
        mine = [g for g in self.groups if src in g]
        theirs = [g for g in self.groups if dst in g]
        return bool(mine and theirs) and not any(g in theirs for g in mine)

    def judge(self, src: Any, dst: Any, space: Any, length: int) -> Verdict | None:
        """The engine's question for one frame from guest src to guest dst on a net."""
        found = self._cache.get((src, dst, space))
        if found is None:
            net = self.net_of(space)
            names = (self.name_of(src), self.name_of(dst))
            rule = self.rule_for(net, *names) if net is not None else None
            stream = None
            if rule is not None:
                stream = self.streams.get((net,) + names)
                if stream is None:
                    stream = self.streams[(net,) + names] = Stream(self.seed, net, *names)
            found = self._cache[(src, dst, space)] = (rule, stream)
        rule, stream = found
        if rule is None:
            return None
        return stream.judge(rule[0], rule[1], length, self.clock())

    # --- the due queue ------------------------------------------------------------------

    def hold(self, due: float, frame: Any) -> None:
        """Keep a frame until its due time (the order it came in breaks ties)."""
        self._order += 1
        heapq.heappush(self.late, (due, self._order, frame))

    def next_due(self) -> float | None:
        return self.late[0][0] if self.late else None

    def take_due(self, now: float) -> list:
        """The frames due by `now`, in due order."""
        out = []
        while self.late and self.late[0][0] <= now:
            out.append(heapq.heappop(self.late)[2])
        return out


def flip_bits(data: bytes, bits: tuple[int, ...]) -> bytes:
    """The frame with each numbered bit flipped (bit 0: the first byte's lowest)."""
    out = bytearray(data)
    for bit in bits:
        if bit < len(out) * BITS_PER_BYTE:
            out[bit // BITS_PER_BYTE] ^= 1 << (bit % BITS_PER_BYTE)
    return bytes(out)

