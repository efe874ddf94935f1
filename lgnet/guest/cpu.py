"""The guest's CPU: real i386 code under Unicorn, in ring 1, with lguest's hypercalls.

What this room is for: lguest ran a guest kernel on the real CPU, in ring 1, and caught it
with the Switcher whenever it made a hypercall, took a trap or was due an interrupt. Here the
CPU is Unicorn's (QEMU's TCG) and the Switcher is this file: it builds the guest's CPU state
the way lguest's Host did, serves the hypercalls that only change CPU state, forwards the rest
to the Host through a HostLink, reflects the guest's traps into its own IDT, and delivers the
interrupts the Host raised.

Rules of this file:

* The CPU serves itself the calls that change nothing but CPU state — LOAD_GDT, NEW_PGTABLE,
  FLUSH_TLB, LOAD_IDT_ENTRY, SET_STACK, TS, SET_PTE, SET_PMD, LOAD_TLS — inside Unicorn's
  interrupt hook, without stopping the emulator (a stop and restart costs about four times
  as much). Everything else (FLUSH_ASYNC, LGUEST_INIT, CRASH, SET_CLOCKEVENT, HALT, BIND_DMA,
  SEND_DMA, and any unknown number, which the Host kills for) goes to ``host.hypercall``.
* The CPU writes only its own guest: lguest_data (time, irq_enabled, cr2, reserve_mem), the
  interrupt and trap frames on the guest's stack, and the Switcher's entry in the guest's
  page directories. The Host's memory objects never see this file, nor it theirs.
* A guest's misbehaviour ends the guest with a reason (``host.kill``), a bug in lgnet stays a
  traceback. A trap is the guest's to handle, as under lguest: only a trap it gave no
  handler for kills it, with lguest's "unhandled trap N at EIP (cr2 or error code)".

Theory of operation.

1. Memory. Each (guest-physical base, buffer) pair is mapped with ``mem_map_ptr`` onto the
   very same memory, no copy: the broker's writes into guest RAM (DMA, used_len) are visible
   to the running guest at once, and the guest's writes to the broker. Unicorn honours the
   guest's own i386 page tables (CR0.PG, CR3) and raises #PF with CR2 like a real CPU.

2. The Switcher. lguest mapped its Switcher at the top of every guest address space. So do we:
   two private pages at physical SWITCHER_ADDR (0xFFC00000, far above anything the guest may
   own, which ends at LGUEST_GUEST_TOP). The first page holds the GDT, the one-byte ``iret``
   we enter the guest through, and the ring-0 stack it pops from; the second is a page table
   mapping that first page at the same virtual address, read-only and supervisor-only.
   Page-directory entry 1023 (SWITCHER_PGD_INDEX) of every page directory the guest runs on
   points at that page table: the Launcher's initial one, each NEW_PGTABLE, and again
   whenever SET_PMD touches index 1023, so the guest cannot lose it. CR0.WP makes the
   read-only mapping hold against ring 1, and lguest_data.reserve_mem (4 MiB) tells the
   guest to keep out. (A guest could still map physical 0xFFC00000 through its own page
   tables, which lguest's shadow page tables forbade; it would only damage itself.)

3. The GDT. 32 entries, as Linux i386: 10/11 are the Host's ring-0 segments (LGUEST_CS/DS,
   used only for the first ``iret``), 12/13 the guest kernel's flat 4 GiB segments with
   DPL 1, so its selectors are 0x61 and 0x69. LOAD_GDT and LOAD_TLS copy the guest's
   descriptors in as lguest's fixup_gdt_table() did: a DPL of 0 becomes 1, the accessed bit
   is preset (the GDT page is read-only, so the CPU must never need to write it), and the
   Host's entries (10, 11, 16, 31) are never taken from the guest.

4. Ring 1. Unicorn will not start a CPU in ring 1, so we start it in ring 0 on the Switcher's
   ``iret`` with a frame {eip=start, cs=0x61, eflags=0x202, esp=0, ss=0x69} on the ring-0
   stack, exactly the registers lguest's Launcher asked for (esi = 0: the boot header).
   From then on the guest is in ring 1 and privileged instructions (cli, hlt, mov to cr3)
   fault, as they did under lguest. Unicorn's interrupt hook sees every ``int`` and every
   exception before the IDT would, so there is no IDT and no TSS: the hook is the Switcher.

5. Hypercalls. ``int $0x1f``: eax = call, edx/ebx/ecx = arguments. eax keeps the call
   number, as lguest left it, except after BIND_DMA, whose result goes there. A served call
   before LGUEST_INIT kills, as in lguest; forwarded ones are the Host's to judge. The async
   ring (lguest's do_hypercalls): it is drained before every synchronous call, served or
   forwarded, and at every other exit (trap, slice end). The Host drains it and ignores the
   CPU-state calls in it; so first the CPU applies those calls itself, in ring order, from
   the same cursor the Host drains from, then the Host drains the same run — with the
   forwarded call, or with a FLUSH_ASYNC of the CPU's. Every queued call is applied exactly
   once, before anything the guest does next.

6. Traps (run_guest's switch, deliver_trap). A hook sees the trap and stops the emulator;
   the run loop takes it at rest. #PF writes the faulting address to lguest_data.cr2; #NM is
   the guest's only while it asked for TS (see _set_ts); in/out never trap here: Unicorn
   calls the I/O hooks, which do what lguest's emulate_insn() did, and turn what it would
   not emulate (string I/O) into the guest's #GP. Then, if the guest's IDT has a present
   gate for the vector, push eflags, cs, eip and — for 8, 10-14 and 17 — the error code on
   the guest's stack and enter it (an interrupt gate clears irq_enabled); if not, kill. An
   ``int $n`` reaches the guest's gate only where lguest let the CPU go there directly (a
   trap gate for a vector below 32 or the syscall vector, DPL ≥ 1); anywhere else it is a
   #GP with error code n << 3 | 2, as lguest's DPL-0 gates made it. Unicorn withholds the
   error code and remembers every exception it raised (a second #GP or #PF would become a
   double fault): _Exceptions reads the one and clears the other.

7. Interrupts (lguest's maybe_do_interrupt). Before the guest resumes — after each hypercall,
   and between run slices — take the lowest bit of ``host.pending_irqs()`` & ~blocked;
   skip while EIP is in [noirq_start, noirq_end) or irq_enabled is 0 (a guest halted in
   HALT is woken with irq_enabled forced to 0x200); if the guest gave a gate for vector
   32+irq, ack it, push eflags (IF = irq_enabled), cs and eip on the guest's own stack and
   jump to the handler; an interrupt gate (type 0xE) also clears irq_enabled. One interrupt
   per entry, and only in ring 1 (lgnet guests have no user mode, so the SET_STACK switch
   lguest made for ring 3 is recorded, not used). A HALT that returns with nothing the guest
   may take sleeps again, as lguest's halted guest did. The guest runs in slices of
   SLICE_INSTRUCTIONS counted instructions, so a guest that computes without hypercalls still
   gets its timer and its packets (never timed slices: see SLICE_INSTRUCTIONS); and at each
   slice end a BREAK the Waker raised is answered (one FLUSH_ASYNC, whose reply makes the
   Launcher service console and tun input), as lguest answered it at each host tick.
   lguest_data.time (CLOCK_REALTIME) is rewritten each time the guest resumes.

8. A debugger (lgnet.guest.gdbstub) may hold the guest. The run loop asks it only at rest:
   after a slice ends (at its count, or stopped by a breakpoint's code hook) and before a
   halted guest would sleep again; never from another thread with emu_stop (see
   SLICE_INSTRUCTIONS). While held, the debugger reads and writes the CPU on the run loop's
   own thread. Interrupts wait while it holds (and during a single step, as QEMU's gdbstub
   steps by default), and a halted guest sleeps on when it lets go.

run() is one-shot: it returns the reason the guest stopped and lets go of its memory.
"""
from __future__ import annotations

import ctypes
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID,
                     UC_HOOK_INTR, UC_HOOK_MEM_FETCH_UNMAPPED, UC_HOOK_MEM_READ_UNMAPPED,
                     UC_HOOK_MEM_WRITE_UNMAPPED, UC_MODE_32, UC_PROT_ALL, Uc, UcError)
from unicorn import uc_version
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from lgnet import abi
from lgnet.guest.host import GuestStopped, HostLink

try:    # Unicorn's C library, as its own binding loaded it (see _Registers)
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:     # pragma: no cover - another binding layout: the slow, public path
    _uclib = None

__all__ = ["Debugger", "GuestCpu", "GuestStopped", "HostLink", "STOPPED"]

STOPPED = "stopped by the Launcher"      # what run() returns after stop()
KILLED_BY_DEBUGGER = "killed from the debugger"

# What a debugger's hold() returns: how the guest goes on.
DEBUG_CONTINUE = "continue"
DEBUG_STEP = "step"                      # one instruction, then hold() again
DEBUG_KILL = "kill"

_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<5I")            # the iret frame: eip, cs, eflags, esp, ss
_DESC = struct.Struct("<II")             # a segment descriptor: low word, high word

# Where things sit in the Switcher's first page (see the module docstring, §2).
_GDT_OFFSET = 0x000
_IRET_OFFSET = 0x800                     # one byte: 0xCF, iret
_EXIT_OFFSET = 0x900                     # Unicorn's "until": never executed
_STACK_TOP = abi.PAGE_SIZE               # the ring-0 stack holding the entry frame
_SWITCHER_PAGES = 2                      # [GDT, iret, stack] [page table for PDE 1023]
_IRET = 0xCF

_PTE_PRESENT = 0x1
_PTE_WRITABLE = 0x2
_PAGE_MASK = ~(abi.PAGE_SIZE - 1) & abi.U32_MASK
_IRQ_MASK = (1 << abi.LGUEST_IRQS) - 1
_EMPTY_RING = bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE
_HALT_RETRY_SECONDS = 0.0005             # halted with only blocked interrupts pending

# Descriptor bits (the high word of a segment descriptor or gate).
_DESC_DPL_MASK = 0x6000
_DESC_DPL_SHIFT = 13
_DESC_ACCESSED = 0x100
_GATE_PRESENT = 0x8000
_GATE_TYPE_SHIFT = 8
_GATE_KEEP_HIGH = 0xFFFFEF00             # lguest kept offset, present, DPL and type

_HOST_GDT_ENTRIES = frozenset({abi.GDT_ENTRY_LGUEST_CS, abi.GDT_ENTRY_LGUEST_DS,
                               abi.GDT_ENTRY_TSS, abi.GDT_ENTRY_DOUBLEFAULT_TSS})

# The instructions lguest's emulate_insn() knew: in/out with an immediate port or (%dx), the
# low bit choosing a byte or a word/long, after at most an operand-size prefix.
_OPERAND_PREFIX = 0x66
_IO_OPCODES = {0xE4: True, 0xEC: True, 0xE6: False, 0xEE: False}    # & 0xFE -> is "in"
_INT_N = 0xCD                            # `int $n`; int3 and into are one byte
_LEGACY_PREFIXES = frozenset({0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65})
_ALL_IO_OPCODES = frozenset({*range(0x6C, 0x70), *range(0xE4, 0xE8), *range(0xEC, 0xF0)})
_STRING_IO_REGS = (x86.UC_X86_REG_EIP, x86.UC_X86_REG_ESI, x86.UC_X86_REG_EDI,
                   x86.UC_X86_REG_ECX)
_ACCESS_NAMES = {ucc.UC_MEM_READ_UNMAPPED: "read", ucc.UC_MEM_WRITE_UNMAPPED: "write",
                 ucc.UC_MEM_FETCH_UNMAPPED: "fetch"}


def _flat_segment(type_: int, dpl: int) -> bytes:
    """A flat 4 GiB, 32-bit, page-granular, present segment descriptor (accessed preset)."""
    low = 0x0000FFFF
    high = (type_ << 8) | 0x1000 | (dpl << _DESC_DPL_SHIFT) | 0x8000 | 0x000F0000 | 0x00C00000
    return _DESC.pack(low, high)


def _fix_descriptor(low: int, high: int) -> tuple[int, int]:
    """lguest's fixup_gdt_table(): the guest runs in ring 1, and the GDT is read-only."""
    if high & _DESC_DPL_MASK == 0:
        high |= abi.GUEST_PL << _DESC_DPL_SHIFT
    return low, high | _DESC_ACCESSED


class _Registers:
    """Register access at the C library's speed.

    Unicorn's Python binding works out the type of a register on every access, about 3.5 µs
    each; a hypercall reads four and writes one. So the hot paths call uc_reg_read_batch and
    uc_reg_write directly with buffers made once (about 0.6 µs a call). Values are u32: in
    32-bit mode Unicorn writes four bytes for a general register, EIP and EFLAGS, and only two
    for a segment register, whose other two bytes are masked off (measured, Unicorn 2).
    """

    _SEGMENTS = frozenset({x86.UC_X86_REG_CS, x86.UC_X86_REG_SS, x86.UC_X86_REG_DS,
                           x86.UC_X86_REG_ES, x86.UC_X86_REG_FS, x86.UC_X86_REG_GS})

    def __init__(self, uc: Uc, reads: tuple[int, ...]):
        self._uc = uc
        self._reads = reads
        self._one = ctypes.c_uint32()
        if _uclib is not None:
            self._handle = uc._uch
            self._count = len(reads)
            self._ids = (ctypes.c_int * len(reads))(*reads)
            self._values = (ctypes.c_uint32 * len(reads))()
            base = ctypes.addressof(self._values)
            self._pointers = (ctypes.c_void_p * len(reads))(
                *[base + 4 * i for i in range(len(reads))])
            self._narrow = tuple(i for i, reg in enumerate(reads) if reg in self._SEGMENTS)
            self._ref = ctypes.byref(self._one)

    def read(self) -> list[int]:
        """The registers named at construction, in that order."""
        if _uclib is None:
            return [self._uc.reg_read(r) & abi.U32_MASK for r in self._reads]
        status = _uclib.uc_reg_read_batch(self._handle, self._ids, self._pointers, self._count)
        if status:
            raise UcError(status)
        values = self._values[:]
        for i in self._narrow:
            values[i] &= 0xFFFF
        return values

    def read_one(self) -> int:
        """The first register named at construction."""
        if _uclib is None:
            return self._uc.reg_read(self._reads[0]) & abi.U32_MASK
        status = _uclib.uc_reg_read(self._handle, self._reads[0], self._ref)
        if status:
            raise UcError(status)
        return self._one.value

    def write(self, reg: int, value: int) -> None:
        if _uclib is None:
            self._uc.reg_write(reg, value & abi.U32_MASK)
            return
        self._one.value = value & abi.U32_MASK
        status = _uclib.uc_reg_write(self._handle, reg, self._ref)
        if status:
            raise UcError(status, reg)


class _Exceptions:
    """What Unicorn's CPU keeps of the exception it raised last: its error code, whether an
    ``int`` raised it, and its double-fault memory.

    Unicorn hands an exception to UC_HOOK_INTR without the error code a real CPU would push,
    and it never forgets it (QEMU's env->old_exception stays set, as if the exception were
    still being delivered): the guest's next #GP or #PF then becomes a double fault and a
    third stops the CPU. Neither is in Unicorn's API, but both are in the CPU state that
    uc_context_save() copies out. So once per process a probe CPU raises a #GP with a
    selector of our choosing and then an ``int``, and we note where those answers sit in the
    saved state. take() reads them for the trap just raised and writes "no exception in
    flight" back with uc_context_restore(), which is what a real delivery does.
    """

    _SELECTOR = 0x5A5C                   # beyond the probe's GDT: #GP with this error code
    _layout: tuple[int, int, int] | None = None     # error code, is-int, old exception

    def __init__(self):
        if _Exceptions._layout is None:
            _Exceptions._layout = self._probe()
        self._error, self._is_int, self._old = _Exceptions._layout

    @staticmethod
    def _state(uc: Uc) -> tuple[object, bytes]:
        context = uc.context_save()
        return context, ctypes.string_at(context.context.value, context.size)

    @classmethod
    def _probe(cls) -> tuple[int, int, int]:
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        uc.mem_map(0, 2 * abi.PAGE_SIZE)
        gdt, selector_at = 0x1000, 0x800
        uc.mem_write(gdt, bytes(8) + _flat_segment(0xB, 0) + _flat_segment(0x3, 0))
        uc.mem_write(selector_at, struct.pack("<H", cls._SELECTOR))
        # movw selector_at, %ds (#GP: no such descriptor); int $0x21
        uc.mem_write(0, b"\x8e\x1d" + _U32.pack(selector_at) + bytes([_INT_N, 0x21]))
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, gdt, 3 * 8 - 1, 0))
        uc.reg_write(x86.UC_X86_REG_CR0, abi.X86_CR0_PE)
        uc.reg_write(x86.UC_X86_REG_CS, 0x08)
        for seg in (x86.UC_X86_REG_SS, x86.UC_X86_REG_DS):
            uc.reg_write(seg, 0x10)
        uc.reg_write(x86.UC_X86_REG_ESP, 0x1800)
        seen: list[bytes] = []

        def stop(uc, _intno, _user):
            seen.append(cls._state(uc)[1])
            uc.emu_stop()

        before = cls._state(uc)[1]
        hook = uc.hook_add(UC_HOOK_INTR, stop)
        uc.emu_start(0, abi.PAGE_SIZE, count=4)
        uc.emu_start(6, abi.PAGE_SIZE, count=4)
        uc.hook_del(hook)
        if len(seen) != 2:
            raise RuntimeError("Unicorn %s: the probe CPU raised %d exceptions, not 2"
                               % (uc_version(), len(seen)))
        gp, soft = seen

        def i32(raw: bytes, at: int) -> int:
            return struct.unpack_from("<i", raw, at)[0]

        last = len(before) - 8
        error = [at for at in range(0, last, 4)
                 if i32(before, at) == 0 and i32(gp, at) == cls._SELECTOR
                 and i32(gp, at + 4) == 0 and i32(soft, at + 4) == 1]
        old = [at for at in range(0, last, 4)
               if i32(before, at) == -1 and i32(gp, at) == abi.TRAP_GENERAL_PROTECTION]
        if len(error) != 1 or len(old) != 1:
            raise RuntimeError("Unicorn %s keeps its exception state where lgnet cannot find "
                               "it (%d, %d candidates): traps cannot be reflected"
                               % (uc_version(), len(error), len(old)))
        return error[0], error[0] + 4, old[0]

    def take(self, uc: Uc) -> tuple[int, bool]:
        """(error code, raised by an ``int``) of the exception just raised, now forgotten."""
        context, raw = self._state(uc)
        error, is_int = struct.unpack_from("<iI", raw, self._error)
        ctypes.memmove(context.context.value + self._old, struct.pack("<i", -1), 4)
        uc.context_restore(context)
        return error & abi.U32_MASK, bool(is_int)


# A run slice, in guest instructions: about 1-2.5 ms at the 40-100 M instructions/s Unicorn
# reaches here. Slices are counted, not timed: an emu_stop() from another thread (a timer, as
# Unicorn's own timeout= uses) can make Unicorn run some instructions twice — measured here, a
# loop of `incl mem; incl %ecx` ended with mem ahead of ecx by thousands — while a counted
# slice ends exactly (and cost about a quarter of the speed in a tight loop).
SLICE_INSTRUCTIONS = 100_000


class Debugger(Protocol):
    """What the run loop asks a debugger, always on its own thread (§8 of the docstring)."""

    wants_stop: bool        # read at rest; set from any thread, or by a code hook (emu_stop)

    def attach(self, cpu: "GuestCpu") -> None:
        """The CPU is built and about to run."""

    def hold(self) -> str:
        """The guest is at rest: serve the debugger until it lets go; a DEBUG_* action
        (after a DEBUG_STEP's one instruction, the run loop calls hold() again)."""

    def ended(self, reason: str | None) -> None:
        """The guest stopped for good (None: the Launcher is going away)."""


@dataclass(frozen=True)
class Gate:
    """One IDT entry as lguest kept it: the handler's address, the gate type, its DPL."""
    offset: int
    type: int
    dpl: int


@dataclass(frozen=True)
class _Trap:
    """A trap the hooks saw, for the run loop to take with the emulator at rest.

    error None: Unicorn raised it and holds its error code (see _Exceptions). restore: the
    registers of a string I/O instruction as they were before it, which lguest's CPU would
    never have begun (it raised #GP first)."""
    vector: int
    error: int | None = None
    restore: tuple[tuple[int, int], ...] = ()


class GuestCpu:
    """One guest's CPU.

    memory_map: (guest-physical base, writable buffer) pairs, whole pages, all below
    LGUEST_GUEST_TOP: RAM and device pages, mapped in place. start: the virtual entry point
    (page_offset + physical). pgdir: the physical address of the Launcher's page directory.
    page_offset: where emulate_insn() told kernel code (emulated in/out) from user code; the
    CPU otherwise walks the guest's page tables.
    """

    def __init__(self, memory_map: list[tuple[int, object]], start: int, pgdir: int,
                 page_offset: int, host: HostLink,
                 slice_instructions: int = SLICE_INSTRUCTIONS,
                 debugger: Debugger | None = None, tracer=None):
        self.host = host
        self.debugger = debugger
        self.start = start
        self.page_offset = page_offset
        self.slice_instructions = slice_instructions
        self._reason: str | None = None
        self._stop_requested = False
        self._lock = threading.Lock()          # stop() against close()

        # The Host-side state lguest kept per guest.
        self._data: memoryview | None = None   # struct lguest_data, once LGUEST_INIT named it
        self._noirq = (0, 0)
        self._halted = False
        self._ring_next = 0                    # the async ring cursor, mirroring the Host's
        self._idt: list[Gate | None] = [None] * abi.IDT_ENTRIES
        self._syscall_gate: Gate | None = None
        self._gdt = [(0, 0)] * abi.GDT_ENTRIES
        self.stack = (0, 0, 0)                 # SET_STACK: ss, esp, pages
        self.ts = 0                            # TS: the guest's CR0.TS wish, in force
        self._trap: _Trap | None = None
        self._exceptions = _Exceptions()
        self.tls = 0                           # LOAD_TLS: where the TLS descriptors came from

        self._uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self._hooks: list[int] = []
        self._args = self._frame = self._pc_reg = None
        self._exports: list[ctypes.Array] = []         # keep the buffers' pointers valid
        self._regions: list[tuple[int, int, memoryview]] = []
        self._switcher = bytearray(_SWITCHER_PAGES * abi.PAGE_SIZE)
        self._switcher_view = memoryview(self._switcher)
        try:
            for base, buffer in memory_map:
                self._map(base, buffer)
            self._map(abi.SWITCHER_ADDR, self._switcher, guest=False)
            self._build_switcher()
            self._cr3 = self._checked_pgdir(pgdir)
            if self._cr3 is None:
                raise ValueError("the page directory %#x is not in guest memory" % pgdir)
            self._install_switcher_pde(self._cr3)
            self._enter_ring1()
        except BaseException:
            self.close()
            raise

        self._hcalls = {
            abi.LHCALL_LOAD_GDT: self._load_gdt,
            abi.LHCALL_NEW_PGTABLE: self._new_pgtable,
            abi.LHCALL_FLUSH_TLB: self._flush_tlb_call,
            abi.LHCALL_LOAD_IDT_ENTRY: self._load_idt_entry,
            abi.LHCALL_SET_STACK: self._set_stack,
            abi.LHCALL_TS: self._set_ts,
            abi.LHCALL_SET_PTE: self._set_pte,
            abi.LHCALL_SET_PMD: self._set_pmd,
            abi.LHCALL_LOAD_TLS: self._load_tls,
        }
        uc = self._uc
        self._args = _Registers(uc, (x86.UC_X86_REG_EAX, x86.UC_X86_REG_EDX,
                                     x86.UC_X86_REG_EBX, x86.UC_X86_REG_ECX))
        self._frame = _Registers(uc, (x86.UC_X86_REG_EIP, x86.UC_X86_REG_CS,
                                      x86.UC_X86_REG_ESP, x86.UC_X86_REG_EFLAGS))
        self._pc_reg = _Registers(uc, (x86.UC_X86_REG_EIP,))
        self._hooks = [
            uc.hook_add(UC_HOOK_INTR, self._on_trap),
            uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid),
            uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN),
            uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT),
            uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED
                        | UC_HOOK_MEM_FETCH_UNMAPPED, self._on_unmapped),
        ]
        if tracer is not None:
            self._trace_with(tracer)

    # --- --trace: the guest's track (lgnet.guest.trace) ---------------------------------------

    def _trace_with(self, tracer) -> None:
        """Time this CPU's hypercalls and interrupt deliveries by wrapping what does them —
        the calls the CPU serves itself, the line to the Host, the delivery — so that an
        untraced CPU runs exactly the code it would without --trace, and pays nothing."""
        def timed(call: int, serve):
            def traced(arg1: int, arg2: int, arg3: int) -> None:
                eip, started = self._eip(), tracer.now()
                serve(arg1, arg2, arg3)
                tracer.hypercall(call, arg1, arg2, arg3, started, eip=eip)
            return traced
        self._hcalls = {call: timed(call, serve) for call, serve in self._hcalls.items()}
        self.host = tracer.traced_host(self.host, where=self._eip)
        apply = self._apply_async_ring

        def applying() -> int:
            # What the ring holds for the Host goes with the call that follows: the line to
            # the Host puts each on the track beside that call.
            first = self._ring_next
            walked = apply()
            entries = ((first + i) % abi.LHCALL_RING_SIZE for i in range(walked))
            self.host.ride([call for call in map(self._ring_entry, entries)
                            if call[0] not in self._hcalls])
            return walked
        self._apply_async_ring = applying
        deliver = self._maybe_interrupt

        def delivering(data: memoryview):
            eip, started, pending = self._eip(), tracer.now(), self.host.pending_irqs()
            deliver(data)
            # The line it took is the one acknowledged (the Host only ever adds flags).
            taken = pending & ~self.host.pending_irqs()
            if taken:
                tracer.interrupt((taken & -taken).bit_length() - 1, started, eip, self._eip())
        self._maybe_interrupt = delivering

    # --- memory ---------------------------------------------------------------------------

    def _map(self, base: int, buffer, guest: bool = True) -> None:
        """Map a buffer at guest-physical base, sharing its memory with Unicorn."""
        view = memoryview(buffer).cast("B")
        size = view.nbytes
        if base % abi.PAGE_SIZE or size % abi.PAGE_SIZE or size == 0:
            raise ValueError("memory at %#x (%d bytes) is not whole pages" % (base, size))
        if guest and base + size > abi.LGUEST_GUEST_TOP:
            raise ValueError("guest memory at %#x runs past LGUEST_GUEST_TOP" % base)
        if view.readonly:
            raise ValueError("guest memory at %#x is read-only" % base)
        export = (ctypes.c_char * size).from_buffer(view)
        self._exports.append(export)
        self._uc.mem_map_ptr(base, size, UC_PROT_ALL, ctypes.addressof(export))
        if guest:
            self._regions.append((base, base + size, view))

    def _phys(self, addr: int, length: int) -> memoryview | None:
        """The guest's physical memory [addr, addr+length), or None if nothing backs it."""
        for base, end, view in self._regions:
            if base <= addr and addr + length <= end:
                return view[addr - base:addr - base + length]
        return None

    def _read_u32(self, addr: int) -> int | None:
        for base, end, view in self._regions:
            if base <= addr and addr + 4 <= end:
                return _U32.unpack_from(view, addr - base)[0]
        return None

    def _checked_pgdir(self, pgdir: int) -> int | None:
        pgdir &= _PAGE_MASK
        return pgdir if self._phys(pgdir, abi.PAGE_SIZE) is not None else None

    def _virt_to_phys(self, vaddr: int, write: bool = True) -> int | None:
        """Walk the guest's two-level page tables for a supervisor access (CR0.WP is on)."""
        pde = self._read_u32(self._cr3 + (vaddr >> abi.PGDIR_SHIFT) * 4)
        if pde is None or not pde & _PTE_PRESENT:
            return None
        pte = self._read_u32((pde & _PAGE_MASK) + ((vaddr >> 12) & 0x3FF) * 4)
        if pte is None or not pte & _PTE_PRESENT or (write and not pde & pte & _PTE_WRITABLE):
            return None
        return (pte & _PAGE_MASK) | (vaddr & (abi.PAGE_SIZE - 1))

    # --- the Switcher, the GDT and ring 1 -------------------------------------------------

    def _build_switcher(self) -> None:
        page = self._switcher_view
        self._gdt[abi.GDT_ENTRY_LGUEST_CS] = _DESC.unpack(_flat_segment(0xB, 0))
        self._gdt[abi.GDT_ENTRY_LGUEST_DS] = _DESC.unpack(_flat_segment(0x3, 0))
        self._gdt[abi.GDT_ENTRY_KERNEL_CS] = _DESC.unpack(_flat_segment(0xB, abi.GUEST_PL))
        self._gdt[abi.GDT_ENTRY_KERNEL_DS] = _DESC.unpack(_flat_segment(0x3, abi.GUEST_PL))
        self._write_gdt(range(abi.GDT_ENTRIES), host_entries_too=True)
        page[_IRET_OFFSET] = _IRET
        # The Host's page table: its first entry maps the first Switcher page, read-only.
        _U32.pack_into(page, abi.PAGE_SIZE, abi.SWITCHER_ADDR | _PTE_PRESENT)

    def _write_gdt(self, entries, host_entries_too: bool = False) -> None:
        for i in entries:
            if i in _HOST_GDT_ENTRIES and not host_entries_too:
                continue
            _DESC.pack_into(self._switcher_view, _GDT_OFFSET + 8 * i, *self._gdt[i])

    def _install_switcher_pde(self, pgdir: int) -> None:
        """Page-directory entry 1023 of this page directory maps the Switcher."""
        entry = self._phys(pgdir + abi.SWITCHER_PGD_INDEX * 4, 4)
        _U32.pack_into(entry, 0, (abi.SWITCHER_ADDR + abi.PAGE_SIZE) | _PTE_PRESENT)

    def _enter_ring1(self) -> None:
        """Ring 0 on the Switcher's iret, with a frame that lands the guest in ring 1."""
        uc = self._uc
        _FRAME.pack_into(self._switcher_view, _STACK_TOP - _FRAME.size, self.start,
                         abi.LGUEST_KERNEL_CS, abi.BOOT_EFLAGS, 0, abi.LGUEST_KERNEL_DS)
        uc.reg_write(x86.UC_X86_REG_GDTR,
                     (0, abi.SWITCHER_ADDR + _GDT_OFFSET, 8 * abi.GDT_ENTRIES - 1, 0))
        uc.reg_write(x86.UC_X86_REG_CR3, self._cr3)
        uc.reg_write(x86.UC_X86_REG_CR0, abi.X86_CR0_PE | abi.X86_CR0_WP | abi.X86_CR0_PG)
        uc.reg_write(x86.UC_X86_REG_CS, abi.LGUEST_CS)
        uc.reg_write(x86.UC_X86_REG_SS, abi.LGUEST_DS)
        for seg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES):
            uc.reg_write(seg, abi.LGUEST_KERNEL_DS)
        for seg in (x86.UC_X86_REG_FS, x86.UC_X86_REG_GS):
            uc.reg_write(seg, 0)
        uc.reg_write(x86.UC_X86_REG_ESP, abi.SWITCHER_ADDR + _STACK_TOP - _FRAME.size)
        uc.reg_write(x86.UC_X86_REG_ESI, 0)
        self._pc = abi.SWITCHER_ADDR + _IRET_OFFSET

    # --- running --------------------------------------------------------------------------

    def run(self) -> str:
        """Run the guest until it stops; the reason (a kill reason, or STOPPED).

        One-shot: when it returns, the CPU has let go of the guest's memory (close()).
        """
        uc = self._uc
        if uc is None:
            raise RuntimeError("a GuestCpu runs once")
        debugger = self.debugger
        try:
            if debugger is not None:
                debugger.attach(self)
            while self._reason is None:
                if self._stop_requested:
                    self._reason = STOPPED
                    break
                if debugger is not None and debugger.wants_stop:
                    self._hand_to_debugger()
                    continue
                if not self._run_slice(self.slice_instructions):
                    break
                if debugger is not None and debugger.wants_stop:
                    continue      # held where it stopped: interrupts wait for the debugger
                try:
                    self._resume()
                except GuestStopped as stopped:
                    self._finish(stopped.reason)
                    break
                self._pc = self._eip()
            return self._reason
        finally:
            if debugger is not None:
                debugger.ended(self._reason)
            self.close()

    def _run_slice(self, count: int) -> bool:
        """Run up to count instructions from self._pc; False once the guest has ended."""
        exit_pc = abi.SWITCHER_ADDR + _EXIT_OFFSET
        try:
            self._uc.emu_start(self._pc, exit_pc, count=count)
        except UcError as error:
            if self._reason is None:
                self._kill(self._eip(), "%s" % error)
            return False
        if self._reason is not None:
            return False
        if self._trap is not None:
            self._take_trap()
            if self._reason is not None:
                return False
        self._pc = self._eip()
        if self._pc == exit_pc:
            self._kill(self._pc, "jumped into the Switcher")
            return False
        return True

    def _hand_to_debugger(self) -> None:
        """The debugger holds the guest; then it continues (a halted guest sleeps on), dies,
        or takes one step (a halted one first waits for its interrupt, as a stepped hlt
        would) and is held again."""
        action = self.debugger.hold()
        while action != DEBUG_KILL:
            try:
                if self._halted:
                    self._resume()
                    self._pc = self._eip()
            except GuestStopped as stopped:
                self._finish(stopped.reason)
                return
            if action != DEBUG_STEP or self._reason is not None:
                return
            if not self._halted and not self._run_slice(1):
                return
            action = self.debugger.hold()
        self._kill_guest(KILLED_BY_DEBUGGER)

    def stop(self) -> None:
        """Ask run() to return soon (thread-safe). A HALT blocked in the Host is the
        HostLink's to end: make its hypercall return or raise GuestStopped."""
        with self._lock:
            self._stop_requested = True
            if self._uc is not None:
                self._uc.emu_stop()

    def close(self) -> None:
        """Let go of Unicorn and of every buffer the guest's memory was mapped from, so the
        Launcher can close its mappings. Idempotent."""
        with self._lock:
            uc, self._uc = self._uc, None
        if uc is None:
            return
        for hook in self._hooks:          # the hooks and uc refer to each other: untie them
            uc.hook_del(hook)
        self._hooks.clear()
        self._args = self._frame = self._pc_reg = None
        self._data = None
        self._exports.clear()
        for _, _, view in self._regions:
            view.release()
        self._regions.clear()
        self._switcher_view.release()

    def _eip(self) -> int:
        return self._pc_reg.read_one()

    def _finish(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
        self._uc.emu_stop()

    def _kill(self, eip: int, what: str) -> None:
        """The guest did something no CPU lets it do: it dies with where and what."""
        reason = abi.MSG_GUEST_FAULT % (eip, what)
        if self._reason is None:
            self.host.kill(reason)
        self._finish(reason)

    def _kill_guest(self, reason: str) -> None:
        """lguest's kill_guest() for the calls served here: the Host records the reason."""
        if self._reason is None:
            self.host.kill(reason)
        self._finish(reason)

    # --- the debugger's door (lgnet.guest.gdbstub): on the run loop's thread only -----------

    @property
    def unicorn(self) -> Uc:
        """The emulator, for the debugger's register reads and writes while it holds."""
        return self._uc

    @property
    def halted(self) -> bool:
        return self._halted

    def add_code_hook(self, address: int, callback) -> int:
        """callback(uc, address, size, user) before the instruction at this virtual address
        runs (a debugger's breakpoint). A hook on one address costs the rest nothing."""
        hook = self._uc.hook_add(UC_HOOK_CODE, callback, begin=address, end=address)
        self._hooks.append(hook)
        self._drop_translations()
        return hook

    def remove_code_hook(self, hook: int) -> None:
        self._hooks.remove(hook)
        self._uc.hook_del(hook)
        self._drop_translations()

    def _drop_translations(self) -> None:
        """Unicorn decides at translation time which instructions call a code hook: measured
        here, a hook added for code already translated (paging on) never fired until the
        translations were flushed. So they go, all of them (retranslating costs milliseconds)."""
        self._uc.ctl_flush_tb()

    def read_virtual(self, vaddr: int, length: int) -> bytes:
        """As much of [vaddr, vaddr+length) as the guest's page tables map, from vaddr on."""
        out = bytearray()
        for phys, size in self._virtual_pieces(vaddr, length):
            out += self._phys(phys, size)
        return bytes(out)

    def write_virtual(self, vaddr: int, data: bytes) -> int:
        """Write through the guest's page tables, read-only pages too (as ptrace may);
        returns how many bytes were written. Code translated from them is dropped."""
        done = 0
        for phys, size in self._virtual_pieces(vaddr, len(data)):
            self._phys(phys, size)[:] = data[done:done + size]
            done += size
        if done:
            self._drop_translations()
        return done

    def _virtual_pieces(self, vaddr: int, length: int):
        """(physical, size) per page of [vaddr, vaddr+length), up to the first hole."""
        done = 0
        while done < length:
            addr = (vaddr + done) & abi.U32_MASK
            size = min(length - done, abi.PAGE_SIZE - (addr & (abi.PAGE_SIZE - 1)))
            phys = self._virt_to_phys(addr, write=False)
            if phys is None or self._phys(phys, size) is None:
                return
            yield phys, size
            done += size

    # --- the hooks: hypercalls and faults ---------------------------------------------------

    def _on_trap(self, uc: Uc, intno: int, _user) -> None:
        if intno != abi.LGUEST_TRAP_ENTRY:
            # Anything but a hypercall is taken with the emulator at rest (see _take_trap).
            self._trap = _Trap(intno)
            uc.emu_stop()
            return
        call, arg1, arg2, arg3 = self._args.read()
        try:
            serve = self._hcalls.get(call)
            if self._data is None:
                if serve is not None:
                    self._kill_guest(abi.MSG_NO_INIT % call)
                    return
            elif self._do_async_hcalls(sync_follows=serve is None):
                return                  # a queued call killed the guest
            if serve is not None:
                serve(arg1, arg2, arg3)
            else:
                result = self.host.hypercall(call, arg1, arg2, arg3)
                # lguest left the call number in eax: only BIND_DMA answers there.
                if call == abi.LHCALL_BIND_DMA:
                    self._args.write(x86.UC_X86_REG_EAX, result)
                if call == abi.LHCALL_LGUEST_INIT and self._data is None:
                    self._lguest_init(arg1)
                elif call == abi.LHCALL_HALT:
                    self._halted = True
            if self._reason is None:
                self._back_from_hypercall()
        except GuestStopped as stopped:
            self._finish(stopped.reason)

    def _on_invalid(self, uc: Uc, _user) -> bool:
        """An instruction Unicorn cannot decode: the CPU's #UD, for the guest to take."""
        self._trap = _Trap(abi.TRAP_INVALID_OPCODE, error=0)
        uc.emu_stop()
        return True

    # lguest's CPU trapped every in/out of a ring-1 guest with #GP; emulate_insn() then made
    # `in` read all ones and skipped `out`, and anything else (string I/O, another prefix,
    # code below page_offset) went to the guest as the #GP it was. Unicorn runs in/out
    # without a fault but calls these hooks first, with EIP on the instruction.

    def _on_in(self, uc: Uc, _port: int, size: int, _user) -> int:
        eip, eax = uc.reg_read(x86.UC_X86_REG_EIP), uc.reg_read(x86.UC_X86_REG_EAX)
        emulated = self._emulate_io(eip)
        if emulated is None or not emulated[0]:
            self._refuse_io(uc, eip)
            return 0
        _, insn, shift = emulated
        eax = abi.U32_MASK if insn & 1 else eax | ((0xFFFF << shift) & abi.U32_MASK)
        uc.reg_write(x86.UC_X86_REG_EAX, eax)
        return eax & ((1 << 8 * size) - 1)     # what the instruction itself writes back

    def _on_out(self, uc: Uc, _port: int, _size: int, _value: int, _user) -> None:
        eip = uc.reg_read(x86.UC_X86_REG_EIP)
        emulated = self._emulate_io(eip)
        if emulated is None or emulated[0]:
            self._refuse_io(uc, eip)

    def _emulate_io(self, eip: int) -> tuple[bool, int, int] | None:
        """emulate_insn()'s decoding: (is "in", opcode, shift of the all-ones), or None."""
        if eip < self.page_offset:
            return None
        raw = self.read_virtual(eip, 2)
        if len(raw) < 2:
            return None
        insn, shift = raw[0], 0
        if insn == _OPERAND_PREFIX:
            insn, shift = raw[1], 16
        is_in = _IO_OPCODES.get(insn & 0xFE)
        return None if is_in is None else (is_in, insn, shift)

    def _is_io(self, eip: int) -> bool:
        """Is the instruction at eip an I/O instruction (after up to four prefixes)?"""
        for byte in self.read_virtual(eip, 5):      # as far as it is mapped
            if byte not in _LEGACY_PREFIXES:
                return byte in _ALL_IO_OPCODES
        return False

    def _refuse_io(self, uc: Uc, eip: int) -> None:
        """#GP(0) on an I/O instruction lguest would not emulate, as if it never began:
        its registers go back as they are now (Unicorn has already stored the first zero of
        an `ins`, which we cannot take back)."""
        saved = tuple((reg, eip if reg == x86.UC_X86_REG_EIP else uc.reg_read(reg))
                      for reg in _STRING_IO_REGS)
        self._trap = _Trap(abi.TRAP_GENERAL_PROTECTION, error=0, restore=saved)
        uc.emu_stop()

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int,
                     _user) -> bool:
        what = "%s of unmapped physical memory at %#010x" % (
            _ACCESS_NAMES.get(access, "access"), address)
        self._kill(self._eip(), what)
        return False

    # --- the calls served here ----------------------------------------------------------------

    def _lguest_init(self, addr: int) -> None:
        """The Host accepted LGUEST_INIT: remember lguest_data, tell the guest the Switcher's
        size, and read the window where it must not be interrupted (set before the call)."""
        data = self._phys(addr, abi.LGUEST_DATA_SIZE)
        if data is None:
            self._kill_guest(abi.MSG_BAD_LGUEST_DATA % addr)
            return
        self._data = data
        _U32.pack_into(data, abi.LGUEST_DATA_RESERVE_MEM, abi.SWITCHER_RESERVE)
        self._noirq = (_U32.unpack_from(data, abi.LGUEST_DATA_NOIRQ_START)[0],
                       _U32.unpack_from(data, abi.LGUEST_DATA_NOIRQ_END)[0])

    def _load_gdt(self, table: int, num: int, _unused: int) -> None:
        if num > abi.GDT_ENTRIES:
            self._kill_guest(abi.MSG_TOO_MANY_GDT % num)
            return
        raw = self._phys(table, 8 * num)
        if raw is None:
            self._kill_guest(abi.MSG_BAD_READ % table)
            return
        for i in range(num):
            self._gdt[i] = _DESC.unpack_from(raw, 8 * i)
        self._fixup_gdt(range(abi.GDT_ENTRIES))

    def _load_tls(self, table: int, _cpu: int, _unused: int) -> None:
        first, count = abi.GDT_ENTRY_TLS_MIN, abi.GDT_ENTRY_TLS_ENTRIES
        raw = self._phys(table, 8 * count)
        if raw is None:
            self._kill_guest(abi.MSG_BAD_READ % table)
            return
        self.tls = table
        for i in range(count):
            self._gdt[first + i] = _DESC.unpack_from(raw, 8 * i)
        self._fixup_gdt(range(first, first + count))

    def _fixup_gdt(self, entries: range) -> None:
        entries = [i for i in entries if i not in _HOST_GDT_ENTRIES]
        for i in entries:
            self._gdt[i] = _fix_descriptor(*self._gdt[i])
        self._write_gdt(entries)

    def _new_pgtable(self, pgdir: int, _a2: int, _a3: int) -> None:
        checked = self._checked_pgdir(pgdir)
        if checked is None:
            self._kill_guest(abi.MSG_BAD_PGDIR % pgdir)
            return
        self._install_switcher_pde(checked)
        self._cr3 = checked
        self._uc.reg_write(x86.UC_X86_REG_CR3, checked)     # also flushes the TLB

    def _flush_tlb(self) -> None:
        self._uc.ctl(ucc.UC_CTL_TLB_FLUSH, ucc.UC_CTL_IO_WRITE)

    def _flush_tlb_call(self, _all: int, _a2: int, _a3: int) -> None:
        self._flush_tlb()

    def _set_pte(self, _pgdir: int, _vaddr: int, _pte: int) -> None:
        """The guest wrote its PTE itself; lguest updated its shadow, we drop the TLB."""
        self._flush_tlb()

    def _set_pmd(self, pgdir: int, index: int, _unused: int) -> None:
        if index == abi.SWITCHER_PGD_INDEX:
            checked = self._checked_pgdir(pgdir)
            if checked is not None:
                self._install_switcher_pde(checked)     # the Switcher's entry is ours
        self._flush_tlb()

    def _load_idt_entry(self, num: int, low: int, high: int) -> None:
        """lguest's load_guest_idt_entry()/set_trap(): only the handler and type matter."""
        if num in abi.IDT_IGNORED_VECTORS:
            return
        gate = None
        if high & _GATE_PRESENT:
            type_ = (high >> _GATE_TYPE_SHIFT) & 0xF
            if type_ not in (abi.IDT_INTERRUPT_GATE, abi.IDT_TRAP_GATE):
                self._kill_guest(abi.MSG_BAD_IDT_TYPE % type_)
                return
            high &= _GATE_KEEP_HIGH
            gate = Gate((low & 0xFFFF) | (high & 0xFFFF0000), type_,
                        (high & _DESC_DPL_MASK) >> _DESC_DPL_SHIFT)
        if num < abi.IDT_ENTRIES:
            self._idt[num] = gate
        elif num == abi.SYSCALL_VECTOR:
            self._syscall_gate = gate

    def _set_stack(self, ss: int, esp: int, pages: int) -> None:
        if ss & 3 != abi.GUEST_PL:
            self._kill_guest(abi.MSG_BAD_STACK_SEGMENT % ss)
            return
        if pages > abi.STACK_PAGES_MAX:
            self._kill_guest(abi.MSG_BAD_STACK_PAGES % pages)
            return
        self.stack = (ss, esp, pages)

    def _set_ts(self, ts: int, _a2: int, _a3: int) -> None:
        """lguest set the real CR0.TS before every entry while the guest wanted it, so the
        guest's next FPU or SSE instruction trapped (#NM) for its lazy FPU switch. Unicorn's
        CPU honours CR0.TS the same way, and a CR0 write from the hook applies at once."""
        self.ts = ts
        cr0 = self._uc.reg_read(x86.UC_X86_REG_CR0)
        cr0 = cr0 | abi.X86_CR0_TS if ts else cr0 & ~abi.X86_CR0_TS
        self._uc.reg_write(x86.UC_X86_REG_CR0, cr0)

    def _ring_queued(self) -> bool:
        return self._data[abi.LGUEST_DATA_HCALL_STATUS:abi.LGUEST_DATA_HCALLS] != _EMPTY_RING

    def _do_async_hcalls(self, sync_follows: bool) -> bool:
        """lguest's do_hypercalls(): the async ring is drained before any synchronous call,
        and at every exit. True if that killed the guest.

        The CPU applies the ring's CPU-state calls, in ring order, from the cursor the Host
        drains from; the Host then drains the same run (ignoring those calls) — with the
        synchronous call that follows (sync_follows), or else with a FLUSH_ASYNC of ours,
        which does nothing but the draining. Either way every queued call is applied once,
        before the guest's next call or instruction. (Kill reasons of one run are recorded
        CPU-state calls first, then the Host's.)"""
        if not self._ring_queued():
            return False
        self._apply_async_ring()
        if self._reason is not None:
            return True
        if not sync_follows:
            self.host.hypercall(abi.LHCALL_FLUSH_ASYNC, 0, 0, 0)
        return self._reason is not None

    def _apply_async_ring(self) -> int:
        """Apply the CPU-state calls queued in the async ring, from the Host's cursor; how
        many entries it walked.

        The Host drains the same run right after (ignoring these calls), so the cursor moves
        past every queued entry, whatever its kind."""
        data = self._data
        n = self._ring_next
        walked = 0
        for _ in range(abi.LHCALL_RING_SIZE):
            if data[abi.LGUEST_DATA_HCALL_STATUS + n] == abi.HCALL_STATUS_EMPTY:
                break
            call, arg1, arg2, arg3 = self._ring_entry(n)
            n = (n + 1) % abi.LHCALL_RING_SIZE
            walked += 1
            serve = self._hcalls.get(call)
            if serve is not None:
                serve(arg1, arg2, arg3)
                if self._reason is not None:
                    break
        self._ring_next = n
        return walked

    def _ring_entry(self, n: int) -> tuple[int, int, int, int]:
        """Entry n of the async ring: (call, arg1, arg2, arg3)."""
        return abi.ASYNC_HCALL.unpack_from(self._data,
                                           abi.LGUEST_DATA_HCALLS + n * abi.ASYNC_HCALL.size)

    # --- traps: lguest's run_guest() and deliver_trap() ---------------------------------

    def _take_trap(self) -> None:
        """The Switcher came back with a trap: handle it as lguest's Host did, or reflect it
        into the guest's IDT, or kill the guest that gave no handler."""
        trap, self._trap = self._trap, None
        uc = self._uc
        for reg, value in trap.restore:
            uc.reg_write(reg, value)
        if trap.error is None:
            error, software = self._exceptions.take(uc)
        else:
            error, software = trap.error, False
        num = trap.vector
        eip, cs, _esp, _eflags = self._frame.read()
        if not software and num != abi.TRAP_GENERAL_PROTECTION and self._is_io(eip):
            # An ins/outs whose memory operand faulted: lguest's CPU checked the I/O
            # permission first, and that was a #GP.
            num, error = abi.TRAP_GENERAL_PROTECTION, 0
        if cs & 3 != abi.GUEST_PL:
            self._kill(eip, "trap %d in ring %d (lgnet's guests have no user mode)"
                       % (num, cs & 3))
            return
        if software:
            # `int n` (EIP is past it). lguest's real IDT held the guest's own gate only for
            # the traps that go direct; every other vector had the Host's DPL-0 gate, so an
            # `int` there was a #GP naming the vector, at the `int` itself.
            gate = self._gate(num)
            if gate is not None and self._direct(num, gate) and gate.dpl >= cs & 3:
                self._push_frame(gate, None, "trap %d" % num, direct=True)
                return
            eip = self._int_start(eip, num)
            self._frame.write(x86.UC_X86_REG_EIP, eip)
            num, error = abi.TRAP_GENERAL_PROTECTION, (num << 3) | abi.GP_ERROR_IDT
        detail = error
        if num == abi.TRAP_PAGE_FAULT:
            # The guest learns the faulting address from lguest_data.cr2. (Before LGUEST_INIT
            # lguest wrote it through a NULL lguest_data: to guest-physical 8, the boot page.)
            detail = uc.reg_read(x86.UC_X86_REG_CR2)
            target = self._data if self._data is not None else self._phys(0, abi.PAGE_SIZE)
            _U32.pack_into(target, abi.LGUEST_DATA_CR2, detail)
        elif num == abi.TRAP_DEVICE_NOT_AVAILABLE and not self.ts:
            return                      # the Host's own FPU business: absorbed
        gate = self._gate(num)
        if gate is None:
            self._kill_guest(abi.MSG_UNHANDLED_TRAP % (num, abi.c_hex(eip), abi.c_hex(detail)))
            return
        self._push_frame(gate, error if num in abi.TRAPS_WITH_ERROR_CODE else None,
                         "trap %d" % num, direct=self._direct(num, gate))

    def _gate(self, num: int) -> Gate | None:
        if num < abi.IDT_ENTRIES:
            return self._idt[num]
        return self._syscall_gate if num == abi.SYSCALL_VECTOR else None

    @staticmethod
    def _direct(num: int, gate: Gate) -> bool:
        """lguest's direct_trap(): would the CPU enter this guest gate without the Host?"""
        if num >= abi.FIRST_EXTERNAL_VECTOR and num != abi.SYSCALL_VECTOR:
            return False
        return num not in abi.TRAPS_THE_HOST_TAKES and gate.type == abi.IDT_TRAP_GATE

    def _int_start(self, next_eip: int, num: int) -> int:
        """Where the `int` that raised num began: `int $n` is two bytes, int3/into one."""
        raw = self.read_virtual((next_eip - 2) & abi.U32_MASK, 2)
        if raw == bytes([_INT_N, num]):
            return (next_eip - 2) & abi.U32_MASK
        return (next_eip - 1) & abi.U32_MASK

    # --- resuming the guest: time and interrupts -------------------------------------------

    def _back_from_hypercall(self) -> None:
        """Interrupts are never delivered from inside the hook: moving ESP and EIP there
        races with a slice's emu_stop (Unicorn may then keep the old EIP with the new ESP, and
        the guest returns through a stack 12 bytes off). When there is something to deliver
        or a HALT to sleep in, stop and let the run loop do it with the emulator at rest."""
        if self._halted or self.host.pending_irqs():
            self._uc.emu_stop()
        elif self._data is not None:
            now = time.time_ns()
            abi.TIMESPEC.pack_into(self._data, abi.LGUEST_DATA_TIME,
                                   (now // abi.NSEC_PER_SEC) & abi.U32_MASK, now % abi.NSEC_PER_SEC)

    def _resume(self) -> None:
        """What lguest did on every way back into the guest (run_guest's loop): drain the
        async ring, service the Waker's BREAK, then time and interrupts."""
        data = self._data
        if data is None:
            return
        while True:
            if self._do_async_hcalls(sync_follows=False):
                return
            if self.host.break_pending():
                # A BREAK waits for us: a guest computing without hypercalls still gets its
                # console and tun input at the end of each slice, as lguest's did at each
                # host tick. The reply to any call carries it; FLUSH_ASYNC does nothing else.
                self.host.hypercall(abi.LHCALL_FLUSH_ASYNC, 0, 0, 0)
            now = time.time_ns()
            abi.TIMESPEC.pack_into(data, abi.LGUEST_DATA_TIME,
                                   (now // abi.NSEC_PER_SEC) & abi.U32_MASK, now % abi.NSEC_PER_SEC)
            self._maybe_interrupt(data)
            if not self._halted or self._reason is not None:
                return
            # Halted, and nothing it may take is pending: lguest slept again. If what is
            # pending is only what the guest blocked, the Host's HALT would return at once:
            # pause a little rather than spin on it.
            if self._stop_requested:
                self._finish(STOPPED)
                return
            if self.debugger is not None and self.debugger.wants_stop:
                return            # it sleeps again once the debugger lets go
            if self.host.pending_irqs():
                time.sleep(_HALT_RETRY_SECONDS)
            self.host.hypercall(abi.LHCALL_HALT, 0, 0, 0)

    def _maybe_interrupt(self, data: memoryview) -> None:
        pending = self.host.pending_irqs()
        if not pending:
            return
        blocked = _U32.unpack_from(data, abi.LGUEST_DATA_BLOCKED_INTERRUPTS)[0]
        ready = pending & ~blocked & _IRQ_MASK
        if not ready:
            return
        irq = (ready & -ready).bit_length() - 1
        frame = self._frame.read()
        eip, cs = frame[0], frame[1]
        if self._noirq[0] <= eip < self._noirq[1]:
            return
        if self._halted:
            _U32.pack_into(data, abi.LGUEST_DATA_IRQ_ENABLED, abi.IRQ_ENABLED_ON)
            self._halted = False
        if not _U32.unpack_from(data, abi.LGUEST_DATA_IRQ_ENABLED)[0]:
            return
        gate = self._idt[abi.FIRST_EXTERNAL_VECTOR + irq]
        if gate is None or cs & 3 != abi.GUEST_PL:
            return      # no handler yet (it stays pending); lgnet guests have no user mode
        if self._push_frame(gate, None, "interrupt %d" % irq, frame=frame):
            self.host.ack_irq(irq)

    def _push_frame(self, gate: Gate, error: int | None, what: str,
                    direct: bool = False, frame: list[int] | None = None) -> bool:
        """lguest's set_guest_interrupt(), in ring 1: push eflags, cs, eip (and the error
        code) on the guest's stack and enter the handler. The pushed IF says whether
        irq_enabled was on, and an interrupt gate turns it off; a trap the CPU would have
        taken directly (direct_trap) pushes the real eflags and leaves irq_enabled alone.
        `frame`: the registers _frame.read() just gave, if nothing wrote them since.
        False if the frame could not be written: the guest is dead."""
        data = self._data
        eip, cs, esp, eflags = frame if frame is not None else self._frame.read()
        if not direct and data is not None and not (
                _U32.unpack_from(data, abi.LGUEST_DATA_IRQ_ENABLED)[0] & abi.IRQ_ENABLED_ON):
            eflags &= ~abi.IRQ_ENABLED_ON
        words = (eip, cs, eflags) if error is None else (error, eip, cs, eflags)
        frame_esp = (esp - 4 * len(words)) & abi.U32_MASK
        if self._push_in_one_page(frame_esp, words):
            words = ()                  # done with one walk of the page tables
        for i, word in enumerate(words):
            where = (frame_esp + 4 * i) & abi.U32_MASK
            phys = self._virt_to_phys(where)
            target = None if phys is None else self._phys(phys, 4)
            if target is None:
                self._kill(eip, "page fault at %#010x pushing %s" % (where, what))
                return False
            _U32.pack_into(target, 0, word)
        self._frame.write(x86.UC_X86_REG_ESP, frame_esp)
        self._frame.write(x86.UC_X86_REG_EIP, gate.offset)
        if not direct and data is not None and gate.type == abi.IDT_INTERRUPT_GATE:
            _U32.pack_into(data, abi.LGUEST_DATA_IRQ_ENABLED, 0)
        return True

    def _push_in_one_page(self, frame_esp: int, words: tuple[int, ...]) -> bool:
        """Write the frame with one page-table walk when it lies in one writable page (as it
        nearly always does); False, having written nothing, when the word-by-word push must
        find out where it fails (or cross a page)."""
        last = frame_esp + 4 * len(words) - 1
        if last > abi.U32_MASK or (frame_esp ^ last) & _PAGE_MASK:
            return False
        phys = self._virt_to_phys(frame_esp)
        target = None if phys is None else self._phys(phys, 4 * len(words))
        if target is None:
            return False
        struct.pack_into("<%dI" % len(words), target, 0, *words)
        return True
