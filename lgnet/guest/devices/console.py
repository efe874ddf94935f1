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


def console_device(out, console_input: bool) -> Device:
    device = Device(abi.LGUEST_DEVICE_T_CONSOLE, 0, 0, watch_key=abi.LGUEST_CONSOLE_DMA_KEY,
                    handle_output=handle_console_output)
    device.state.update(out=out, aborts=0, abort_start=0.0)
    if console_input:
        device.input_fd = sys.stdin.fileno()
        device.handle_input = handle_console_input
        raw_terminal(device)
    return device


def raw_terminal(device: Device) -> None:
    fd = device.input_fd
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        return                      # not a terminal: nothing to restore
    term = list(saved)
    term[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
    termios.tcsetattr(fd, termios.TCSANOW, term)
    restore = lambda: termios.tcsetattr(fd, termios.TCSANOW, saved)
    atexit.register(restore)
    device.close = restore


def handle_console_output(phys, channel, pieces, device: Device) -> int:
    out = device.state["out"]
    written = 0
    for piece in pieces:
        out.write(piece)
        written += len(piece)
    out.flush()
    return written


def handle_console_input(phys, channel, device: Device) -> bool:
    found = get_dma_buffer(phys, channel, abi.LGUEST_CONSOLE_DMA_KEY)
    if found is None:
        device.state["out"].write(b"lgnet: console: no dma buffer!\n")
        pieces = [memoryview(bytearray(DISCARD_BYTES))]
    else:
        pieces = found[0]
    try:
        length = os.readv(device.input_fd, pieces)
    except OSError:
        length = 0
    if length <= 0:
        device.state["out"].write(b"lgnet: Failed to get console input, ignoring console.\n")
        length = 0
    if found is not None:
        phys.write_u32(found[1], length)
        trigger_irq(channel, found[2])
    check_abort(device, length, bytes(pieces[0][:1]) if length else b"")
    return length > 0


def check_abort(device: Device, length: int, first: bytes) -> None:
    """Three ^C within about a second: the hack that lets a user out of a raw console."""
    state = device.state
    if length == 1 and first == bytes([abi.CTRL_C]):
        now = time.monotonic()
        if state["aborts"] == 0:
            state["abort_start"] = now
        state["aborts"] += 1
        if state["aborts"] >= abi.CONSOLE_ABORT_PRESSES:
            if now <= state["abort_start"] + abi.CONSOLE_ABORT_SECONDS + 1:
                raise ConsoleAbort()
            state["aborts"] = 0
    else:
        state["aborts"] = 0
