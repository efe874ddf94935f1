"""A guest's half of `--trace`: its track on the timeline (lgnet.timeline).

Rules of this file: it only observes the guest. With tracing off nothing here exists: the CPU
and the Python driver talk to the plain BrokerHost, the console writes straight to its
stream. With it on, the CPU wraps its hypercall servers and its interrupt delivery, both
guests' line to the Host is a TracedHost, and the guest's track gets:
- every hypercall as a slice, named as lguest names it, with its arguments decoded: a key as
  the net (or device) and offset it lies in (`lan0+0x4`), a DMA's list of pieces, BIND_DMA's
  count and interrupt line; HALT is the guest's sleep (the slice lasts until it woke);
- every interrupt delivery, with its line;
- every console line, as an instant.
For a Unicorn guest, hypercalls and interrupts carry the guest's EIP and the function it is in
(from the kernel ELF's symbol table, read with pyelftools), and an interrupt also the handler it
entered. Events are buffered and written between the guest's own steps, never while the
Host waits on us.
"""
from __future__ import annotations

import bisect
import os

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from lgnet import abi, netfile, timeline
from lgnet.guest.host import GuestStopped
from lgnet.guest.physmem import InvalidAddress, PhysMap

GUEST_TRACK = 1
CONSOLE_NAME = "console"


class Symbols:
    """A kernel ELF's symbol table, for "which function holds this address": a sized
    function (C) by its name; code between them (assembly labels, which have no size) as the
    nearest label before it plus the offset, e.g. `irq_common+0x4`."""

    def __init__(self, path: str):
        functions, labels = [], []
        self.code: list[tuple[int, int]] = []           # executable sections: [start, end)
        try:
            with open(path, "rb") as image:
                elf = ELFFile(image)
                code = {i for i, section in enumerate(elf.iter_sections())
                        if section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR}
                self.code = [(elf.get_section(i)["sh_addr"],
                              elf.get_section(i)["sh_addr"] + elf.get_section(i)["sh_size"])
                             for i in sorted(code)]
                table = elf.get_section_by_name(".symtab")
                for sym in (table.iter_symbols() if table is not None else ()):
                    kind = sym["st_info"]["type"]
                    if not sym.name or sym["st_shndx"] not in code:
                        continue
                    if kind == "STT_FUNC" and sym["st_size"]:
                        functions.append((sym["st_value"], sym["st_size"], sym.name))
                    elif kind in ("STT_FUNC", "STT_NOTYPE"):
                        labels.append((sym["st_value"], sym.name))
        except (OSError, ELFError):
            pass                        # a bzImage, or stripped: addresses without names
        functions.sort()
        labels.sort()
        self.starts = [f[0] for f in functions]
        self.functions = functions
        self.label_starts = [label[0] for label in labels]
        self.labels = labels

    def function(self, address: int) -> str | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.starts[i] + self.functions[i][1]:
            return self.functions[i][2]
        j = bisect.bisect_right(self.label_starts, address) - 1
        if j < 0 or (i >= 0 and self.starts[i] > self.label_starts[j]) \
                or not any(start <= address < end for start, end in self.code):
            return None                 # not code, or past a function's end before a label
        start, name = self.labels[j]
        return name if address == start else "%s+%#x" % (name, address - start)


class GuestTrace:
    """One guest's event stream, and how to read its hypercalls' arguments."""

    def __init__(self, path: str, process_name: str, phys: PhysMap,
                 key_spaces: list[tuple[int, int, str]], symbols: Symbols | None = None):
        self.stream = timeline.EventStream(path, process_name)
        self.stream.thread(GUEST_TRACK, "guest")
        self.phys = phys
        self.key_spaces = key_spaces          # (first address, end, name): net and device pages
        self.symbols = symbols
        self.now = timeline.now_us

    # --- decoding ---------------------------------------------------------------------------

    def key_name(self, addr: int) -> str:
        if addr == abi.LGUEST_CONSOLE_DMA_KEY:
            return CONSOLE_NAME
        for first, end, name in self.key_spaces:
            if first <= addr < end:
                return netfile.key_text(name, addr - first)
        return "%#x" % addr

    def pieces(self, udma: int) -> str:
        """A struct lguest_dma's list, as addr:len pieces (what the Host will copy)."""
        try:
            dma = abi.unpack_dma(self.phys.view(udma, abi.LGUEST_DMA_SIZE))
        except InvalidAddress as bad:
            return str(bad)
        return " ".join("%#x:%d" % piece for piece in dma.pieces()) or "(empty)"

    def arguments(self, call: int, a1: int, a2: int, a3: int) -> dict:
        if call == abi.LHCALL_SEND_DMA:
            return {"key": self.key_name(a1), "dma": "%#x" % a2, "pieces": self.pieces(a2)}
        if call == abi.LHCALL_BIND_DMA:
            num, irq = abi.split_bind_arg(a3)
            return {"key": self.key_name(a1), "dmas": "%#x" % a2, "num": num, "irq": irq}
        if call == abi.LHCALL_HALT:
            return {}                   # it takes no argument: the registers hold leftovers
        if call == abi.LHCALL_SET_CLOCKEVENT:
            return {"delta_ns": a1}
        if call == abi.LHCALL_LOAD_IDT_ENTRY:
            return {"vector": a1}
        return {"args": "%#x %#x %#x" % (a1, a2, a3)}

    def where(self, prefix: str, eip: int | None) -> dict:
        if eip is None:
            return {}
        place = {prefix + "eip": "%#010x" % eip}
        function = self.symbols.function(eip) if self.symbols is not None else None
        if function is not None:
            place[prefix + "function"] = function
        return place

    # --- the events -------------------------------------------------------------------------

    def hypercall(self, call: int, a1: int, a2: int, a3: int, started: float,
                  result: int | None = None, eip: int | None = None,
                  stopped: str | None = None, ring: str | None = None) -> None:
        args = self.arguments(call, a1, a2, a3)
        if result is not None:
            args["result"] = result
        if ring is not None:
            args["ring"] = ring                  # queued in the async ring, made with another
        if stopped is not None:
            args["stopped"] = stopped            # the guest never ran again
        args.update(self.where("", eip))
        self.stream.complete(GUEST_TRACK, timeline.CAT_HYPERCALL,
                             abi.HYPERCALL_NAMES.get(call, "hypercall %d" % call), started,
                             self.now() - started, args)
        self.stream.flush(force=False)

    def interrupt(self, irq: int, started: float, eip: int | None = None,
                  handler: int | None = None) -> None:
        args = {"irq": irq}
        args.update(self.where("", eip))
        args.update(self.where("handler_", handler))
        self.stream.complete(GUEST_TRACK, timeline.CAT_INTERRUPT, timeline.INTERRUPT % irq,
                             started, self.now() - started, args)

    def console_line(self, text: str) -> None:
        self.stream.instant(GUEST_TRACK, timeline.CAT_CONSOLE, text[:80], self.now(),
                            {"line": text})

    def traced_host(self, host, where=None) -> "TracedHost":
        """The line to the Host, each hypercall on it a slice (where(): the guest's EIP)."""
        return TracedHost(host, self, where)

    def close(self) -> None:
        self.stream.close()


class ConsoleTee:
    """The Launcher's output stream, each complete line also an instant on the track."""

    def __init__(self, out, trace: GuestTrace):
        self.out = out
        self.trace = trace
        self.partial = b""

    def write(self, data) -> int:
        written = self.out.write(data)
        lines = (self.partial + bytes(data)).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            self.trace.console_line(line.decode(errors="replace").rstrip("\r"))
        return written

    def flush(self) -> None:
        self.out.flush()

    def fileno(self) -> int:
        return self.out.fileno()


def process_label(kernel: str) -> str:
    """A launcher's track before the lab names it after its guest."""
    return "launcher %d (%s)" % (os.getpid(), os.path.basename(kernel))


class TracedHost:
    """A guest's line to the Host, each hypercall a slice with the Host's result: a Python
    guest's, or a Unicorn CPU's (`where` then reads the guest's EIP, the Python driver has
    none)."""

    def __init__(self, host, trace: GuestTrace, where=None):
        self.host = host
        self.trace = trace
        self.where = where
        self.riding: list[tuple[int, int, int, int]] = []

    def ride(self, calls: list[tuple[int, int, int, int]]) -> None:
        """Calls (call, arg1, arg2, arg3) queued in the async ring, which the Host makes with
        the next hypercall, before it: each becomes a slice as long as that one (the Host does
        not say when it made them), its `ring` argument naming it."""
        self.riding += calls

    def hypercall(self, call: int, arg1: int = 0, arg2: int = 0, arg3: int = 0) -> int:
        eip = self.where() if self.where is not None else None
        started = self.trace.now()
        riding, self.riding = self.riding, []
        try:
            result = self.host.hypercall(call, arg1, arg2, arg3)
        except GuestStopped as stopped:
            # The last call of a guest (CRASH, or the one it was killed in) is on the track too.
            self.trace.hypercall(call, arg1, arg2, arg3, started, None, eip, stopped.reason)
            raise
        finally:
            name = abi.HYPERCALL_NAMES.get(call, "hypercall %d" % call)
            for queued in riding:
                self.trace.hypercall(*queued, started, ring="queued, made with " + name)
        self.trace.hypercall(call, arg1, arg2, arg3, started, result, eip)
        return result

    def __getattr__(self, name: str):
        return getattr(self.host, name)       # the rest of HostLink, untimed
