"""--tunnet: the reference Launcher's guest <-> host network.

The guest sees an ordinary lguest_net device whose page is *private* (not a net file): it is
slot 1 (NET_PEERNUM, with LGUEST_DEVICE_F_RANDOMNESS and without LGUEST_NET_F_NOCSUM: these
frames can reach the real world), and the host's MAC sits in slot 0 with the promiscuous bit.
So every frame the guest transmits goes to slot 0's key, which is private: the Host hands the
DMA back to this Launcher, which writes it to the host end. A frame from the host end is read
straight into the buffer the guest bound at its own slot's key (GETDMA(page + 4)) and the
receive interrupt is raised; without a buffer it is read into a discard buffer, with a warning
only once the guest has sent something (before that, the guest is simply not up yet).

The host end is either
- a TAP interface (IFF_TAP | IFF_NO_PI, named tap%d): `--tunnet=A.B.C.D[/N]` gives it that
  address and brings it up, `--tunnet=bridge:NAME` adds it to a bridge instead. This needs
  CAP_NET_ADMIN; without it the Launcher stops with a clear error;
- or `--tunnet=fd:N`, a descriptor the Launcher inherited that carries one Ethernet frame per
  message, like a TAP (a SOCK_SEQPACKET socket): how lgnet's host ports (`Lab.port`) join a net.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.guest.devices import Device, get_dma_buffer, trigger_irq
from lgnet.guest.host import GuestStopped

# Linux's tun and interface ioctls (include/linux/if_tun.h, sockios.h, if.h).
TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETNOCSUM = 0x400454C8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x0001
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCGIFHWADDR = 0x8927
SIOCGIFINDEX = 0x8933
SIOCBRADDIF = 0x89A2
IFNAMSIZ = 16
IFREQ_SIZE = 40
IFREQ_NAME = struct.Struct("%ds" % IFNAMSIZ)
IFREQ_FLAGS = struct.Struct("%dsH" % IFNAMSIZ)
IFREQ_INDEX = struct.Struct("%dsi" % IFNAMSIZ)
IFREQ_ADDR = struct.Struct("%dsHH4s" % IFNAMSIZ)          # name + struct sockaddr_in
HWADDR_OFFSET = IFNAMSIZ + 2                                # after sa_family
TAP_NAME = "tap%d"
BRIDGE_PREFIX = "bridge:"
FD_PREFIX = "fd:"
# lgnet's own: the host end of an fd: link has no hardware address, so slot 0 gets this one
# (locally administered, never a guest's 02:00:<id>:00:00).
LINK_HOST_MAC = bytes.fromhex("0200ffffff00")
DISCARD_BYTES = 1024


def _ifreq(layout: struct.Struct, *fields) -> bytes:
    return layout.pack(*fields).ljust(IFREQ_SIZE, b"\0")


def _need_cap(what: str, exc: OSError) -> LgnetError:
    return LgnetError("--tunnet needs CAP_NET_ADMIN (%s: %s)" % (what, exc.strerror))


def open_tap() -> tuple[int, str]:
    """A new TAP interface: its descriptor and its name."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR)
    except OSError as exc:
        raise _need_cap("cannot open %s" % TUN_DEVICE, exc) from None
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, _ifreq(IFREQ_FLAGS, TAP_NAME.encode(),
                                                    IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise _need_cap("configuring %s" % TUN_DEVICE, exc) from None
    try:
        # "We don't need checksums calculated for packets coming in this device: trust us!"
        # (gone from newer kernels, where it fails harmlessly)
        fcntl.ioctl(fd, TUNSETNOCSUM, 1)
    except OSError:
        pass
    return fd, IFREQ_NAME.unpack_from(answer)[0].rstrip(b"\0").decode()


def configure_tap(name: str, arg: str) -> bytes:
    """Bridge or address the TAP, bring it up; its hardware address."""
    ipfd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        raw = name.encode()
        if arg.startswith(BRIDGE_PREFIX):
            add_to_bridge(ipfd, raw, arg[len(BRIDGE_PREFIX):])
        else:
            try:
                iface = ipaddress.IPv4Interface(arg)
            except ValueError:
                raise LgnetError("--tunnet=%s: not an address (A.B.C.D[/N]) nor bridge:NAME"
                                 % arg) from None
            _ioctl(ipfd, SIOCSIFADDR, _ifreq(IFREQ_ADDR, raw, socket.AF_INET, 0,
                                             iface.ip.packed), "setting the address of " + name)
            if "/" in arg:
                _ioctl(ipfd, SIOCSIFNETMASK, _ifreq(IFREQ_ADDR, raw, socket.AF_INET, 0,
                                                    iface.netmask.packed),
                       "setting the netmask of " + name)
        flags = IFREQ_FLAGS.unpack_from(_ioctl(ipfd, SIOCGIFFLAGS, _ifreq(IFREQ_NAME, raw),
                                               "getting the flags of " + name))[1]
        _ioctl(ipfd, SIOCSIFFLAGS, _ifreq(IFREQ_FLAGS, raw, flags | IFF_UP),
               "bringing interface %s up" % name)
        answer = _ioctl(ipfd, SIOCGIFHWADDR, _ifreq(IFREQ_NAME, raw),
                        "getting hw address for " + name)
        return answer[HWADDR_OFFSET:HWADDR_OFFSET + abi.ETH_ALEN]
    finally:
        ipfd.close()


def add_to_bridge(ipfd: socket.socket, name: bytes, bridge: str) -> None:
    index = IFREQ_INDEX.unpack_from(_ioctl(ipfd, SIOCGIFINDEX, _ifreq(IFREQ_NAME, name),
                                           "getting the index of " + name.decode()))[1]
    _ioctl(ipfd, SIOCBRADDIF, _ifreq(IFREQ_INDEX, bridge.encode(), index),
           "can't add %s to bridge %s" % (name.decode(), bridge))


def _ioctl(sock: socket.socket, request: int, arg: bytes, what: str) -> bytes:
    try:
        return fcntl.ioctl(sock.fileno(), request, arg)
    except OSError as exc:
        raise LgnetError("--tunnet: %s: %s" % (what, exc.strerror)) from None


def tun_device(arg: str, out, verbose: bool = False) -> Device:
    """The device for --tunnet=ARG (see the module's docstring for ARG)."""
    if arg.startswith(FD_PREFIX):
        try:
            fd = int(arg[len(FD_PREFIX):])
            os.fstat(fd)
        except (ValueError, OSError):
            raise LgnetError("--tunnet=%s: not an open descriptor" % arg) from None
        name, host_mac, owned = arg, LINK_HOST_MAC, False
    else:
        fd, name = open_tap()
        try:
            host_mac = configure_tap(name, arg)
        except BaseException:
            os.close(fd)
            raise
        owned = True
    device = Device(abi.LGUEST_DEVICE_T_NET, abi.TUN_GUEST_SLOT | abi.LGUEST_DEVICE_F_RANDOMNESS,
                    1, handle_output=handle_tun_output, input_fd=fd,
                    handle_input=handle_tun_input)
    device.state.update(fd=fd, name=name, host_mac=host_mac, sent=False, out=out,
                        verbose=verbose, init=write_host_mac)
    if owned:
        device.close = lambda: os.close(fd)
    if verbose:
        out.write(("lgnet: tun device %s, host MAC %s\n" % (name, host_mac.hex(":"))).encode())
    return device


def write_host_mac(phys, device: Device) -> None:
    """We are slot 0; the promiscuous bit says: send me every single frame."""
    mac = bytearray(device.state["host_mac"])
    mac[0] |= abi.NET_PROMISC_BIT
    phys.write(device.page + abi.TUN_HOST_SLOT * abi.ETH_ALEN, bytes(mac))


def handle_tun_output(phys, channel, pieces, device: Device) -> int:
    """Whatever frame the guest sent us, write it to the host end."""
    device.state["sent"] = True
    try:
        return os.writev(device.state["fd"], pieces)
    except OSError:
        return 0                     # e.g. the TAP is down: the guest counts a carrier error


def handle_tun_input(phys, channel, device: Device) -> bool:
    """A frame from the host end: into the guest's buffer at its slot's key, or discarded."""
    state = device.state
    found = get_dma_buffer(phys, channel, abi.peer_key(device.page, abi.TUN_GUEST_SLOT))
    if found is None:
        if state["sent"]:
            state["out"].write(b"lgnet: network: no dma buffer!\n")
        pieces = [memoryview(bytearray(DISCARD_BYTES))]
    else:
        pieces = found[0]
    try:
        length = os.readv(state["fd"], pieces)
    except OSError as exc:
        raise GuestStopped("reading network: %s" % exc.strerror) from None
    if length <= 0:
        raise GuestStopped("reading network: the host end of %s closed" % state["name"])
    if found is not None:
        phys.write_u32(found[1], length)
        trigger_irq(channel, found[2])
    if state["verbose"]:
        state["out"].write(b"tun input packet len %d (%s)\n"
                           % (length, b"sent" if found is not None else b"discarded"))
    return True
