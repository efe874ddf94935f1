"""Driving a running lab: what `lgnet shell`'s commands do, as methods of `Lab`.

Rules of this file: every command of the shell is one method here (or of Lab itself), and
the shell only calls them and prints what they return: a Python user gets the same lab to
drive. Nothing here prints. `LabControls` is a part of `Lab` (lab.py), kept in a room of its
own because it acts on a lab that is up, where lab.py brings one up and down.

pingall works like Mininet's, but from the Host's side: a host port on each net (a guest in
a free slot whose frames this process sends and reads, lgnet.hostport) asks every addressed
guest on that net for its MAC (ARP) and then for an ICMP echo. Every kind of guest answers
that — the bundled i386 kernel and the Python driver alike — so the matrix says who is
reachable on which net, whatever each guest's kernel can do itself.
"""
from __future__ import annotations

import ipaddress
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from lgnet import netfile
from lgnet.errors import LgnetError

PING_TIMEOUT_SECONDS = 2.0            # per guest: for the ARP reply, then for the echo reply
PING_PORT = "ping-%s"                 # the name of pingall's port on a net
PING_ID = 0x1616                      # the ICMP id of pingall's echo requests
GUEST_PING_SECONDS = 1.5              # a console ping's wait per echo request (1 s apart)
MAX_PING_COUNT = 100
RESTART_SECONDS = 10                  # for a killed guest's Host state to be gone
DUMP_POLL_SECONDS = 0.1


@dataclass
class Reach:
    """One cell of the pingall matrix: did `guest` answer on `net` at `ip`?"""
    net: str
    guest: str
    ip: str
    reached: bool
    why: str = ""                      # what was missing when it did not


@dataclass
class PingAll:
    cells: list[Reach]

    @property
    def sent(self) -> int:
        return len(self.cells)

    @property
    def received(self) -> int:
        return sum(c.reached for c in self.cells)

    @property
    def loss(self) -> int:
        """Per cent lost, as Mininet rounds it."""
        return 100 * (self.sent - self.received) // self.sent if self.sent else 0


@dataclass
class NetPlace:
    """A guest's place on a net: its slot and MAC there, and whether it holds them."""
    guest: str
    net: str
    slot: int | None
    mac: str | None
    state: str                        # "up" (its slot is held), "down" (no slot)


class LabControls:
    """The lab-is-up half of Lab: look at it, reach into it, knock guests over."""

    # --- looking ------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """Every guest and port: name, kind, pid, nets, and how it is (running or its
        ending, as in the results table)."""
        self.collect()
        rows = []
        ports = {id(p.run): "port" for p in self.ports}
        ports.update({id(u.run): "uplink" for u in self.uplinks})
        for run in self._runs():
            spec = run.spec
            kind = ports.get(id(run)) or (
                "python driver" if not spec.kernel else
                "bundled kernel" if _is_bundled(spec.kernel) else "kernel %s" % spec.kernel)
            rows.append({"name": run.name, "kind": kind, "pid": run.process.pid,
                         "nets": list(spec.nets), "ip": list(spec.ip), "state": run.ending})
        return rows

    def links(self) -> list[NetPlace]:
        """Who is on which net: each guest's slot and MAC in each of its nets, from the net
        files' own slot tables (the locks its launcher holds)."""
        holders = {}
        for net in self.scenario.networks:
            path = self.net_file(net)
            table = netfile.slot_table(path) if os.path.exists(path) else []
            for s in table:
                for pid in s.pids:
                    holders[net, pid] = s
        links = []
        for run in self._runs():
            for net in run.spec.nets:
                s = holders.get((net, run.process.pid))
                links.append(NetPlace(run.name, net, s.slot if s else None,
                                  s.mac_text if s else None, "up" if s else "down"))
        return links

    def slots(self, net: str) -> list:
        """The live slot table of `net` (lgnet.netfile.SlotInfo each), as `lgnet slots`."""
        self._check_names(net, [])
        return netfile.slot_table(self.net_file(net))

    def stats(self) -> dict:
        """The broker's counters now: {"guests": {name: counters}, "broker": its own}."""
        self.collect()
        guests = {run.name: dict(run.stats) for run in self._runs()}
        return {"guests": guests, "broker": self.broker_stats()}

    # --- reaching in --------------------------------------------------------------------

    def pingall(self, timeout: float = PING_TIMEOUT_SECONDS) -> PingAll:
        """ARP, then ICMP echo, from a host port on each net to every guest with an address
        there: the reachability matrix (PingAll: .cells, .sent, .received, .loss)."""
        from scapy.layers.inet import ICMP, IP
        from scapy.layers.l2 import ARP, Ether
        cells = []
        for net in self.scenario.networks:
            targets = [(run, str(_interface(run.spec, net).ip)) for run in self.guests
                       if _interface(run.spec, net) is not None]
            if not targets:
                continue
            port, me = self._ping_port(net, targets)
            for seq, (run, ip) in enumerate(targets, 1):
                port.sniff(timeout=0)                     # what came before is not an answer
                port.send(ARP(pdst=ip, psrc=me))
                try:
                    mac = port.expect("arp and src host %s" % ip, timeout)[ARP].hwsrc
                except AssertionError:
                    cells.append(Reach(net, run.name, ip, False, "no ARP reply"))
                    continue
                port.send(Ether(dst=mac) / IP(src=me, dst=ip) / ICMP(id=PING_ID, seq=seq))
                try:
                    port.expect(lambda p, seq=seq: ICMP in p and p[ICMP].type == 0
                                and p[ICMP].id == PING_ID and p[ICMP].seq == seq, timeout)
                    cells.append(Reach(net, run.name, ip, True))
                except AssertionError:
                    cells.append(Reach(net, run.name, ip, False, "no echo reply"))
        return PingAll(cells)

    def _ping_port(self, net: str, targets: list) -> tuple:
        """pingall's port on `net` (made once) and its address: the highest one of the
        first target's subnet that no guest of the scenario uses."""
        if net in self.ping_ports:
            return self.ping_ports[net]
        first = _interface(targets[0][0].spec, net)
        used = {_interface(g, n).ip for g in self.scenario.guests for n in g.nets
                if _interface(g, n) is not None}
        me = next(str(host) for host in reversed(list(first.network.hosts()))
                  if host not in used)
        self.ping_ports[net] = self.port(net, name=PING_PORT % net), me
        return self.ping_ports[net]

    def ping(self, name: str, ip: str, count: int = 1) -> str:
        """Have guest `name` ping `ip` `count` times itself, as its console's `ping` command:
        what it printed (ping(8)'s lines). Only a Python-driver guest with an address and no
        script takes console commands; for any other, an LgnetError says why not."""
        run = self._live(name)
        spec = run.spec
        if spec.kernel:
            raise LgnetError("%s cannot ping on command: its kernel (%s) takes no commands; "
                             "the bundled kernel pings only what its command line's ping= "
                             "names, at boot. A Python-driver guest with an address can."
                             % (name, "the bundled kernel" if _is_bundled(spec.kernel)
                                else spec.kernel))
        if not spec.ip or spec.script:
            raise LgnetError("%s cannot ping on command: only a Python-driver guest with an "
                             "address and no script serves its console" % name)
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise LgnetError("%r is not an IPv4 address (A.B.C.D)" % ip) from None
        if not 1 <= count <= MAX_PING_COUNT:
            raise LgnetError("ping count: 1 to %d, got %d" % (MAX_PING_COUNT, count))
        start = len(run.console)
        run.type("ping %s %d\n" % (ip, count))
        seconds = count * GUEST_PING_SECONDS + PING_TIMEOUT_SECONDS
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and run.process.poll() is None:
            lines = run.console[start:]
            loss = [i for i, line in enumerate(lines) if "packet loss" in line]
            # ping(8)'s last line: the loss, or after it the rtt summary when a reply came
            if loss and (" 0 received" in lines[loss[0]] or lines[loss[0] + 1:]):
                return "\n".join(lines[:loss[0] + 2])
            time.sleep(0.02)
        raise LgnetError("%s did not finish its ping within %gs" % (name, seconds))

    def dump(self, net: str, expression: str | None = None,
             stop: threading.Event | None = None) -> Iterator[str]:
        """Live: one line per frame delivered on `net` from now on (those that the
        pcap-filter(7) `expression` keeps), until `stop` is set or the lab stops capturing.
        Needs a capturing lab (capture=True; `lgnet shell` captures)."""
        from lgnet.fabric import capture as pcapng
        from lgnet.filters import FilterError, compile_filter
        from lgnet.packets import describe_frame
        path = self.capture_path(net)
        try:
            keep = compile_filter(expression) if expression else None
        except FilterError as error:
            raise LgnetError(str(error)) from None
        while not os.path.exists(path):
            if stop is not None and stop.wait(DUMP_POLL_SECONDS):
                return
        reader = pcapng.Reader(path)
        n = sum(1 for _ in pcapng.deliveries(reader))       # the past is not live
        first = None
        while True:
            stopping = stop is not None and stop.is_set()
            for d in pcapng.deliveries(reader):
                n += 1
                first = d.time if first is None else first
                if keep is None or keep(d.data):
                    yield "%5d %10.6f %s" % (n, d.time - first, describe_frame(d.data,
                                                                               d.comment))
            if stopping:
                return                        # one look after the stop: nothing left behind
            if stop is not None:
                stop.wait(DUMP_POLL_SECONDS)
            else:
                time.sleep(DUMP_POLL_SECONDS)

    # --- knocking over ------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL guest `name`'s Launcher: a crash, as far as the broker and the net can
        tell (its slot's lock dies with it; the broker closes its connection)."""
        run = self._live(name)
        run.kill()
        run.wait(RESTART_SECONDS)

    def restart(self, name: str):
        """Launch guest `name` again with the same command line (killing it first if it still
        runs): a free slot, and the same MAC, which lguest_net takes from the guest id — the
        Host hands out the lowest free id, the one the old guest left once its connection
        closed. Returns the new GuestRun."""
        index, run = self._guest_index(name)
        if run.process.poll() is None:
            run.kill()
        run.wait(RESTART_SECONDS)
        deadline = time.monotonic() + RESTART_SECONDS
        while run.process.pid in self._live_pids():   # its guest id is free once closed
            if time.monotonic() > deadline:
                raise LgnetError("the broker still holds %s's guest after %gs"
                                 % (name, RESTART_SECONDS))
            time.sleep(0.02)
        if run.reader is not None:
            run.reader.join(timeout=1)
        for pipe in (run.process.stdout, run.process.stdin):
            if pipe:
                pipe.close()
        fresh = self._spawn(run.spec, self.launch_command(run.spec),
                            console_input=self.console_input)
        fresh.lives = run.lives + 1
        fresh.console = run.console              # one console for the guest, both lives
        self.guests[index] = fresh
        # Up once its receive buffers are bound on each of its nets (its MAC follows at
        # once); a MAC read from its slot earlier may be the old guest's, about to be cleared.
        while {b.net for b in self.bindings().bindings if b.pid == fresh.process.pid} \
                < set(run.spec.nets) and fresh.process.poll() is None:
            if time.monotonic() > deadline + RESTART_SECONDS:
                raise LgnetError("%s did not come up again within %gs" % (name, RESTART_SECONDS))
            time.sleep(0.02)
        for net in run.spec.nets:
            self.wait_net(net)
        return fresh

    # --- helpers ------------------------------------------------------------------------

    def _runs(self) -> list:
        """Every launcher of the lab: the scenario's guests, host ports, uplinks."""
        return self.guests + [p.run for p in self.ports + self.uplinks]

    def _guest_index(self, name: str) -> tuple:
        for index, run in enumerate(self.guests):
            if run.name == name:
                return index, run
        raise LgnetError("no guest %r in %s (guests: %s)" % (
            name, self.scenario.path, ", ".join(r.name for r in self.guests)))

    def _live(self, name: str):
        run = self._guest_index(name)[1]
        if run.process.poll() is not None:
            self.collect()
            raise LgnetError("%s is not running (%s)" % (name, run.ending))
        return run

    def _live_pids(self) -> set[int]:
        """The launchers whose guest the Host still holds."""
        return {g.pid for g in self.bindings().guests}


def _is_bundled(kernel) -> bool:
    from lgnet.guest.images import BUNDLED_KERNEL
    return os.path.abspath(str(kernel)) == os.path.abspath(str(BUNDLED_KERNEL))


def _interface(spec, net: str) -> ipaddress.IPv4Interface | None:
    """The guest's address on `net` (ip: lists one per net, in the order of nets:)."""
    if net not in spec.nets or spec.nets.index(net) >= len(spec.ip):
        return None
    ip = spec.ip[spec.nets.index(net)]
    return ipaddress.IPv4Interface(ip if "/" in ip else ip + "/24")   # the kernels' default
