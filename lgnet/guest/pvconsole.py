"""The Python guest's console driver: output is SEND_DMA to key 0, and the Launcher prints it;
input, once listened for, is a buffer bound at key 0 that the Launcher fills (lguest's console
device, guest side)."""
from __future__ import annotations

import re

from lgnet import abi
from lgnet.guest.pvmachine import Machine


class Console:
    """Output = SEND_DMA to key 0; the Launcher prints it. Input (once `listen`ed): one
    buffer bound at key 0, as the bundled kernel's console binds it; the Launcher fills it
    and raises the console's interrupt, and typed lines queue up in `lines`."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.buffer = machine.alloc_pages(abi.PAGE_SIZE)
        self.dma = machine.alloc(abi.LGUEST_DMA_SIZE, 4)
        self.lines: list[str] = []
        self._partial = b""
        self._in_buffer = self._in_dma = 0

    def listen(self) -> bool:
        """Bind the input buffer; False when there is no console device or the bind failed."""
        index = next((d[0] for d in self.machine.devices()
                      if d[1] == abi.LGUEST_DEVICE_T_CONSOLE), None)
        if index is None:
            return False
        self._in_buffer = self.machine.alloc(abi.CONSOLE_INPUT_BYTES)
        self._in_dma = self.machine.alloc(abi.LGUEST_DMA_SIZE, 4)
        self.machine.phys.write(self._in_dma, abi.pack_dma(
            [(self._in_buffer, abi.CONSOLE_INPUT_BYTES)]))
        self.machine.handlers[index + 1] = self._input
        return self.machine.hcall(abi.LHCALL_BIND_DMA, abi.LGUEST_CONSOLE_DMA_KEY,
                                  self._in_dma, abi.bind_dma_arg(1, index + 1)) == 1

    def _input(self) -> None:
        used = self.machine.phys.read_u32(self._in_dma + abi.DMA_USED_LEN_OFFSET)
        data = self.machine.phys.read(self._in_buffer, min(used, abi.CONSOLE_INPUT_BYTES))
        self.machine.phys.write_u32(self._in_dma + abi.DMA_USED_LEN_OFFSET, 0)   # re-arm
        # A raw terminal sends Enter as \r, a pipe as \n.
        *complete, self._partial = re.split(rb"\r\n?|\n", self._partial + data)
        self.lines += [line.decode(errors="replace") for line in complete]

    def write(self, text: str) -> None:
        data = text.encode()
        for start in range(0, len(data), abi.PAGE_SIZE):
            chunk = data[start:start + abi.PAGE_SIZE]
            self.machine.phys.write(self.buffer, chunk)
            self.machine.phys.write(self.dma, abi.pack_dma([(self.buffer, len(chunk))]))
            self.machine.hcall(abi.LHCALL_SEND_DMA, abi.LGUEST_CONSOLE_DMA_KEY, self.dma)
