"""The Launcher's devices: descriptors, their pages, and who serves which key.

Rules of this room (the reference Launcher's device list): devices are created in
command-line order and the console last; each gets a `struct lguest_device_desc` in the page
just above RAM; device pages are handed out downward from LGUEST_GUEST_TOP. A device may watch
a private key (the guest's SEND_DMA to it comes back to the Launcher: handle_output) and an
input descriptor (the Waker kicks the guest out of run when it is readable: handle_input).
Net pages come from net files and are shared; every other page lives in the guest's own
shared-memory object.
"""
from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass, field
from typing import Callable

from lgnet import abi, wire
from lgnet.errors import LgnetError
from lgnet.guest.loader import write_device_descriptors
from lgnet.guest.physmem import PhysMap


@dataclass
class Device:
    type: int
    features: int
    num_pages: int
    watch_key: int | None = None          # set once the page address is known
    handle_output: Callable | None = None  # (phys, channel, pieces, device) -> used_len
    input_fd: int | None = None
    handle_input: Callable | None = None   # (phys, channel, device) -> keep watching?
    shared_fd: int | None = None          # a net file, handed to the broker
    shared_map: object = None
    page: int = 0                         # guest-physical address of the first page
    state: dict = field(default_factory=dict)
    close: Callable[[], None] | None = None


class DeviceList:
    def __init__(self, mem: int):
        self.mem = mem
        self.list: list[Device] = []
        self.control_offset = 0

    # --- creating devices, in command-line order ----------------------------------------

    def add(self, device: Device) -> Device:
        if len(self.list) >= abi.MAX_DEVICES:
            raise LgnetError(abi.MSG_TOO_MANY_DEVICES)
        self.list.append(device)
        return device

    def add_net(self, net) -> Device:
        # The broker gets its own open of the file: the slot lock stays ours alone, and dies
        # with this process as lguest intended.
        handover = os.open(net.path, os.O_RDWR)
        device = self.add(Device(abi.LGUEST_DEVICE_T_NET, net.slot | abi.LGUEST_NET_F_NOCSUM,
                                 1, shared_fd=handover, shared_map=net.mmap))
        device.close = lambda: os.close(handover)
        return device

    def add_tun(self, arg: str, out, verbose: bool = False) -> Device:
        from lgnet.guest.devices.tun import tun_device
        return self.add(tun_device(arg, out, verbose))

    def add_block(self, path: str) -> Device:
        from lgnet.guest.devices.block import open_block
        return self.add(open_block(path))

    def add_console(self, out, console_input: bool) -> Device:
        from lgnet.guest.devices.console import console_device
        return self.add(console_device(out, console_input))

    # --- laying them out ----------------------------------------------------------------

    def private_pages(self) -> int:
        return sum(d.num_pages for d in self.list if d.shared_fd is None)

    def shared_fds(self) -> list[int]:
        return [d.shared_fd for d in self.list if d.shared_fd is not None]

    def place(self, ram, ram_fd: int, phys: PhysMap) -> list[wire.Region]:
        """Map RAM, the descriptor page and every device page; write the descriptors."""
        mem = self.mem
        regions = [wire.Region(0, mem, 0, 0, False),
                   wire.Region(mem, abi.PAGE_SIZE, mem, 0, False)]
        phys.add(0, memoryview(ram)[:mem + abi.PAGE_SIZE])
        next_private = mem + abi.PAGE_SIZE
        top = abi.LGUEST_GUEST_TOP
        shared_index = 1
        for device in self.list:
            if device.num_pages:
                size = device.num_pages * abi.PAGE_SIZE
                top -= size
                device.page = top
                if device.shared_fd is not None:
                    regions.append(wire.Region(top, size, 0, shared_index, True))
                    shared_index += 1
                    phys.add(top, device.shared_map)
                else:
                    regions.append(wire.Region(top, size, next_private, 0, False))
                    phys.add(top, memoryview(ram)[next_private:next_private + size])
                    next_private += size
                if device.watch_key is None and device.handle_output is not None:
                    device.watch_key = top
            if device.state.get("init") is not None:
                device.state["init"](phys, device)
        write_device_descriptors(phys.view(mem, abi.PAGE_SIZE),
                                 [(d.type, d.features, d.num_pages, d.page // abi.PAGE_SIZE)
                                  for d in self.list])
        self.control_offset = next_private
        return regions

    # --- serving the guest --------------------------------------------------------------

    def output(self, phys: PhysMap, channel, dma: int, key: int) -> int | None:
        for device in self.list:
            if device.handle_output is not None and device.watch_key == key:
                return device.handle_output(phys, channel, phys.dma_pieces(dma), device)
        return None

    def input_fds(self) -> list[int]:
        return [d.input_fd for d in self.list if d.handle_input is not None]

    def input(self, phys: PhysMap, channel) -> None:
        ready = select.select(self.input_fds(), [], [], 0)[0]
        for device in self.list:
            if device.handle_input is not None and device.input_fd in ready:
                if not device.handle_input(phys, channel, device):
                    device.handle_input = None       # e.g. console EOF: stop watching

    def close(self) -> None:
        for device in self.list:
            if device.close is not None:
                device.close()
        self.list.clear()


def get_dma_buffer(phys: PhysMap, channel, key: int):
    """GETDMA: (pieces, used_len address, irq) of a free buffer bound at key, or None."""
    reply = channel.call(wire.OP_GETDMA, key)
    if reply.result < 0:
        return None
    dma = reply.arg0
    irq = phys.read_u32(dma + abi.DMA_USED_LEN_OFFSET)      # the Host stashed the irq here
    return phys.dma_pieces(dma), dma + abi.DMA_USED_LEN_OFFSET, irq


def trigger_irq(channel, irq: int) -> None:
    channel.call(wire.OP_IRQ, irq)


class Waker(threading.Thread):
    """lguest's Waker: watches input and kicks the guest out of run (BREAK 1)."""

    def __init__(self, broker_path: str, guest_id: int, fds: Callable[[], list[int]]):
        super().__init__(name="lgnet-waker", daemon=True)
        self.channel = wire.Channel(broker_path)
        reply = self.channel.call(wire.OP_ATTACH, guest_id)
        if reply.result < 0:
            raise OSError(-reply.result, "cannot attach the Waker")
        self.fds = fds
        self.stop_r, self.stop_w = os.pipe()
        self.start()

    def run(self) -> None:
        try:
            while True:
                ready = select.select(self.fds() + [self.stop_r], [], [])[0]
                if self.stop_r in ready:
                    return
                # Blocks until the Launcher has serviced the input and written BREAK 0.
                self.channel.call(wire.OP_BREAK, 1)
        except (wire.BrokerGone, OSError):
            return

    def stop(self) -> None:
        os.write(self.stop_w, b"x")
        self.channel.close()
        self.join(timeout=1)
        os.close(self.stop_r)
        os.close(self.stop_w)
