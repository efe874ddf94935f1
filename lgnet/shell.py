"""`lgnet shell SCENARIO`: bring a lab up and drive it from a prompt, as Mininet's CLI does.

Rules of this file: it is a face, beside cli.py (whose tables it prints). Each command parses its words, calls one method of the
running `Lab` (lab.py and controls.py hold everything a Python user would need) and prints
what came back; `source`, `help` and `exit` are the shell's own. A user's mistake inside a
command (an LgnetError) is one line and the prompt comes back; Ctrl-C cancels the line or
the command running, Ctrl-D or `exit` tears the lab down and prints the results table, as
`lgnet up` does at its end.

Why prompt_toolkit: it is the well-kept line editor of the Python world (IPython's prompt,
pgcli, ptpython) and gives, without a C library underneath, what this shell needs — Emacs
or vi line editing, a persistent history with search, and completion that knows the
position of a word (a guest name after `console`, a net after `dump`, `ping` after a guest)
through NestedCompleter. cmd2 adds scripting and argparse integration on top of readline,
which would bring GNU readline's licence and platform quirks (libedit on macOS) for
features this shell does not use; plain readline has no notion of nested completion.
"""
from __future__ import annotations

import os
import select
import shlex
import signal
import sys
import termios
import threading
import tty
from typing import Callable

from lgnet.errors import LgnetError
from lgnet.cli import COLUMNS, HEADINGS, TABLE_NOTE, bindings_text, columns, results_table
from lgnet.lab import Lab

PROMPT = "lgnet> "
DETACH = b"\x1d"                       # Ctrl-]: leave `console NAME`, as telnet's escape
CONSOLE_BACKLOG = 20                   # lines of a console shown when attaching
KEY_POLL_SECONDS = 0.05


class Terminated(Exception):
    """SIGTERM: leave the shell, tearing the lab down."""


class Shell:
    """One lab, one prompt. `out` is where everything is printed; `keys` the terminal fd
    that `console` and `dump` read keystrokes from (None: not a terminal, no live views)."""

    def __init__(self, lab: Lab, out=sys.stdout, keys: int | None = None):
        self.lab = lab
        self.out = out
        self.keys = keys
        self.commands: dict[str, tuple[Callable, str, str]] = {
            "nodes": (self.nodes, "", "every guest and port: kind, pid, nets, state"),
            "net": (self.net, "", "who is on which net: slot, MAC, state"),
            "links": (self.net, "", "the same as net"),
            "pingall": (self.pingall, "", "ARP + ICMP echo from a host port to every "
                        "addressed guest: the loss matrix"),
            "console": (self.console, "NAME", "attach to a guest's console (detach: Ctrl-])"),
            "dump": (self.dump, "NET [FILTER]", "frames delivered on NET, live, until a key"),
            "slots": (self.slots, "NET", "the net file's slot table"),
            "bindings": (self.bindings, "[NAME|NET]", "the Host's dma_hash: bindings, "
                         "buffers, guests' states"),
            "stats": (self.stats, "", "the broker's counters per guest, and its own"),
            "kill": (self.kill, "NAME", "SIGKILL a guest's Launcher"),
            "restart": (self.restart, "NAME", "launch a guest again (same command line)"),
            "link": (self.link, "NAME NET down|up", "take a guest's link to a net down or up"),
            "source": (self.source, "FILE", "run the commands of FILE, one a line"),
            "help": (self.help, "", "this list"),
            "exit": (None, "", "tear the lab down and leave (also Ctrl-D)"),
        }

    # --- the loop -----------------------------------------------------------------------

    def completer(self):
        from prompt_toolkit.completion import NestedCompleter, PathCompleter
        guests = {run.name: None for run in self.lab.guests}
        nets = {net: None for net in self.lab.scenario.networks}
        nets_updown = {net: {"down": None, "up": None} for net in self.lab.scenario.networks}
        tree: dict = {name: None for name in self.commands}
        tree.update(console=guests, kill=guests, restart=guests,
                    link={g: dict(nets_updown) for g in guests}, slots=nets, dump=nets,
                    bindings=dict(guests, **nets), source=PathCompleter(expanduser=True))
        tree.update({name: {"ping": None} for name in guests})
        return NestedCompleter.from_nested_dict(tree)

    def run(self) -> None:
        """Prompt until `exit`, Ctrl-D or SIGTERM."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        session = PromptSession(history=FileHistory(history_path()),
                                completer=self.completer(), complete_while_typing=False)
        while True:
            try:
                line = session.prompt(PROMPT)
            except KeyboardInterrupt:
                continue                                 # Ctrl-C: a fresh line
            except EOFError:
                return
            if not self.one(line):
                return

    def one(self, line: str) -> bool:
        """Run one command line; False once it said exit."""
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            self.say("lgnet: %s" % error)
            return True
        if not words:
            return True
        if words[0] == "exit":
            return False
        try:
            self.dispatch(words)
        except LgnetError as error:
            self.say("lgnet: %s" % error)
        except KeyboardInterrupt:
            self.say("(interrupted)")
        return True

    def dispatch(self, words: list[str]) -> None:
        name, args = words[0], words[1:]
        if name in self.commands:
            self._check_usage(name, args)
            self.commands[name][0](*args)
        elif name in {run.name for run in self.lab.guests} and args[:1] == ["ping"]:
            self.ping(name, *args[1:])
        else:
            raise LgnetError("unknown command %r (help lists them; NAME ping IP [COUNT] pings "
                             "from a guest)" % name)

    def _check_usage(self, name: str, args: list[str]) -> None:
        usage = self.commands[name][1].split()
        need = sum(1 for u in usage if not u.startswith("["))
        # dump's FILTER is any number of words, as tcpdump's expression
        if len(args) < need or (len(args) > len(usage) and name != "dump"):
            raise LgnetError("usage: %s %s" % (name, self.commands[name][1]))

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # --- the commands -------------------------------------------------------------------

    def help(self) -> None:
        width = max(len(("%s %s" % (n, u)).strip()) for n, (_f, u, _h) in self.commands.items())
        for name, (_f, usage, text) in self.commands.items():
            self.say("  %-*s  %s" % (width, ("%s %s" % (name, usage)).strip(), text))
        self.say("  %-*s  %s" % (width, "NAME ping IP [COUNT]",
                                 "the guest pings IP itself (Python-driver guests)"))

    def nodes(self) -> None:
        rows = [("name", "kind", "pid", "nets", "ip", "state")]
        for n in self.lab.nodes():
            rows.append((n["name"], n["kind"], str(n["pid"]), ",".join(n["nets"]) or "-",
                         ",".join(n["ip"]) or "-", n["state"]))
        self.table(rows)

    def net(self) -> None:
        rows = [("guest", "net", "slot", "mac", "state")]
        for link in self.lab.links():
            rows.append((link.guest, link.net, "-" if link.slot is None else str(link.slot),
                         link.mac or "-", link.state))
        self.table(rows)

    def pingall(self) -> None:
        self.say("*** Ping: ARP + ICMP echo from a host port on each net to every addressed "
                 "guest")
        result = self.lab.pingall()
        for net in self.lab.scenario.networks:
            cells = [c for c in result.cells if c.net == net]
            if cells:
                self.say("%s -> %s" % (net, " ".join(c.guest if c.reached else "X"
                                                     for c in cells)))
        for c in result.cells:
            if not c.reached:
                self.say("    %s (%s on %s): %s" % (c.guest, c.ip, c.net, c.why))
        self.say("*** Results: %d%% dropped (%d/%d received)" % (result.loss, result.received,
                                                                 result.sent))

    def ping(self, name: str, ip: str | None = None, count: str = "1") -> None:
        if ip is None:
            raise LgnetError("usage: %s ping IP [COUNT]" % name)
        try:
            number = int(count)
        except ValueError:
            raise LgnetError("ping count: a whole number, got %r" % count) from None
        self.say(self.lab.ping(name, ip, number))

    def console(self, name: str) -> None:
        run = self.lab.guest(name)
        shown = max(0, len(run.console) - CONSOLE_BACKLOG)
        if self.keys is None:
            self.say("\n".join(run.console[shown:]))
            return
        self.say("*** %s's console (Ctrl-] detaches)" % name)
        with raw_keys(self.keys):
            while True:
                lines = run.console[shown:]
                shown += len(lines)
                for line in lines:
                    self.out.write(line + "\r\n")
                self.out.flush()
                data = read_keys(self.keys)
                if DETACH in data:
                    break
                if data and run.process.stdin is not None:
                    # What was typed goes to the guest as a raw terminal would send it.
                    run.type(data)
                elif data:
                    self.out.write("(%s's console takes no input)\r\n" % name)
                if run.process.poll() is not None and shown == len(run.console):
                    self.out.write("*** %s ended: %s\r\n" % (name, run.ending))
                    break
        self.say("*** detached from %s" % name)

    def dump(self, net: str, *expression: str) -> None:
        stop = threading.Event()
        lines = self.lab.dump(net, " ".join(expression) or None, stop)
        printer = threading.Thread(target=self._print_all, args=(lines,), daemon=True)
        self.say("*** frames on %s%s (any key stops)" % (
            net, " matching %r" % " ".join(expression) if expression else ""))
        printer.start()
        try:
            if self.keys is None:
                printer.join(1.0)
            else:
                with raw_keys(self.keys):
                    while not read_keys(self.keys) and printer.is_alive():
                        pass
        finally:
            stop.set()
            printer.join(2.0)
        self.say("*** dump of %s stopped" % net)

    def _print_all(self, lines) -> None:
        for line in lines:
            self.out.write(line + "\r\n" if self.keys is not None else line + "\n")
            self.out.flush()

    def slots(self, net: str) -> None:
        rows = [("slot", "mac", "promisc", "lock", "holder pids")]
        for s in self.lab.slots(net):
            rows.append((str(s.slot), s.mac_text, "yes" if s.promisc else "no",
                         "held" if s.locked else "stale" if s.stale else "free",
                         " ".join(map(str, s.pids)) or "-"))
        self.table(rows)

    def bindings(self, name: str | None = None) -> None:
        self.say(bindings_text(self.lab.bindings(name)))

    def stats(self) -> None:
        counts = self.lab.stats()
        rows = [HEADINGS[:-1]]
        for name, row in counts["guests"].items():
            rows.append((name,) + tuple(str(row.get(c, 0)) for c in COLUMNS))
        self.table(rows, right=tuple(range(1, len(COLUMNS) + 1)))
        b = counts["broker"]
        self.say("broker pid %d: %d messages, %d hypercalls, %d wake-ups (%d held back), "
                 "%.3fs busy" % (b["pid"], b["messages"], b["hypercalls"], b["wakes"],
                                 b["wakes_deferred"], b["busy_s"]))

    def kill(self, name: str) -> None:
        self.lab.kill(name)
        self.say("*** %s killed (%s)" % (name, self.lab.guest(name).ending))

    def restart(self, name: str) -> None:
        run = self.lab.restart(name)
        macs = ", ".join("%s slot %s mac %s" % (l.net, l.slot, l.mac) for l in self.lab.links()
                         if l.guest == name)
        self.say("*** %s restarted: pid %d, %s" % (name, run.process.pid, macs))

    def link(self, name: str, net: str, state: str) -> None:
        if state not in ("down", "up"):
            raise LgnetError("link %s %s: say down or up, not %r" % (name, net, state))
        link = self.lab.link(name, net)
        link.down() if state == "down" else link.up()
        self.say("*** link %s %s is %s" % (name, net, link.state))

    def source(self, path: str) -> None:
        try:
            with open(os.path.expanduser(path)) as f:
                lines = f.read().splitlines()
        except OSError as error:
            raise LgnetError("source %s: %s" % (path, error.strerror)) from None
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                self.say(PROMPT + line)
            if not self.one(line):
                raise LgnetError("exit in %s: only the prompt's exit leaves" % path)

    def table(self, rows: list[tuple], right: tuple[int, ...] = ()) -> None:
        for line in columns(rows, right):
            self.say(line)


# --- the terminal ---------------------------------------------------------------------------

class raw_keys:
    """Keystrokes one by one, no echo, Ctrl-C and Ctrl-] as bytes; restored on the way out."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        self.saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd)
        return self

    def __exit__(self, *exc):
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def read_keys(fd: int) -> bytes:
    """What was typed within KEY_POLL_SECONDS (b"" for nothing)."""
    if select.select([fd], [], [], KEY_POLL_SECONDS)[0]:
        return os.read(fd, 64)
    return b""


def history_path() -> str:
    """The shell's history: $XDG_STATE_HOME/lgnet/shell_history (~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    path = os.path.join(base, "lgnet")
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, "shell_history")


def run_shell(path: str, pcap: str | None = None, out=sys.stdout) -> int:
    """`lgnet shell`: up, prompt, down; the results table at the end; the exit status of
    `lgnet up` (0; 1 when a guest was killed, by the shell's `kill` too; 130 on SIGTERM)."""
    def terminated(*_):
        from prompt_toolkit.application.current import get_app_or_none
        app = get_app_or_none()
        if app is not None and app.is_running:
            # Inside the prompt's event loop a raised exception would be caught and shown
            # ("Press ENTER to continue"): let the prompt itself end with it.
            if not app.future.done():
                app.exit(exception=Terminated())
        else:
            raise Terminated()
    signal.signal(signal.SIGTERM, terminated)
    lab = Lab(path, out=None, capture=True, pcap=pcap, console_input=True)
    keys = sys.stdin.fileno() if sys.stdin.isatty() else None
    interrupted = False
    try:
        lab.start()
        for net in lab.scenario.networks:
            lab.wait_net(net)                  # `net` right away shows every MAC
        out.write("".join("lgnet shell: %s\n" % line for line in lab.whereabouts()))
        out.write("lgnet shell: %d guests up; `help` lists the commands\n" % len(lab.guests))
        out.flush()
        Shell(lab, out, keys).run()
    except (Terminated, KeyboardInterrupt):      # SIGTERM, or Ctrl-C outside the prompt
        interrupted = True
    finally:
        lab.stop()
    out.write("\n" + results_table(lab.guests) + "\n" + TABLE_NOTE + "\n")
    if interrupted:
        return 130
    return 1 if any(g.killed for g in lab.guests) else 0
