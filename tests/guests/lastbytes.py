"""A Python kernel that dies with its CRASH message in the last 20 bytes of its RAM. The
Host reads 128 bytes there (lgread of the message), running on into the descriptor page
just above RAM: lguest's copy_from_user saw one range and read it, and so must lgnet."""
from lgnet import abi
from lgnet.guest.pvmachine import Machine

MESSAGE = b"at the end of RAM"
ROOM = 20


def main(machine: Machine) -> None:
    at = machine.mem - ROOM
    machine.phys.write(at, MESSAGE + b"\0")
    machine.hcall(abi.LHCALL_CRASH, at)
