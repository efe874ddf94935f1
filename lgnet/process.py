"""Process helpers every lgnet process shares: how a child is started, how it dies with its
parent, how an entry point turns errors into exit statuses.

Rules of this file: ground floor (DESIGN.md, Layout): it imports only errors.py, and both
wings' entry points and the lab use it. It knows nothing of what the processes do.

Children run as `python -P -m MODULE`: -P keeps the current directory off sys.path, so a
folder named `lgnet` wherever the user stands cannot stand in for lgnet (PYTHONPATH still
counts, as a user of it expects).
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
from typing import Callable

from lgnet.errors import USER_ERROR_EXIT, LgnetError

PR_SET_PDEATHSIG = 1
EXIT_ORPHANED = 1                    # the parent was gone before we could ask to die with it
EXIT_INTERRUPTED = 130               # Ctrl-C, as a shell reports it


def readable(fds, timeout: float | None = None) -> list[int]:
    """The descriptors of `fds` ready to read within `timeout` seconds (None: wait). poll,
    not select: select cannot take a descriptor numbered 1024 or more, and a large lab
    has those."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)]


def proc_field(path: str, name: str) -> str | None:
    """The first word after `name:` in a /proc file of "Name: value ..." lines (status,
    meminfo), or None when the file or the line is not there."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(name) and line[len(name):len(name) + 1] == ":":
                    return line.split()[1]
    except OSError:
        pass
    return None


def child_command(module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args...` independently of the cwd."""
    return [sys.executable, "-P", "-m", module, *args]


def die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the process that started us dies (a lab's children)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        raise SystemExit(EXIT_ORPHANED)


def entry_main(run: Callable[[], int], program: str = "lgnet") -> int:
    """Run an entry point: a user's mistake (LgnetError) is one line and status 2, Ctrl-C is
    130; anything else is a bug and keeps its traceback."""
    try:
        return run()
    except LgnetError as exc:
        print("%s: %s" % (program, exc), file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
