"""The block device: a file behind one lguest_block_page.

The guest fills in the request (type, sector, bytes) and sends DMA to the page's key: the data
for a write (any type but 0), an empty DMA for a read (type 0) whose reply buffer it bound at
that key. The reference
Launcher's rules: an offset past the end is an error; a request without a reply buffer is an
error; a write past the end is truncated back and fails the guest; result = 1 + (bytes != len);
then the reply buffer's used_len and the interrupt.
"""
from __future__ import annotations

import os

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.guest.devices import Device, get_dma_buffer, trigger_irq
from lgnet.guest.host import GuestStopped


def open_block(path: str) -> Device:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise LgnetError("cannot open block file '%s': %s" % (path, exc.strerror)) from None
    length = os.lseek(fd, 0, os.SEEK_END)
    device = Device(abi.LGUEST_DEVICE_T_BLOCK, abi.LGUEST_DEVICE_F_RANDOMNESS, 1,
                    handle_output=handle_block_output)
    device.state.update(fd=fd, length=length, init=write_size)
    device.close = lambda: os.close(fd)
    return device


def write_size(phys, device: Device) -> None:
    page = abi.LGUEST_BLOCK_PAGE.pack(0, 0, 0, 0, device.state["length"] // abi.SECTOR_SIZE)
    phys.write(device.page, page)


def handle_block_output(phys, channel, pieces, device: Device) -> int:
    fd, length = device.state["fd"], device.state["length"]
    kind, sector, want, _result, _n = abi.LGUEST_BLOCK_PAGE.unpack(
        phys.read(device.page, abi.LGUEST_BLOCK_PAGE.size))
    offset = sector * abi.SECTOR_SIZE
    if offset >= length:
        raise GuestStopped("Bad offset %d vs %d" % (offset, length))
    reply = get_dma_buffer(phys, channel, device.page)
    if reply is None:
        raise GuestStopped("Block request didn't give us a dma buffer")
    reply_pieces, used_len_addr, irq = reply
    # 2.6.23's test was `if (p->type)`: any type but 0 (read) is a write.
    if kind != abi.BLOCK_TYPE_READ:
        done = os.pwritev(fd, pieces, offset)
        if offset + done > length:
            os.ftruncate(fd, length)          # trim it back, then fail the guest
            raise GuestStopped("Write past end %d+%d" % (offset, done))
        phys.write_u32(used_len_addr, 0)
    else:
        done = os.preadv(fd, reply_pieces, offset)
        phys.write_u32(used_len_addr, done)
    result = abi.BLOCK_RESULT_DONE + (want != done)
    phys.write(device.page + abi.BLOCK_RESULT_OFFSET, result.to_bytes(4, "little", signed=True))
    trigger_irq(channel, irq)
    return 0
