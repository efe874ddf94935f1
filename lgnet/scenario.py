"""Scenario YAML -> a validated model.

A scenario says which networks exist and which guests sit on them: the lab brings it up, the
CLI and the tests only name the file. Everything a user can get wrong here is an LgnetError
naming the file, the line and the key path, e.g.

    scenarios/x.yaml:7: guests[1].mem: must be a whole number of megabytes between 1 and
    1024, got 'lots'

Rules of this file: the YAML is *composed*, never loaded, so every key and value keeps its
line; values are constructed with the safe constructor one node at a time. All checks go
through the few generic ones on `_Node` (mapping of known keys, list of, whole number in
range, seconds, name, one of, existing file) and `_Fields` (required, exclusive, only with);
the schema functions below only say which check applies where. Nothing is opened or created
here except to see that a named input file exists.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.fabric.impair import KEYS as IMPAIR_KEYS, ImpairError, check_params, check_value
from lgnet.filters import FilterError, compile_filter
from lgnet.filekind import describe_file
from lgnet.guest.devices import tun
from lgnet.guest.devices.tun import TunSpec, Vxlan
from lgnet.guest.images import BUNDLED_KERNEL, BUNDLED_NAME
from lgnet.guest.launcher import MAX_PORT
from lgnet.guest.loader import load_kernel

NAME_PATTERN = r"[a-z][a-z0-9_-]{0,30}"
UPLINK_NAME = "uplink:%s"            # a net's uplink, in captures and expect: (':' is in no name)
DRIVERS = ("python",)
SEND_TARGETS = ("broadcast", "peers")
DEFAULT_MEM_MB = 32
MAX_MEM_MB = 1024
MAX_SECONDS = 86400
MAX_SEND_COUNT = 65536
_NULL_TAG = "tag:yaml.org,2002:null"

TOP_KEYS = ("duration", "seed", "networks", "guests", "impair", "events", "expect",
            "first_guest_id")
NETWORK_KEYS = ("file", "uplink")
UPLINK_KEYS = ("bridge", "tap", "vxlan")
VXLAN_KEYS = ("id", "remote", "dev")
GUEST_KEYS = ("name", "mem", "kernel", "driver", "nets", "promisc", "ip", "cmdline", "args",
              "block", "initrd", "script", "gdb")
STEP_KEYS = ("send", "net", "count", "wait", "ping")
STEP_KINDS = ("send", "wait", "ping")
EXPECT_KEYS = ("from", "to", "net", "match", "fault", "count", "min", "within")
RULE_PLACE_KEYS = ("net", "src", "dst")
EVENT_KINDS = ("link", "impair", "kill", "restart", "partition", "heal")
EVENT_KEYS = ("at", "down", "up") + EVENT_KINDS
MAX_SEED = (1 << 64) - 1
MAX_PING_COUNT = 65535               # icmp_seq is 16 bits
MAX_EXPECT_COUNT = 1 << 20


# --- the model ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Network:
    """A net file. `file` None: the lab puts one in its private runtime directory. `uplink`:
    the TAP (in a bridge) that joins this net to the world beyond this host (lgnet.uplink)."""
    name: str
    file: Path | None = None
    uplink: TunSpec | None = None


@dataclass(frozen=True)
class Step:
    """One step of a Python-driver guest's script.

    kind 'send': `send` ('broadcast': one broadcast frame; 'peers': one unicast frame to
    each other guest on the net) `count` times on `net`. kind 'wait': keep receiving for
    `wait` seconds. kind 'ping': `count` ICMP echo requests to the address `ping` (the guest
    needs an address: `ip`)."""
    kind: str
    send: str | None = None
    net: str | None = None
    count: int | None = None
    wait: float | None = None
    ping: str | None = None


@dataclass(frozen=True)
class GuestSpec:
    name: str
    mem_mb: int = DEFAULT_MEM_MB
    kernel: Path | None = None
    driver: str | None = None
    nets: tuple[str, ...] = ()          # device order
    promisc: bool = False
    ip: tuple[str, ...] = ()            # A.B.C.D/N per net, in device order (`ip=` for the kernel)
    args: tuple[str, ...] = ()          # the kernel command line, word by word
    block: Path | None = None
    initrd: Path | None = None
    script: tuple[Step, ...] = ()
    gdb: int | None = None              # a gdb server's port (0: any free one)


@dataclass(frozen=True)
class Expectation:
    """One entry of `expect:`, checked against the capture by `lgnet test`.

    The deliveries considered are those on `net`, from the guest `sender`, to the guest
    `receiver`, within `within` seconds of the start (each only when given), that `match` (a
    pcap-filter(7) expression, lgnet.filters). It holds when exactly `count` of them were
    seen, or, without a count, at least `least` (1 unless `min:` says otherwise)."""
    where: str                          # "file:line", for messages
    sender: str | None = None
    receiver: str | None = None
    net: str | None = None
    match: str | None = None
    count: int | None = None
    least: int = 1
    within: float | None = None
    fault: str | None = None            # frames an impairment touched: its record contains this

    def describe(self) -> str:
        parts = [("from", self.sender), ("to", self.receiver), ("net", self.net),
                 ("match", repr(self.match) if self.match else None),
                 ("fault", repr(self.fault) if self.fault else None),
                 ("count", self.count), ("min", self.least if self.least != 1 else None),
                 ("within", "%gs" % self.within if self.within is not None else None)]
        return ", ".join("%s %s" % (k, v) for k, v in parts if v is not None) or "any delivery"

    def scope(self) -> str:
        parts = [("from", self.sender), ("to", self.receiver), ("on", self.net)]
        text = " ".join("%s %s" % (k, v) for k, v in parts if v is not None)
        if self.within is not None:
            text += (" " if text else "") + "within %gs" % self.within
        return " " + text if text else ""


@dataclass(frozen=True)
class Rule:
    """An impairment rule: on `net`, frames from `src` to `dst` (each None: any) get
    `params` (checked keys of lgnet.fabric.impair, as the user wrote them)."""
    where: str
    net: str
    src: str | None
    dst: str | None
    params: dict


@dataclass(frozen=True)
class Event:
    """One entry of the timeline, `at` seconds after the guests were started. kind 'link':
    `guest`'s link to `net` goes `down` (or up); 'impair': `rule` is set; 'kill' / 'restart':
    `guest`; 'partition': `groups`; 'heal'."""
    where: str
    at: float
    kind: str
    guest: str | None = None
    net: str | None = None
    down: bool | None = None
    rule: Rule | None = None
    groups: tuple[tuple[str, ...], ...] = ()

    def describe(self) -> str:
        if self.kind == "link":
            return "link %s on %s %s" % (self.guest, self.net, "down" if self.down else "up")
        if self.kind == "impair":
            r = self.rule
            return "impair %s" % " ".join("%s=%s" % (k, v) for k, v in
                                          [("net", r.net), ("src", r.src), ("dst", r.dst)]
                                          + sorted(r.params.items()) if v is not None)
        if self.kind == "partition":
            return "partition %s" % " | ".join(",".join(g) for g in self.groups)
        if self.kind == "heal":
            return "heal"
        return "%s %s" % (self.kind, self.guest)


@dataclass(frozen=True)
class Scenario:
    path: Path
    duration: float | None              # None: run until every guest halts
    networks: dict[str, Network]
    guests: list[GuestSpec]
    expect: list[Expectation]
    # The guest id the lab's Host gives its first guest: lguest_net's MAC is 02:00:<guest
    # id>:00:00, so labs whose nets are uplinked to each other need ranges apart.
    first_guest_id: int = 0
    seed: int | None = None             # None: the lab picks one (and says which)
    impair: tuple[Rule, ...] = ()
    events: tuple[Event, ...] = ()


# --- generic checks -----------------------------------------------------------------------

class _Node:
    """A YAML node and where it came from: the file, its key path, and (for a mapping value)
    the node of its key, so a message can point at the key's line."""

    def __init__(self, file: str, node: Node, path: str, key: "_Node | None" = None):
        self.file = file
        self.node = node
        self.path = path
        self.key = key or self

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def at(self, part: str) -> "_Node":
        """This node, as the place of its child `part` (for "is required")."""
        return _Node(self.file, self.node, _join(self.path, part))

    def fail(self, what: str) -> NoReturn:
        raise LgnetError("%s:%d: %s: %s" % (self.file, self.line, self.path or "(top level)", what))

    def must(self, what: str) -> NoReturn:
        self.fail("must be %s, got %s" % (what, self.describe()))

    def describe(self) -> str:
        if isinstance(self.node, MappingNode):
            return "a mapping"
        if isinstance(self.node, SequenceNode):
            return "a list" if self.node.value else "an empty list"
        value = self.value()
        return "nothing" if value is None else repr(value)

    def value(self):
        try:
            return SafeConstructor().construct_object(self.node, deep=True)
        except yaml.YAMLError as e:
            self.fail("not valid YAML: %s" % getattr(e, "problem", e))

    def scalar(self, ok, what: str):
        """The value, if this is a scalar and ok(value); otherwise "must be <what>"."""
        if isinstance(self.node, ScalarNode):
            value = self.value()
            if ok(value):
                return value
        self.must(what)

    def fields(self, allowed: Iterable[str] | None) -> "_Fields":
        """A mapping with string keys, each once, each in `allowed` (None: any key)."""
        if not isinstance(self.node, MappingNode):
            self.must("a mapping")
        pairs = []
        for key_node, value_node in self.node.value:
            name = _Node(self.file, key_node, self.path).scalar(_is_str, "a string key")
            key = _Node(self.file, key_node, _join(self.path, name))
            if allowed is not None and name not in allowed:
                key.fail("unknown key%s (allowed: %s)" % (_did_you_mean(name, allowed),
                                                          ", ".join(allowed)))
            pairs.append((name, _Node(self.file, value_node, key.path, key)))
        # compose keeps every pair, so a key given twice is still here to be caught
        _no_repeats(((name, value.key) for name, value in pairs), "key")
        return _Fields(self, pairs)

    def items(self, noun: str, least: int = 0, most: int | None = None) -> list["_Node"]:
        count = len(self.node.value) if isinstance(self.node, SequenceNode) else -1
        if count < least or (most is not None and count > most):
            self.must("a list of %s%s" % ("%d to %d " % (least, most) if most else "", noun))
        return [_Node(self.file, item, "%s[%d]" % (self.path, i))
                for i, item in enumerate(self.node.value)]

    def is_null(self) -> bool:
        return self.node.tag == _NULL_TAG

    def whole(self, least: int, most: int, unit: str) -> int:
        return self.scalar(lambda v: _is_int(v) and least <= v <= most,
                           "a whole number of %s between %d and %d" % (unit, least, most))

    def seconds(self) -> float:
        return float(self.scalar(lambda v: _is_number(v) and 0 < v <= MAX_SECONDS,
                                 "a number of seconds above 0 and at most %d" % MAX_SECONDS))

    def flag(self) -> bool:
        return self.scalar(lambda v: isinstance(v, bool), "true or false")

    def text(self) -> str:
        return self.scalar(_is_str, "a string")

    def kernel_text(self) -> str:
        """A piece of a kernel command line: a C string, so no NUL."""
        value = self.text()
        if "\0" in value:
            self.fail("must not contain NUL (a kernel command line is a C string), got %r"
                      % value)
        return value

    def name(self) -> str:
        return self.scalar(lambda v: _is_str(v) and re.fullmatch(NAME_PATTERN, v),
                           "a name matching %s" % NAME_PATTERN)

    def choice(self, options: Iterable[str], among: str = "") -> str:
        options = list(options)
        listed = ", ".join(map(repr, options)) or "none"
        value = self.value() if isinstance(self.node, ScalarNode) else None
        if isinstance(value, str) and value not in options:
            self.fail("must be one of %s, got %r%s" % (
                "%s (%s)" % (among, listed) if among else listed, value,
                _did_you_mean(value, options)))
        return self.scalar(lambda v: v in options,
                           "one of %s" % ("%s (%s)" % (among, listed) if among else listed))

    def file_path(self, base: Path) -> Path:
        return base / self.text()

    def kernel_file(self, base: Path) -> Path:
        """A kernel image, or `bundled` for the one that ships with lgnet. The image is
        read now, as the Launcher will: a file that is no kernel is the scenario's mistake,
        found before anything runs."""
        text = self.text()
        if text == BUNDLED_NAME:
            return BUNDLED_KERNEL
        path = self.file_path(base)
        if not path.is_file():
            self.fail("no such file: %s%s" % (path, _did_you_mean(text, [BUNDLED_NAME])))
        st = path.stat()
        why = _not_a_kernel(str(path), st.st_mtime_ns, st.st_size)
        if why:
            self.fail("%s is not an lguest kernel (an i386 vmlinux or a bzImage): it is %s "
                      "(%s)" % (path, describe_file(path), why))
        return path

    def existing_file(self, base: Path) -> Path:
        path = self.file_path(base)
        if not path.is_file():
            self.fail("no such file: %s" % path)
        return path


class _Fields(dict):
    """The checked keys of one mapping: name -> value node, plus the rules between keys."""

    def __init__(self, owner: _Node, pairs: Iterable[tuple[str, _Node]] = ()):
        super().__init__(pairs)
        self.owner = owner

    def need(self, name: str) -> _Node:
        if name not in self:
            self.owner.at(name).fail("is required")
        return self[name]

    def one_of(self, *names: str) -> str:
        """Exactly one of the keys; returns it."""
        present = [n for n in names if n in self]
        if not present:
            self.owner.fail("needs %s" % _either(names))
        for other in present[1:]:
            self.exclusive(present[0], other)
        return present[0]

    def exclusive(self, a: str, b: str) -> None:
        if a in self and b in self:
            self[b].key.fail("cannot be combined with '%s' (line %d)" % (a, self[a].key.line))

    def only_with(self, name: str, *needed: str) -> None:
        if name in self and not any(n in self for n in needed):
            self[name].key.fail("only allowed with %s" % _either(needed))

    def get_or(self, name: str, check, default):
        """check(node) if the key is there, else the default."""
        return check(self[name]) if name in self else default


def _no_repeats(pairs: Iterable[tuple[object, _Node]], noun: str) -> None:
    first: dict[object, _Node] = {}
    for value, node in pairs:
        if value in first:
            node.fail("duplicate %s '%s' (first at line %d)" % (noun, value, first[value].line))
        first[value] = node


@functools.lru_cache(maxsize=16)
def _not_a_kernel(path: str, mtime_ns: int, size: int) -> str | None:
    """Why the Launcher would refuse this image (its own words), or None. Once per version
    of a file: a scenario of 128 guests names the same kernel 128 times."""
    try:
        load_kernel(path)
    except LgnetError as error:
        why = str(error)
        return why[len(path) + 2:] if why.startswith(path + ": ") else why
    return None


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    """" (did you mean 'X'?)" for a near miss — a letter wrong, missing, extra or two swapped
    (`bundle`, `nmae`), two in longer words — else "". Names that differ only in their digits
    (lan9, lan1) are different names, not typos."""
    if len(word) < 3:
        return ""
    allowed = 1 + len(word) // 6
    near = [(_edits(word, o), o) for o in options
            if re.sub(r"\d", "", o) != re.sub(r"\d", "", word)]
    near = sorted((d, o) for d, o in near if d <= allowed)
    return " (did you mean '%s'?)" % near[0][1] if near else ""


def _edits(a: str, b: str) -> int:
    """Edits from a to b: insertions, deletions, substitutions, swaps of neighbours."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1,
                         rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _either(names: Iterable[str]) -> str:
    quoted = ["'%s'" % n for n in names]
    return quoted[0] if len(quoted) == 1 else "%s or %s" % (", ".join(quoted[:-1]), quoted[-1])


def _join(path: str, part: str) -> str:
    return "%s.%s" % (path, part) if path else part


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- the schema ---------------------------------------------------------------------------

def load_scenario(path) -> Scenario:
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise LgnetError("%s: cannot read scenario: %s" % (file, e.strerror)) from None
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
    except RecursionError:
        raise LgnetError("%s: not a scenario: its YAML nests deeper than Python can follow "
                         "(a scenario is a few levels deep)" % file) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise LgnetError("%s:%d: not valid YAML: %s" % (file, mark.line + 1, e.problem)) from None
    except yaml.YAMLError as e:
        raise LgnetError("%s: not valid YAML: %s" % (file, e)) from None
    if node is None:
        raise LgnetError("%s:1: (top level): must be a mapping, got nothing" % file)
    try:
        return _scenario(_Node(file, node, ""), Path(path))
    except RecursionError:
        raise LgnetError("%s: not a scenario: it nests deeper than Python can follow "
                         "(a scenario is a few levels deep)" % file) from None


def _scenario(root: _Node, path: Path) -> Scenario:
    top = root.fields(TOP_KEYS)
    base = path.absolute().parent
    duration = top.get_or("duration", _Node.seconds, None)
    networks = top.get_or("networks", lambda node: _networks(node, base), {})
    guests, names, ports = [], [], []
    for node in top.need("guests").items("guests", 1, abi.MAX_GUESTS):
        fields = node.fields(GUEST_KEYS)
        guests.append(_guest(fields, networks, base))
        names.append((guests[-1].name, fields["name"]))
        if guests[-1].gdb:
            ports.append((guests[-1].gdb, fields["gdb"]))
    _no_repeats(names, "guest name")
    _no_repeats(ports, "gdb port")
    members = [g.name for g in guests] + [UPLINK_NAME % name for name, network in
                                          networks.items() if network.uplink is not None]
    expect = top.get_or("expect", lambda n: _expect(n, members, networks), [])
    last_base = abi.GUEST_ID_LIMIT - abi.MAX_GUESTS
    first_id = top.get_or("first_guest_id", lambda n: n.scalar(
        lambda v: _is_int(v) and 0 <= v <= last_base,
        "a guest id from 0 to %d (ids are 16 bits, a Host has %d)" % (last_base,
                                                                       abi.MAX_GUESTS)), 0)
    seed = top.get_or("seed", lambda n: n.whole(0, MAX_SEED, "(a seed)"), None)
    names = [g.name for g in guests]
    rules = top.get_or("impair", lambda n: tuple(_rule(item, names, networks)
                                                 for item in n.items("impairment rules")), ())
    events = top.get_or("events", lambda n: _events(n, guests, networks), ())
    return Scenario(path, duration, networks, guests, expect, first_id, seed, rules, events)


def _rule(node: _Node, guests: list[str], networks: dict[str, Network]) -> Rule:
    """{net, src?, dst?, <impairments>}: each value checked by lgnet.fabric.impair."""
    fields = node.fields(RULE_PLACE_KEYS + IMPAIR_KEYS)
    net = fields.need("net").choice(networks, "the networks")
    src = fields.get_or("src", lambda n: n.choice(guests, "the guests"), None)
    dst = fields.get_or("dst", lambda n: n.choice(guests, "the guests"), None)
    params = {}
    for key in IMPAIR_KEYS:
        if key in fields:
            value = fields[key]
            if not isinstance(value.node, ScalarNode):
                value.must("a single value")
            try:
                check_value(key, value.value())
            except ImpairError as e:
                value.fail(e.what)
            params[key] = value.value()
    if not params:
        node.fail("needs at least one impairment (%s)" % ", ".join(IMPAIR_KEYS))
    try:
        check_params(params)
    except ImpairError as e:
        fields[e.key].key.fail(e.what)
    return Rule("%s:%d" % (node.file, node.line), net, src, dst, params)


def _events(node: _Node, guests: list[GuestSpec], networks: dict[str, Network]) -> tuple:
    names = [g.name for g in guests]
    out = []
    for item in node.items("events"):
        fields = item.fields(EVENT_KEYS)
        at = fields.need("at").scalar(lambda v: _is_number(v) and 0 <= v <= MAX_SECONDS,
                                      "a number of seconds from 0 to %d" % MAX_SECONDS)
        kind = fields.one_of(*EVENT_KINDS)
        where = "%s:%d" % (item.file, item.line)
        fields.only_with("down", "link")
        fields.only_with("up", "link")
        if kind == "link":
            pair = fields["link"].items("a guest and a net", 2, 2)
            guest = pair[0].choice(names, "the guests")
            net = pair[1].choice(networks, "the networks")
            if not any(net in g.nets for g in guests if g.name == guest):
                fields["link"].fail("%s is not on %s" % (guest, net))
            state = fields.one_of("down", "up")
            flag = fields[state].flag()
            out.append(Event(where, float(at), kind, guest=guest, net=net,
                             down=flag if state == "down" else not flag))
        elif kind == "impair":
            out.append(Event(where, float(at), kind, rule=_rule(fields["impair"], names,
                                                                networks)))
        elif kind in ("kill", "restart"):
            out.append(Event(where, float(at), kind, guest=fields[kind].choice(names,
                                                                               "the guests")))
        elif kind == "partition":
            groups = tuple(tuple(m.choice(names, "the guests") for m in g.items("guests", 1))
                           for g in fields["partition"].items("2 or more groups of guests", 2))
            _no_repeats([(name, fields["partition"]) for g in groups for name in g], "guest")
            out.append(Event(where, float(at), kind, groups=groups))
        else:
            if not fields["heal"].flag():
                fields["heal"].must("true")
            out.append(Event(where, float(at), kind))
    return tuple(sorted(out, key=lambda e: e.at))


def _networks(node: _Node, base: Path) -> dict[str, Network]:
    """name -> Network; `lan0:` and `lan0: {}` alike mean "a net file of the lab's own"."""
    networks, files = {}, []
    for name, value in node.fields(None).items():
        value.key.name()
        fields = _Fields(value) if value.is_null() else value.fields(NETWORK_KEYS)
        file = fields.get_or("file", lambda n: n.file_path(base), None)
        if file is not None:
            files.append((file.resolve(), fields["file"]))
        networks[name] = Network(name, file, fields.get_or("uplink", _uplink, None))
    _no_repeats(files, "net file")
    return networks


def _uplink(node: _Node) -> TunSpec:
    """`uplink: {bridge: br0}`, `{tap: NAME}` (or both: that TAP in that bridge), and with a
    bridge optionally `vxlan: {id: 42, remote: A.B.C.D, dev: IFACE}`."""
    fields = node.fields(UPLINK_KEYS)
    if "bridge" not in fields and "tap" not in fields:
        node.fail("needs 'bridge' or 'tap' (or both)")
    fields.only_with("vxlan", "bridge")
    return TunSpec(bridge=fields.get_or("bridge", _ifname, None),
                   tap=fields.get_or("tap", _ifname, None),
                   vxlan=fields.get_or("vxlan", _vxlan, None))


def _vxlan(node: _Node) -> Vxlan:
    fields = node.fields(VXLAN_KEYS)
    return Vxlan(fields.need("id").scalar(tun.is_vxlan_id, tun.VXLAN_ID_WHAT),
                 fields.need("remote").scalar(tun.is_ipv4, tun.REMOTE_WHAT),
                 _ifname(fields.need("dev")))


def _ifname(node: _Node) -> str:
    return node.scalar(tun.is_ifname, tun.IFNAME_WHAT)


def _guest(fields: _Fields, networks: dict[str, Network], base: Path) -> GuestSpec:
    name = fields.need("name").name()
    fields.one_of("kernel", "driver")
    fields.exclusive("cmdline", "args")
    fields.only_with("initrd", "kernel")
    fields.only_with("script", "driver")
    fields.only_with("promisc", "driver")     # a kernel guest sets promiscuity itself
    fields.only_with("gdb", "kernel")         # gdb debugs i386 code, not a Python driver
    nets = fields.get_or("nets", lambda node: _nets(node, networks), ())
    args = _args(fields)
    ip = fields.get_or("ip", lambda n: _ips(n, nets, args), ())
    addressed = bool(ip) or any(word.startswith("ip=") for word in args)
    return GuestSpec(
        name=name,
        mem_mb=fields.get_or("mem", lambda n: n.whole(1, MAX_MEM_MB, "megabytes"), DEFAULT_MEM_MB),
        kernel=fields.get_or("kernel", lambda n: n.kernel_file(base), None),
        driver=fields.get_or("driver", lambda n: n.choice(DRIVERS), None),
        nets=nets,
        promisc=fields.get_or("promisc", _Node.flag, False),
        ip=ip,
        args=args,
        block=fields.get_or("block", lambda n: _block(n, base, nets), None),
        initrd=fields.get_or("initrd", lambda n: n.existing_file(base), None),
        script=fields.get_or("script", lambda n: _script(n, nets, addressed), ()),
        gdb=fields.get_or("gdb", _port, None))


def _port(node: _Node) -> int:
    return node.scalar(lambda v: _is_int(v) and 0 <= v <= MAX_PORT,
                       "a TCP port from 0 (any free one) to %d" % MAX_PORT)


def _ips(node: _Node, nets: tuple[str, ...], args: tuple[str, ...]) -> tuple[str, ...]:
    """`ip: 10.0.0.1/24` or a list, one address per net in device order."""
    if any(word.startswith("ip=") for word in args):
        node.key.fail("cannot be combined with an ip= in 'cmdline' or 'args'")
    items = [node] if isinstance(node.node, ScalarNode) else node.items("addresses", 1)
    if len(items) > len(nets):
        node.fail("gives %d addresses for %d nets" % (len(items), len(nets)))
    out = []
    for item in items:
        text = item.text()
        try:
            ipaddress.IPv4Interface(text)
        except ValueError:
            item.must("an IPv4 address with an optional prefix (A.B.C.D/N)")
        out.append(text)
    return tuple(out)


def _nets(node: _Node, networks: dict[str, Network]) -> tuple[str, ...]:
    names = [(item.choice(networks, "the networks"), item)
             for item in node.items("network names")]
    _no_repeats(names, "network")
    if len(names) > abi.MAX_DEVICES - 1:
        node.fail(_TOO_MANY_DEVICES % len(names))
    return tuple(name for name, _ in names)


# The Launcher's descriptor table: one device per net, one for a block file, the console.
_TOO_MANY_DEVICES = ("%%d devices and the console: too many devices (a guest has at most %d, "
                     "the console included)" % abi.MAX_DEVICES)


def _block(node: _Node, base: Path, nets: tuple[str, ...]) -> Path:
    if len(nets) + 1 > abi.MAX_DEVICES - 1:
        node.fail(_TOO_MANY_DEVICES % (len(nets) + 1))
    return node.existing_file(base)


def _args(fields: _Fields) -> tuple[str, ...]:
    if "cmdline" in fields:
        return tuple(fields["cmdline"].kernel_text().split())
    return tuple(item.kernel_text()
                 for item in fields.get_or("args", lambda n: n.items("strings"), []))


def _script(node: _Node, nets: tuple[str, ...], addressed: bool) -> tuple[Step, ...]:
    return tuple(_step(item.fields(STEP_KEYS), nets, addressed) for item in node.items("steps"))


def _step(fields: _Fields, nets: tuple[str, ...], addressed: bool) -> Step:
    kind = fields.one_of(*STEP_KINDS)
    fields.only_with("net", "send")
    fields.only_with("count", "send", "ping")
    if kind == "wait":
        return Step("wait", wait=fields["wait"].seconds())
    if kind == "ping":
        target = fields["ping"].scalar(_is_ipv4, "an IPv4 address")
        if not addressed:
            fields["ping"].key.fail("needs an address of this guest's own: give it 'ip'")
        return Step("ping", ping=target,
                    count=fields.get_or("count", lambda n: n.whole(1, MAX_PING_COUNT,
                                                                  "echo requests"), 1))
    return Step("send",
                send=fields["send"].choice(SEND_TARGETS),
                net=fields.need("net").choice(nets, "this guest's nets"),
                count=fields.get_or("count", lambda n: n.whole(1, MAX_SEND_COUNT, "frames"), 1))


def _is_ipv4(v) -> bool:
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        return False
    return isinstance(v, str)


def _expect(node: _Node, guests: list[str], networks: dict[str, Network]) -> list[Expectation]:
    """`expect:` entries: {from, to, net, match, count | min, within} (see Expectation)."""
    out = []
    for item in node.items("expectations"):
        fields = item.fields(EXPECT_KEYS)
        fields.exclusive("count", "min")
        out.append(Expectation(
            where="%s:%d" % (item.file, item.line),
            sender=fields.get_or("from", lambda n: n.choice(guests, "the guests"), None),
            receiver=fields.get_or("to", lambda n: n.choice(guests, "the guests"), None),
            net=fields.get_or("net", lambda n: n.choice(networks, "the networks"), None),
            match=fields.get_or("match", _filter, None),
            count=fields.get_or("count", lambda n: n.whole(0, MAX_EXPECT_COUNT, "deliveries"),
                                None),
            least=fields.get_or("min", lambda n: n.whole(1, MAX_EXPECT_COUNT, "deliveries"), 1),
            within=fields.get_or("within", _Node.seconds, None),
            fault=fields.get_or("fault", _Node.text, None)))
    return out


def _filter(node: _Node) -> str:
    text = node.text()
    try:
        compile_filter(text)
    except FilterError as e:
        node.fail(str(e))
    return text
