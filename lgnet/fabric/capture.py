"""Capture: every frame the Host delivers on a net, as pcapng, with the lguest facts of it.

Rules of this file: the capture only *observes*. It reads guest memory through views that
never fault (a capture must not kill a guest nor change a delivery), it never touches
dma_hash, and with capture off the engine's hook is None and nothing here runs. The format
(writer and reader) lives here alone so the two cannot drift.

Theory of operation. The broker sets `Engine.on_transfer` to `Capture.on_transfer`, which
the engine calls under lguest_lock after each completed dma_transfer — the data copied and
both used_len written, before the receiver's interrupt is raised. The block is queued, and
the broker calls `flush()` at the end of every pass of its loop, before it can sleep: whole
blocks go to an O_APPEND file in one write(), so a reader of the growing file (`lgnet dump
--follow`, `Lab.capture`) only ever waits for the broker's current pass, and a frame a host
port handed to its test is always on disk already (forwarding it took the port another
hypercall, served in a later pass). A broker killed with SIGKILL loses at most its current
pass (up to FLUSH_BLOCKS frames).

One pcapng file per net file, named after the net (the lab tells the broker its nets' names;
otherwise the file's name without its extension): a Section Header, one Interface Description
(Ethernet, nanosecond timestamps, the net's name), then one Enhanced Packet Block per delivery:
the bytes as the receiver got them (the first used_len bytes of its receive buffer), the
sender's offer as the original length (so a truncated delivery shows as such), and a comment
carrying what no tap can see:

    alpha slot 0 -> beta slot 1 key lan0+0x4 buffer 2 used_len 60 send 17
        (guest 0 pid 4242 -> guest 1 pid 4243)            [one line; "truncated from N" too]

lguest_net transmits a broadcast as one SEND_DMA per recipient, so "one send" is recognised
the way the driver makes it: consecutive deliveries from one sender, of the same bytes from
the same source descriptor, to increasing slots, share a send number.

A frame an impairment touched (fabric/impair.py) says so after the facts — what happened and
why — and one it kept from its receiver is recorded too, with the sender's bytes, no buffer
(`buffer -`) and used_len 0:

    alpha slot 0 -> beta slot 1 key lan0+0x4 buffer - used_len 0 send 18 (guest 0 ...)
        dropped: loss 0.1 (link alpha->beta on lan0)

The lab's impairment seed is a comment of the Section Header ("lgnet seed N").
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

from lgnet import abi, netfile
from lgnet.errors import LgnetError

# --- pcapng (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng): the blocks we use ---

SHB_TYPE = 0x0A0D0D0A
IDB_TYPE = 0x00000001
EPB_TYPE = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_VERSION = (1, 0)
SECTION_LENGTH_UNKNOWN = 0xFFFFFFFFFFFFFFFF
LINKTYPE_ETHERNET = 1
SNAPLEN_UNLIMITED = 0
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
TSRESOL_NANOSECONDS = 9              # 10^-9 s per tick
BLOCK_ALIGN = 4

_HEAD = struct.Struct("<II")                 # block type, total length
_TAIL = struct.Struct("<I")
_SHB_BODY = struct.Struct("<IHHQ")           # magic, major, minor, section length
_IDB_BODY = struct.Struct("<HHI")            # link type, reserved, snaplen
_EPB_BODY = struct.Struct("<IIIII")          # interface, ts high, ts low, caplen, origlen
_OPT = struct.Struct("<HH")
# An EPB with one comment, in three packs: head + body, the comment's option header, and
# end-of-options + the trailing length (the capture's per-frame path).
_EPB_HEAD = struct.Struct("<II" + "IIIII")
_EPB_END = struct.Struct("<HHI")
# ... each also packed with the zeros that pad what comes before it (0 to 3 bytes), so a
# block is five pieces: head, data, padding + option header, comment, padding + end.
_PADDED_OPT = tuple(struct.Struct("<%dx" % n + _OPT.format[1:]) for n in range(BLOCK_ALIGN))
_PADDED_END = tuple(struct.Struct("<%dx" % n + _EPB_END.format[1:]) for n in range(BLOCK_ALIGN))
_EPB_FIXED = _EPB_HEAD.size + _OPT.size + _EPB_END.size

CAPTURE_SUFFIX = ".pcapng"
CAPTURE_FILE_MODE = 0o644


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK_ALIGN)


def _options(options: list[tuple[int, bytes]]) -> bytes:
    if not options:
        return b""
    out = [_OPT.pack(code, len(value)) + _pad(value) for code, value in options]
    return b"".join(out) + _OPT.pack(OPT_ENDOFOPT, 0)


def _block(kind: int, body: bytes) -> bytes:
    length = _HEAD.size + len(body) + _TAIL.size
    return _HEAD.pack(kind, length) + body + _TAIL.pack(length)


SEED_COMMENT = "lgnet seed %d"


def section_header(application: str, comments: tuple[str, ...] = ()) -> bytes:
    return _block(SHB_TYPE, _SHB_BODY.pack(BYTE_ORDER_MAGIC, *PCAPNG_VERSION,
                                           SECTION_LENGTH_UNKNOWN)
                  + _options([(OPT_COMMENT, c.encode()) for c in comments]
                             + [(SHB_USERAPPL, application.encode())]))


def capture_seed(path) -> int | None:
    """The impairment seed a capture was written with (its Section Header says it)."""
    reader = Reader(path)
    for _ in reader.records():
        break
    for comment in reader.section_comments:
        m = re.fullmatch(SEED_COMMENT.replace("%d", r"(\d+)"), comment)
        if m:
            return int(m[1])
    return None


def interface_description(name: str, description: str) -> bytes:
    return _block(IDB_TYPE, _IDB_BODY.pack(LINKTYPE_ETHERNET, 0, SNAPLEN_UNLIMITED)
                  + _options([(IF_NAME, name.encode()), (IF_DESCRIPTION, description.encode()),
                              (IF_TSRESOL, bytes([TSRESOL_NANOSECONDS]))]))


def enhanced_packet(ts_ns: int, data: bytes, orig_len: int, comment: str,
                    interface: int = 0) -> bytes:
    """One Enhanced Packet Block with one comment (what _block and _options would make)."""
    return b"".join(enhanced_packet_parts(ts_ns, data, orig_len, comment, interface))


def enhanced_packet_parts(ts_ns: int, data: bytes, orig_len: int, comment: str | bytes,
                          interface: int = 0) -> tuple[bytes, ...]:
    """The pieces of that block, in order (the capture joins many blocks' pieces at once):
    the fixed head, the data, the data's padding and the comment's option header in one
    pack, the comment, and its padding with the end of options and the trailing length."""
    text = comment.encode() if isinstance(comment, str) else comment
    data_pad = -len(data) % BLOCK_ALIGN
    text_pad = -len(text) % BLOCK_ALIGN
    length = _EPB_FIXED + len(data) + data_pad + len(text) + text_pad
    return (_EPB_HEAD.pack(EPB_TYPE, length, interface, ts_ns >> 32, ts_ns & abi.U32_MASK,
                           len(data), orig_len),
            data, _PADDED_OPT[data_pad].pack(OPT_COMMENT, len(text)), text,
            _PADDED_END[text_pad].pack(OPT_ENDOFOPT, 0, length))


# --- the lguest facts of one delivery ---------------------------------------------------

UNKNOWN_SLOT = "?"


@dataclass
class Delivery:
    """One delivered frame, as read back from a capture."""
    time: float                       # seconds since the epoch
    data: bytes
    net: str
    sender: str
    sender_slot: int | None
    receiver: str
    receiver_slot: int
    key_offset: int                   # the key: offset in the net page (slot * 4)
    buffer: int                       # index of the receive buffer in the receiver's array
    used_len: int
    send: int                         # deliveries of one transmit share this number
    offered: int                      # what the sender offered (> used_len: truncated)
    sender_guest: int
    sender_pid: int
    receiver_guest: int
    receiver_pid: int
    comment: str = ""
    fault: str = ""                   # what an impairment did and why ("" for none)

    @property
    def truncated(self) -> bool:
        return self.delivered and self.offered > self.used_len

    @property
    def delivered(self) -> bool:
        """False for a frame an impairment kept from its receiver (buffer -1)."""
        return self.buffer >= 0

    def facts(self) -> str:
        """The lguest facts in one line (what `lgnet dump` prints after the summary)."""
        return self.comment


def format_facts(sender: str, sender_slot: int | None, receiver: str, receiver_slot: int,
                 net: str, key_offset: int, buffer: int, used_len: int, send: int,
                 offered: int, guests: tuple[int, int], pids: tuple[int, int]) -> str:
    head, tail = facts_parts(sender, sender_slot, receiver, receiver_slot, net, key_offset,
                             guests, pids)
    return facts_text(head, buffer, used_len, send, offered, tail).decode()


def facts_parts(sender: str, sender_slot: int | None, receiver: str, receiver_slot: int,
                net: str, key_offset: int, guests: tuple[int, int],
                pids: tuple[int, int]) -> tuple[bytes, bytes]:
    """What stays the same for every frame between two slots: the text before the buffer
    number and the text after the lengths (encoded once: the comment goes out as bytes)."""
    head = "%s slot %s -> %s slot %d key %s buffer " % (
        sender, UNKNOWN_SLOT if sender_slot is None else sender_slot, receiver, receiver_slot,
        netfile.key_text(net, key_offset))
    tail = " (guest %d pid %d -> guest %d pid %d)" % (guests[0], pids[0], guests[1], pids[1])
    return head.encode(), tail.encode()


NOT_DELIVERED = "-"
_FACTS_TEXT = b"%b%d used_len %d send %d%b%b"
_TRUNCATED = b" truncated from %d"


def facts_text(head: bytes, buffer: int, used_len: int, send: int, offered: int,
               tail: bytes) -> bytes:
    return _FACTS_TEXT % (head, buffer, used_len, send,
                          _TRUNCATED % offered if offered > used_len else b"", tail)


def fault_text(head: bytes, send: int, tail: bytes, fault: str) -> bytes:
    """The facts of a frame an impairment kept from its receiver."""
    return b"%b%b used_len 0 send %d%b %b" % (head, NOT_DELIVERED.encode(), send, tail,
                                              fault.encode())


_FACTS = re.compile(
    r"^(?P<sender>\S+) slot (?P<sslot>\d+|\?) -> (?P<receiver>\S+) slot (?P<rslot>\d+) "
    r"key (?P<net>\S+)\+(?P<key>0x[0-9a-f]+) buffer (?P<buffer>\d+|-) used_len (?P<used>\d+) "
    r"send (?P<send>\d+)(?: truncated from (?P<offered>\d+))? "
    r"\(guest (?P<sg>\d+) pid (?P<sp>\d+) -> guest (?P<rg>\d+) pid (?P<rp>\d+)\)"
    r"(?: (?P<fault>.+))?$")


def parse_facts(comment: str, ts: float, data: bytes) -> Delivery | None:
    m = _FACTS.match(comment)
    if m is None:
        return None
    used = int(m["used"])
    return Delivery(
        time=ts, data=data, net=m["net"], sender=m["sender"],
        sender_slot=None if m["sslot"] == UNKNOWN_SLOT else int(m["sslot"]),
        receiver=m["receiver"], receiver_slot=int(m["rslot"]), key_offset=int(m["key"], 16),
        buffer=-1 if m["buffer"] == NOT_DELIVERED else int(m["buffer"]), used_len=used,
        send=int(m["send"]),
        offered=int(m["offered"]) if m["offered"] else used if used else len(data),
        sender_guest=int(m["sg"]), sender_pid=int(m["sp"]),
        receiver_guest=int(m["rg"]), receiver_pid=int(m["rp"]), comment=comment,
        fault=m["fault"] or "")


# --- reading (a finished file, or one that is still growing) ----------------------------

@dataclass
class Record:
    """One Enhanced Packet Block."""
    ts_ns: int
    data: bytes
    orig_len: int
    interface: int
    comments: list[str] = field(default_factory=list)


def _parse_options(raw: bytes, order: str) -> list[tuple[int, bytes]]:
    out, off = [], 0
    opt = struct.Struct(order + "HH")
    while off + opt.size <= len(raw):
        code, length = opt.unpack_from(raw, off)
        if code == OPT_ENDOFOPT:
            break
        off += opt.size
        out.append((code, raw[off:off + length]))
        off += length + (-length % BLOCK_ALIGN)
    return out


class Reader:
    """Reads whole blocks from a pcapng file; call `records()` again to get what was added
    since (a block still being written is left for next time)."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.order = "<"
        self.interfaces: list[tuple[str, int]] = []      # (name, ns per tick)
        self.section_comments: list[str] = []

    def records(self) -> Iterator[Record]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = f.read()
        off = 0
        while off + _HEAD.size <= len(raw):
            kind = struct.unpack_from(self.order + "I", raw, off)[0]
            if kind == SHB_TYPE:
                magic = struct.unpack_from("<I", raw, off + _HEAD.size)[0]
                self.order = "<" if magic == BYTE_ORDER_MAGIC else ">"
                self.interfaces = []
                self._section(raw[off:off + struct.unpack_from(self.order + "I", raw, off + 4)[0]])
            length = struct.unpack_from(self.order + "I", raw, off + 4)[0]
            if length < _HEAD.size + _TAIL.size or off + length > len(raw):
                break                          # incomplete: still being written
            body = raw[off + _HEAD.size:off + length - _TAIL.size]
            off += length
            if kind == IDB_TYPE:
                self._interface(body)
            elif kind == EPB_TYPE:
                yield self._packet(body)
        self.offset += off

    def _section(self, block: bytes) -> None:
        body = block[_HEAD.size + _SHB_BODY.size:len(block) - _TAIL.size]
        self.section_comments = [v.decode(errors="replace")
                                 for c, v in _parse_options(body, self.order) if c == OPT_COMMENT]

    def _interface(self, body: bytes) -> None:
        name, ns_per_tick = "", 1000         # pcapng's default resolution: microseconds
        for code, value in _parse_options(body[_IDB_BODY.size:], self.order):
            if code == IF_NAME:
                name = value.decode(errors="replace")
            elif code == IF_TSRESOL and value:
                exp = value[0]
                ns_per_tick = (abi.NSEC_PER_SEC // (10 ** exp if exp < 0x80 else 2 ** (exp & 0x7F))
                               or 1)
        self.interfaces.append((name, ns_per_tick))

    def _packet(self, body: bytes) -> Record:
        iface, hi, lo, caplen, orig = struct.unpack_from(self.order + "IIIII", body)
        data = body[_EPB_BODY.size:_EPB_BODY.size + caplen]
        options = _parse_options(body[_EPB_BODY.size + caplen + (-caplen % BLOCK_ALIGN):],
                                 self.order)
        ns_per_tick = self.interfaces[iface][1] if iface < len(self.interfaces) else 1000
        return Record(((hi << 32) | lo) * ns_per_tick, data, orig, iface,
                      [v.decode(errors="replace") for c, v in options if c == OPT_COMMENT])


def deliveries(reader: Reader) -> list[Delivery]:
    """The new deliveries of a capture (records without lgnet facts are skipped)."""
    out = []
    for record in reader.records():
        for comment in record.comments:
            delivery = parse_facts(comment, record.ts_ns / abi.NSEC_PER_SEC, record.data)
            if delivery is not None:
                out.append(delivery)
                break
    return out


def read_deliveries(path) -> list[Delivery]:
    return deliveries(Reader(path))


# --- any capture file, finished: what `lgnet dump` reads ---------------------------------

PCAP_MAGICS = (0xA1B2C3D4, 0xA1B23C4D)      # classic pcap: microseconds, nanoseconds
PCAP_FILE_HEADER = 24
PCAP_RECORD_HEADER = 16
LINKTYPE_NAMES = {LINKTYPE_ETHERNET: "Ethernet"}


def capture_format(path) -> str:
    """'pcapng' or 'pcap', or LgnetError saying what the file is instead."""
    from lgnet.filekind import describe
    try:
        with open(path, "rb") as f:
            head = f.read(PCAP_FILE_HEADER)
    except OSError as error:
        raise LgnetError("cannot read %s: %s" % (path, error.strerror)) from None
    if len(head) >= 4:
        if struct.unpack_from("<I", head)[0] == SHB_TYPE:
            return "pcapng"
        if {struct.unpack_from("<I", head)[0], struct.unpack_from(">I", head)[0]} \
                & set(PCAP_MAGICS):
            return "pcap"
    raise LgnetError("%s is not a capture (pcapng or pcap): it is %s" % (path, describe(head)))


def read_capture(path) -> Iterator[Record]:
    """Every frame of a finished capture, pcapng (this file's reader) or classic pcap
    (scapy's reader), oldest first. Raises LgnetError before the first frame for a file that
    is not a capture, and after the last whole frame for one that is cut short."""
    kind = capture_format(path)
    size = os.path.getsize(path)
    if kind == "pcapng":
        reader = Reader(path)
        yield from reader.records()
        whole = reader.offset
    else:
        whole = yield from _pcap_records(path)
    if whole != size:
        raise LgnetError("%s is truncated: %d bytes after its last whole frame (at byte %d)"
                         % (path, size - whole, whole))


def _pcap_records(path):
    """Classic pcap through scapy; returns how many bytes were whole records."""
    from scapy.utils import RawPcapReader
    reader = RawPcapReader(str(path))
    quiet = logging.getLogger("scapy.runtime")
    level = quiet.level
    quiet.setLevel(logging.ERROR)      # its "packet has been truncated": we say it, once
    try:
        if reader.linktype != LINKTYPE_ETHERNET:
            raise LgnetError("%s: link type %d, not Ethernet: lgnet reads Ethernet captures"
                             % (path, reader.linktype))
        whole = PCAP_FILE_HEADER
        ns = getattr(reader, "nano", False)
        for data, meta in reader:
            if len(data) < meta.caplen:
                break                          # the last record, cut short
            whole += PCAP_RECORD_HEADER + len(data)
            ts_ns = meta.sec * abi.NSEC_PER_SEC + (meta.usec if ns else meta.usec * 1000)
            yield Record(ts_ns, data, meta.wirelen, 0)
        return whole
    finally:
        quiet.setLevel(level)
        reader.close()


def writer_active(path) -> bool:
    """Is a broker still writing this capture? (It holds an exclusive flock while it does.)"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# --- writing: the broker's side --------------------------------------------------------

FLUSH_BLOCKS = 256                   # a capture writes at least every this many frames


class CaptureBusy(LgnetError):
    """Another process (another lab's broker) is writing this capture file."""

    def __init__(self, path: str, pid: int | None):
        self.path, self.pid = path, pid
        super().__init__("capture %s is being written by another lgnet broker (pid %s): one "
                         "file has one writer; give this lab a --pcap DIR of its own"
                         % (path, pid if pid is not None else "not visible"))


def writer_pid(path) -> int | None:
    """The pid holding the writer's flock on a capture file (from /proc/locks), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    inode = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "2: FLOCK  ADVISORY  WRITE 12846 fe:00:2146588 0 EOF" (waiters carry "->")
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def check_free(path) -> None:
    """Raise CaptureBusy if a broker is writing `path` (what a lab asks before it starts)."""
    if writer_active(path):
        raise CaptureBusy(str(path), writer_pid(path))


MIN_CAPTURE_BYTES = 4096               # the smallest size cap: room for the header blocks
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def capture_size(text: str) -> int:
    """--pcap-max's BYTES[K|M|G] -> bytes, as an argparse type."""
    number, suffix = text[:-1], text[-1:].upper()
    if suffix not in SIZE_SUFFIXES:
        number, suffix = text, ""
    try:
        size = int(number) * SIZE_SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError("a size in bytes (suffix K, M or G), got %r" % text) from None
    if size < MIN_CAPTURE_BYTES:
        raise argparse.ArgumentTypeError("at least %d bytes, got %r" % (MIN_CAPTURE_BYTES, text))
    return size


class NetCapture:
    """The open capture file of one net; blocks wait in `pending` until flush().

    One file, one writer: the file is locked (flock, exclusive) *before* it is emptied, so a
    second broker pointed at a file in use gets CaptureBusy and leaves the file alone. (Two
    writers appending to one file is what tshark calls "damaged or corrupt".)"""

    def __init__(self, name: str, path: str, source: str, application: str,
                 comments: tuple[str, ...] = (), max_bytes: int | None = None):
        self.name = name
        self.path = path
        self.pending: list[bytes] = []     # the pieces of whole blocks
        self.blocks = 0                    # how many blocks they make
        self.max_bytes = max_bytes         # the size cap (--pcap-max), or None
        self.stopped: str | None = None    # why this capture ended early
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, CAPTURE_FILE_MODE)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise CaptureBusy(path, writer_pid(path)) from None
        os.ftruncate(self.fd, 0)
        self.size = 0                      # bytes of whole blocks in the file
        self.pending.append(section_header(application, comments)
                            + interface_description(name, "lgnet net %s (%s)" % (name, source)))
        self.flush()

    def flush(self) -> None:
        """Append the pending blocks. A capture can never take the lab down: a write error
        (a full disk, EIO) or the size cap stops this capture, loudly, and nothing else."""
        if not self.pending or self.fd < 0:
            self.pending.clear()
            return
        data = b"".join(self.pending)
        self.pending.clear()
        self.blocks = 0
        if self.max_bytes is not None and self.size + len(data) > self.max_bytes:
            self.stop("it reached its size cap of %d bytes (--pcap-max)" % self.max_bytes)
            return
        size = len(data)
        try:
            while data:                   # a regular file takes it all; be sure anyway
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            self.stop(exc.strerror or str(exc))
            return
        self.size += size                 # all of it: the file is ours alone (flock)

    def stop(self, reason: str) -> None:
        """End this capture early: cut a block the failed write left half-written (so the
        file stays readable), keep the rest, and say so."""
        self.stopped = reason
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            pass
        os.close(self.fd)                 # drops the flock: `dump --follow` ends
        self.fd = -1
        print("lgnet broker: capture of %s stopped: %s; %s keeps the %d bytes written so "
              "far, the lab goes on" % (self.name, reason, self.path, self.size),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.fd >= 0:
            self.flush()
            os.close(self.fd)             # also drops the flock: `dump --follow` ends
            self.fd = -1


def _one_word(name: str) -> str:
    """Names in a comment are one word each: the comment is parsed back."""
    return re.sub(r"\s+", "_", name)


def net_source(identity: tuple, fd: int) -> str:
    """The path of a net file a launcher handed over (its identity if it has none)."""
    try:
        return os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        return "net-%d-%d" % identity[:2]


class _LastSend:
    __slots__ = ("send", "slot", "pieces", "data")

    def __init__(self, send: int, slot: int, pieces: tuple, data: bytes):
        self.send, self.slot, self.pieces, self.data = send, slot, pieces, data


# A struct lguest_dma's first piece: addr[0] and len[0], in one unpack.
_FIRST_PIECE = struct.Struct("<%dxI%dxH" % (abi.DMA_ADDR_OFFSET, abi.DMA_LEN_OFFSET
                                             - abi.DMA_ADDR_OFFSET - 4))
FACTS_CACHE_LIMIT = 1 << 14          # (sender, receiver) pairs whose comment text is kept


class Capture:
    """The broker's recorder: Engine.on_transfer -> one pcapng per net file.

    `net_names` maps a net file's real path to the name its capture gets; `names` maps a
    launcher's pid to its guest's name (the lab fills it in as it starts guests)."""

    def __init__(self, directory: str, net_names: dict[str, str] | None = None,
                 names: dict[int, str] | None = None, application: str = "lgnet",
                 seed: int | None = None, max_bytes: int | None = None):
        self.directory = directory
        self.max_bytes = max_bytes                      # each file's size cap, or None
        os.makedirs(directory, exist_ok=True)
        self.net_names = {os.path.realpath(p): n for p, n in (net_names or {}).items()}
        self.names = names if names is not None else {}
        self.application = application
        self.comments = (SEED_COMMENT % seed,) if seed is not None else ()
        self.nets: dict[tuple, NetCapture] = {}         # file identity -> its capture
        self.last: dict[int, _LastSend] = {}            # sender guest id -> its last send
        self.sends = 0
        # The per-frame shortcut: (sender guest, receive binding) -> _fixed_facts().
        self.facts: dict[tuple, tuple] = {}
        self.dirty = False
        # The nets a lab named are claimed now, before the broker says it is ready: a lab
        # pointed at another running lab's files is refused at its start (CaptureBusy).
        self.claimed: dict[str, NetCapture] = {}
        try:
            for source, name in self.net_names.items():
                name = _one_word(name)
                path = os.path.join(directory, name + CAPTURE_SUFFIX)
                self.claimed[source] = NetCapture(name, path, source, application,
                                                  self.comments, max_bytes)
        except BaseException:
            self.close()
            raise

    def learn_net(self, identity: tuple, fd: int) -> str:
        """A launcher handed over a net file: open its capture (once per net); its name."""
        if identity in self.nets:
            return self.nets[identity].name
        source = net_source(identity, fd)
        claimed = self.claimed.pop(os.path.realpath(source), None)
        if claimed is not None:
            self.nets[identity] = claimed
            return claimed.name
        name = netfile.net_name(source)
        # A net the lab did not name: its own file, under a name no other net of ours and no
        # other broker is writing (lan0, lan0-2, ...).
        taken = {c.name for c in self.nets.values()} | {c.name for c in self.claimed.values()}
        n = 1
        while True:
            unique = name if n == 1 else "%s-%d" % (name, n)
            n += 1
            if unique in taken:
                continue
            try:
                self.nets[identity] = NetCapture(unique, os.path.join(
                    self.directory, unique + CAPTURE_SUFFIX), source, self.application,
                    self.comments, self.max_bytes)
                return unique
            except CaptureBusy:
                continue

    def flush(self) -> None:
        """Write what was delivered since the last flush (the broker calls this once per
        pass of its loop, before it can sleep)."""
        if self.dirty:
            self.dirty = False
            for net in self.nets.values():
                net.flush()

    def close(self) -> None:
        for net in list(self.nets.values()) + list(self.claimed.values()):
            net.close()

    def guest_name(self, guest) -> str:
        name = self.names.get(guest.owner)
        return _one_word(name) if name else "guest%d" % guest.id

    # --- the engine's hook: called under lguest_lock after a completed transfer ------------

    def on_transfer(self, src, dst, index: int, entry: int, copied: int,
                    src_dma: abi.LguestDma, fault: str = "") -> int | None:
        """Record the delivery (with what an impairment did to it, if anything); its send
        number (None: not on a net we were told about)."""
        key = dst.key
        net = self.nets.get(key.space)
        if net is None or net.stopped is not None:
            return None                       # not a net we record (or no longer)
        data = self._delivered(dst.guest.memory, entry, copied)
        lens = src_dma.len
        offered = lens[0] if not lens[1] else src_dma.total
        # The text that stays the same between this sender and this receive binding, kept
        # while the binding still has this key and the sender's own binding still stands.
        fixed = self.facts.get((src, dst))
        if fixed is None or fixed[3] is not key or not self._still_bound(fixed[2], key.space):
            fixed = self._fixed_facts(src, dst, net.name)
        send = self._send_number(src.id, fixed[4], (src_dma.addr, lens), data)
        comment = facts_text(fixed[0], index, copied, send, offered, fixed[1])
        if fault:
            comment += b" " + fault.encode()
        net.pending += enhanced_packet_parts(time.time_ns(), data, max(offered, copied),
                                             comment)
        net.blocks += 1
        self.dirty = True
        if net.blocks >= FLUSH_BLOCKS:
            net.flush()
        return send

    def on_fault(self, src, receiver, key, data: bytes, fault: str) -> None:
        """The engine's other hook: a frame an impairment kept from `receiver` (None: there
        was none by then), with the sender's bytes."""
        net = self.nets.get(key.space)
        if net is None:
            return
        own = self._own_binding(src, key.space)
        sender_slot = own.key.offset // abi.NET_PEER_KEY_STRIDE if own is not None else None
        head, tail = facts_parts(
            self.guest_name(src), sender_slot,
            self.guest_name(receiver) if receiver is not None else UNKNOWN_SLOT,
            key.offset // abi.NET_PEER_KEY_STRIDE, net.name, key.offset,
            (src.id, receiver.id if receiver is not None else 0),
            (src.owner, receiver.owner if receiver is not None else 0))
        self.sends += 1
        net.pending += enhanced_packet_parts(time.time_ns(), data, len(data),
                                             fault_text(head, self.sends, tail, fault))
        net.blocks += 1
        self.dirty = True
        if net.blocks >= FLUSH_BLOCKS:
            net.flush()

    def _fixed_facts(self, src, dst, net: str) -> tuple:
        """(head, tail, the sender's binding, the receiver's key, the receiver's slot)."""
        key, receiver = dst.key, dst.guest
        own = self._own_binding(src, key.space)
        sender_slot = own.key.offset // abi.NET_PEER_KEY_STRIDE if own is not None else None
        receiver_slot = key.offset // abi.NET_PEER_KEY_STRIDE
        head, tail = facts_parts(self.guest_name(src), sender_slot, self.guest_name(receiver),
                                 receiver_slot, net, key.offset, (src.id, receiver.id),
                                 (src.owner, receiver.owner))
        if len(self.facts) >= FACTS_CACHE_LIMIT:
            self.facts.clear()
        fixed = self.facts[(src, dst)] = (head, tail, own, key, receiver_slot)
        return fixed

    @staticmethod
    def _still_bound(binding, space) -> bool:
        return binding is not None and binding.interrupt != 0 and binding.key.space == space

    def named(self) -> None:
        """A guest was (re)named: the cached texts must be made again."""
        self.facts.clear()

    @staticmethod
    def _delivered(memory, entry: int, copied: int) -> bytes:
        """The first `copied` bytes of the receive buffer, through non-faulting views (the
        entry itself may run from the end of RAM into the next page, as lguest allowed)."""
        desc = memory.view(entry, abi.LGUEST_DMA_SIZE)
        if desc is None:
            desc = memory.gather(entry, abi.LGUEST_DMA_SIZE)
            if desc is None:
                return b""
        addr, first = _FIRST_PIECE.unpack_from(desc)
        if first >= copied:
            # The usual receive buffer: one piece holds the whole frame.
            window = memory.view(addr, copied)
            return bytes(window) if window is not None else b""
        out, left = [], copied
        for addr, length in abi.unpack_dma(desc).pieces():
            if left <= 0:
                break
            window = memory.view(addr, min(length, left))
            if window is None:
                break
            out.append(bytes(window))
            left -= len(window)
        return b"".join(out)

    @staticmethod
    def _own_binding(guest, space):
        """The sender's own receive binding on this net (its key is its slot), or None."""
        for binding in guest.dma:
            key = binding.key
            if binding.interrupt and key is not None and key.shared and key.space == space:
                return binding
        return None

    def _send_number(self, sender: int, slot: int, pieces: tuple, data: bytes) -> int:
        last = self.last.get(sender)
        if last is None:
            last = self.last[sender] = _LastSend(0, slot, pieces, data)
        elif (slot > last.slot and pieces == last.pieces
                and (data == last.data if len(data) == len(last.data)
                     else data[:len(last.data)] == last.data[:len(data)])):
            last.slot = slot
            return last.send
        else:                              # a new send: the sender's record, updated in place
            last.slot, last.pieces, last.data = slot, pieces, data
        self.sends += 1
        last.send = self.sends
        return last.send


FOLLOW_POLL_SECONDS = 0.1


def follow(path, poll: float = FOLLOW_POLL_SECONDS) -> Iterator[Delivery]:
    """Every delivery of a capture, waiting for new ones while a broker still writes it."""
    reader = Reader(path)
    while True:
        active = writer_active(path)
        yield from deliveries(reader)
        if not active:
            return                       # read once more after the writer was gone: done
        time.sleep(poll)
