"""The console: output is SEND_DMA to key 0, input is a buffer the guest binds at key 0.

The reference Launcher's rules: stdin goes raw (no echo, no line buffering, no signals) and is
restored on every exit; input is read straight into the guest's buffer; three ^C within about
a second end the Launcher with status 2, each ^C arriving in a buffer of its own. The device
only says so (ConsoleAbort); the Launcher decides how it ends.
"""
from __future__ import annotations

import atexit
import os
import sys
import termios
import time

from lgnet import abi
from lgnet.guest.devices import Device, get_dma_buffer, trigger_irq

DISCARD_BYTES = 1024


class ConsoleAbort(Exception):
    """The user pressed ^C three times within about a second: stop this Launcher."""


class Console(Device):
    serves_output = True

    def __init__(self, out, console_input: bool):
        super().__init__(abi.LGUEST_DEVICE_T_CONSOLE, 0, 0,
                         watch_key=abi.LGUEST_CONSOLE_DMA_KEY,
                         input_fd=sys.stdin.fileno() if console_input else None)
        self.out = out
        self.aborts = 0                       # ^C pressed in a row ...
        self.abort_start = 0.0                # ... since this moment
        self.restore = None                   # puts the terminal back as it was
        if self.input_fd is not None:
            self.raw_terminal()

    def raw_terminal(self) -> None:
        fd = self.input_fd
        try:
            saved = termios.tcgetattr(fd)
        except termios.error:
            return                      # not a terminal: nothing to restore
        term = list(saved)
        term[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
        termios.tcsetattr(fd, termios.TCSANOW, term)
        self.restore = lambda: termios.tcsetattr(fd, termios.TCSANOW, saved)
        atexit.register(self.restore)

    def close(self) -> None:
        if self.restore is not None:
            self.restore()

    def output(self, phys, channel, pieces) -> int:
        written = 0
        for piece in pieces:
            self.out.write(piece)
            written += len(piece)
        self.out.flush()
        return written

    def input(self, phys, channel) -> bool:
        found = get_dma_buffer(phys, channel, abi.LGUEST_CONSOLE_DMA_KEY)
        if found is None:
            self.out.write(b"lgnet: console: no dma buffer!\n")
            pieces = [memoryview(bytearray(DISCARD_BYTES))]
        else:
            pieces = found[0]
        try:
            length = os.readv(self.input_fd, pieces)
        except OSError:
            length = 0
        if length <= 0:
            self.out.write(b"lgnet: Failed to get console input, ignoring console.\n")
            length = 0
        if found is not None:
            phys.write_u32(found[1], length)
            trigger_irq(channel, found[2])
        self.check_abort(length, bytes(pieces[0][:1]) if length else b"")
        return length > 0

    def check_abort(self, length: int, first: bytes) -> None:
        """Three ^C within about a second: the hack that lets a user out of a raw console."""
        if length == 1 and first == bytes([abi.CTRL_C]):
            now = time.monotonic()
            if self.aborts == 0:
                self.abort_start = now
            self.aborts += 1
            if self.aborts >= abi.CONSOLE_ABORT_PRESSES:
                if now <= self.abort_start + abi.CONSOLE_ABORT_SECONDS + 1:
                    raise ConsoleAbort()
                self.aborts = 0
        else:
            self.aborts = 0
