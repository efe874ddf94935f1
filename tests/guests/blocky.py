"""A Python kernel that misuses its block device, chosen by `block=` on the command line:
`pastend` writes two sectors starting at the last one; `badsector` reads a sector beyond the
end. The Launcher must refuse both, and the first must not grow the file. `type2` sends a
request of type 2 with two sectors of PATTERN for sector 1: 2.6.23 wrote whenever the type
was not 0."""
from lgnet import abi
from lgnet.guest.pvmachine import Machine, parse_cmdline

REQUEST_BYTES = 2 * abi.SECTOR_SIZE
PATTERN = bytes(range(256)) * (REQUEST_BYTES // 256)


def main(machine: Machine) -> None:
    what = parse_cmdline(machine.cmdline())["block"]
    page = next(pfn for _i, kind, _f, _s, _n, pfn in machine.devices()
                if kind == abi.LGUEST_DEVICE_T_BLOCK) * abi.PAGE_SIZE
    sectors = abi.LGUEST_BLOCK_PAGE.unpack(machine.phys.read(page, abi.LGUEST_BLOCK_PAGE.size))[4]
    reply = machine.alloc(abi.LGUEST_DMA_SIZE, 4)
    data = machine.alloc_pages(REQUEST_BYTES)
    request = machine.alloc(abi.LGUEST_DMA_SIZE, 4)
    machine.phys.write(reply, abi.pack_dma([]))
    machine.hcall(abi.LHCALL_BIND_DMA, page, reply, abi.bind_dma_arg(1, 1))
    if what == "pastend":
        kind, sector, pieces = abi.BLOCK_TYPE_WRITE, sectors - 1, [(data, REQUEST_BYTES)]
    elif what == "type2":
        machine.phys.write(data, PATTERN)
        kind, sector, pieces = 2, 1, [(data, REQUEST_BYTES)]
    else:
        kind, sector, pieces = abi.BLOCK_TYPE_READ, sectors + 4, []
    machine.phys.write(page, abi.LGUEST_BLOCK_PAGE.pack(kind, sector, REQUEST_BYTES, 0, sectors))
    machine.phys.write(request, abi.pack_dma(pieces))
    machine.hcall(abi.LHCALL_SEND_DMA, page, request)
    machine.power_down()
