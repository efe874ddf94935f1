"""The bindings inspector's client: a running broker's dma_hash, in the scenario's words.

Rules of this file: it only asks (wire.OP_BINDINGS, a read-only request the broker answers
from the engine's own state between operations; fabric/dmahash.py says what is in it) and
names what it gets: a shared key becomes `lan0+0x4` (the net whose file it lives in, and the
offset in that file), a guest its scenario name. Printing is the faces' job.

Only the lab's own user can ask: the broker refuses connections from any other uid, and a
lab's socket lives in a 0700 directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from lgnet import netfile, wire
from lgnet.errors import LgnetError


@dataclass
class BindingRow:
    """One struct lguest_dma_info: which guest bound which key, and its receive buffers."""
    chain: int                       # the dma_hash bucket (jhash2 of the key, mod 61)
    position: int                    # 0 = the chain's head: the first send_dma meets
    guest: str
    guest_id: int
    pid: int
    key: str                         # "lan0+0x4" (shared) or "private@0x1234" (its address)
    net: str | None                  # the net of a shared key, None for a private one
    dmas: int                        # guest-physical address of the lguest_dma array
    num_dmas: int
    next_dma: int
    interrupt: int
    used_len: list[int | None]       # per buffer: 0 free, N used (bytes), None unreadable

    @property
    def free(self) -> int:
        return sum(1 for n in self.used_len if n == 0)

    @property
    def used(self) -> int:
        return sum(1 for n in self.used_len if n)


@dataclass
class GuestState:
    """What the Host's connection to one guest is doing."""
    name: str
    guest_id: int
    pid: int
    state: str                       # running, halted, pending DMA, dead, closing
    dead: str | None
    irq_flags: list[int]             # interrupt lines raised, not yet taken by the launcher
    pending_dma: list[int] | None    # (dma address, key) handed to the Launcher


@dataclass
class BindingsView:
    bindings: list[BindingRow] = field(default_factory=list)
    guests: list[GuestState] = field(default_factory=list)

    def only(self, name: str | None) -> "BindingsView":
        """The bindings of guest `name`, or on net `name`; everything for None."""
        if name is None:
            return self
        rows = [b for b in self.bindings if name in (b.guest, b.net)]
        guests = [g for g in self.guests if g.name == name
                  or any(b.guest_id == g.guest_id for b in rows)]
        known = {b.guest for b in self.bindings} | {b.net for b in self.bindings} \
            | {g.name for g in self.guests}
        if name not in known:
            raise LgnetError("no guest or net %r has bindings (guests: %s)" % (
                name, ", ".join(sorted(g.name for g in self.guests)) or "none"))
        return BindingsView(rows, guests)

    def as_dict(self) -> dict:
        return {"bindings": [dict(asdict(b), free=b.free, used=b.used) for b in self.bindings],
                "guests": [asdict(g) for g in self.guests]}


def query(socket_path: str, nets: dict[str, str]) -> BindingsView:
    """Ask the broker at `socket_path`; `nets` (name -> net file) names the shared keys."""
    try:
        channel = wire.Channel(socket_path)
    except OSError as exc:
        raise LgnetError("no broker answers at %s (%s)" % (socket_path,
                                                           exc.strerror or exc)) from None
    try:
        reply = channel.query(wire.OP_BINDINGS)
    except wire.BrokerGone as gone:
        raise LgnetError("the broker at %s: %s" % (socket_path, gone)) from None
    finally:
        channel.close()
    if reply.result < 0:
        raise LgnetError("the broker at %s does not answer BINDINGS (errno %d): an older "
                         "lgnet?" % (socket_path, -reply.result))
    raw = json.loads(reply.tail)
    files = {}
    for name, path in nets.items():
        try:
            st = os.stat(path)
        except OSError:
            continue                         # not joined yet: nothing can be bound in it
        files[(st.st_dev, st.st_ino)] = name
    names = {g["guest"]: g.get("name") or "guest%d" % g["guest"] for g in raw["guests"]}
    view = BindingsView()
    for row in raw["bindings"]:
        key = row["key"]
        net = files.get(tuple(key["space"])) if key["shared"] else None
        if key["shared"]:
            text = netfile.key_text(net or "file %d:%d" % tuple(key["space"][:2]),
                                    key["offset"])
        else:
            text = "private@%#x" % key["offset"]
        view.bindings.append(BindingRow(
            row["chain"], row["position"], names.get(row["guest"], "guest%d" % row["guest"]),
            row["guest"], row["pid"], text, net, row["dmas"], row["num_dmas"],
            row["next_dma"], row["interrupt"], row["used_len"]))
    for g in raw["guests"]:
        view.guests.append(GuestState(names[g["guest"]], g["guest"], g["pid"], g["state"],
                                      g["dead"], g["irq_flags"], g["pending_dma"]))
    return view
