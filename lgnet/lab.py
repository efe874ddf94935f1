"""Bring a scenario up and down: one broker, one launcher per guest, and their results.

Rules of this file: the lab owns every resource of a run — its private runtime directory
(mode 0700: the broker's socket and the net files live there), the broker process and the
launcher processes — and releases all of them on every exit path. Children are told to die
with the lab (PR_SET_PDEATHSIG) and the broker also watches a pipe whose other end only the
lab holds, so even a SIGKILLed lab leaves nothing running; guest RAM never outlives its
launcher (its shared-memory name is unlinked at creation).

This is the Python API that `lgnet up`, the tests and the benchmark share.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from lgnet import abi, wire
from lgnet.errors import LgnetError
from lgnet.scenario import GuestSpec, Scenario, load_scenario

BROKER_START_SECONDS = 10
TEARDOWN_GRACE_SECONDS = 1.0
POWER_DOWN = abi.MSG_CRASH % abi.MSG_POWER_DOWN
DEFAULT_AWAIT_SECONDS = 10


@dataclass
class GuestRun:
    """One guest of a running lab: its process, console and (at the end) its counters."""
    spec: GuestSpec
    process: subprocess.Popen
    console: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    reader: threading.Thread | None = None
    stopped: bool = False              # still running when the lab stopped it

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
        return "exited %d" % self.process.returncode

    @property
    def killed(self) -> bool:
        if self.stats.get("dead") not in (None, POWER_DOWN):
            return True
        return not self.stopped and self.process.returncode not in (0, None)


class Lab:
    def __init__(self, scenario: Scenario | str, out: TextIO | None = None):
        self.scenario = load_scenario(scenario) if isinstance(scenario, str) else scenario
        self.out = out
        self.runtime = tempfile.mkdtemp(prefix="lgnet-")
        os.chmod(self.runtime, 0o700)
        self.socket_path = os.path.join(self.runtime, "broker.sock")
        self.broker: subprocess.Popen | None = None
        self.watch_w: int | None = None
        self.guests: list[GuestRun] = []
        self.out_lock = threading.Lock()

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
        return str(network.file) if network.file else os.path.join(self.runtime, name + ".net")

    def start(self) -> None:
        self.start_broker()
        for spec in self.scenario.guests:
            self.start_guest(spec)

    def start_broker(self) -> None:
        watch_r, self.watch_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self.broker = subprocess.Popen(
            [sys.executable, "-m", "lgnet", "broker", "--quiet", "--die-with-parent",
             "--socket", self.socket_path, "--watch-fd", str(watch_r), "--ready-fd", str(ready_w)],
            pass_fds=(watch_r, ready_w), stdin=subprocess.DEVNULL)
        os.close(watch_r)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            if not ready.readline():
                raise LgnetError("the broker did not start (exit status %s)" % self.broker.wait())

    def launch_command(self, spec: GuestSpec) -> list[str]:
        cmd = [sys.executable, "-m", "lgnet", "launch", "--broker", self.socket_path,
               "--no-console-input", "--die-with-parent"]
        for net in spec.nets:
            cmd += ["--sharenet", self.net_file(net)]
        if spec.block:
            cmd += ["--block", str(spec.block)]
        if spec.initrd:
            cmd += ["--initrd", str(spec.initrd)]
        kernel = str(spec.kernel) if spec.kernel else "python:"
        return cmd + [str(spec.mem_mb), kernel] + list(spec.args) + self.driver_args(spec)

    def driver_args(self, spec: GuestSpec) -> list[str]:
        """A Python guest is configured like a kernel: through its command line."""
        if spec.kernel:
            return []
        steps = []
        for index, net in enumerate(spec.nets):
            peers = sum(1 for g in self.scenario.guests if g is not spec and net in g.nets)
            steps.append("await:%d:%d:%d" % (index, peers, DEFAULT_AWAIT_SECONDS))
        for step in spec.script:
            if step.kind == "wait":
                steps.append("wait:%g" % step.wait)
            else:
                kind = "bcast" if step.send == "broadcast" else "peers"
                steps += ["%s:%d" % (kind, spec.nets.index(step.net))] * step.count
        args = ["script=" + ",".join(steps)]
        return args + (["promisc"] if spec.promisc else [])

    def start_guest(self, spec: GuestSpec) -> GuestRun:
        process = subprocess.Popen(self.launch_command(spec), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        run = GuestRun(spec, process)
        run.reader = threading.Thread(target=self._read_console, args=(run,), daemon=True)
        run.reader.start()
        self.guests.append(run)
        return run

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
        """Wait until every guest has ended (True) or the timeout passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for run in self.guests:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                run.process.wait(left)
            except subprocess.TimeoutExpired:
                return False
        return True

    def collect(self) -> None:
        """Fetch the broker's per-guest counters (live and ended guests alike)."""
        try:
            channel = wire.Channel(self.socket_path)
        except OSError:
            return
        try:
            reply = channel.call(wire.OP_STATS)
        except wire.BrokerGone:
            return
        finally:
            channel.close()
        by_pid = {row["pid"]: row for row in json.loads(reply.tail or b"[]")}
        for run in self.guests:
            run.stats = by_pid.get(run.process.pid, run.stats)

    # --- down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process and remove the runtime directory; safe to call twice."""
        if self.broker is not None and self.broker.poll() is None:
            self.collect()
        for run in self.guests:
            run.stopped = run.process.poll() is None
            terminate(run.process)
        for run in self.guests:
            if run.reader is not None:
                run.reader.join(timeout=TEARDOWN_GRACE_SECONDS)
            if run.process.stdout:
                run.process.stdout.close()
        if self.broker is not None and self.broker.poll() is None:
            self.collect()
        if self.broker is not None:
            terminate(self.broker)
        if self.watch_w is not None:
            os.close(self.watch_w)
            self.watch_w = None
        shutil.rmtree(self.runtime, ignore_errors=True)


def terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(TEARDOWN_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def up(scenario: Scenario | str, out: TextIO | None = None) -> Lab:
    """`with lgnet.lab.up("scenarios/three-guests.yaml") as lab:` — always torn down."""
    return Lab(scenario, out)


# --- `lgnet up` -----------------------------------------------------------------------------

COLUMNS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_carrier_errors",
           "rx_dropped")
HEADINGS = ("guest", "tx pkts", "tx bytes", "rx pkts", "rx bytes", "carrier err", "drops",
            "ended")


def results_table(guests: list[GuestRun]) -> str:
    rows = [HEADINGS] + [(g.name,) + tuple(str(g.stats.get(c, 0)) for c in COLUMNS)
                         + (g.ending,) for g in guests]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADINGS) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:])]
        lines.append("  ".join(cells + [row[-1]]))
    return "\n".join(lines)


def run_up(path: str, duration: float | None = None, out: TextIO = sys.stdout) -> int:
    """Bring the scenario up, wait for its end, print the table; 0 when no guest was killed."""
    scenario = load_scenario(path)
    duration = duration if duration is not None else scenario.duration
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    lab = Lab(scenario, out)
    interrupted = False
    try:
        lab.start()
        lab.wait(duration)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        lab.stop()
    out.write("\n" + results_table(lab.guests) + "\n")
    if interrupted:
        return 130
    return 1 if any(g.killed for g in lab.guests) else 0
