"""A Python kernel that says what the Host and the Launcher gave it, then powers down: the
lguest_data fields LGUEST_INIT writes (reserve_mem, tsc_khz) and the device descriptors in
the order it finds them (one line each: index, type, features, pfn)."""
import struct

from lgnet import abi
from lgnet.guest.pvconsole import Console
from lgnet.guest.pvmachine import Machine


def main(machine: Machine) -> None:
    console = Console(machine)
    data = machine.phys.read(machine.lguest_data, abi.LGUEST_DATA_SIZE)
    reserve_mem, = struct.unpack_from("<I", data, abi.LGUEST_DATA_RESERVE_MEM)
    tsc_khz, = struct.unpack_from("<I", data, abi.LGUEST_DATA_TSC_KHZ)
    console.write("reserve_mem %d tsc_khz %d\n" % (reserve_mem, tsc_khz))
    for index, kind, features, _status, _num_pages, pfn in machine.devices():
        console.write("device %d %s features %#x pfn %#x\n" % (
            index, abi.DEVICE_TYPE_NAMES[kind], features, pfn))
    machine.power_down()
