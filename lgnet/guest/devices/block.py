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
import stat

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.guest.devices import Device, get_dma_buffer, trigger_irq
from lgnet.guest.host import GuestStopped


class Block(Device):
    serves_output = True

    def __init__(self, fd: int, length: int):
        super().__init__(abi.LGUEST_DEVICE_T_BLOCK, abi.LGUEST_DEVICE_F_RANDOMNESS, 1)
        self.fd = fd
        self.length = length                  # bytes; the guest sees length / SECTOR_SIZE

    @classmethod
    def open(cls, path: str) -> "Block":
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise LgnetError("cannot open block file '%s': %s" % (path, exc.strerror)) from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise LgnetError("block file '%s' is not a regular file or a block device"
                                 % path)
            length = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise LgnetError("block file '%s': cannot find its size: %s"
                             % (path, exc.strerror)) from None
        except LgnetError:
            os.close(fd)
            raise
        return cls(fd, length)

    def init(self, phys) -> None:
        """The page tells the guest the device's size, in sectors."""
        page = abi.LGUEST_BLOCK_PAGE.pack(0, 0, 0, 0, self.length // abi.SECTOR_SIZE)
        phys.write(self.page, page)

    def output(self, phys, channel, pieces) -> int:
        return serve_request(phys, channel, pieces, self)

    def close(self) -> None:
        os.close(self.fd)


def serve_request(phys, channel, pieces, device: Block) -> int:
    """One request the guest wrote into the page, with its data (a write) in `pieces`."""
    fd, length = device.fd, device.length
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
