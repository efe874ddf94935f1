"""The spawner: a process that has imported the Launcher once and forks one per guest.

Why: a launcher started as `python -P -m lgnet.guest.launcher` pays an interpreter's start
and the Launcher's imports (≈ 0.2 s of CPU here) before its guest does anything; a lab of 128
guests on two cores spends most of its bring-up on that. A fork of a process that already
did both costs a few milliseconds. (The idea is multiprocessing's forkserver, CPython's own;
that one serves only multiprocessing's Process objects, so this is its small cousin for
command lines.)

Rules of this file: the spawner is single-threaded (a fork of it is safe: no other thread
can hold a lock the child would inherit) and starts nothing but forks of itself that become
launchers; what a child runs is exactly what `python -P -m lgnet.guest.launcher ARGS` would
run, with the stdin, stdout, stderr and passed descriptors of `subprocess.Popen`, in a process
group of its own. The lab's end (`Spawner`, `Spawned`) serves only a launcher command line
and only while its environment and working directory are those the spawner started with:
anything else is started with Popen (the same process, the slow way).

Every resource has its owner: the lab owns the spawner (it dies with the lab, and leaves when
its control socket closes); the spawner is each launcher's parent, reaps it and tells the lab
its wait status; the lab holds a pidfd of each, so a signal can never reach a recycled pid.

Protocol (SOCK_SEQPACKET, one JSON object per message, descriptors as SCM_RIGHTS):
  lab -> spawner   {"argv": [...], "cpu": BOOL, "fds": [0, 1, 2, N...]}  + the descriptors
                   to become those numbers in the child
  spawner -> lab   {"pid": P}  + its pidfd
  spawner -> lab   {"exited": P, "status": WAIT_STATUS}     when it ends
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

from lgnet import process

LAUNCHER = "lgnet.guest.launcher"
# Imported before the first fork: the Launcher and the Python kernels lgnet ships (the bench
# guests, the host port's, the default driver). A real kernel's CPU (Unicorn) is imported
# on the first request for one, so Python guests' resident set does not carry it.
PRELOADED = (LAUNCHER, "lgnet.guest.pvmachine", "lgnet.guest.pvdriver", "lgnet.guest.port",
             "lgnet.guest.benchguests")
REAL_CPU = "lgnet.guest.cpu"
MAX_MESSAGE = 1 << 20                # a request's JSON: a command line
MAX_FDS = 64                         # stdin, stdout, stderr and what a launcher is passed
LEAVE_SECONDS = 5                    # the spawner leaves this soon after its socket closes
STDIO = (0, 1, 2)


# --- the lab's end ------------------------------------------------------------------------

class Spawned:
    """A launcher the spawner forked, as the lab sees it: what the lab uses of Popen (pid,
    stdin, stdout, returncode, poll, wait, send_signal, terminate, kill)."""

    def __init__(self, args: list[str], pid: int, pidfd: int, stdin, stdout):
        self.args = args
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._ended = threading.Event()

    def _end(self, returncode: int) -> None:
        self.returncode = returncode
        self._ended.set()
        pidfd, self._pidfd = self._pidfd, -1
        if pidfd >= 0:
            os.close(pidfd)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except (ProcessLookupError, OSError):
                pass                  # it ended a moment ago; its status is on its way

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Spawner:
    """The lab's spawner: `spawn()` a launcher command line, `close()` at the end."""

    def __init__(self, process_group: int):
        self.cwd = os.getcwd()
        self.env = dict(os.environ)
        self.prefix = process.child_command(LAUNCHER)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                process.child_command(__name__, "--die-with-parent",
                                      "--control-fd", str(theirs.fileno())),
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                process_group=process_group)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.control = mine
        self.lock = threading.Lock()          # one request and its reply at a time
        self.replies: list[tuple[dict, list[int]]] = []
        self.replied = threading.Condition()
        self.children: dict[int, Spawned] = {}
        self.early: dict[int, int] = {}       # pid -> status that came before its handle
        self.gone = False
        self.reader = threading.Thread(target=self._read, name="lgnet-spawner", daemon=True)
        self.reader.start()

    def serves(self, command: list[str]) -> bool:
        """A launcher's command line, in the environment the spawner has."""
        return (not self.gone and command[:len(self.prefix)] == self.prefix
                and os.environ == self.env and os.getcwd() == self.cwd)

    def spawn(self, command: list[str], console_input: bool = False, pass_fds=(),
              real_cpu: bool = False) -> Spawned | None:
        """Fork a launcher of `command`, its stdout and stderr one pipe to the lab, its stdin
        a pipe from the lab (console_input) or /dev/null; None when the spawner is gone.
        `real_cpu`: its kernel runs under Unicorn (imported once, in the spawner)."""
        request = json.dumps({"argv": command[len(self.prefix):], "cpu": real_cpu,
                              "fds": list(STDIO) + list(pass_fds)}).encode()
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe() if console_input else (os.open(os.devnull, os.O_RDONLY), -1)
        try:
            with self.lock:
                try:
                    socket.send_fds(self.control, [request], [in_r, out_w, out_w, *pass_fds])
                except OSError:
                    reply = None
                else:
                    with self.replied:
                        while not self.replies and not self.gone:
                            self.replied.wait()
                        reply = self.replies.pop(0) if self.replies else None
        finally:
            os.close(in_r)
            os.close(out_w)
        if reply is None:
            os.close(out_r)
            if in_w >= 0:
                os.close(in_w)
            return None
        message, fds = reply
        child = Spawned(command, message["pid"], fds[0], open(in_w, "wb") if in_w >= 0
                        else None, open(out_r, "rb"))
        with self.replied:
            status = self.early.pop(child.pid, None)
            if status is None:
                self.children[child.pid] = child
        if status is not None:
            child._end(os.waitstatus_to_exitcode(status))
        return child

    def _read(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, MAX_FDS)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            message = json.loads(data)
            with self.replied:
                if "exited" not in message:
                    self.replies.append((message, fds))
                    self.replied.notify_all()
                    continue
                child = self.children.pop(message["exited"], None)
                if child is None:
                    self.early[message["exited"]] = message["status"]
            if child is not None:
                child._end(os.waitstatus_to_exitcode(message["status"]))
        self._orphaned()

    def _orphaned(self) -> None:
        """The spawner is gone: its launchers die with it (SIGTERM, as --die-with-parent
        asks; SIGKILL if one lingers); their wait status went with it, so each ends as
        killed by the signal that ended it."""
        with self.replied:
            self.gone = True
            self.replied.notify_all()
            children, self.children = list(self.children.values()), {}
        for child in children:
            ended_by = signal.SIGTERM
            if child._pidfd >= 0 and not process.readable([child._pidfd], LEAVE_SECONDS):
                child.kill()                              # a pidfd reads ready at its exit
                process.readable([child._pidfd])
                ended_by = signal.SIGKILL
            child._end(-ended_by)

    def close(self) -> None:
        """Tell the spawner to leave (its control socket closes) and wait for it."""
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.process.wait(LEAVE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join()
        self.control.close()


# --- the spawner's end ----------------------------------------------------------------------

def serve(control: socket.socket) -> list[str] | None:
    """Fork a launcher per request until the control socket closes (None). In a child this
    returns its launcher's arguments, its descriptors in place."""
    for module in PRELOADED:
        importlib.import_module(module)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)     # only to wake the poll below
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 4096):
                        break
                except BlockingIOError:
                    break
        if not reap(control):
            return None
        if control.fileno() in ready:
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, MAX_FDS)
            except OSError:
                data, fds = b"", []
            if not data:
                return None
            request = json.loads(data)
            if request.get("cpu"):
                importlib.import_module(REAL_CPU)      # once: every later fork has it
            pid = fork_launcher(control, fds)
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (wake_r, wake_w):
                    os.close(fd)
                control.close()
                place_fds(fds, request["fds"])
                return request["argv"]


def fork_launcher(control: socket.socket, fds: list[int]) -> int:
    """Fork; in the parent tell the lab the child's pid (and hand it a pidfd), drop the
    descriptors that were for the child. 0 in the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    # A process group of its own, as the lab's Popen gives: set by both sides (the shell's
    # way), so it holds whichever runs first and before the lab hears the pid.
    try:
        os.setpgid(0 if pid == 0 else pid, 0 if pid == 0 else pid)
    except OSError:
        pass                          # the child has already ended
    if pid == 0:
        return 0
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(control, [json.dumps({"pid": pid}).encode()], [pidfd])
    except OSError:
        pass                          # the lab is gone: its launcher dies with us
    finally:
        os.close(pidfd)
        for fd in fds:
            os.close(fd)
    return pid


def reap(control: socket.socket) -> bool:
    """Tell the lab of every launcher that ended; False once the lab is gone."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return True
        try:
            control.send(json.dumps({"exited": pid, "status": status}).encode())
        except OSError:
            return False


def place_fds(fds: list[int], wanted: list[int]) -> None:
    """What Popen does for a child: each received descriptor at the number asked for
    (stdin, stdout, stderr, then pass_fds), every other one closed."""
    above = max(fds + wanted) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]   # out of the way
    for fd in set(fds):
        os.close(fd)
    for fd, target in zip(high, wanted):
        os.dup2(fd, target)                          # inheritable, as Popen leaves them
    keep = set(wanted)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass                                 # the listing's own descriptor


def main(argv: list[str] | None = None) -> int:
    """`python -m lgnet.guest.spawner --control-fd N`: serve the lab at the other end; in a
    forked child, be the launcher it asked for (and exit as one, through the interpreter's
    normal exit: its atexit handlers, its threads, its buffers)."""
    parser = argparse.ArgumentParser(prog="python -m " + __name__)
    parser.add_argument("--die-with-parent", action="store_true")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    if args.die_with_parent:
        process.die_with_parent()
    control = socket.socket(fileno=args.control_fd)
    launcher_args = serve(control)
    if launcher_args is None:
        return 0
    from lgnet.guest import launcher
    sys.argv = [launcher.__file__, *launcher_args]
    return launcher.main(launcher_args)


if __name__ == "__main__":
    sys.exit(main())
