"""The guest's CPU (lgnet/guest/cpu.py): real i386 code under Unicorn, against a Python Host.

This is a unit test of the CPU, so the Host is a FakeHost in this process that records every
call. The guests are a few lines of assembly each, built at test time with ``gcc -m32 -c``,
``ld -m elf_i386`` and ``objcopy -O binary``, loaded at physical 1 MiB and mapped at
0xC0000000 as the Launcher does (a page directory and linear PTEs, flags 0x7). Without a
32-bit toolchain these tests skip and say so.
"""
from __future__ import annotations

import hashlib
import mmap
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lgnet import abi
from lgnet.guest.cpu import STOPPED, GuestCpu, GuestStopped

RAM_SIZE = 4 * abi.MiB
PAGE_OFFSET = abi.DEFAULT_PAGE_OFFSET
PGDIR = RAM_SIZE - abi.PAGE_SIZE                 # the Launcher's pgdir, at the top of RAM
PTES = PGDIR - abi.PAGE_SIZE                     # one page of PTEs maps all 4 MiB
LGUEST_DATA = 0x80000                            # guest-physical
MARK = 0x90000                                   # guest-physical: the guests' results
START = PAGE_OFFSET + abi.KERNEL_LOAD_ADDRESS
RUN_TIMEOUT = 5.0

U32 = struct.Struct("<I")

# Every guest starts with this: constants, a stack, and macros for the calls it makes.
PRELUDE = r"""
.code32
.equ PAGE_OFFSET, %(page_offset)#x
.equ LGUEST_DATA, PAGE_OFFSET + %(lguest_data)#x
.equ MARK, PAGE_OFFSET + %(mark)#x
.equ IRQ_ENABLED, LGUEST_DATA + %(irq_enabled)d
.equ BLOCKED, LGUEST_DATA + %(blocked)d
.equ NOIRQ_START, LGUEST_DATA + %(noirq_start)d
.equ NOIRQ_END, LGUEST_DATA + %(noirq_end)d
.equ HCALL_STATUS, LGUEST_DATA + %(hcall_status)d
.equ HCALLS, LGUEST_DATA + %(hcalls)d
.equ CR2, LGUEST_DATA + %(cr2)d

/* (macro arguments must not contain spaces) */
.macro HCALL call, a1=0, a2=0, a3=0
    movl $\call, %%eax
    movl $\a1, %%edx
    movl $\a2, %%ebx
    movl $\a3, %%ecx
    int $0x1f
.endm

.macro INIT
    HCALL 1, LGUEST_DATA-PAGE_OFFSET
.endm

/* LOAD_IDT_ENTRY(vector, low word, high word) of a gate to handler, type 0xE or 0xF. */
.macro IDT vec, handler, type, dpl=0
    movl $\handler, %%ebx
    andl $0xffff, %%ebx
    orl $0x00610000, %%ebx
    movl $\handler, %%ecx
    andl $0xffff0000, %%ecx
    orl $(0x8000 | (\type << 8) | (\dpl << 13)), %%ecx
    movl $\vec, %%edx
    movl $6, %%eax
    int $0x1f
.endm

.macro CRASH msg
    movl $2, %%eax
    movl $9f - PAGE_OFFSET, %%edx
    int $0x1f
    jmp .
9:  .asciz "\msg"
.endm

/* An interrupt handler's first words: its frame and irq_enabled into MARK+4.. */
.macro SAVE_FRAME
    movl (%%esp), %%eax
    movl %%eax, MARK + 4
    movl 4(%%esp), %%eax
    movl %%eax, MARK + 8
    movl 8(%%esp), %%eax
    movl %%eax, MARK + 12
    movl IRQ_ENABLED, %%eax
    movl %%eax, MARK + 16
.endm

.text
.globl _start
_start:
    movl $PAGE_OFFSET + 0x70000, %%esp
""" % dict(page_offset=PAGE_OFFSET, lguest_data=LGUEST_DATA, mark=MARK,
           irq_enabled=abi.LGUEST_DATA_IRQ_ENABLED, blocked=abi.LGUEST_DATA_BLOCKED_INTERRUPTS,
           noirq_start=abi.LGUEST_DATA_NOIRQ_START, noirq_end=abi.LGUEST_DATA_NOIRQ_END,
           hcall_status=abi.LGUEST_DATA_HCALL_STATUS, hcalls=abi.LGUEST_DATA_HCALLS,
           cr2=abi.LGUEST_DATA_CR2)


# --- building and running guests ---------------------------------------------------------

class Image:
    def __init__(self, code: bytes, symbols: dict[str, int]):
        self.code = code
        self.symbols = symbols

    def __getitem__(self, name: str) -> int:
        return self.symbols[name]


@pytest.fixture(scope="session")
def assemble(tmp_path_factory):
    """assemble(body) -> Image: the prelude plus body, linked at START."""
    missing = [tool for tool in ("gcc", "ld", "objcopy", "nm") if shutil.which(tool) is None]
    if missing:
        pytest.skip("building the test guests needs %s" % ", ".join(missing))
    workdir = tmp_path_factory.mktemp("cpu_images")
    cache: dict[str, Image] = {}

    def build(body: str) -> Image:
        source = PRELUDE + body
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        if digest in cache:
            return cache[digest]
        base = workdir / digest
        Path("%s.S" % base).write_text(source)
        steps = [
            ["gcc", "-m32", "-c", "%s.S" % base, "-o", "%s.o" % base],
            ["ld", "-m", "elf_i386", "-e", "_start", "-Ttext=%#x" % START,
             "%s.o" % base, "-o", "%s.elf" % base],
            ["objcopy", "-O", "binary", "-j", ".text", "%s.elf" % base, "%s.bin" % base],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                if step[0] == "gcc" and "-m32" in done.stderr + done.stdout or \
                        step[0] == "ld" and "elf_i386" in done.stderr:
                    pytest.skip("gcc -m32 cannot build 32-bit code here: %s" % done.stderr)
                raise AssertionError("%s failed:\n%s" % (" ".join(step), done.stderr))
        nm = subprocess.run(["nm", "%s.elf" % base], capture_output=True, text=True,
                            check=True).stdout
        symbols = {}
        for line in nm.splitlines():
            value, _kind, name = line.split()
            symbols[name] = int(value, 16)
        image = Image(Path("%s.bin" % base).read_bytes(), symbols)
        cache[digest] = image
        return image

    try:
        build("nop\n")
    except AssertionError as error:
        pytest.skip("gcc -m32 cannot build 32-bit code here: %s" % error)
    return build


class FakeHost:
    """HostLink in this process: records calls, raises interrupts when told."""

    def __init__(self, ram, raise_irqs: int = 0, after_polls: int = 0, on_halt=None,
                 results=None):
        self.ram = ram
        self.calls: list[tuple[int, int, int, int]] = []
        self.kills: list[str] = []
        self.acks: list[int] = []
        self.polls = 0
        self.pending = 0
        self.raise_irqs = raise_irqs
        self.after_polls = after_polls
        self.raised_at: float | None = None
        self.acked_at: float | None = None
        self.on_halt = on_halt
        self.results = results or {}
        self.ring_seen: list[bytes] = []
        self.breaking = False                # a BREAK waits (the Waker's, in the broker)
        self.breaks_answered = 0

    def hypercall(self, call: int, arg1: int, arg2: int, arg3: int) -> int:
        self.calls.append((call, arg1, arg2, arg3))
        if call == abi.LHCALL_CRASH:
            message = bytes(self.ram[arg1:arg1 + abi.CRASH_MESSAGE_MAX]).split(b"\0")[0]
            raise GuestStopped(abi.MSG_CRASH % message.decode())
        if call == abi.LHCALL_HALT and self.on_halt is not None:
            self.on_halt(self)
        if call == abi.LHCALL_FLUSH_ASYNC:
            self.drain_ring()
        if self.breaking:                    # this reply carries FLAG_AGAIN
            self.breaking = False
            self.breaks_answered += 1
        if call not in abi.HYPERCALL_NAMES:
            raise GuestStopped(abi.MSG_BAD_HYPERCALL % call)
        return self.results.get(call, 0)

    def drain_ring(self) -> None:
        """As the broker does: take every queued entry, in order, and mark it empty."""
        status = LGUEST_DATA + abi.LGUEST_DATA_HCALL_STATUS
        self.ring_seen.append(bytes(self.ram[status:status + abi.LHCALL_RING_SIZE]))
        for n in range(abi.LHCALL_RING_SIZE):
            self.ram[status + n] = abi.HCALL_STATUS_EMPTY

    def pending_irqs(self) -> int:
        self.polls += 1
        if self.raise_irqs and self.polls >= self.after_polls and self.raised_at is None:
            self.pending |= self.raise_irqs
            self.raised_at = time.perf_counter()
        return self.pending

    def ack_irq(self, irq: int) -> None:
        self.acks.append(irq)
        self.acked_at = time.perf_counter()
        self.pending &= ~(1 << irq)

    def kill(self, reason: str) -> None:
        self.kills.append(reason)

    def break_pending(self) -> bool:
        return self.breaking


class Machine:
    """4 MiB of guest RAM with the Launcher's page tables and the image at 1 MiB."""

    def __init__(self, image: Image):
        self.ram = mmap.mmap(-1, RAM_SIZE)
        self.ram[abi.KERNEL_LOAD_ADDRESS:abi.KERNEL_LOAD_ADDRESS + len(image.code)] = image.code
        for pfn in range(RAM_SIZE // abi.PAGE_SIZE):
            U32.pack_into(self.ram, PTES + 4 * pfn, (pfn * abi.PAGE_SIZE) | abi.PAGE_PRESENT)
        U32.pack_into(self.ram, PGDIR + 4 * (PAGE_OFFSET >> abi.PGDIR_SHIFT),
                      PTES | abi.PAGE_PRESENT)
        status = LGUEST_DATA + abi.LGUEST_DATA_HCALL_STATUS
        self.ram[status:status + abi.LHCALL_RING_SIZE] = \
            bytes([abi.HCALL_STATUS_EMPTY]) * abi.LHCALL_RING_SIZE

    def u32(self, phys: int) -> int:
        return U32.unpack_from(self.ram, phys)[0]

    def mark(self, n: int) -> int:
        return self.u32(MARK + 4 * n)

    def cpu(self, host: FakeHost, **kwargs) -> GuestCpu:
        return GuestCpu([(0, self.ram)], START, PGDIR, PAGE_OFFSET, host, **kwargs)


@pytest.fixture
def machine_for(assemble):
    made: list[Machine] = []

    def make(body: str) -> tuple[Machine, Image]:
        image = assemble(body)
        machine = Machine(image)
        made.append(machine)
        return machine, image

    yield make
    for machine in made:
        machine.ram.close()      # fails (BufferError) if the CPU still held the memory


def unhandled(trap: int, eip: int, detail: int) -> str:
    """lguest's kill reason for a trap the guest gave no handler for (C's %#lx: 0 is "0")."""
    return "unhandled trap %d at %#x (%s)" % (trap, eip, "%#x" % detail if detail else "0")


def run(cpu: GuestCpu, timeout: float = RUN_TIMEOUT, until=None) -> str:
    """cpu.run() in a thread; stop it once until() holds; fail if it hangs."""
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(cpu.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    if until is not None:
        while not until() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.001)
        cpu.stop()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        cpu.stop()
        thread.join(2)
        pytest.fail("the guest did not stop within %.0f s" % timeout)
    return result[0]


# --- hypercalls ---------------------------------------------------------------------------

def test_forwarded_hypercall_round_trip(machine_for):
    machine, _ = machine_for(r"""
    INIT
    HCALL 12, 0x1000, 0x2000, 0x801
    movl %eax, MARK
    CRASH "done"
""")
    host = FakeHost(machine.ram, results={abi.LHCALL_BIND_DMA: 0x1234})
    assert run(machine.cpu(host)) == "CRASH: done"
    assert machine.mark(0) == 0x1234
    assert host.calls[0] == (abi.LHCALL_LGUEST_INIT, LGUEST_DATA, 0, 0)
    assert host.calls[1] == (abi.LHCALL_BIND_DMA, 0x1000, 0x2000, 0x801)
    assert host.kills == []


def test_init_then_crash_and_lguest_data(machine_for):
    machine, _ = machine_for(r"""
    INIT
    HCALL 0
    CRASH "bye"
""")
    host = FakeHost(machine.ram)
    before = time.time()
    assert run(machine.cpu(host)) == "CRASH: bye"
    assert [c[0] for c in host.calls] == [abi.LHCALL_LGUEST_INIT, abi.LHCALL_FLUSH_ASYNC,
                                         abi.LHCALL_CRASH]
    # The CPU told the guest to keep clear of the Switcher, and keeps its clock.
    assert machine.u32(LGUEST_DATA + abi.LGUEST_DATA_RESERVE_MEM) == abi.SWITCHER_RESERVE
    tv_sec, tv_nsec = abi.TIMESPEC.unpack_from(machine.ram, LGUEST_DATA + abi.LGUEST_DATA_TIME)
    assert before - 2 <= tv_sec <= time.time() + 1 and tv_nsec < 1_000_000_000


def test_unknown_hypercall_is_forwarded(machine_for):
    machine, _ = machine_for(r"""
    INIT
    HCALL 99, 1, 2, 3
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == abi.MSG_BAD_HYPERCALL % 99
    assert host.calls[-1] == (99, 1, 2, 3)


def test_cpu_state_call_before_init_kills(machine_for):
    machine, _ = machine_for(r"""
    HCALL 5
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    reason = run(machine.cpu(host))
    assert reason == abi.MSG_NO_INIT % abi.LHCALL_FLUSH_TLB
    assert host.kills == [reason] and host.calls == []


def test_ring1_segments_and_read_only_switcher(machine_for):
    machine, image = machine_for(r"""
    movl %cs, %eax
    movl %eax, MARK
    movl %ss, %eax
    movl %eax, MARK + 4
    movl %ds, %eax
    movl %eax, MARK + 8
    movl 0xFFC00000 + 8 * 12 + 4, %eax      /* the kernel CS descriptor, readable */
    movl %eax, MARK + 12
poke:
    movl $0, 0xFFC00000                     /* but the GDT is not writable */
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    reason = run(machine.cpu(host))
    assert (machine.mark(0), machine.mark(1), machine.mark(2)) == (0x61, 0x69, 0x69)
    assert (machine.mark(3) >> 13) & 3 == abi.GUEST_PL
    assert reason == unhandled(abi.TRAP_PAGE_FAULT, image["poke"], 0xFFC00000)


def test_load_gdt_fixes_dpl_and_keeps_host_entries(machine_for):
    machine, _ = machine_for(r"""
    INIT
    HCALL 3, gdt-PAGE_OFFSET, 14
    movl $0x69, %eax
    movl %eax, %ds                          /* entry 13 now comes from our table */
    movl 0xFFC00000 + 8 * 13 + 4, %eax
    movl %eax, MARK
    movl 0xFFC00000 + 8 * 10 + 4, %eax
    movl %eax, MARK + 4
    CRASH "gdt"
.balign 8
gdt:
    .fill 10, 8, 0
    .long 0, 0                              /* 10: the Host's, ignored */
    .long 0, 0
    .long 0x0000ffff, 0x00cf9a00            /* 12: flat code, DPL 0 */
    .long 0x0000ffff, 0x00cf9200            /* 13: flat data, DPL 0 */
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: gdt"
    assert machine.mark(0) == 0x00cf9200 | (abi.GUEST_PL << 13) | 0x100
    assert machine.mark(1) & 0x8000 and (machine.mark(1) >> 13) & 3 == 0   # still the Host's


def test_bad_idt_type_kills(machine_for):
    machine, _ = machine_for(r"""
    INIT
    HCALL 6, 40, 0x00610000, 0x8500         /* a task gate */
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == abi.MSG_BAD_IDT_TYPE % 5
    assert host.kills == [abi.MSG_BAD_IDT_TYPE % 5]


def test_new_pgtable_installs_the_switcher(machine_for):
    machine, _ = machine_for(r"""
    INIT
    movl $PAGE_OFFSET + %(pgdir)#x, %%esi    /* copy the Launcher's pgdir to 0xA0000 */
    movl $PAGE_OFFSET + 0xA0000, %%edi
    movl $1024, %%ecx
    rep movsl
    movl $0, PAGE_OFFSET + 0xA0000 + 4092   /* without the Switcher's entry */
    HCALL 4, 0xA0000
    movl $0x69, %%eax
    movl %%eax, %%ds                          /* reads the GDT through the new pgdir */
    movl 0xFFC00000 + 8 * 12, %%eax
    movl %%eax, MARK
    CRASH "switched"
""" % dict(pgdir=PGDIR))
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: switched"
    assert machine.mark(0) == 0x0000ffff
    assert machine.u32(0xA0000 + 4 * abi.SWITCHER_PGD_INDEX) & 1


def test_set_pte_flushes_the_tlb(machine_for):
    machine, _ = machine_for(r"""
    INIT
    movl $0x11111111, PAGE_OFFSET + 0xB0000
    movl $0x22222222, PAGE_OFFSET + 0xB1000
    movl PAGE_OFFSET + 0xB0000, %%eax        /* the TLB now maps page 0xB0 */
    movl %%eax, MARK
    movl $0xB1000 | 7, PAGE_OFFSET + %(pte)#x
    HCALL 14, %(pgdir)#x, PAGE_OFFSET+0xB0000, 0xB1007
    movl PAGE_OFFSET + 0xB0000, %%eax
    movl %%eax, MARK + 4
    CRASH "pte"
""" % dict(pgdir=PGDIR, pte=PTES + 4 * 0xB0))
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: pte"
    assert (machine.mark(0), machine.mark(1)) == (0x11111111, 0x22222222)


QUEUE_SET_STACK = r"""
    movl $7, HCALLS                         /* queue SET_STACK(%(ss)#x, 0xC0070000, 2) */
    movl $%(ss)#x, HCALLS + 4
    movl $0xC0070000, HCALLS + 8
    movl $2, HCALLS + 12
    movb $0, HCALL_STATUS
"""


def test_async_ring_cpu_calls_are_applied_before_forwarding(machine_for):
    machine, _ = machine_for(r"""
    INIT
""" + QUEUE_SET_STACK % dict(ss=0x69) + r"""
    HCALL 0                                 /* FLUSH_ASYNC: applied, then drained */
    HCALL 7, 0x69, 0xC0060000, 1            /* a newer stack, served at once */
    HCALL 0
    CRASH "ring"
""")
    stacks = []

    class Host(FakeHost):
        def hypercall(self, call, arg1, arg2, arg3):
            if call == abi.LHCALL_FLUSH_ASYNC:
                stacks.append(cpu.stack)
            return super().hypercall(call, arg1, arg2, arg3)

    host = Host(machine.ram)
    cpu = machine.cpu(host)
    assert run(cpu) == "CRASH: ring"
    assert host.ring_seen[0][0] == abi.HCALL_STATUS_PENDING     # the Host drains it too
    assert stacks == [(0x69, 0xC0070000, 2), (0x69, 0xC0060000, 1)]
    assert cpu.stack == (0x69, 0xC0060000, 1)                   # and it was applied once


def test_async_ring_bad_call_kills_before_forwarding(machine_for):
    machine, _ = machine_for(r"""
    INIT
""" + QUEUE_SET_STACK % dict(ss=0x68) + r"""
    HCALL 0
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == abi.MSG_BAD_STACK_SEGMENT % 0x68
    assert [c[0] for c in host.calls] == [abi.LHCALL_LGUEST_INIT]


# --- faults and ring 1 --------------------------------------------------------------------

def test_a_page_fault_without_a_handler_kills_with_lguests_message(machine_for):
    machine, image = machine_for(r"""
    INIT
fault:
    movl 0x00000004, %eax
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    reason = run(machine.cpu(host))
    assert reason == "unhandled trap 14 at %#x (0x4)" % image["fault"]
    assert host.kills == [reason]
    # lguest wrote cr2 for the guest before it found no handler.
    assert machine.u32(LGUEST_DATA + abi.LGUEST_DATA_CR2) == 4


def test_unmapped_physical_memory_kills(machine_for):
    machine, image = machine_for(r"""
    movl $0x09000000 | 7, PAGE_OFFSET + %(pte)#x   /* page 0xB0 -> beyond all memory */
fault:
    movl PAGE_OFFSET + 0xB0010, %%eax
    CRASH "not reached"
""" % dict(pte=PTES + 4 * 0xB0))
    host = FakeHost(machine.ram)
    reason = run(machine.cpu(host))
    assert reason == abi.MSG_GUEST_FAULT % (
        image["fault"], "read of unmapped physical memory at 0x09000010")
    assert host.kills == [reason]


@pytest.mark.parametrize("instruction", ["cli", "hlt", "movl %eax, %cr3", "lgdt (%eax)"])
def test_privileged_instructions_fault_in_ring1(machine_for, instruction):
    machine, image = machine_for(r"""
fault:
    %s
    CRASH "ring 0?"
""" % instruction)
    host = FakeHost(machine.ram)
    reason = run(machine.cpu(host))
    assert reason == unhandled(abi.TRAP_GENERAL_PROTECTION, image["fault"], 0)


# --- interrupts ---------------------------------------------------------------------------

HANDLER_SPIN = r"""
handler:
    SAVE_FRAME
    movl $1, MARK
    jmp .
"""


def test_interrupt_delivered_while_spinning(machine_for):
    machine, image = machine_for(r"""
    INIT
    IDT 32, handler, 0xE
    movl $0x200, IRQ_ENABLED
spin:
    incl MARK + 20
    jmp spin
""" + HANDLER_SPIN)
    host = FakeHost(machine.ram, raise_irqs=1 << abi.TIMER_IRQ, after_polls=5)
    cpu = machine.cpu(host)
    assert run(cpu, until=lambda: machine.mark(0) == 1) == STOPPED
    assert machine.mark(0) == 1 and host.acks == [abi.TIMER_IRQ]
    eip, cs, eflags, irq_enabled = (machine.mark(n) for n in (1, 2, 3, 4))
    assert image["spin"] <= eip < image["handler"]
    assert cs == abi.LGUEST_KERNEL_CS and eflags & abi.IRQ_ENABLED_ON
    assert irq_enabled == 0                  # an interrupt gate turned them off
    assert machine.mark(5) > 0               # it really was computing
    assert host.kills == []


def test_halt_wakes_on_interrupt_with_interrupts_forced_on(machine_for):
    machine, image = machine_for(r"""
    INIT
    IDT 33, handler, 0xF                    /* a trap gate: irq_enabled stays as it is */
    movl $0, IRQ_ENABLED
    HCALL 10
after_halt:
    CRASH "no interrupt"
handler:
    SAVE_FRAME
    CRASH "woken"
""")

    def on_halt(host):
        host.pending |= 1 << 1

    host = FakeHost(machine.ram, on_halt=on_halt)
    assert run(machine.cpu(host)) == "CRASH: woken"
    assert host.acks == [1]
    assert machine.mark(1) == image["after_halt"]
    assert machine.mark(3) & abi.IRQ_ENABLED_ON and machine.mark(4) == abi.IRQ_ENABLED_ON


def test_halted_guest_sleeps_again_while_only_blocked_irqs_are_pending(machine_for):
    machine, _ = machine_for(r"""
    INIT
    IDT 33, handler, 0xE
    IDT 34, handler, 0xE
    movl $1 << 2, BLOCKED
    HCALL 10
    CRASH "no interrupt"
handler:
    SAVE_FRAME
    CRASH "woken"
""")
    halts = []

    def on_halt(host):
        halts.append(host.pending)
        host.pending |= (1 << 2) if len(halts) == 1 else (1 << 1)

    host = FakeHost(machine.ram, on_halt=on_halt)
    assert run(machine.cpu(host)) == "CRASH: woken"
    assert halts == [0, 1 << 2]              # the blocked irq did not wake it
    assert host.acks == [1] and host.pending == 1 << 2


def test_blocked_and_disabled_interrupts_wait(machine_for):
    machine, image = machine_for(r"""
    INIT
    IDT 34, handler, 0xE
    movl $0, %esi                           /* irq_enabled == 0 (RAM starts zeroed) */
1:  HCALL 0
    incl %esi
    cmpl $50, %esi
    jb 1b
    movl %esi, MARK + 20
    movl $1 << 2, BLOCKED                   /* enabled, but irq 2 blocked */
    movl $0x200, IRQ_ENABLED
    movl $0, %esi
2:  HCALL 0
    incl %esi
    cmpl $50, %esi
    jb 2b
    movl %esi, MARK + 24
    movl $0, BLOCKED
spin:
    jmp spin
handler:
    SAVE_FRAME
    CRASH "irq"
""")
    host = FakeHost(machine.ram, raise_irqs=1 << 2, after_polls=0)
    assert run(machine.cpu(host)) == "CRASH: irq"
    assert (machine.mark(5), machine.mark(6)) == (50, 50)
    assert machine.mark(1) == image["spin"] and host.acks == [2]


def test_interrupt_without_a_gate_stays_pending(machine_for):
    machine, _ = machine_for(r"""
    INIT
    movl $0x200, IRQ_ENABLED
    HCALL 0
    HCALL 0
    CRASH "no gate"
""")
    host = FakeHost(machine.ram, raise_irqs=1 << 3, after_polls=0)
    assert run(machine.cpu(host)) == "CRASH: no gate"
    assert host.acks == [] and host.pending == 1 << 3


def test_noirq_window_is_respected(machine_for):
    machine, image = machine_for(r"""
    movl $noirq_start, NOIRQ_START
    movl $noirq_end, NOIRQ_END
    INIT
    IDT 32, handler, 0xE
    movl $0, %esi
noirq_start:
    movl $0x200, IRQ_ENABLED
1:  HCALL 0
    incl %esi
    cmpl $100, %esi
    jb 1b
noirq_end:
    movl %esi, MARK + 20
spin:
    jmp spin
handler:
    SAVE_FRAME
    CRASH "irq"
""")
    host = FakeHost(machine.ram, raise_irqs=1, after_polls=0)
    assert run(machine.cpu(host)) == "CRASH: irq"
    assert machine.mark(5) == 100
    assert image["noirq_end"] <= machine.mark(1) <= image["spin"]


def test_stop_from_another_thread(machine_for):
    machine, _ = machine_for(r"""
spin:
    jmp spin
""")
    host = FakeHost(machine.ram)
    cpu = machine.cpu(host)
    started = time.monotonic()
    assert run(cpu, until=lambda: time.monotonic() - started > 0.05) == STOPPED
    assert time.monotonic() - started < 1.0
    cpu.stop()                               # harmless once it has stopped


def test_slices_never_repeat_or_skip_an_instruction(machine_for):
    """Thousands of slice ends in one second: a memory counter and a register counter
    incremented side by side must stay together (timed stops from another thread made
    Unicorn run instructions twice; counted slices do not)."""
    machine, _ = machine_for(r"""
    xorl %%ecx, %%ecx
count:
    incl %(mark)#x
    incl %%ecx
    movl %%ecx, %(mark4)#x
    jmp count
""" % {"mark": MARK + PAGE_OFFSET, "mark4": MARK + PAGE_OFFSET + 4})
    cpu = machine.cpu(FakeHost(machine.ram), slice_instructions=300)
    started = time.monotonic()
    run(cpu, until=lambda: time.monotonic() - started > 0.5)
    in_memory, in_register = machine.mark(0), machine.mark(1)
    assert in_memory > 100_000
    assert in_memory - in_register in (0, 1)      # 1: stopped between the two increments


# --- lguest's do_hypercalls: the async ring first, eax -----------------------------------

def test_the_async_ring_is_drained_before_a_call_the_cpu_serves(machine_for):
    machine, _ = machine_for(r"""
    INIT
""" + QUEUE_SET_STACK % dict(ss=0x69) + r"""
    HCALL 7, 0x69, 0xC0060000, 1            /* served here, but after the queued one */
    CRASH "ring"
""")
    host = FakeHost(machine.ram)
    cpu = machine.cpu(host)
    assert run(cpu) == "CRASH: ring"
    assert cpu.stack == (0x69, 0xC0060000, 1)
    # The Host drained the ring (with the CPU's FLUSH_ASYNC) before the served call ran.
    assert [c[0] for c in host.calls] == [abi.LHCALL_LGUEST_INIT, abi.LHCALL_FLUSH_ASYNC,
                                         abi.LHCALL_CRASH]
    assert host.ring_seen[0][0] == abi.HCALL_STATUS_PENDING


def test_a_bad_queued_call_kills_before_a_served_call_runs(machine_for):
    machine, _ = machine_for(r"""
    INIT
""" + QUEUE_SET_STACK % dict(ss=0x68) + r"""
    HCALL 5
    movl $1, MARK
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == abi.MSG_BAD_STACK_SEGMENT % 0x68
    assert machine.mark(0) == 0 and [c[0] for c in host.calls] == [abi.LHCALL_LGUEST_INIT]


def test_the_async_ring_is_drained_at_every_exit(machine_for):
    """No hypercall at all after queueing: the next slice end drains the ring."""
    machine, _ = machine_for(r"""
    INIT
""" + QUEUE_SET_STACK % dict(ss=0x68) + r"""
spin:
    incl MARK
    jmp spin
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host, slice_instructions=1000)) == abi.MSG_BAD_STACK_SEGMENT % 0x68
    assert 0 < machine.mark(0) <= 1000


def test_eax_keeps_the_call_number_except_after_bind_dma(machine_for):
    machine, _ = machine_for(r"""
    INIT
    movl %eax, MARK
    HCALL 5, 1                              /* FLUSH_TLB, served here */
    movl %eax, MARK + 4
    HCALL 9, 1000000                        /* SET_CLOCKEVENT, the Host's */
    movl %eax, MARK + 8
    HCALL 12, 0x1000, 0x2000, 0x801         /* BIND_DMA: its result */
    movl %eax, MARK + 12
    CRASH "eax"
""")
    host = FakeHost(machine.ram, results={abi.LHCALL_SET_CLOCKEVENT: 0x777,
                                          abi.LHCALL_BIND_DMA: 0x1234})
    assert run(machine.cpu(host)) == "CRASH: eax"
    assert [machine.mark(n) for n in range(4)] == [abi.LHCALL_LGUEST_INIT,
                                                   abi.LHCALL_FLUSH_TLB,
                                                   abi.LHCALL_SET_CLOCKEVENT, 0x1234]


# --- traps: reflected into the guest's IDT (deliver_trap) ---------------------------------

def test_a_page_fault_reaches_the_guests_handler_with_cr2_and_its_error_code(machine_for):
    """Two faults in a row: the handler reads cr2 from lguest_data, maps the page and returns
    to the faulting instruction, which then succeeds (read, then a write to a read-only
    page: error codes 0 and 3)."""
    machine, image = machine_for(r"""
    INIT
    IDT 14, pf_handler, 0xE
    movl $0x5a5a5a5a, PAGE_OFFSET + 0xB0010
    movl $0, PAGE_OFFSET + %(pte)#x            /* page 0xB0: not present */
    HCALL 14, %(pgdir)#x, PAGE_OFFSET+0xB0000, 0
    movl $0x200, IRQ_ENABLED
read:
    movl PAGE_OFFSET + 0xB0010, %%eax
    movl %%eax, MARK + 4
    movl $0xB0005, PAGE_OFFSET + %(pte)#x      /* present, read-only */
    HCALL 14, %(pgdir)#x, PAGE_OFFSET+0xB0000, 0xB0005
write:
    movl $0x77, PAGE_OFFSET + 0xB0020
    movl PAGE_OFFSET + 0xB0020, %%eax
    movl %%eax, MARK + 8
    CRASH "carried on"

pf_handler:                                    /* slot n at MARK + 16n + 16 */
    incl MARK
    movl MARK, %%esi
    shll $4, %%esi
    movl (%%esp), %%eax
    movl %%eax, MARK+16(%%esi)                 /* error code */
    movl 4(%%esp), %%eax
    movl %%eax, MARK+20(%%esi)                 /* eip */
    movl CR2, %%eax
    movl %%eax, MARK+24(%%esi)
    movl IRQ_ENABLED, %%eax
    movl %%eax, MARK+28(%%esi)
    movl $0xB0007, PAGE_OFFSET + %(pte)#x      /* map it, writable */
    HCALL 14, %(pgdir)#x, PAGE_OFFSET+0xB0000, 0xB0007
    addl $4, %%esp                              /* pop the error code */
    iret
""" % dict(pte=PTES + 4 * 0xB0, pgdir=PGDIR))
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: carried on"
    assert machine.mark(0) == 2
    assert (machine.mark(1), machine.mark(2)) == (0x5a5a5a5a, 0x77)
    first, second = ([machine.mark(n) for n in range(4 * k + 4, 4 * k + 8)] for k in (1, 2))
    assert first == [0, image["read"], PAGE_OFFSET + 0xB0010, 0]    # interrupt gate: irqs off
    assert second == [3, image["write"], PAGE_OFFSET + 0xB0020, 0]  # present | write
    assert host.kills == []


def test_a_trap_gate_gets_no_error_code_and_keeps_interrupts_on(machine_for):
    machine, image = machine_for(r"""
    INIT
    IDT 0, de_handler, 0xF
    movl $0x200, IRQ_ENABLED
    movl $7, %eax
    xorl %edx, %edx
    xorl %ecx, %ecx
divide:
    divl %ecx
    movl $1, MARK + 12
    CRASH "divided"
de_handler:
    movl (%esp), %eax
    movl %eax, MARK
    movl 8(%esp), %eax
    movl %eax, MARK + 4
    movl IRQ_ENABLED, %eax
    movl %eax, MARK + 8
    addl $2, (%esp)                         /* past the two bytes of divl %ecx */
    iret
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: divided"
    assert machine.mark(0) == image["divide"]
    assert machine.mark(1) & abi.IRQ_ENABLED_ON and machine.mark(2) == abi.IRQ_ENABLED_ON
    assert machine.mark(3) == 1


@pytest.mark.parametrize("esp, unmapped, fault_at", [
    (0x70000, None, None),                  # the frame in one page
    (0x70004, None, None),                  # across two: eip and cs below 0x70000, eflags above
    (0x70004, 0x70, 0x70000),               # ... and the upper page is not there
    (0x70000, 0x6F, 0x6FFF4),               # the whole frame in a page that is not there
])
def test_a_trap_frame_is_pushed_within_or_across_pages_or_kills_where_it_cannot_be(
        machine_for, esp, unmapped, fault_at):
    unmap = "" if unmapped is None else (
        "movl $0, PAGE_OFFSET + %#x\n    HCALL 14, %#x, PAGE_OFFSET+%#x, 0"
        % (PTES + 4 * unmapped, PGDIR, unmapped << 12))
    machine, image = machine_for(r"""
    INIT
    IDT 0, de_handler, 0xF
    %s
    movl $PAGE_OFFSET + %#x, %%esp
    movl $7, %%eax
    xorl %%edx, %%edx
    xorl %%ecx, %%ecx
divide:
    divl %%ecx
    CRASH "divided"
de_handler:
    movl (%%esp), %%eax
    movl %%eax, MARK
    movl 4(%%esp), %%eax
    movl %%eax, MARK + 4
    movl 8(%%esp), %%eax
    movl %%eax, MARK + 8
    movl %%esp, MARK + 12
    addl $2, (%%esp)
    iret
""" % (unmap, esp))
    host = FakeHost(machine.ram)
    reason = run(machine.cpu(host))
    if fault_at is None:
        assert reason == "CRASH: divided"
        assert machine.mark(0) == image["divide"] and machine.mark(1) == abi.LGUEST_KERNEL_CS
        assert machine.mark(2) & 0x2                # eflags: bit 1 is always set
        assert machine.mark(3) == PAGE_OFFSET + esp - 12
    else:
        assert reason == abi.MSG_GUEST_FAULT % (
            image["divide"], "page fault at %#010x pushing trap 0" % (PAGE_OFFSET + fault_at))
        assert host.kills == [reason]


def test_an_invalid_opcode_reaches_the_guests_handler(machine_for):
    machine, image = machine_for(r"""
    INIT
    IDT 6, ud_handler, 0xF
bad:
    ud2
    CRASH "after ud2"
ud_handler:
    movl (%esp), %eax
    movl %eax, MARK
    addl $2, (%esp)
    iret
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: after ud2"
    assert machine.mark(0) == image["bad"]


GP_HANDLER = r"""
gp_handler:                                 /* slot n at MARK + 8n + 40: error code, eip */
    incl MARK + 40
    movl MARK + 40, %esi
    shll $3, %esi
    movl (%esp), %eax
    movl %eax, MARK+40(%esi)
    movl 4(%esp), %eax
    movl %eax, MARK+44(%esi)
    movl 4(%esp), %ebx                      /* step over the int: `int $n` is 2 bytes */
    cmpb $0xcd, (%ebx)
    jne 1f
    incl 4(%esp)
1:  incl 4(%esp)
    addl $4, %esp
    iret
"""


def test_int_n_reaches_a_gate_only_where_lguest_let_the_cpu_go_direct(machine_for):
    """int $0x80 to a DPL-3 trap gate is the guest's; int $0x21 (an interrupt vector) and
    int3 to a DPL-0 gate hit lguest's own gates and arrive as #GP naming the vector."""
    machine, image = machine_for(r"""
    INIT
    IDT 0x80, syscall_handler, 0xF, 3
    IDT 3, never, 0xF, 0
    IDT 13, gp_handler, 0xE
    movl $0x200, IRQ_ENABLED
    int $0x80
after_syscall:
int21:
    int $0x21
breakpoint:
    int3
    CRASH "ints"
syscall_handler:
    movl (%esp), %eax
    movl %eax, MARK
    iret
never:
    CRASH "a DPL-0 gate taken from ring 1"
""" + GP_HANDLER)
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: ints"
    assert machine.mark(0) == image["after_syscall"]
    assert machine.mark(10) == 2
    assert (machine.mark(12), machine.mark(13)) == ((0x21 << 3) | 2, image["int21"])
    assert (machine.mark(14), machine.mark(15)) == ((3 << 3) | 2, image["breakpoint"])


def test_a_trap_without_a_handler_kills_with_lguests_message(machine_for):
    machine, image = machine_for(r"""
    INIT
    IDT 14, pf_handler, 0xE                 /* a handler, but not for this trap */
fault:
    ud2
pf_handler:
    CRASH "wrong handler"
""")
    host = FakeHost(machine.ram)
    reason = run(machine.cpu(host))
    assert reason == "unhandled trap 6 at %#x (0)" % image["fault"]
    assert host.kills == [reason]


# --- in/out: lguest's emulate_insn ---------------------------------------------------------

def test_in_reads_all_ones_and_out_is_skipped(machine_for):
    machine, _ = machine_for(r"""
    INIT
    movl $0x12345678, %eax
    inb $0x60, %al                          /* lguest: eax |= 0xFFFF */
    movl %eax, MARK
    movl $0x12345678, %eax
    movw $0x3f8, %dx
    inw %dx, %ax                            /* odd opcode: all of eax */
    movl %eax, MARK + 4
    movl $0x12345678, %eax
    inl %dx, %eax
    movl %eax, MARK + 8
    movl $0x12345678, %eax
    outb %al, $0x80
    outl %eax, %dx
    movl %eax, MARK + 12
    CRASH "io"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: io"
    assert [machine.mark(n) for n in range(4)] == [0x1234FFFF, 0xFFFFFFFF, 0xFFFFFFFF,
                                                   0x12345678]


@pytest.mark.parametrize("instruction, length", [("rep insb", 2), ("outsl", 1)])
def test_string_io_is_a_general_protection_fault_for_the_guest(machine_for, instruction,
                                                               length):
    machine, image = machine_for(r"""
    INIT
    IDT 13, gp_handler, 0xE
    movl $PAGE_OFFSET + 0xB0000, %%edi
    movl $PAGE_OFFSET + 0xB0000, %%esi
    movl $3, %%ecx
io:
    %s
    movl %%edi, MARK + 8
    movl %%esi, MARK + 12
    movl %%ecx, MARK + 16
    CRASH "string io"
gp_handler:
    movl (%%esp), %%eax
    movl %%eax, MARK
    movl 4(%%esp), %%eax
    movl %%eax, MARK + 4
    addl $%d, 4(%%esp)
    addl $4, %%esp
    iret
""" % (instruction, length))
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: string io"
    assert (machine.mark(0), machine.mark(1)) == (0, image["io"])
    # The instruction never began: its registers are as they were.
    assert [machine.mark(n) for n in (2, 3, 4)] == [PAGE_OFFSET + 0xB0000] * 2 + [3]


def test_string_io_without_a_gp_handler_kills(machine_for):
    machine, image = machine_for(r"""
    INIT
io:
    insb
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == unhandled(abi.TRAP_GENERAL_PROTECTION, image["io"], 0)


# --- TS: lazy FPU switching ------------------------------------------------------------

def test_ts_makes_the_next_fpu_instruction_trap_into_the_guest(machine_for):
    machine, image = machine_for(r"""
    INIT
    IDT 7, nm_handler, 0xE
    HCALL 8, 1                              /* TS */
fpu:
    fld1                                    /* #NM; the handler clears TS; again */
    movl $1, MARK + 4
    fld1                                    /* TS is clear: no trap */
    CRASH "fpu"
nm_handler:
    incl MARK
    movl (%esp), %eax
    movl %eax, MARK + 8
    HCALL 8, 0
    iret
""")
    host = FakeHost(machine.ram)
    cpu = machine.cpu(host)
    assert run(cpu) == "CRASH: fpu"
    assert (machine.mark(0), machine.mark(1), machine.mark(2)) == (1, 1, image["fpu"])
    assert cpu.ts == 0


def test_ts_without_a_handler_for_7_kills(machine_for):
    machine, image = machine_for(r"""
    INIT
    HCALL 8, 1
fpu:
    fninit
    CRASH "not reached"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == unhandled(abi.TRAP_DEVICE_NOT_AVAILABLE, image["fpu"], 0)


def test_fpu_without_ts_runs_untrapped(machine_for):
    machine, _ = machine_for(r"""
    INIT
    fld1
    fistpl MARK
    CRASH "fpu"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: fpu"
    assert machine.mark(0) == 1


# --- the Waker's BREAK ----------------------------------------------------------------------

def test_a_break_is_answered_at_a_slice_end_without_a_guest_hypercall(machine_for):
    """lguest serviced a BREAK at least every host tick: a guest that only computes still
    gets its input (the reply to the CPU's FLUSH_ASYNC carries it)."""
    machine, _ = machine_for(r"""
    INIT
spin:
    incl MARK
    jmp spin
""")

    class Host(FakeHost):
        def hypercall(self, call, arg1, arg2, arg3):
            result = super().hypercall(call, arg1, arg2, arg3)
            self.breaking = call == abi.LHCALL_LGUEST_INIT    # the Waker, just after boot
            return result

    host = Host(machine.ram)
    cpu = machine.cpu(host, slice_instructions=1000)
    assert run(cpu, until=lambda: host.breaks_answered == 1) == STOPPED
    assert host.breaks_answered == 1
    assert [c[0] for c in host.calls] == [abi.LHCALL_LGUEST_INIT, abi.LHCALL_FLUSH_ASYNC]


def test_a_gate_the_guest_took_back_is_no_handler(machine_for):
    """LOAD_IDT_ENTRY without the present bit empties the entry (set_trap), and a trap there
    is unhandled; the gate is checked when the trap comes, not when it was loaded."""
    machine, image = machine_for(r"""
    INIT
    IDT 13, gp_handler, 0xE
    HCALL 6, 13, 0, 0                       /* not present */
fault:
    cli
gp_handler:
    CRASH "a gate that is not there"
""")
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == unhandled(abi.TRAP_GENERAL_PROTECTION, image["fault"], 0)


def test_in_below_page_offset_is_not_emulated(machine_for):
    """emulate_insn() only decoded kernel code (EIP >= page_offset): `in` anywhere else is the
    guest's #GP. The guest maps its own code at physical = virtual too and runs it there."""
    machine, image = machine_for(r"""
    INIT
    IDT 13, gp_handler, 0xE
    movl $%(ptes)#x | 7, PAGE_OFFSET + %(pgdir)#x   /* PDE 0: the first 4 MiB, 1:1 */
    HCALL 15, %(pgdir)#x, 0
    movl $low - PAGE_OFFSET, %%eax
    jmp *%%eax
low:
    inb $0x60, %%al
    CRASH "in emulated below page_offset"
gp_handler:
    movl (%%esp), %%eax
    movl %%eax, MARK
    movl 4(%%esp), %%eax
    movl %%eax, MARK + 4
    CRASH "gp"
""" % dict(ptes=PTES, pgdir=PGDIR))
    host = FakeHost(machine.ram)
    assert run(machine.cpu(host)) == "CRASH: gp"
    assert (machine.mark(0), machine.mark(1)) == (0, image["low"] - PAGE_OFFSET)
