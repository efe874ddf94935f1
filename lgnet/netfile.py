"""The net file: the one page that every guest on an inter-guest network maps.

This is lguest's --sharenet, and both wings use it: a launcher opens the file, reserves a slot
and maps the page over its guest's net device page; the broker only maps it, and uses the
file's identity (st_dev, st_ino) as the *shared* half of every DMA key that falls inside it.

The page is an array of 682 six-byte MACs, one per slot (abi §6). A guest is told its slot in
its device's feature bits, writes its MAC there when its interface opens, and reads everyone
else's to decide whom to send to. Nothing else is in the file, so lgnet keeps its own
bookkeeping (who holds which slot) out of it: the locks themselves are the bookkeeping.

Theory of operation:

- A slot is reserved with a 1-byte write lock on byte `slot` of the file (the byte offset is
  only a counter; the slot's MAC lives at 6 * slot). lguest: "fcntl locks are cleaned up
  automatically when we die, this cleverly means that our reservation on the slot will vanish
  if we crash." Slots die with the process, even under SIGKILL.
- lgnet takes *open-file-description* locks (F_OFD_SETLK), not lguest's classic F_SETLK. A
  classic lock belongs to the process and vanishes when the process closes ANY descriptor of
  the file — a launcher that opens the net file a second time (to stat it, to hand it on) and
  closes it would silently free its slot. An OFD lock belongs to this one open() and goes
  away only when its last descriptor is closed (or the process dies). It also means two
  NetFiles in one process get two slots, where classic locks would hand out the same one.
- A dead guest leaves its MAC behind (lguest never cleaned it: peers kept sending into a slot
  nobody had bound). lgnet zeroes a slot's MAC when it reserves it, and `clear_stale_slots`
  zeroes every unlocked slot that still has one.
- The kernel does not say which process holds an OFD lock (F_OFD_GETLK, F_GETLK and
  /proc/locks all report pid -1). `slot_table` finds holders in /proc/<pid>/fdinfo/<fd>,
  which lists the locks taken through that very descriptor.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass

from lgnet import abi
from lgnet.errors import LgnetError

# struct flock on Linux x86_64: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to 32 bytes ("0l" aligns the end to a long). OFD locks need l_pid == 0.
_FLOCK = struct.Struct("@hhlli0l")
_BUSY = (errno.EAGAIN, errno.EACCES)      # what F_OFD_SETLK says when someone holds the byte


def key_text(net: str, offset: int) -> str:
    """A shared DMA key as lgnet shows it everywhere (capture, trace, bindings): the net's
    name and the key's offset in its page, e.g. lan0+0x4 for slot 1's."""
    return "%s+%#x" % (net, offset)


def net_name(path) -> str:
    """A net's name where nobody gave one: its file's name without the extension, one word."""
    return re.sub(r"\s+", "_", os.path.splitext(os.path.basename(path))[0]) or "net"


def open_netfile(path) -> int:
    """Open the net file read/write, creating it as one zeroed page (mode 0600) if missing."""
    try:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            # Like lguest, create only on ENOENT; any other failure is the user's to fix.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, abi.NET_FILE_MODE)
    except OSError as e:
        raise _open_error(path, e.strerror) from None
    try:
        _ensure_page(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ensure_page(fd: int, path) -> None:
    # lguest's creator wrote a zeroed page after creating the file, so a racing opener could
    # see it empty. Growing a short file to one page with ftruncate (zero-filled, a no-op for
    # whoever comes second) closes that window: nobody maps past the end and takes a SIGBUS.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _open_error(path, "not a regular file")
    if st.st_size < abi.PAGE_SIZE:
        try:
            os.ftruncate(fd, abi.PAGE_SIZE)
        except OSError as e:
            raise _open_error(path, e.strerror) from None


def _open_error(path, why: str) -> LgnetError:
    return LgnetError((abi.MSG_CANNOT_OPEN_NET_FILE % path) + ": " + why)


def _lock(fd: int, cmd: int, kind: int, start: int, length: int = 1) -> tuple:
    """One fcntl lock call with a packed struct flock; returns the kernel's answer, unpacked."""
    answer = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    return _FLOCK.unpack(answer)


def _try_lock(fd: int, slot: int, path) -> bool:
    try:
        _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, slot)
        return True
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise LgnetError("cannot lock net file '%s': %s" % (path, e.strerror)) from None


def _is_locked(fd: int, slot: int) -> bool:
    """Would a write lock on this slot conflict with someone else's? (Takes no lock.)"""
    return _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, slot)[0] != fcntl.F_UNLCK


def _mac_offset(slot: int) -> int:
    return slot * abi.ETH_ALEN


def _clear_mac(fd: int, slot: int) -> None:
    if any(os.pread(fd, abi.ETH_ALEN, _mac_offset(slot))):
        os.pwrite(fd, bytes(abi.ETH_ALEN), _mac_offset(slot))


def reserve_slot(fd: int, path) -> int:
    """lguest's find_slot: the first slot whose lock byte we can take, its stale MAC cleared.

    One reservation per open: the lock belongs to `fd`'s open file description, so asking
    twice through the same descriptor returns the same slot."""
    for slot in range(abi.NET_SLOTS):
        if _try_lock(fd, slot, path):
            _clear_mac(fd, slot)
            return slot
    raise LgnetError(abi.MSG_NO_FREE_SLOTS % path)


def map_netfile(fd: int) -> mmap.mmap:
    """The net page, shared: every mapping of the file sees every other's writes."""
    return mmap.mmap(fd, abi.PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def file_identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino): the same for every process that opens the same file."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def clear_stale_slots(path) -> list[int]:
    """Zero the MAC of every slot nobody holds; returns the slots cleared.

    Each slot is locked while it is cleared, so a launcher reserving it at the same moment
    cannot have its fresh MAC wiped. Uses its own descriptor: never one holding a slot."""
    fd = open_netfile(path)
    try:
        page = os.pread(fd, abi.PAGE_SIZE, 0)
        cleared = []
        for slot in _slots_with_mac(page):
            if _try_lock(fd, slot, path):
                _clear_mac(fd, slot)
                _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, slot)
                cleared.append(slot)
        return cleared
    finally:
        os.close(fd)


def _slots_with_mac(page: bytes) -> list[int]:
    return [slot for slot in range(abi.NET_SLOTS) if any(_mac(page, slot))]


def _mac(page: bytes, slot: int) -> bytes:
    return page[_mac_offset(slot):_mac_offset(slot) + abi.ETH_ALEN]


# --- the slot table (`lgnet slots NET`) ----------------------------------------------------

def require_net_page(path) -> None:
    """LgnetError unless `path` looks like a net file: a regular file of exactly one page
    (what --sharenet makes). Any other file would be read as 682 slots of junk."""
    from lgnet.filekind import describe_file
    try:
        st = os.stat(path)
    except OSError as e:
        raise LgnetError("no net file %s: %s" % (path, e.strerror)) from None
    if not stat.S_ISREG(st.st_mode) or st.st_size != abi.PAGE_SIZE:
        what = "%s of %d bytes" % (describe_file(path), st.st_size) \
            if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise LgnetError("%s is not a net file (one %d-byte page of %d MAC slots): it is %s"
                         % (path, abi.PAGE_SIZE, abi.NET_SLOTS, what))


@dataclass(frozen=True)
class SlotInfo:
    """One slot in use: its MAC, whether it is locked, and by which processes.

    `pids` is every process with a descriptor of the locking open file description (more
    than one after a fork); empty when the holder is out of our sight (another user's
    process, another pid namespace). A slot with a MAC but no lock is *stale*."""
    slot: int
    mac: bytes
    locked: bool
    pids: tuple[int, ...] = ()

    @property
    def promisc(self) -> bool:
        return bool(self.mac[0] & abi.NET_PROMISC_BIT)

    @property
    def holder(self) -> int | None:
        return self.pids[0] if self.pids else None

    @property
    def stale(self) -> bool:
        return any(self.mac) and not self.locked

    @property
    def mac_text(self) -> str:
        return ":".join("%02x" % b for b in self.mac)


def slot_table(path) -> list[SlotInfo]:
    """Every slot that has a MAC or is locked, in slot order. Reads only: takes no lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise _open_error(path, e.strerror) from None
    try:
        page = os.pread(fd, abi.PAGE_SIZE, 0).ljust(abi.PAGE_SIZE, b"\0")
        locked = [slot for slot in range(abi.NET_SLOTS) if _is_locked(fd, slot)]
        holders = _lock_holders(file_identity(fd)) if locked else {}
        used = sorted(set(locked) | set(_slots_with_mac(page)))
        return [SlotInfo(slot, _mac(page, slot), slot in locked,
                         tuple(sorted(holders.get(slot, ()))))
                for slot in used]
    finally:
        os.close(fd)


# fdinfo "lock:" lines look like /proc/locks: "1: OFDLCK ADVISORY  WRITE -1 fe:00:2146319 3 3"
# (id, kind, mode, access, pid, dev:ino, first byte, last byte or EOF). Waiters carry "->".
_LOCK_LINE = re.compile(r"^lock:\s+\d+:\s+(?:OFDLCK|POSIX)\s+\S+\s+\S+\s+-?\d+\s+\S+"
                        r"\s+(\d+)\s+(\d+|EOF)\s*$")


def _lock_holders(identity: tuple[int, int]) -> dict[int, set[int]]:
    """slot -> pids whose descriptors of this file carry a lock covering the slot's byte."""
    holders: dict[int, set[int]] = {}
    for pid, fd in _descriptors_of(identity):
        for first, last in _locked_ranges(pid, fd):
            for slot in range(first, min(last, abi.NET_SLOTS - 1) + 1):
                holders.setdefault(slot, set()).add(pid)
    return holders


def _descriptors_of(identity: tuple[int, int]):
    """(pid, fd) of every descriptor we may look at that refers to the file."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:                      # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                st = os.stat("/proc/%s/fd/%s" % (pid, fd))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == identity:
                yield int(pid), fd


def _locked_ranges(pid: int, fd: str) -> list[tuple[int, int]]:
    try:
        with open("/proc/%d/fdinfo/%s" % (pid, fd)) as info:
            lines = info.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        m = _LOCK_LINE.match(line)
        if m:
            first, last = m.groups()
            ranges.append((int(first), abi.NET_SLOTS - 1 if last == "EOF" else int(last)))
    return ranges


# --- both together ----------------------------------------------------------------------

class NetFile:
    """One open of a net file: its descriptor, its mapped page and, for a launcher, its slot.

    `NetFile.reserve(path)` is the launcher's --sharenet; `NetFile.attach(path)` is the
    broker's view (mapped, no slot). close() releases everything: unmapping the page and
    closing the descriptor, which drops the slot's lock. Both are needed: the mapping holds
    the open file description too (Python's mmap even keeps a dup of the descriptor), and an
    OFD lock lives until the last reference to its description is gone."""

    def __init__(self, path, fd: int, slot: int | None):
        self.path = path
        self.fd = fd
        self.slot = slot
        self.identity = file_identity(fd)
        self.mmap = map_netfile(fd)

    @classmethod
    def reserve(cls, path) -> "NetFile":
        return cls._open(path, reserve=True)

    @classmethod
    def attach(cls, path) -> "NetFile":
        return cls._open(path, reserve=False)

    @classmethod
    def _open(cls, path, reserve: bool) -> "NetFile":
        fd = open_netfile(path)
        try:
            return cls(path, fd, reserve_slot(fd, path) if reserve else None)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.mmap.close()           # BufferError if someone still holds a view of it
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "NetFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "NetFile(%r, slot=%r)" % (str(self.path), self.slot)
