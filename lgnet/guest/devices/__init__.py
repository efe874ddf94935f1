"""The Launcher's devices: descriptors, their pages, and who serves which key.

Rules of this room (the reference Launcher's device list): devices are created in
command-line order and the console last; each gets a `struct lguest_device_desc` in the page
just above RAM; device pages are handed out downward from LGUEST_GUEST_TOP. A device may watch
a private key (the guest's SEND_DMA to it comes back to the Launcher: handle_output) and an
input descriptor (the Waker kicks the guest out of run when it is readable: handle_input).
Net pages come from net files and are shared; every other page lives in the guest's own
shared-memory object.

One class per device kind (SharedNet here; Console, Block, Tun in their rooms), each with its
own typed fields; the list only calls what every Device has: init once its pages are placed,
output for a DMA to its key, input when its descriptor is readable, close.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

from lgnet import abi, netfile, process, wire
from lgnet.errors import LgnetError
from lgnet.guest.loader import write_device_descriptors
from lgnet.guest.physmem import PhysMap


class Device:
    """A device of the Launcher: its descriptor, its pages, what it serves."""
    serves_output = False                 # does a DMA to watch_key come to output()?

    def __init__(self, type: int, features: int, num_pages: int,
                 watch_key: int | None = None, input_fd: int | None = None):
        self.type = type
        self.features = features
        self.num_pages = num_pages
        self.watch_key = watch_key            # None: its first page, once placed
        self.input_fd = input_fd              # watched by the Waker while not None
        self.page = 0                         # guest-physical address of the first page

    @property
    def shared_fd(self) -> int | None:
        """A net file's descriptor, handed to the broker (None: pages of the guest's own)."""
        return None

    def init(self, phys: PhysMap) -> None:
        """Its pages are placed (self.page): write what the guest finds there."""

    def output(self, phys: PhysMap, channel, pieces: list[memoryview]) -> int:
        """The guest sent DMA to watch_key: serve it; the used_len to give back."""
        raise NotImplementedError

    def input(self, phys: PhysMap, channel) -> bool:
        """input_fd is readable: serve it; False to stop watching it (e.g. EOF)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the device holds."""


class SharedNet(Device):
    """--sharenet: a net file's page, shared with every guest on that net (and the broker).
    The broker gets its own open of the file: the slot lock stays ours alone, and dies with
    this process as lguest intended."""

    def __init__(self, net):
        super().__init__(abi.LGUEST_DEVICE_T_NET, net.slot | abi.LGUEST_NET_F_NOCSUM, 1)
        self.handover = os.open(net.path, os.O_RDWR)
        self.map = net.mmap
        self.name = netfile.net_name(net.path)     # as a trace names its keys (lan0+0x4)

    @property
    def shared_fd(self) -> int:
        return self.handover

    def close(self) -> None:
        os.close(self.handover)


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
        return self.add(SharedNet(net))

    def add_tun(self, arg: str, out, verbose: bool = False) -> Device:
        from lgnet.guest.devices.tun import Tun
        return self.add(Tun.open(arg, out, verbose))

    def add_block(self, path: str) -> Device:
        from lgnet.guest.devices.block import Block
        return self.add(Block.open(path))

    def add_console(self, out, console_input: bool) -> Device:
        from lgnet.guest.devices.console import Console
        return self.add(Console(out, console_input))

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
                    phys.add(top, device.map)
                else:
                    regions.append(wire.Region(top, size, next_private, 0, False))
                    phys.add(top, memoryview(ram)[next_private:next_private + size])
                    next_private += size
                if device.watch_key is None and device.serves_output:
                    device.watch_key = top
            device.init(phys)
        write_device_descriptors(phys.view(mem, abi.PAGE_SIZE),
                                 [(d.type, d.features, d.num_pages, d.page // abi.PAGE_SIZE)
                                  for d in self.list])
        self.control_offset = next_private
        return regions

    # --- serving the guest --------------------------------------------------------------

    def output(self, phys: PhysMap, channel, dma: int, key: int) -> int | None:
        for device in self.list:
            if device.serves_output and device.watch_key == key:
                return device.output(phys, channel, phys.dma_pieces(dma))
        return None

    def input_fds(self) -> list[int]:
        return [d.input_fd for d in self.list if d.input_fd is not None]

    def input(self, phys: PhysMap, channel) -> None:
        ready = process.readable(self.input_fds(), 0)
        for device in self.list:
            if device.input_fd is not None and device.input_fd in ready:
                if not device.input(phys, channel):
                    device.input_fd = None           # e.g. console EOF: stop watching

    def close(self) -> None:
        for device in self.list:
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
                ready = process.readable(self.fds() + [self.stop_r])
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
