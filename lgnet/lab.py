"""Bring a scenario up and down: one broker, one launcher per guest, and their results.

Rules of this file: the lab owns every resource of a run — its private runtime directory
(mode 0700: the broker's socket and the net files live there), the broker process and the
launcher processes — and releases all of them on every exit path. Children are told to die
with the lab (PR_SET_PDEATHSIG) and the broker also watches a pipe whose other end only the
lab holds, so even a SIGKILLed lab leaves nothing running; guest RAM never outlives its
launcher (its shared-memory name is unlinked at creation). Launchers are forks of the lab's
spawner (lgnet.guest.spawner: one interpreter start and one set of imports for all of them),
which dies with the lab as they die with it.

With capture on, the broker writes one pcapng per net (lgnet.fabric.capture) into the lab's
capture directory; the lab tells the broker each net's name and each launcher's guest name, so
the files speak the scenario's language. Host ports (`port()`) are guests too: each has its own
launcher, which the lab owns like the others; so is each net's uplink (lgnet.uplink), started
before the guests so that nothing they send early misses the world beyond the host.

Impairments are the broker's (fabric/impair.py): the lab sends the scenario's `impair:`
rules before any guest starts, runs its `events:` timeline on a thread of its own, and
`impair()`, `link()`, `partition()` / `heal()` change them live — each one IMPAIR request, the
same one `lgnet impair` sends to a running lab. Every decision comes from the lab's seed
(`seed`: the scenario's, the caller's, or a fresh one), which the capture records.

This is the Python API that `lgnet up`, `lgnet test`, the tests and the benchmark share.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from lgnet import abi, netfile, process, timeline, wire
from lgnet import uplink as uplinks
from lgnet.controls import LabControls
from lgnet.errors import USER_ERROR_EXIT, LgnetError
from lgnet.fabric import capture as pcapng
from lgnet.guest import script
from lgnet.guest.spawner import Spawned, Spawner
from lgnet.scenario import NAME_PATTERN, Event, GuestSpec, Scenario, load_scenario

BROKER_START_SECONDS = 10
TEARDOWN_GRACE_SECONDS = 1.0
POWER_DOWN = abi.MSG_CRASH % abi.MSG_POWER_DOWN
DEFAULT_AWAIT_SECONDS = script.AWAIT_SECONDS
PORT_MEM_MB = 4
PORT_KERNEL = "python:lgnet.guest.port"
PORT_START_SECONDS = 20
NET_READY_SECONDS = 20
POLL_SECONDS = 0.02
TEST_POLL_SECONDS = 0.2
DEFAULT_TEST_SECONDS = 10            # `lgnet test` without duration or within
RUNTIME_PREFIX = "lgnet-"            # a lab's private directory: $TMPDIR/lgnet-XXXXXXXX
BROKER_SOCKET = "broker.sock"
NET_SUFFIX = ".net"
SEED_BITS = 32                       # a fresh seed: short enough to type back in
# Every child in a process group of its own: a Ctrl-C at the terminal (or a SIGTERM to the
# lab's group) reaches the lab alone, which collects the broker's counters and then stops its
# children in order — not a broker that dies with the counters before anyone asked.
OWN_GROUP = 0
DESCRIPTION = "lab.json"             # what a lab says of itself, for `lgnet status`


@dataclass
class GuestRun:
    """One guest of a running lab: its process, console and (at the end) its counters."""
    spec: GuestSpec
    process: subprocess.Popen | Spawned
    console: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    reader: threading.Thread | None = None
    stopped: bool = False              # still running when the lab stopped it
    lives: int = 1                     # 2 after one Lab.restart, ...

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ending(self) -> str:
        dead = self.stats.get("dead")
        if dead == POWER_DOWN:
            return "powered down"
        if dead:
            return "killed: %s" % dead
        if self.stopped:
            return "stopped by the lab"
        if self.process.returncode is None:
            return "running"
        if self.refused:
            return "refused at launch (exit %d)" % USER_ERROR_EXIT
        if self.process.returncode < 0:          # SIGKILL from Lab.kill, or anyone's signal
            return "killed by %s" % signal.Signals(-self.process.returncode).name
        return "exited %d" % self.process.returncode

    @property
    def killed(self) -> bool:
        if self.stats.get("dead") not in (None, POWER_DOWN):
            return True
        return not self.stopped and self.process.returncode not in (0, None)

    @property
    def refused(self) -> bool:
        """Its launcher found the user's mistake (a file of the scenario that turned out bad
        at launch, say) and said so with exit status 2, before its guest ran."""
        return (not self.stopped and self.process.returncode == USER_ERROR_EXIT
                and self.stats.get("dead") is None)

    @property
    def gdb_port(self) -> int | None:
        """The port its gdb server listens on (`gdb:` in the scenario), once it is up: from
        the Launcher's line saying so (the port may have been any free one)."""
        from lgnet.guest.launcher import GDB_LISTENING
        announcement = re.compile(re.escape(GDB_LISTENING.split("%s")[0]) + r"[\d.]+:(\d+)")
        for line in list(self.console):
            found = announcement.match(line)
            if found:
                return int(found.group(1))
        return None

    @property
    def console_text(self) -> str:
        """Everything the guest printed so far."""
        return "".join(line + "\n" for line in list(self.console))

    def type(self, text: str | bytes) -> None:
        """Send keystrokes to the guest's console (a lab started with console_input=True)."""
        if self.process.stdin is None:
            raise LgnetError("%s's console takes no input: start the lab with "
                             "console_input=True (lgnet shell does)" % self.name)
        data = text.encode() if isinstance(text, str) else bytes(text)
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise LgnetError("%s is not running (%s)" % (self.name, self.ending)) from None

    def kill(self) -> None:
        """SIGKILL the guest's launcher: a crash, as far as the net and the broker can tell."""
        if self.process.poll() is None:
            self.process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        """Its launcher's exit status, or None if it is still running after `timeout`."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class Lab(LabControls):
    """A running scenario. `capture=True` records every delivery in the lab's own directory;
    `pcap=DIR` records them into DIR (kept after the lab is down); `pcap_max` caps each
    capture file at that many bytes (the capture stops there, the lab goes on); `trace=FILE`
    writes the run's timeline to FILE once the lab is down (lgnet.timeline; it captures too:
    the capture's send numbers join a frame's slices); `console_input=True` lets guests'
    consoles be typed into (GuestRun.type). What can be done to it once it is up — nodes,
    links, pingall, ping, kill, restart, dump, ... — is lgnet.controls'."""

    def __init__(self, scenario: Scenario | str, out: TextIO | None = None,
                 capture: bool = False, pcap: str | None = None, trace: str | None = None,
                 seed: int | None = None, console_input: bool = False,
                 pcap_max: int | None = None):
        self.scenario = load_scenario(scenario) if isinstance(scenario, (str, os.PathLike)) \
            else scenario
        self.seed = seed if seed is not None else self.scenario.seed \
            if self.scenario.seed is not None else random.getrandbits(SEED_BITS)
        self.out = out
        self.trace = timeline.check_trace_path(trace) if trace is not None else None
        self.runtime = tempfile.mkdtemp(prefix=RUNTIME_PREFIX)
        os.chmod(self.runtime, 0o700)
        self.socket_path = os.path.join(self.runtime, BROKER_SOCKET)
        capture = capture or self.trace is not None
        self.capture_dir = str(pcap) if pcap is not None else \
            os.path.join(self.runtime, "capture") if capture else None
        # Not in the runtime directory: the broker takes that with it when it exits, and its
        # stream is complete only then. The lab removes it once merged.
        self.trace_dir = tempfile.mkdtemp(prefix="lgnet-trace-") if self.trace else None
        self.pcap_max = pcap_max
        self.broker: subprocess.Popen | None = None
        self.spawner: Spawner | None = None        # forks launchers (lgnet.guest.spawner)
        self.watch_w: int | None = None
        self.guests: list[GuestRun] = []
        self.ports: list = []                      # lgnet.hostport.Port
        self.uplinks: list[uplinks.Uplink] = []
        self.out_lock = threading.Lock()
        self.started_at: float | None = None       # wall clock, when the guests were started
        self.console_input = console_input
        self.ping_ports: dict = {}                 # net -> (pingall's port, its address)
        self._readers: dict[str, pcapng.Reader] = {}
        self._delivered: dict[str, list[pcapng.Delivery]] = {}
        self.started_mono: float | None = None
        self.timeline: threading.Thread | None = None
        self.timeline_done: list[tuple[float, Event, str]] = []   # (at, event, error or "")
        self._stopping = threading.Event()

    # --- up -----------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def net_file(self, name: str) -> str:
        network = self.scenario.networks[name]
        return str(network.file) if network.file else os.path.join(self.runtime,
                                                                   name + NET_SUFFIX)

    def start(self) -> None:
        uplinks.check_privilege(self.scenario)
        self.start_broker()
        # Beside the broker, from the same thread: both die with the thread that started
        # them (PR_SET_PDEATHSIG), so neither may hang on whichever thread first starts a guest.
        self.spawner = Spawner(OWN_GROUP)
        for rule in self.scenario.impair:
            self.impair(rule.net, rule.src, rule.dst, **rule.params)
        for net, network in self.scenario.networks.items():
            if network.uplink is not None:
                self.start_uplink(net, network.uplink)
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.describe()
        for spec in self.scenario.guests:
            self.start_guest(spec)
        if self.scenario.events:
            self.timeline = threading.Thread(target=self._run_timeline, daemon=True)
            self.timeline.start()

    def start_broker(self) -> None:
        watch_r, self.watch_w = os.pipe()
        ready_r, ready_w = os.pipe()
        options = ["--seed", str(self.seed)]
        if self.capture_dir is not None:
            options += ["--capture", self.capture_dir]
            if self.pcap_max is not None:
                options += ["--capture-max", str(self.pcap_max)]
            for net in self.scenario.networks:
                # One writer per file: refuse now, with the other lab's pid, rather than let
                # the broker find out (it checks again, for two labs starting at once).
                pcapng.check_free(os.path.join(self.capture_dir, net + pcapng.CAPTURE_SUFFIX))
        for net in self.scenario.networks:
            options += ["--net", "%s=%s" % (net, self.net_file(net))]
        for spec in self.scenario.guests:
            options += ["--guest", spec.name]
        if self.scenario.first_guest_id:
            options += ["--first-guest-id", str(self.scenario.first_guest_id)]
        if self.trace_dir is not None:
            options += ["--trace-stream", self.trace_stream("broker")]
        self.broker = subprocess.Popen(
            process.child_command(
                "lgnet.fabric.broker", "--die-with-parent", "--owns-directory",
                "--socket", self.socket_path, "--watch-fd", str(watch_r),
                "--ready-fd", str(ready_w), *options),
            pass_fds=(watch_r, ready_w), stdin=subprocess.DEVNULL,
            process_group=OWN_GROUP)
        os.close(watch_r)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            # READY, EOF (it died) or nothing for BROKER_START_SECONDS (it hangs).
            if not process.readable([ready], BROKER_START_SECONDS):
                terminate(self.broker)
                raise LgnetError("the broker did not start within %gs" % BROKER_START_SECONDS)
            if not ready.readline():
                raise LgnetError("the broker did not start (exit status %s)" % self.broker.wait())

    def describe(self) -> None:
        """Leave lab.json in the runtime directory: which scenario this is, its nets and
        guests, who runs it (`lgnet status` and `--lab DIR` read it)."""
        description = {
            "scenario": os.path.abspath(self.scenario.path),
            "lab_pid": os.getpid(), "broker_pid": self.broker.pid,
            "started": self.started_at,
            "nets": {net: self.net_file(net) for net in self.scenario.networks},
            "guests": [spec.name for spec in self.scenario.guests],
            "captures": {net: self.capture_path(net) for net in self.scenario.networks}
            if self.capture_dir is not None else {}}
        path = os.path.join(self.runtime, DESCRIPTION)
        with open(path + ".new", "w") as f:
            json.dump(description, f, indent=1)
        os.replace(path + ".new", path)            # readers never see half of it

    def launch_command(self, spec: GuestSpec) -> list[str]:
        cmd = self.launcher_command(spec.name, console_input=self.console_input)
        for net in spec.nets:
            cmd += ["--sharenet", self.net_file(net)]
        if spec.block:
            cmd += ["--block", str(spec.block)]
        if spec.initrd:
            cmd += ["--initrd", str(spec.initrd)]
        if spec.gdb is not None:
            cmd += ["--gdb", str(spec.gdb)]
        kernel = str(spec.kernel) if spec.kernel else "python:"
        ip = ["ip=" + ",".join(spec.ip)] if spec.ip else []
        return cmd + [str(spec.mem_mb), kernel] + list(spec.args) + ip + self.driver_args(spec)

    def launcher_command(self, name: str, *options: str,
                         console_input: bool = False) -> list[str]:
        """The launcher of guest `name`: the Launcher's own entry point, dying with the lab
        (and writing its timeline events, with a trace); its console reads the pipe the lab
        holds only with console_input."""
        if self.trace_dir is not None:
            options = ("--trace-stream", self.trace_stream(name)) + options
        quiet = [] if console_input else ["--no-console-input"]
        return process.child_command("lgnet.guest.launcher", "--die-with-parent",
                                     "--broker", self.socket_path, *quiet, *options)

    def trace_stream(self, name: str) -> str:
        return os.path.join(self.trace_dir, name + timeline.STREAM_SUFFIX)

    def driver_args(self, spec: GuestSpec) -> list[str]:
        """A Python guest is configured like a kernel: through its command line."""
        if spec.kernel:
            return []
        if spec.ip and not spec.script:
            # An addressed guest with nothing to do serves: ARP, ping and UDP echo, until
            # the lab stops it (like the bundled kernel without ping=).
            return ["promisc"] if spec.promisc else []
        steps: list[script.Step] = []
        for index, net in enumerate(spec.nets):
            peers = sum(1 for g in self.scenario.guests if g is not spec and net in g.nets)
            peers += self.scenario.networks[net].uplink is not None    # its slot counts too
            steps.append(script.Await(index, peers, DEFAULT_AWAIT_SECONDS))
        for step in spec.script:
            if step.kind == "wait":
                steps.append(script.Wait(step.wait))
            elif step.kind == "ping":
                steps.append(script.Ping(step.ping, step.count))
            else:
                kind = script.Broadcast if step.send == "broadcast" else script.Peers
                steps += [kind(spec.nets.index(step.net))] * step.count
        args = [script.command_line(steps)]
        return args + (["promisc"] if spec.promisc else [])

    def start_guest(self, spec: GuestSpec) -> GuestRun:
        run = self._spawn(spec, self.launch_command(spec), console_input=self.console_input)
        self.guests.append(run)
        return run

    # --- impairments --------------------------------------------------------------------

    def impair(self, net: str, src: str | None = None, dst: str | None = None,
               **params) -> "Impairment":
        """Set the rule for frames from `src` to `dst` on `net` (either None: any), e.g.
        `lab.impair("lan0", src="alpha", dst="beta", loss=0.1, delay=20)`; no params turns
        it off. The handle restores the rule that was there (`.restore()`, or leave its
        `with` block)."""
        self._check_names(net, [g for g in (src, dst) if g is not None])
        reply = self.impair_request({"do": "set", "net": net, "src": src, "dst": dst,
                                     "params": params})
        return Impairment(self, net, src, dst, reply["previous"])

    def link(self, guest: str, net: str) -> "Link":
        """A guest's attachment to a net: `.down()`, `.up()`, `.state`."""
        self._check_names(net, [guest])
        specs = list(self.scenario.guests) + [p.run.spec for p in self.ports + self.uplinks]
        if not any(net in spec.nets for spec in specs if spec.name == guest):
            raise LgnetError("guest %r is not on %s" % (guest, net))
        return Link(self, guest, net)

    def partition(self, groups) -> None:
        """Split the guests: frames between different groups go as to a dead peer (a guest
        no group names keeps every link). `heal()` ends it."""
        self._check_names(None, [name for group in groups for name in group])
        self.impair_request({"do": "partition", "groups": [list(g) for g in groups]})

    def heal(self) -> None:
        self.impair_request({"do": "heal"})

    def impairments(self) -> dict:
        """Every rule, down link and partition group now, and the seed."""
        return self.impair_request({"do": "show"})["state"]

    def impair_request(self, asked: dict) -> dict:
        return impair_request(self.socket_path, asked)

    def _check_names(self, net: str | None, guests: list[str]) -> None:
        if net is not None and net not in self.scenario.networks:
            raise LgnetError("no network %r in %s (networks: %s)" % (
                net, self.scenario.path, ", ".join(self.scenario.networks) or "none"))
        known = {spec.name for spec in self.scenario.guests} | {p.name for p in self.ports} \
            | {u.run.name for u in self.uplinks}
        for guest in guests:
            if guest not in known:
                raise LgnetError("no guest %r in %s (guests: %s)" % (
                    guest, self.scenario.path, ", ".join(sorted(known))))

    # --- the timeline -------------------------------------------------------------------

    def _run_timeline(self) -> None:
        """The scenario's events, each at its time after the guests were started."""
        for event in self.scenario.events:
            if self._stopping.wait(max(0.0, self.started_mono + event.at - time.monotonic())):
                return
            error = ""
            try:
                self.apply(event)
            except LgnetError as exc:
                error = str(exc)
            self.timeline_done.append((time.monotonic() - self.started_mono, event, error))
            if self.out is not None:
                with self.out_lock:
                    self.out.write("lab: %.2fs: %s%s\n" % (
                        event.at, event.describe(), " failed: " + error if error else ""))
                    self.out.flush()

    def apply(self, event: Event) -> None:
        """One event of a timeline, now."""
        if event.kind == "link":
            self.impair_request({"do": "link", "net": event.net, "guest": event.guest,
                                 "down": event.down})
        elif event.kind == "impair":
            r = event.rule
            self.impair(r.net, r.src, r.dst, **r.params)
        elif event.kind == "kill":
            self.kill(event.guest)
        elif event.kind == "restart":
            self.restart(event.guest)
        elif event.kind == "partition":
            self.partition(event.groups)
        elif event.kind == "heal":
            self.heal()

    def _spawn(self, spec: GuestSpec, command: list[str], pass_fds=(),
               console_input: bool = False) -> GuestRun:
        process = self._fork_launcher(spec, command, pass_fds, console_input)
        if process is None:
            stdin = subprocess.PIPE if console_input else subprocess.DEVNULL
            process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, pass_fds=pass_fds,
                                       process_group=OWN_GROUP)
        run = GuestRun(spec, process)
        self.name_guest(process.pid, spec.name)
        run.reader = threading.Thread(target=self._read_console, args=(run,), daemon=True)
        run.reader.start()
        return run

    def _fork_launcher(self, spec: GuestSpec, command: list[str], pass_fds,
                       console_input: bool) -> Spawned | None:
        """The launcher as a fork of the lab's spawner, which imported the Launcher once for
        all; None where it cannot serve this command line (lgnet.guest.spawner says when)."""
        if self.spawner is None or not self.spawner.serves(command):
            return None
        from lgnet.guest.launcher import PYTHON_KERNEL
        real_cpu = bool(spec.kernel) and not str(spec.kernel).startswith(PYTHON_KERNEL)
        return self.spawner.spawn(command, console_input, pass_fds, real_cpu)

    def name_guest(self, pid: int, name: str) -> None:
        """Tell the broker which guest a launcher runs, for the capture's annotations."""
        try:
            channel = wire.Channel(self.socket_path)
        except OSError:
            return
        try:
            channel.call(wire.OP_NAME, pid, tail=name.encode())
        except wire.BrokerGone:
            pass
        finally:
            channel.close()

    def whereabouts(self) -> list[str]:
        """Where this lab keeps things, one line each: its runtime directory, each net file
        (what `lgnet slots` reads), each capture file, and the impairment seed."""
        lines = ["runtime directory %s (broker socket %s)" % (self.runtime, self.socket_path)]
        lines += ["net %s: %s (`lgnet slots %s`)" % (net, self.net_file(net),
                                                     net if self.scenario.networks[net].file
                                                     is None else self.net_file(net))
                  for net in self.scenario.networks]
        if self.capture_dir is not None:
            lines += ["capture of %s: %s" % (net, self.capture_path(net))
                      for net in self.scenario.networks]
        lines.append("impairment seed %d (`lgnet impair` changes this lab's impairments)"
                     % self.seed)
        return lines

    def start_uplink(self, net: str, spec) -> uplinks.Uplink:
        """The uplink of `net` (a tun.TunSpec: a TAP in a bridge, or a named TAP), once up."""
        guest = uplinks.guest_spec(net)
        command = self.launcher_command(guest.name, "--sharenet", self.net_file(net))
        run = self._spawn(guest, command + uplinks.launch_args(spec))
        link = uplinks.Uplink(net, spec, run)
        self.uplinks.append(link)
        link.wait_ready()
        return link

    # --- host ports -----------------------------------------------------------------------

    def port(self, net: str, mac: str | None = None, promisc: bool = False,
             name: str | None = None):
        """A host port on `net` (lgnet.hostport.Port): a guest in a free slot whose frames
        come from and go to this process. Returns once it is up and every guest of the
        scenario on that net has its MAC in the net (or has ended)."""
        from lgnet.hostport import Port, host_mac
        if net not in self.scenario.networks:
            raise LgnetError("no network %r in %s (networks: %s)" % (
                net, self.scenario.path, ", ".join(self.scenario.networks) or "none"))
        mac = host_mac(mac)
        name = name or "port%d" % len(self.ports)
        if not re.fullmatch(NAME_PATTERN, name) or name in {r.name for r in self.guests} \
                | {p.name for p in self.ports}:
            raise LgnetError("port name %r: must be a new name matching %s" % (name, NAME_PATTERN))
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = self.launcher_command(name, "--sharenet", self.net_file(net), "--tunnet",
                                        "fd:%d" % theirs.fileno(), str(PORT_MEM_MB),
                                        PORT_KERNEL)
        command += (["mac=" + mac] if mac else []) + (["promisc"] if promisc else [])
        try:
            run = self._spawn(GuestSpec(name=name, driver="python", nets=(net,),
                                        promisc=promisc), command, pass_fds=(theirs.fileno(),))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        port = Port(self, net, run, mine)
        self.ports.append(port)
        port.wait_ready(PORT_START_SECONDS)
        self.wait_net(net)
        return port

    def wait_net(self, net: str, timeout: float = NET_READY_SECONDS) -> None:
        """Until every running guest of the scenario on `net` has its MAC in a slot."""
        deadline = time.monotonic() + timeout
        path = self.net_file(net)
        while True:
            # No file yet: no launcher has reached the net.
            table = netfile.slot_table(path) if os.path.exists(path) else []
            up = {pid for s in table if any(s.mac) for pid in s.pids}
            late = [run.name for run in self.guests if net in run.spec.nets
                    and run.process.poll() is None and run.process.pid not in up]
            if not late:
                return
            if time.monotonic() > deadline:
                raise LgnetError("guests not up on %s after %gs: %s" % (net, timeout,
                                                                       ", ".join(late)))
            time.sleep(POLL_SECONDS)

    # --- capture ------------------------------------------------------------------------

    def capture_path(self, net: str) -> str:
        if self.capture_dir is None:
            raise LgnetError("this lab does not capture: start it with capture=True or pcap=DIR")
        if net not in self.scenario.networks:
            raise LgnetError("no network %r in %s" % (net, self.scenario.path))
        return os.path.join(self.capture_dir, net + pcapng.CAPTURE_SUFFIX)

    def deliveries(self, net: str) -> list[pcapng.Delivery]:
        """Every delivery on `net` so far (lgnet.fabric.capture.Delivery), oldest first; after
        the lab is down, every delivery of the run."""
        return [d for d in self.records(net) if d.delivered]

    def records(self, net: str) -> list[pcapng.Delivery]:
        """Every frame the capture of `net` holds: the deliveries and the frames an
        impairment kept from their receivers (`.delivered` False, `.fault` says why)."""
        path = self.capture_path(net)
        if os.path.exists(path):              # not yet: no guest has joined the net
            if net not in self._readers:
                self._readers[net] = pcapng.Reader(path)
                self._delivered[net] = []
            runs = self.guests + [p.run for p in self.ports + self.uplinks]
            names = {run.process.pid: run.name for run in runs}
            for d in pcapng.deliveries(self._readers[net]):
                # The broker names guests as the lab told it; one it missed: by its pid.
                d.sender = names.get(d.sender_pid, d.sender)
                d.receiver = names.get(d.receiver_pid, d.receiver)
                self._delivered[net].append(d)
        return list(self._delivered.get(net, []))

    def capture(self, net: str):
        """Every frame of the capture of `net` so far, as a scapy PacketList; each packet
        carries .sender and .receiver (guest names), .time, and .lgnet (every lguest fact of
        the delivery; `.lgnet.fault` what an impairment did and why, "" for none)."""
        from lgnet.packets import packet_list
        return packet_list(self.records(net), name=net)

    def check(self) -> list:
        """The scenario's `expect:` against the capture so far (lgnet.packets.Verdict each)."""
        from lgnet.packets import check
        everything = [d for net in self.scenario.networks for d in self.records(net)]
        everything.sort(key=lambda d: d.time)
        return [check(e, everything, self.started_at) for e in self.scenario.expect]

    # --- the guests ---------------------------------------------------------------------

    def guest(self, name: str) -> GuestRun:
        """A guest (or port) by name, its counters fetched now: .console_text, .stats,
        .kill(), .wait()."""
        for run in self.guests + [p.run for p in self.ports + self.uplinks]:
            if run.name == name:
                self.collect()
                return run
        raise LgnetError("no guest %r in %s" % (name, self.scenario.path))

    def _read_console(self, run: GuestRun) -> None:
        for raw in run.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            run.console.append(line)
            if self.out is not None:
                with self.out_lock:
                    self.out.write("%s: %s\n" % (run.name, line))
                    self.out.flush()

    # --- running ------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every guest has ended and the timeline is over (True: a restart on it
        may bring a guest back) or the timeout passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for run in list(self.guests):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    run.process.wait(left)
                except subprocess.TimeoutExpired:
                    return False
            timeline = self.timeline
            if timeline is None or not timeline.is_alive():
                if all(run.process.poll() is not None for run in self.guests):
                    return True
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            timeline.join(left)
            if timeline.is_alive():
                return False

    def collect(self) -> None:
        """Fetch the broker's per-guest counters (live and ended guests alike)."""
        rows = _broker_rows(self.socket_path)
        if rows is None:
            return
        by_pid = {row["pid"]: row for row in rows}
        for run in self.guests + [p.run for p in self.ports + self.uplinks]:
            run.stats = by_pid.get(run.process.pid, run.stats)

    def bindings(self, name: str | None = None):
        """The broker's dma_hash right now (lgnet.inspector.BindingsView): every binding —
        chain, guest, key as `lan0+0x4`, array, used_len of each buffer, next_dma,
        interrupt — and each guest's state; only those of guest or net `name` if given."""
        from lgnet import inspector
        view = inspector.query(self.socket_path, {net: self.net_file(net)
                                                  for net in self.scenario.networks})
        return view.only(name)

    def broker_stats(self) -> dict:
        """The broker's own counters: where its time went, rings run, wake-ups held back."""
        channel = wire.Channel(self.socket_path)
        try:
            return json.loads(channel.query(wire.OP_BROKER_STATS).tail or b"{}")
        finally:
            channel.close()

    # --- down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process and remove the runtime directory; safe to call twice."""
        self._stopping.set()
        if self.timeline is not None and self.timeline is not threading.current_thread():
            self.timeline.join(timeout=TEARDOWN_GRACE_SECONDS * 5)
        if self.broker is not None and self.broker.poll() is None:
            self.collect()
        runs = self.guests + [p.run for p in self.ports + self.uplinks]
        for link in self.uplinks:
            link.count()                   # the TAP goes with its Launcher
        for run in runs:
            run.stopped = run.process.poll() is None
        terminate_all([run.process for run in runs])
        for link in self.uplinks:
            link.leftovers()
        for port in self.ports:
            port.close()
        for run in runs:
            if run.reader is not None:
                run.reader.join(timeout=TEARDOWN_GRACE_SECONDS)
            for pipe in (run.process.stdout, run.process.stdin):
                if pipe:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass
        if self.spawner is not None:
            self.spawner.close()           # its launchers have ended: it leaves now
            self.spawner = None
        if self.broker is not None and self.broker.poll() is None:
            self.collect()
        if self.capture_dir is not None and self.capture_dir.startswith(self.runtime + os.sep):
            # The lab's own capture goes with its directory, which the broker removes as it
            # exits: keep what it recorded (every pass of the broker's is flushed, and with
            # the guests gone no pass delivers more).
            for net in self.scenario.networks:
                self.records(net)
        if self.broker is not None:
            terminate(self.broker)
        if self.watch_w is not None:
            os.close(self.watch_w)
            self.watch_w = None
        shutil.rmtree(self.runtime, ignore_errors=True)
        if self.trace_dir is not None:
            try:
                self.write_trace()
            finally:
                shutil.rmtree(self.trace_dir, ignore_errors=True)
                self.trace_dir = None

    def write_trace(self) -> None:
        """Every process's stream, merged into the trace file: tracks named after the
        guests, each transfer with the capture's summary of its frame (lgnet.timeline)."""
        from lgnet.packets import describe_frame
        runs = self.guests + [p.run for p in self.ports + self.uplinks]
        names = {run.process.pid: run.name for run in runs}
        frames = {}
        for net in self.scenario.networks:
            for d in self.deliveries(net):
                frames[d.send, d.receiver_guest] = {"summary": describe_frame(d.data),
                                                    "facts": d.comment}
        streams = sorted(os.path.join(self.trace_dir, f) for f in os.listdir(self.trace_dir))
        timeline.merge(streams, self.trace, names,
                       lambda args: frames.get((args.get("send"), args["receiver_guest"]), {}),
                       [run.name for run in runs])


class Impairment:
    """A rule set by `Lab.impair`: `restore()` (or leaving its `with`) puts back the rule
    that was there before."""

    def __init__(self, lab: Lab, net: str, src: str | None, dst: str | None,
                 previous: dict | None):
        self.lab, self.net, self.src, self.dst = lab, net, src, dst
        self.previous = previous

    def restore(self) -> None:
        self.lab.impair_request({"do": "set", "net": self.net, "src": self.src,
                                 "dst": self.dst, "params": self.previous or {}})

    def __enter__(self) -> "Impairment":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class Link:
    """A guest's attachment to a net. `down()` / `up()` return it, and leaving a `with`
    block puts back the state it had when the block began:
    `with lab.link("beta", "lan0").down(): ...`."""

    def __init__(self, lab: Lab, guest: str, net: str):
        self.lab, self.guest, self.net = lab, guest, net
        self._before: list[bool] = []

    @property
    def state(self) -> str:
        """"down" or "up", as the broker has it now."""
        down = {(d["net"], d["guest"]) for d in self.lab.impairments()["down"]}
        return "down" if (self.net, self.guest) in down else "up"

    def _set(self, down: bool) -> "Link":
        reply = self.lab.impair_request({"do": "link", "net": self.net, "guest": self.guest,
                                         "down": down})
        self._before.append(reply["previous"])
        return self

    def down(self) -> "Link":
        return self._set(True)

    def up(self) -> "Link":
        return self._set(False)

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        if self._before:
            self._set(self._before[0])
            self._before.clear()


def impair_request(socket_path: str, asked: dict) -> dict:
    """One IMPAIR request to the broker at socket_path: its JSON reply; a refusal (an unknown
    guest or net, a bad value) is an LgnetError with the broker's words."""
    try:
        channel = wire.Channel(socket_path)
    except OSError as exc:
        raise LgnetError("no broker at %s: %s" % (socket_path, exc.strerror or exc)) from None
    try:
        reply = channel.call(wire.OP_IMPAIR, tail=json.dumps(asked).encode())
    except wire.BrokerGone:
        raise LgnetError("the broker at %s is gone" % socket_path) from None
    finally:
        channel.close()
    if reply.result < 0:
        raise LgnetError("impair: %s" % reply.tail.decode(errors="replace"))
    return json.loads(reply.tail)


# --- finding a running lab (`lgnet slots lan0`) ----------------------------------------------

def guest_names(socket_path: str) -> dict[int, str]:
    """Launcher pid -> guest name, as the lab told its broker; {} when no broker answers."""
    return {row["pid"]: row["name"] for row in _broker_rows(socket_path) or []
            if row.get("name")}


def running_labs() -> list[str]:
    """The runtime directories of this user's labs whose broker is up."""
    found = []
    base = tempfile.gettempdir()
    for entry in sorted(os.listdir(base)):
        runtime = os.path.join(base, entry)
        if not entry.startswith(RUNTIME_PREFIX) or not os.path.isdir(runtime):
            continue
        try:
            wire.Channel(os.path.join(runtime, BROKER_SOCKET)).close()
        except OSError:
            continue                              # not ours to read, or its broker is gone
        found.append(runtime)
    return found


def description(runtime: str) -> dict:
    """A running lab's lab.json (Lab.describe); {} for a lab that left none."""
    try:
        with open(os.path.join(runtime, DESCRIPTION)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def find_lab(lab: str | None = None) -> str:
    """A running lab's runtime directory: `lab` itself when it is one, else the running lab
    whose scenario is `lab` (its file, or that file's name without .yaml); without `lab`,
    the only running lab."""
    if lab is not None and os.path.isdir(lab):
        return lab
    labs = running_labs()
    if lab is not None:
        labs = [runtime for runtime in labs
                if lab in _scenario_names(description(runtime).get("scenario"))]
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise LgnetError("no running lab%s (`lgnet status` lists them)"
                         % (" is %r" % lab if lab is not None else ""))
    raise LgnetError("%d labs are running%s: choose one with --lab DIR (%s)" % (
        len(labs), " %s" % lab if lab is not None else "", ", ".join(labs)))


def _scenario_names(path: str | None) -> set[str]:
    if not path:
        return set()
    base = os.path.basename(path)
    return {path, base, os.path.splitext(base)[0]}


def lab_status(runtime: str) -> dict:
    """What `lgnet status` says of one running lab: its scenario, broker, runtime directory,
    and each guest (live and ended) with pid, slots (net, slot, MAC), state and counters."""
    from lgnet import inspector
    described = description(runtime)
    socket_path = os.path.join(runtime, BROKER_SOCKET)
    nets = described.get("nets") or {f[:-len(NET_SUFFIX)]: os.path.join(runtime, f)
                                     for f in _listdir(runtime) if f.endswith(NET_SUFFIX)}
    rows = _broker_rows(socket_path)
    answering = rows is not None
    try:
        states = {g.pid: g for g in inspector.query(socket_path, nets).guests} \
            if answering else None
    except LgnetError:
        states = None                 # an older broker: it knows no BINDINGS
    slots: dict[int, list[dict]] = {}
    for net, path in nets.items():
        try:
            table = netfile.slot_table(path)
        except (OSError, LgnetError):
            continue
        for s in table:
            for pid in s.pids:
                slots.setdefault(pid, []).append({"net": net, "slot": s.slot,
                                                  "mac": s.mac_text})
    guests = []
    for row in rows or []:
        live = (states or {}).get(row["pid"])
        if row.get("dead") == POWER_DOWN:
            state = "powered down"
        elif row.get("dead"):
            state = "killed: %s" % row["dead"]
        else:
            state = "unknown" if states is None else live.state if live is not None \
                else "ended"
        guests.append({"name": row.get("name") or "guest%d" % row["guest"],
                       "pid": row["pid"], "guest_id": row["guest"], "state": state,
                       "slots": slots.get(row["pid"], []),
                       "counters": {k: v for k, v in row.items() if k not in ROW_IDENTITY}})
    return {"runtime": runtime, "scenario": described.get("scenario"),
            "lab_pid": described.get("lab_pid"), "broker_pid": described.get("broker_pid"),
            "started": described.get("started"), "answering": answering, "nets": nets,
            "guests": guests}


ROW_IDENTITY = ("guest", "pid", "dead", "name", "ended")   # the rest of a stats row: counters


def status() -> list[dict]:
    """Every running lab of this user (lab_status each), oldest runtime directory first."""
    return [lab_status(runtime) for runtime in running_labs()]


def _broker_rows(socket_path: str) -> list[dict] | None:
    """The broker's per-guest counters (OP_STATS); None when no broker answers."""
    try:
        channel = wire.Channel(socket_path)
    except OSError:
        return None
    try:
        return json.loads(channel.query(wire.OP_STATS).tail or b"[]")
    except wire.BrokerGone:
        return None
    finally:
        channel.close()


def find_net(name: str, lab: str | None = None) -> str:
    """The net file of the net `name` in a running lab: the lab whose runtime directory is
    `lab`, or the only running lab that has such a net."""
    labs = [find_lab(lab)] if lab is not None else running_labs()
    having = [runtime for runtime in labs
              if os.path.isfile(os.path.join(runtime, name + NET_SUFFIX))]
    if len(having) == 1:
        return os.path.join(having[0], name + NET_SUFFIX)
    if lab is not None:
        lab = labs[0]
        raise LgnetError("no net %r in the lab at %s (its nets: %s)" % (
            name, lab, ", ".join(sorted(f[:-len(NET_SUFFIX)] for f in _listdir(lab)
                                        if f.endswith(NET_SUFFIX))) or "none"))
    if not having:
        raise LgnetError("no running lab has a net %r (labs up: %s); give a net file's path"
                         % (name, ", ".join(labs) or "none"))
    raise LgnetError("%d running labs have a net %r: choose one with --lab DIR (%s)"
                     % (len(having), name, ", ".join(having)))


def lab_socket(lab: str | None = None) -> str:
    """The broker socket of a running lab (find_lab: a runtime directory, a scenario's
    name, or the only lab running): what `lgnet impair` talks to."""
    return os.path.join(find_lab(lab), BROKER_SOCKET)


def find_capture(net: str, lab: str | None = None) -> str:
    """The capture file a running lab writes for its net `net` (`lgnet dump lan0`): the
    lab `lab` (find_lab), or the only running lab that has such a net."""
    labs = [find_lab(lab)] if lab is not None else [
        runtime for runtime in running_labs() if net in description(runtime).get("nets", {})]
    if len(labs) > 1:
        raise LgnetError("%d running labs have a net %r: choose one with --lab DIR (%s)"
                         % (len(labs), net, ", ".join(labs)))
    if not labs:
        raise LgnetError("no capture file %s, and no running lab has a net %r: give a .pcapng "
                         "or .pcap file, or a net name with --pcap DIR" % (net, net))
    described = description(labs[0])
    if net not in described.get("nets", {}):
        raise LgnetError("no net %r in the lab at %s (its nets: %s)" % (
            net, labs[0], ", ".join(described.get("nets", {})) or "none"))
    if net not in described.get("captures", {}):
        raise LgnetError("the lab at %s does not capture: start it with --pcap DIR (or "
                         "lgnet shell) to dump its nets" % labs[0])
    return described["captures"][net]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def terminate(process: subprocess.Popen) -> None:
    terminate_all([process])


def terminate_all(processes: list) -> None:
    """SIGTERM to every one still running, then TEARDOWN_GRACE_SECONDS for all of them
    together (a large lab's launchers end side by side, not one after another); SIGKILL
    for any still there."""
    running = [p for p in processes if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TEARDOWN_GRACE_SECONDS
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class KeptCaptures:
    """Where `up()` keeps a capture it was not told to keep (pcap=None): nowhere (the lab's
    own directory, gone with it) unless someone — the pytest plugin's `--lgnet-pcap DIR` —
    named a directory for now: the first lab then writes into it, the next ones into
    DIR-2, DIR-3, ... (two labs never share a capture file)."""

    def __init__(self):
        self.directory: str | None = None
        self.labs = 0

    def keep_in(self, directory: str | None) -> None:
        self.directory, self.labs = directory, 0

    def next(self) -> str | None:
        if self.directory is None:
            return None
        self.labs += 1
        return self.directory if self.labs == 1 else "%s-%d" % (self.directory, self.labs)


kept_captures = KeptCaptures()


def up(scenario: Scenario | str, out: TextIO | None = None, capture: bool = True,
       pcap: str | None = None, trace: str | None = None,
       seed: int | None = None, console_input: bool = False) -> Lab:
    """`with lgnet.up("scenarios/three-guests.yaml") as lab:` — always torn down; captures
    every delivery unless capture=False (pcap=DIR keeps the files in DIR); trace=FILE writes
    the run's timeline there when the lab is down (open it in ui.perfetto.dev); `seed` for
    every impairment decision (default: the scenario's, else a fresh one: `lab.seed`);
    console_input=True lets the guests' consoles be typed into (lab.ping, GuestRun.type)."""
    if pcap is None and capture:
        pcap = kept_captures.next()
    return Lab(scenario, out, capture=capture, pcap=pcap, trace=trace, seed=seed,
               console_input=console_input)


# --- a whole run: what `lgnet up` and `lgnet test` do, printing nothing ----------------------

@dataclass
class RunResult:
    """How a run ended: every guest (with its counters), whether Ctrl-C / SIGTERM cut it
    short, and the capture files it wrote (with pcap=DIR)."""
    guests: list[GuestRun]
    uplinks: list = field(default_factory=list)            # lgnet.uplink.Uplink
    interrupted: bool = False
    captures: list[str] = field(default_factory=list)
    seed: int | None = None
    scenario: Scenario | None = None
    verdicts: list | None = None                           # `lgnet test`'s, one per expect:

    @property
    def killed(self) -> bool:
        return any(g.killed for g in self.guests)

    @property
    def refused(self) -> list[GuestRun]:
        """The guests whose launcher refused the user's input (exit status 2)."""
        return [g for g in self.guests if g.refused]

    def as_dict(self, status: int) -> dict:
        """The run as JSON-ready data (`--json FILE`): per guest and uplink the broker's
        counters, how it ended and lguest's death reason; for `lgnet test` each expectation's
        verdict; `status` is the command's exit status."""
        record = {"scenario": os.path.abspath(self.scenario.path) if self.scenario else None,
                  "status": status, "interrupted": self.interrupted,
                  "guests": [dict({"name": g.name, "pid": g.process.pid},
                                  **{k: v for k, v in g.stats.items() if k not in ROW_IDENTITY},
                                  ended=g.ending, killed=g.killed, dead=g.stats.get("dead"))
                             for g in self.guests + [u.run for u in self.uplinks]]}
        if self.verdicts is not None:
            record["expectations"] = [
                {"where": e.where, "expectation": e.describe(), "held": v.held,
                 "matched": len(v.matched), "considered": len(v.considered),
                 "report": v.report}
                for e, v in zip(self.scenario.expect, self.verdicts)]
            record["held"] = sum(v.held for v in self.verdicts)
        return record


def run_up(path: str, duration: float | None = None, out: TextIO | None = None,
           pcap: str | None = None, uplink: list[str] = (),
           trace: str | None = None,
           on_up: Callable[[Lab], None] | None = None,
           seed: int | None = None, pcap_max: int | None = None) -> RunResult:
    """Bring the scenario up and wait for its end (every guest ended, `duration`, or a
    KeyboardInterrupt); always torn down. With pcap=DIR, DIR/<net>.pcapng records every
    delivery on each net; `uplink` holds `--uplink NET=...` options
    (lgnet.uplink.parse_option). Console lines go to `out`, prefixed with the guest's name;
    on_up(lab) runs once everything is started (`lgnet up` says where things are)."""
    scenario = uplinks.with_uplinks(load_scenario(path), list(uplink))
    duration = duration if duration is not None else scenario.duration
    lab = Lab(scenario, out, pcap=pcap, trace=trace, seed=seed, pcap_max=pcap_max)
    result = RunResult(lab.guests, lab.uplinks, seed=lab.seed, scenario=scenario)
    try:
        lab.start()
        if on_up is not None:
            on_up(lab)
        lab.wait(duration)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        lab.stop()
    if pcap is not None:
        result.captures = sorted(os.path.join(pcap, f) for f in os.listdir(pcap)
                                 if f.endswith(pcapng.CAPTURE_SUFFIX))
    return result


def run_seconds(scenario: Scenario) -> float:
    """How long `lgnet test` may run: `duration`, else the longest `within`, else a default."""
    if scenario.duration is not None:
        return scenario.duration
    return max((e.within for e in scenario.expect if e.within is not None),
               default=DEFAULT_TEST_SECONDS)


def run_test(path: str, out: TextIO | None = None, pcap: str | None = None,
             trace: str | None = None) -> RunResult:
    """Run the scenario and check its `expect:` against the capture: the run, with its
    verdicts (lgnet.packets.Verdict, one per expectation). A scenario error is an LgnetError.

    The run ends when every guest has ended, when the time is up (run_seconds), or early when
    every expectation is an "at least" one and already holds."""
    scenario = load_scenario(path)
    if not scenario.expect:
        raise LgnetError("%s: expect: nothing to check (add an expect: list)" % path)
    limit = run_seconds(scenario)
    early = all(e.count is None for e in scenario.expect)
    with Lab(scenario, out, capture=True, pcap=pcap, trace=trace) as lab:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if lab.wait(TEST_POLL_SECONDS):
                break
            if early and all(v.held for v in lab.check()):
                break
        verdicts = lab.check()
    return RunResult(lab.guests, lab.uplinks, scenario=scenario, verdicts=verdicts)
