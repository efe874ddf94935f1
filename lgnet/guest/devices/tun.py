"""--tunnet: the reference Launcher's guest <-> host network.

The guest sees an ordinary lguest_net device whose page is *private* (not a net file): it is
slot 1 (NET_PEERNUM, with LGUEST_DEVICE_F_RANDOMNESS and without LGUEST_NET_F_NOCSUM: these
frames can reach the real world), and the host's MAC sits in slot 0 with the promiscuous bit.
So every frame the guest transmits goes to slot 0's key, which is private: the Host hands the
DMA back to this Launcher, which writes it to the host end. A frame from the host end is read
straight into the buffer the guest bound at its own slot's key (GETDMA(page + 4)) and the
receive interrupt is raised; without a buffer it is read into a discard buffer, with a warning
only once the guest has sent something (before that, the guest is simply not up yet).

The host end (ARG of --tunnet, parsed once by parse_tunnet into a TunSpec) is either
- a TAP interface (IFF_TAP | IFF_NO_PI): `A.B.C.D[/N]` gives it that address and brings it up;
  `bridge:NAME` adds it to a bridge instead; `tap:NAME` names it (default: the kernel's
  tap%d) — a persistent TAP of that name (`ip tuntap add NAME mode tap user U`) is attached to,
  not created, and then no privilege is needed. Otherwise this needs CAP_NET_ADMIN; without it
  the Launcher stops with a clear error. With a bridge, `vxlan:ID,remote:A.B.C.D,dev:IFACE`
  also creates a VXLAN port `lgvxID` in that bridge (removed when the Launcher stops): how an
  uplink (lgnet.uplink) joins a net to the same net on another host;
- or `fd:N`, a descriptor the Launcher inherited that carries one Ethernet frame per message,
  like a TAP (a SOCK_SEQPACKET socket): how lgnet's host ports (`Lab.port`) join a net.

The VXLAN port is made with iproute2's `ip`, not a netlink library: the commands are exactly
the ones the README teaches for joining two hosts by hand, so what lgnet did can be read,
repeated and undone with the same tool, and an optional feature adds no dependency.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn

from lgnet import abi, process
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
FD_PREFIX = "fd:"
# Linux's dev_valid_name(): under IFNAMSIZ, not "." or "..", no "/", ":" or white space.
IFNAME_PATTERN = r"(?!\.\.?$)[^/:\s]{1,%d}" % (IFNAMSIZ - 1)
CAP_NET_ADMIN = 12                                          # include/uapi/linux/capability.h
# VXLAN (RFC 7348): a 24-bit network identifier; IANA's UDP port; what it wraps around a
# frame over IPv4 (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 bytes).
VXLAN_MAX_ID = (1 << 24) - 1
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50
VXLAN_NAME = "lgvx%d"
TUNNET_KEYS = ("bridge", "tap", "vxlan", "remote", "dev")
VXLAN_KEYS = ("vxlan", "remote", "dev")
IP_COMMAND_SECONDS = 10
IP_REMOVE_SECONDS = 60
# lgnet's own: the host end of an fd: link has no hardware address, so slot 0 gets this one
# (locally administered, never a guest's 02:00:<id>:00:00).
LINK_HOST_MAC = bytes.fromhex("0200ffffff00")
DISCARD_BYTES = 1024


@dataclass(frozen=True)
class Vxlan:
    """A VXLAN port to create in the TAP's bridge: network `id`, tunnel to `remote` over `dev`."""
    id: int
    remote: str
    dev: str

    @property
    def name(self) -> str:
        return VXLAN_NAME % self.id


@dataclass(frozen=True)
class TunSpec:
    """What --tunnet=ARG asks for (see the module's docstring); `arg` writes it back."""
    address: str | None = None
    bridge: str | None = None
    tap: str | None = None
    fd: int | None = None
    vxlan: Vxlan | None = None

    @property
    def arg(self) -> str:
        if self.fd is not None:
            return "fd:%d" % self.fd
        if self.address is not None:
            return self.address
        parts = [("bridge", self.bridge), ("tap", self.tap)]
        if self.vxlan:
            parts += [("vxlan", self.vxlan.id), ("remote", self.vxlan.remote),
                      ("dev", self.vxlan.dev)]
        return ",".join("%s:%s" % (k, v) for k, v in parts if v is not None)

    def describe(self) -> str:
        """`a TAP in bridge br0, VXLAN 42 to 10.1.0.2 over veth0`, for messages."""
        text = "TAP %s" % self.tap if self.tap else "a TAP"
        if self.bridge:
            text += " in bridge %s" % self.bridge
        if self.vxlan:
            text += ", VXLAN %d to %s over %s" % (self.vxlan.id, self.vxlan.remote,
                                                  self.vxlan.dev)
        return text


IFNAME_WHAT = "an interface name (1 to %d characters, no '/', ':' or spaces)" % (IFNAMSIZ - 1)
VXLAN_ID_WHAT = "a VXLAN network identifier, a whole number from 0 to %d" % VXLAN_MAX_ID
REMOTE_WHAT = "the IPv4 address of the tunnel's other end"


def is_ifname(value) -> bool:
    return isinstance(value, str) and re.fullmatch(IFNAME_PATTERN, value) is not None


def is_vxlan_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= VXLAN_MAX_ID


def is_ipv4(value) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return isinstance(value, str)


def parse_tunnet(arg: str) -> TunSpec:
    """--tunnet=ARG -> TunSpec; an LgnetError naming what is wrong."""
    def fail(what: str) -> NoReturn:
        raise LgnetError("--tunnet=%s: %s" % (arg, what))

    if arg.startswith(FD_PREFIX):
        if not arg[len(FD_PREFIX):].isdigit():
            fail("fd: wants a descriptor number")
        return TunSpec(fd=int(arg[len(FD_PREFIX):]))
    if ":" not in arg:
        try:
            ipaddress.IPv4Interface(arg)
        except ValueError:
            fail("not an address (A.B.C.D[/N]), nor bridge:NAME, tap:NAME or fd:N")
        return TunSpec(address=arg)
    items = _items(arg, fail)
    for key in ("bridge", "tap", "dev"):
        if key in items and not is_ifname(items[key]):
            fail(_must(key, IFNAME_WHAT, items[key]))
    if "bridge" not in items and "tap" not in items:
        fail("needs bridge:NAME or tap:NAME")
    vxlan = None
    if items.keys() & set(VXLAN_KEYS):
        missing = [k for k in VXLAN_KEYS if k not in items]
        if missing:
            fail("a VXLAN port needs %s" % ", ".join("%s:" % k for k in missing))
        if "bridge" not in items:
            fail("a VXLAN port needs a bridge (bridge:NAME) to join")
        number = int(items["vxlan"]) if items["vxlan"].isdigit() else None
        if not is_vxlan_id(number):
            fail(_must("vxlan", VXLAN_ID_WHAT, items["vxlan"]))
        if not is_ipv4(items["remote"]):
            fail(_must("remote", REMOTE_WHAT, items["remote"]))
        vxlan = Vxlan(number, items["remote"], items["dev"])
    return TunSpec(bridge=items.get("bridge"), tap=items.get("tap"), vxlan=vxlan)


def _items(arg: str, fail) -> dict[str, str]:
    """KEY:VALUE,KEY:VALUE... -> {KEY: VALUE}, each key known and given once."""
    items: dict[str, str] = {}
    for item in arg.split(","):
        key, sep, value = item.partition(":")
        if not sep or key not in TUNNET_KEYS:
            fail("%r: expected one of %s, each as KEY:VALUE" % (item, ", ".join(TUNNET_KEYS)))
        if key in items:
            fail("%s: given twice" % key)
        items[key] = value
    return items


def _must(key: str, what: str, value: str) -> str:
    return "%s: must be %s, got %r" % (key, what, value)


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (in its effective set)."""
    caps = process.proc_field("/proc/self/status", "CapEff")
    return caps is not None and bool(int(caps, 16) >> CAP_NET_ADMIN & 1)


def _ifreq(layout: struct.Struct, *fields) -> bytes:
    return layout.pack(*fields).ljust(IFREQ_SIZE, b"\0")


def _need_cap(what: str, exc: OSError) -> LgnetError:
    return LgnetError("--tunnet needs CAP_NET_ADMIN (%s: %s)" % (what, exc.strerror))


def open_tap(name: str = TAP_NAME) -> tuple[int, str]:
    """A TAP interface (a new one, or the persistent one of that name): descriptor, name."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR)
    except OSError as exc:
        raise _need_cap("cannot open %s" % TUN_DEVICE, exc) from None
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, _ifreq(IFREQ_FLAGS, name.encode(),
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


def configure_tap(name: str, spec: TunSpec) -> bytes:
    """Bridge or address the TAP, bring it up; its hardware address."""
    ipfd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        raw = name.encode()
        if spec.bridge:
            add_to_bridge(ipfd, raw, spec.bridge)
        if spec.address:
            iface = ipaddress.IPv4Interface(spec.address)
            _ioctl(ipfd, SIOCSIFADDR, _ifreq(IFREQ_ADDR, raw, socket.AF_INET, 0,
                                             iface.ip.packed), "setting the address of " + name)
            if "/" in spec.address:
                _ioctl(ipfd, SIOCSIFNETMASK, _ifreq(IFREQ_ADDR, raw, socket.AF_INET, 0,
                                                    iface.netmask.packed),
                       "setting the netmask of " + name)
        flags = IFREQ_FLAGS.unpack_from(_ioctl(ipfd, SIOCGIFFLAGS, _ifreq(IFREQ_NAME, raw),
                                               "getting the flags of " + name))[1]
        if not flags & IFF_UP:
            # (A persistent TAP its owner brought up already needs no privilege here.)
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


class Tun(Device):
    """--tunnet: the guest in slot 1 of a private net page, the host's end (a TAP, or a
    descriptor a host port hands over) in slot 0."""
    serves_output = True

    def __init__(self, fd: int, name: str, host_mac: bytes, closers: list, out, verbose: bool):
        super().__init__(abi.LGUEST_DEVICE_T_NET,
                         abi.TUN_GUEST_SLOT | abi.LGUEST_DEVICE_F_RANDOMNESS, 1, input_fd=fd)
        self.fd = fd
        self.name = name
        self.host_mac = host_mac
        self.closers = closers                # undone in reverse order at close (TAP, VXLAN)
        self.sent = False                     # has the guest sent anything yet?
        self.out = out
        self.verbose = verbose

    @classmethod
    def open(cls, arg: str, out, verbose: bool = False) -> "Tun":
        """The device for --tunnet=ARG (see the module's docstring for ARG)."""
        spec = parse_tunnet(arg)
        closers = []
        if spec.fd is not None:
            try:
                os.fstat(spec.fd)
            except OSError:
                raise LgnetError("--tunnet=%s: not an open descriptor" % arg) from None
            fd, name, host_mac = spec.fd, arg, LINK_HOST_MAC
        else:
            fd, name = open_tap(spec.tap or TAP_NAME)
            closers.append(lambda: os.close(fd))
            try:
                host_mac = configure_tap(name, spec)
                if spec.vxlan:
                    closers.append(create_vxlan(spec.vxlan, spec.bridge, out))
            except BaseException:
                close_all(closers)
                raise
        device = cls(fd, name, host_mac, closers, out, verbose)
        if verbose:
            out.write(("lgnet: tun device %s, host MAC %s\n" % (name, host_mac.hex(":"))).encode())
        return device

    def init(self, phys) -> None:
        """We are slot 0; the promiscuous bit says: send me every single frame."""
        mac = bytearray(self.host_mac)
        mac[0] |= abi.NET_PROMISC_BIT
        phys.write(self.page + abi.TUN_HOST_SLOT * abi.ETH_ALEN, bytes(mac))

    def output(self, phys, channel, pieces) -> int:
        """Whatever frame the guest sent us, write it to the host end."""
        self.sent = True
        try:
            return os.writev(self.fd, pieces)
        except OSError:
            return 0                 # e.g. the TAP is down: the guest counts a carrier error

    def input(self, phys, channel) -> bool:
        """A frame from the host end: into the guest's buffer at its slot's key, or
        discarded."""
        found = get_dma_buffer(phys, channel, abi.peer_key(self.page, abi.TUN_GUEST_SLOT))
        if found is None:
            if self.sent:
                self.out.write(b"lgnet: network: no dma buffer!\n")
            pieces = [memoryview(bytearray(DISCARD_BYTES))]
        else:
            pieces = found[0]
        try:
            length = os.readv(self.fd, pieces)
        except OSError as exc:
            raise GuestStopped("reading network: %s" % exc.strerror) from None
        if length <= 0:
            raise GuestStopped("reading network: the host end of %s closed" % self.name)
        if found is not None:
            phys.write_u32(found[1], length)
            trigger_irq(channel, found[2])
        if self.verbose:
            self.out.write(b"tun input packet len %d (%s)\n"
                           % (length, b"sent" if found is not None else b"discarded"))
        return True

    def close(self) -> None:
        close_all(self.closers)


def close_all(closers: list) -> None:
    """Undo in reverse order (the VXLAN port goes before the TAP it sits beside)."""
    while closers:
        closers.pop()()


# --- the VXLAN port --------------------------------------------------------------------------

def create_vxlan(vxlan: Vxlan, bridge: str, out):
    """Create the VXLAN port in `bridge`, up; returns what removes it again.

    lguest_net frames are up to 1514 bytes (an MTU of 1500); VXLAN wraps each in 50 more, so
    the device it runs over needs an MTU of 1550 to carry them whole. With less, the port
    gets what fits and a warning says what larger frames will meet: the bridge drops them."""
    if shutil.which("ip") is None:
        raise LgnetError("vxlan %d: needs iproute2's `ip` command, which is not installed"
                         % vxlan.id)
    try:
        with open("/sys/class/net/%s/mtu" % vxlan.dev) as f:
            dev_mtu = int(f.read())
    except (OSError, ValueError):
        raise LgnetError("vxlan %d: no interface %r to run over (dev:)" % (vxlan.id,
                                                                           vxlan.dev)) from None
    mtu = min(abi.ETH_DATA_LEN, dev_mtu - VXLAN_OVERHEAD)
    _ip_link("add", vxlan.name, "mtu", str(mtu), "type", "vxlan", "id", str(vxlan.id),
             "remote", vxlan.remote, "dev", vxlan.dev, "dstport", str(VXLAN_PORT))
    try:
        _ip_link("set", vxlan.name, "master", bridge, "up")
    except BaseException:
        remove_vxlan(vxlan.name)
        raise
    if mtu < abi.ETH_DATA_LEN:
        out.write(("lgnet: vxlan %s over %s (MTU %d) carries frames of at most %d bytes, "
                   "lguest_net's are up to %d: raise the MTU of %s to %d on both hosts\n"
                   % (vxlan.name, vxlan.dev, dev_mtu, mtu + abi.ETH_HLEN, abi.ETH_FRAME_LEN,
                      vxlan.dev, abi.ETH_DATA_LEN + VXLAN_OVERHEAD)).encode())
    return lambda: remove_vxlan(vxlan.name)


def remove_vxlan(name: str) -> None:
    """Delete the port; nothing to report if it is gone already. Removing a netdev waits for
    the kernel's rtnl lock, which a network namespace being torn down elsewhere can hold for
    seconds: wait for it rather than leave the port behind."""
    try:
        subprocess.run(["ip", "link", "del", name], capture_output=True,
                       timeout=IP_REMOVE_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        sys.stderr.write("lgnet: could not remove VXLAN port %s in %d s: `ip link del %s`\n"
                         % (name, IP_REMOVE_SECONDS, name))


def _ip_link(*args: str) -> None:
    command = ["ip", "link"] + list(args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=IP_COMMAND_SECONDS,
                          check=False)
    if done.returncode == 0:
        return
    why = done.stderr.strip() or "exit status %d" % done.returncode
    if "File exists" in why:
        why += " (another uplink's, or left by a lab that was killed: `ip link del %s`)" \
            % args[1]
    raise LgnetError("vxlan: `%s` failed: %s" % (" ".join(command), why))
