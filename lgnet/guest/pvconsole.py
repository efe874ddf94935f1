"""The Python guest's console driver: output is SEND_DMA to key 0, and the Launcher prints it
(lguest's console device, guest side)."""
from __future__ import annotations

from lgnet import abi
from lgnet.guest.pvmachine import Machine


class Console:
    """Output = SEND_DMA to key 0; the Launcher prints it."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.buffer = machine.alloc_pages(abi.PAGE_SIZE)
        self.dma = machine.alloc(abi.LGUEST_DMA_SIZE, 4)

    def write(self, text: str) -> None:
        data = text.encode()
        for start in range(0, len(data), abi.PAGE_SIZE):
            chunk = data[start:start + abi.PAGE_SIZE]
            self.machine.phys.write(self.buffer, chunk)
            self.machine.phys.write(self.dma, abi.pack_dma([(self.buffer, len(chunk))]))
            self.machine.hcall(abi.LHCALL_SEND_DMA, abi.LGUEST_CONSOLE_DMA_KEY, self.dma)
