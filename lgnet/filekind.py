"""What a file is, in a few words: for the messages that refuse the wrong file.

Rules of this file: it only looks at the first bytes it is given and names what it sees; it
decides nothing. `lgnet dump README.md` and `kernel: notes.txt` both say what they found.
"""
from __future__ import annotations

import struct

SAMPLE = 64                          # bytes a caller reads to ask
_SHOWN_TEXT = 24
_SHOWN_BYTES = 8

_MAGICS = (
    (b"\x7fELF", "an ELF file"),
    (b"\x1f\x8b", "gzip data"),
    (b"\x0a\x0d\x0d\x0a", "a pcapng capture"),
    (b"\xd4\xc3\xb2\xa1", "a pcap capture"),
    (b"\xa1\xb2\xc3\xd4", "a pcap capture"),
    (b"\x4d\x3c\xb2\xa1", "a pcap capture"),
    (b"\xa1\xb2\x3c\x4d", "a pcap capture"),
    (b"PK\x03\x04", "a zip archive"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
)
_ELF_MACHINES = {3: "i386", 62: "x86-64", 40: "ARM", 183: "AArch64"}
_ELF_CLASSES = {1: "32-bit", 2: "64-bit"}


def describe(head: bytes) -> str:
    """'an empty file', 'text ("# lgnet...")', 'a 64-bit x86-64 ELF file', ..."""
    if not head:
        return "an empty file"
    for magic, what in _MAGICS:
        if head.startswith(magic):
            if magic == b"\x7fELF":
                return _elf(head)
            return what
    if not any(head):
        return "data starting with zero bytes"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return "text (%r)" % (first[:_SHOWN_TEXT] + ("..." if len(first) > _SHOWN_TEXT else ""))
    return "data starting %s" % head[:_SHOWN_BYTES].hex(" ")


def _elf(head: bytes) -> str:
    if len(head) < 20:
        return "an ELF file (cut short)"
    order = "<" if head[5] == 1 else ">"
    machine = struct.unpack_from(order + "H", head, 18)[0]
    return "a %s %s ELF file" % (_ELF_CLASSES.get(head[4], "?-bit"),
                                 _ELF_MACHINES.get(machine, "machine %d" % machine))


def describe_file(path) -> str:
    """describe() of a file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(SAMPLE)
    return describe(head)
