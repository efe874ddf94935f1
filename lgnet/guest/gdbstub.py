"""gdb into a Unicorn guest: a GDB remote-protocol server for one guest's CPU.

What this room is for: `lgnet launch --gdb PORT` (and `gdb: PORT` in a scenario) lets gdb
`target remote :PORT` into a running guest of real i386 code — break on a function, step,
read registers and memory, detach — while every other guest and the broker run on. QEMU
has its gdbstub; lguest had none (its guests ran on the real CPU); this is lgnet's.

Why not udbserver. `pip install udbserver` gives a wheel here (0.3.0, manylinux, for
Unicorn 2), but it does not fit lgnet's run loop:
- udbserver() blocks the emulating thread in accept() until gdb comes (at once, or when a
  start address is reached) and then runs the whole gdb session inside a Unicorn hook. A
  running guest cannot be attached to later, nor again after a detach, and a guest asleep in
  HALT — blocked in the broker, not in Unicorn — cannot be stopped at all;
- it reads and writes memory with uc_mem_read/uc_mem_write, which take Unicorn's
  *physical* addresses, while gdb's are the guest's virtual ones (0xc01..., through its own
  page tables): `x/4x $esp` fails;
- it keeps a code hook on every instruction and a read hook on all memory for as long as it
  is loaded, and listens on 0.0.0.0 (this server listens on 127.0.0.1 only).
So this is the smallest server that does fit, on GuestCpu's debugger door (cpu.py, §8).

Rules of this file:
* Two threads, one owner each. The server thread owns the sockets; the run loop's thread
  owns Unicorn. Every register and memory access is posted to the run loop's thread while
  it holds the guest (hold()), and done there.
* The guest stops only at rest: at the end of a run slice (a stop request takes effect
  within one slice, a few milliseconds) or at a breakpoint, whose code hook emu_stop()s from
  inside Unicorn. A guest asleep in the Host's HALT is kicked out with BREAK by the
  Launcher's Waker, which watches wake_fd as lguest's Waker watched input.
* Breakpoints (Z0 and Z1 alike) are code hooks on one address each: guest memory is never
  patched, so the guest and the Host read its text unchanged.
* A guest held in gdb is a halted guest to the Host: the broker goes on filling its receive
  buffers (frames to it drop once they are full), raising its interrupts in its control
  page and running its timer; it takes them when gdb lets go. Nothing times out.

The protocol (gdb's "Remote Protocol" appendix): packets `$data#checksum`, each answered
with `+` (or `-`: send it again); a 0x03 byte interrupts a running guest. Served:
qSupported, qXfer:features:read (an i386 target description: the core registers and the
x87's, in gdb's numbering), ?, g/G, p/P, m/M, c/C, s/S, Z0/z0 and Z1/z1, D, k, vKill and
the thread queries of a one-CPU target. Everything else gets the empty reply, which gdb
reads as "not supported" (watchpoints; vCont, for which gdb falls back to c and s).
"""
from __future__ import annotations

import os
import queue
import select
import socket
import struct
import threading

from unicorn import UcError
from unicorn import x86_const as x86

from lgnet import abi
from lgnet.errors import LgnetError
from lgnet.guest.cpu import DEBUG_CONTINUE, DEBUG_KILL, DEBUG_STEP, STOPPED, GuestCpu

LISTEN_ADDRESS = "127.0.0.1"
PACKET_SIZE = 0x4000
INTERRUPT = 0x03                     # gdb's ^C, outside any packet
JOIN_SECONDS = 1.0

# Stop replies: the signal gdb reports, and why.
STOP_ATTACHED = "T05"                # SIGTRAP: stopped because gdb arrived
STOP_STEPPED = "T05"                 # SIGTRAP: one instruction done
STOP_INTERRUPTED = "T02"             # SIGINT: gdb's ^C
STOP_BREAKPOINT = {0: "T05swbreak:;", 1: "T05hwbreak:;"}
EXIT_POWER_DOWN = "W00"              # the guest powered down: "exited normally"
EXIT_KILLED = "X09"                  # killed (by the Host, or from gdb): SIGKILL
EXIT_LAUNCHER_GONE = "X0f"           # the Launcher was told to stop: SIGTERM
ERROR_FAULT = "E0e"                  # EFAULT: no memory there
ERROR_INVALID = "E16"                # EINVAL: no such register, or a malformed packet

_U32 = struct.Struct("<I")
_X87_REGISTER = struct.Struct("<QH")         # mantissa, sign and exponent: 80 bits

_CORE = [("eax", x86.UC_X86_REG_EAX, "int32"), ("ecx", x86.UC_X86_REG_ECX, "int32"),
         ("edx", x86.UC_X86_REG_EDX, "int32"), ("ebx", x86.UC_X86_REG_EBX, "int32"),
         ("esp", x86.UC_X86_REG_ESP, "data_ptr"), ("ebp", x86.UC_X86_REG_EBP, "data_ptr"),
         ("esi", x86.UC_X86_REG_ESI, "int32"), ("edi", x86.UC_X86_REG_EDI, "int32"),
         ("eip", x86.UC_X86_REG_EIP, "code_ptr"), ("eflags", x86.UC_X86_REG_EFLAGS, "i386_eflags"),
         ("cs", x86.UC_X86_REG_CS, "int32"), ("ss", x86.UC_X86_REG_SS, "int32"),
         ("ds", x86.UC_X86_REG_DS, "int32"), ("es", x86.UC_X86_REG_ES, "int32"),
         ("fs", x86.UC_X86_REG_FS, "int32"), ("gs", x86.UC_X86_REG_GS, "int32")]
_X87 = [("st%d" % i, getattr(x86, "UC_X86_REG_FP%d" % i), "i387_ext") for i in range(8)]
_X87_CONTROL = [("fctrl", x86.UC_X86_REG_FPCW), ("fstat", x86.UC_X86_REG_FPSW),
                ("ftag", x86.UC_X86_REG_FPTAG), ("fiseg", x86.UC_X86_REG_FCS),
                ("fioff", x86.UC_X86_REG_FIP), ("foseg", x86.UC_X86_REG_FDS),
                ("fooff", x86.UC_X86_REG_FDP), ("fop", x86.UC_X86_REG_FOP)]
# gdb's i386 register numbers, in order: (name, Unicorn register, bits, type, group).
REGISTERS = ([(name, reg, 32, type_, "general") for name, reg, type_ in _CORE]
             + [(name, reg, 80, type_, "float") for name, reg, type_ in _X87]
             + [(name, reg, 32, "int", "float") for name, reg in _X87_CONTROL])

_EFLAGS = ["CF", "", "PF", None, "AF", None, "ZF", "SF", "TF", "IF", "DF", "OF", None, None,
           "NT", None, "RF", "VM", "AC", "VIF", "VIP", "ID"]


def target_description() -> str:
    """target.xml: gdb's own feature name for i386, so gdb checks and numbers the registers
    as its i386 architecture expects (eax..gs, st0-7, fctrl..fop)."""
    flags = "".join('<field name="%s" start="%d" end="%d"/>' % (name, bit, bit)
                    for bit, name in enumerate(_EFLAGS) if name is not None)
    regs = "".join('<reg name="%s" bitsize="%d" type="%s" group="%s"/>' % (name, bits, type_,
                                                                           group)
                   for name, _, bits, type_, group in REGISTERS)
    return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
            '<target version="1.0"><architecture>i386</architecture>'
            '<feature name="org.gnu.gdb.i386.core">'
            '<flags id="i386_eflags" size="4">%s</flags>%s</feature></target>' % (flags, regs))


class _Link:
    """One gdb connection: packets in (checked, acknowledged), replies out."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.last = b""

    def fill(self) -> bool:
        """More bytes from gdb; False when it has gone."""
        try:
            data = self.sock.recv(PACKET_SIZE)
        except OSError:
            return False
        self.buffer += data
        return bool(data)

    def take_interrupt(self) -> bool:
        """Was there a ^C among the bytes so far (outside packets: gdb is waiting)?"""
        if INTERRUPT not in self.buffer:
            return False
        self.buffer = self.buffer.replace(bytes([INTERRUPT]), b"")
        return True

    def packet(self) -> str | None:
        """The next packet, acknowledged; None when gdb has gone. Acks and interrupts between
        packets are dropped (a `-` sends the last reply again)."""
        while True:
            start = self.buffer.find(b"$")
            if b"-" in (self.buffer if start < 0 else self.buffer[:start]) and self.last:
                self.sock.sendall(self.last)
            if start < 0:
                self.buffer.clear()
            else:
                del self.buffer[:start]
                end = self.buffer.find(b"#")
                if end >= 0 and len(self.buffer) >= end + 3:
                    data = bytes(self.buffer[1:end])
                    check = bytes(self.buffer[end + 1:end + 3])
                    del self.buffer[:end + 3]
                    if check != b"%02x" % (sum(data) & 0xFF):
                        self.sock.sendall(b"-")
                        continue
                    self.sock.sendall(b"+")
                    return data.decode("latin-1")
            if not self.fill():
                return None

    def send(self, reply: str) -> None:
        body = bytearray()
        for byte in reply.encode("latin-1"):
            if byte in b"#$}*":
                body += bytes([ord("}"), byte ^ 0x20])
            else:
                body.append(byte)
        self.last = b"$" + bytes(body) + b"#%02x" % (sum(body) & 0xFF)
        self.sock.sendall(self.last)


class GdbServer:
    """The gdb server of one guest (cpu.Debugger). Listens from construction on; serves one
    gdb at a time, as often as gdb comes, until the guest ends."""

    def __init__(self, port: int, say=None):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((LISTEN_ADDRESS, port))
            self._listener.listen(1)
        except OSError as exc:
            self._listener.close()
            raise LgnetError("--gdb %d: cannot listen on %s:%d (%s)"
                             % (port, LISTEN_ADDRESS, port, exc.strerror)) from None
        self.port = self._listener.getsockname()[1]
        self._say = say or (lambda text: None)
        self.wants_stop = False
        self._cpu: GuestCpu | None = None
        self._thread: threading.Thread | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._events_r, self._events_w = os.pipe()     # run loop -> server: held / ended
        self._wake_r, self._wake_w = os.pipe()         # server -> the Waker: kick it out of HALT
        self._fds = [self._events_r, self._events_w, self._wake_r, self._wake_w]
        self._held = False                              # the server's view
        self._ended: str | None = None
        self._stop_reply = STOP_ATTACHED
        self._breakpoints: dict[int, tuple[int, int]] = {}     # address -> (hook, Z kind)
        self._step_from: int | None = None
        self._skip_once: int | None = None

    # --- the Launcher's side ----------------------------------------------------------------

    @property
    def wake_fd(self) -> int:
        """For the Waker: readable from a stop request until the guest is held, so the Waker
        goes on kicking it out of HALT (with BREAK) until it is. (Drained any earlier — when
        the Launcher services the BREAK — a kick taken by some other hypercall could leave
        the guest asleep in its next HALT with the request unseen.)"""
        return self._wake_r

    def close(self) -> None:
        """Idempotent."""
        self._shut_listener()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    # --- the run loop's side (cpu.Debugger), on its thread -----------------------------------

    def attach(self, cpu: GuestCpu) -> None:
        self._cpu = cpu
        self._thread = threading.Thread(target=self._serve, name="lgnet-gdb", daemon=True)
        self._thread.start()

    def hold(self) -> str:
        """Serve the server thread's calls until it lets the guest go."""
        self.wants_stop = False
        self._step_from = self._skip_once = None
        while select.select([self._wake_r], [], [], 0)[0]:
            os.read(self._wake_r, 64)           # the kicks have done their job
        os.write(self._events_w, b"h")
        while True:
            call, answer = self._calls.get()
            if answer is not None:
                answer.put(call())
                continue
            cpu = self._cpu
            pc = cpu.unicorn.reg_read(x86.UC_X86_REG_EIP)
            if call == DEBUG_STEP:
                self._step_from = pc
                self._stop_reply = STOP_STEPPED
            elif call == DEBUG_CONTINUE and pc in self._breakpoints and not cpu.halted:
                self._skip_once = pc            # its first instruction is the one held at
            return call

    def ended(self, reason: str | None) -> None:
        self._ended = reason if reason is not None else ""
        try:
            os.write(self._events_w, b"e")
        except OSError:
            pass
        self._shut_listener()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)

    def _on_breakpoint(self, uc, address: int, _size: int, _user) -> None:
        if address == self._step_from:
            return                              # the instruction being stepped
        if address == self._skip_once:
            self._skip_once = None
            return
        self._skip_once = None
        entry = self._breakpoints.get(address)
        if entry is None:
            return                              # removed while Unicorn ran its block
        self._stop_reply = STOP_BREAKPOINT[entry[1]]
        self.wants_stop = True
        uc.emu_stop()                           # before this instruction runs

    # --- the server thread --------------------------------------------------------------------

    def _shut_listener(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)     # wakes accept()
        except OSError:
            pass
        self._listener.close()

    def _serve(self) -> None:
        while self._ended is None:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._say("gdb connected from %s:%d" % peer)
                self._session(_Link(sock))
                self._say("gdb disconnected")

    def _session(self, link: _Link) -> None:
        """One gdb, from its arrival (the guest stops) to its detach, kill or departure."""
        self._request_stop(STOP_ATTACHED)
        if not self._wait_held():
            link.send(self._exit_reply())
            return
        try:
            while True:
                packet = link.packet()
                if packet is None:
                    break
                if not packet:
                    link.send("")
                    continue
                outcome = self._command(packet)
                if outcome is DEBUG_CONTINUE or outcome is DEBUG_STEP:
                    self._resume(outcome)
                    if not self._running(link):
                        return
                elif outcome is DEBUG_KILL or outcome is _VKILL:
                    if outcome is _VKILL:
                        link.send("OK")     # vKill is answered; k is not
                    self._resume(DEBUG_KILL)
                    return
                elif outcome is _DETACH:
                    link.send("OK")
                    break
                else:
                    link.send(outcome)
        except OSError:
            pass                                # the connection broke: gdb has gone
        self._let_go()

    def _running(self, link: _Link) -> bool:
        """Until the guest is held again (its stop reply sent: True), or it ended or gdb
        left (False). A ^C asks for a stop."""
        while True:
            if link.take_interrupt():           # it may have come with the resuming packet
                self._request_stop(STOP_INTERRUPTED)
            readable = select.select([link.sock, self._events_r], [], [])[0]
            if self._events_r in readable:
                if os.read(self._events_r, 1) == b"h":
                    self._held = True
                    link.send(self._stop_reply)
                    return True
                link.send(self._exit_reply())
                return False
            if not link.fill():
                self._let_go()
                return False

    def _request_stop(self, reply: str) -> None:
        self._stop_reply = reply
        self.wants_stop = True
        os.write(self._wake_w, b"k")            # a guest asleep in HALT needs the Waker

    def _wait_held(self) -> bool:
        """Until the run loop holds the guest (True), or the guest ended (False)."""
        if self._held:
            return True
        if self._ended is None and os.read(self._events_r, 1) == b"h":
            self._held = True
        return self._held

    def _resume(self, action: str) -> None:
        self._held = False
        self._calls.put((action, None))

    def _let_go(self) -> None:
        """gdb has gone: no breakpoint stays, and the guest runs on."""
        if self._ended is not None:
            return
        if not self._held:
            self._request_stop(self._stop_reply)
        if self._wait_held():
            self._on_cpu(self._clear_breakpoints)
            self._resume(DEBUG_CONTINUE)

    def _on_cpu(self, call):
        """call() on the run loop's thread, while it holds the guest."""
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self._calls.put((call, answer))
        return answer.get()

    def _exit_reply(self) -> str:
        if self._ended == abi.MSG_CRASH % abi.MSG_POWER_DOWN:
            return EXIT_POWER_DOWN
        return EXIT_LAUNCHER_GONE if self._ended in ("", STOPPED) else EXIT_KILLED

    # --- the commands (the guest is held) ---------------------------------------------------

    def _command(self, packet: str):
        """The reply to one packet, or what the guest does next."""
        handler, args = _COMMANDS.get(packet[0]), packet[1:]
        for prefix, query in _QUERIES:
            if packet.startswith(prefix):
                handler, args = query, packet[len(prefix):]
                break
        if handler is None:
            return ""
        try:
            return handler(self, args)
        except ValueError:
            return ERROR_INVALID

    def _supported(self, _features: str) -> str:
        return "PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+" % PACKET_SIZE

    def _features(self, args: str) -> str:
        annex, _, window = args.partition(":")
        if annex != "target.xml":
            return ERROR_INVALID
        offset, length = (int(x, 16) for x in window.split(","))
        text = target_description()
        chunk = text[offset:offset + length]
        return ("l" if offset + length >= len(text) else "m") + chunk

    def _stop_reason(self, _args: str) -> str:
        return self._stop_reply

    def _read_registers(self, _args: str) -> str:
        return self._on_cpu(lambda: "".join(_encode(self._cpu, r) for r in REGISTERS))

    def _write_registers(self, args: str) -> str:
        data = bytes.fromhex(args)

        def write():
            offset = 0
            for register in REGISTERS:
                size = register[2] // 8
                if offset + size > len(data):
                    break
                value = data[offset:offset + size].hex()
                if value != _encode(self._cpu, register):
                    _decode(self._cpu, register, data[offset:offset + size])
                offset += size
            return "OK"
        return self._on_cpu(write)

    def _read_register(self, args: str) -> str:
        number = int(args, 16)
        if number >= len(REGISTERS):
            return ERROR_INVALID
        return self._on_cpu(lambda: _encode(self._cpu, REGISTERS[number]))

    def _write_register(self, args: str) -> str:
        number, _, value = args.partition("=")
        number = int(number, 16)
        if number >= len(REGISTERS) or len(value) != REGISTERS[number][2] // 4:
            return ERROR_INVALID
        data = bytes.fromhex(value)
        return self._on_cpu(lambda: _decode(self._cpu, REGISTERS[number], data) or "OK")

    def _read_memory(self, args: str) -> str:
        address, length = (int(x, 16) for x in args.split(","))
        data = self._on_cpu(lambda: self._cpu.read_virtual(address, min(length, PACKET_SIZE // 2)))
        return data.hex() if data or not length else ERROR_FAULT

    def _write_memory(self, args: str) -> str:
        where, _, hexdata = args.partition(":")
        address, length = (int(x, 16) for x in where.split(","))
        data = bytes.fromhex(hexdata)
        if len(data) != length:
            return ERROR_INVALID
        done = self._on_cpu(lambda: self._cpu.write_virtual(address, data))
        return "OK" if done == length else ERROR_FAULT

    def _insert_breakpoint(self, args: str) -> str:
        kind, address = _breakpoint_args(args)
        if kind is None:
            return ""                           # watchpoints: not supported

        def insert():
            if address not in self._breakpoints:
                hook = self._cpu.add_code_hook(address, self._on_breakpoint)
                self._breakpoints[address] = (hook, kind)
            return "OK"
        return self._on_cpu(insert)

    def _remove_breakpoint(self, args: str) -> str:
        kind, address = _breakpoint_args(args)
        if kind is None:
            return ""

        def remove():
            entry = self._breakpoints.pop(address, None)
            if entry is not None:
                self._cpu.remove_code_hook(entry[0])
            return "OK"
        return self._on_cpu(remove)

    def _clear_breakpoints(self) -> None:
        for hook, _ in self._breakpoints.values():
            self._cpu.remove_code_hook(hook)
        self._breakpoints.clear()

    def _continue(self, args: str):
        return self._go(DEBUG_CONTINUE, args)

    def _continue_signal(self, args: str):
        return self._go(DEBUG_CONTINUE, args.partition(";")[2])    # the signal means nothing

    def _step(self, args: str):
        return self._go(DEBUG_STEP, args)

    def _step_signal(self, args: str):
        return self._go(DEBUG_STEP, args.partition(";")[2])

    def _go(self, action: str, address: str):
        if address:
            eip = int(address, 16) & abi.U32_MASK
            self._on_cpu(lambda: self._cpu.unicorn.reg_write(x86.UC_X86_REG_EIP, eip))
        return action

    def _detach(self, _args: str):
        return _DETACH

    def _kill(self, _args: str):
        return DEBUG_KILL

    def _ok(self, _args: str) -> str:
        return "OK"


_DETACH = object()
_VKILL = object()


def _breakpoint_args(args: str) -> tuple[int | None, int]:
    """Z/z arguments "TYPE,ADDR,KIND": (0 or 1 for a breakpoint, else None; the address)."""
    type_, address, _kind = args.split(",")[:3]
    return (int(type_) if type_ in ("0", "1") else None), int(address, 16)


def _encode(cpu: GuestCpu, register) -> str:
    _, reg, bits, _, _ = register
    value = cpu.unicorn.reg_read(reg)
    if bits == 80:
        return _X87_REGISTER.pack(*value).hex()
    return _U32.pack(value & abi.U32_MASK).hex()


def _decode(cpu: GuestCpu, register, data: bytes) -> str | None:
    """Write one register from gdb's bytes; an error reply if the CPU refused it."""
    _, reg, bits, _, _ = register
    value = _X87_REGISTER.unpack(data) if bits == 80 else _U32.unpack(data)[0]
    try:
        cpu.unicorn.reg_write(reg, value)
    except UcError:
        return ERROR_INVALID
    return None


_QUERIES = (
    ("qSupported", GdbServer._supported),
    ("qXfer:features:read:", GdbServer._features),
    ("qAttached", lambda self, _: "1"),         # attached to a running guest: detach on quit
    ("qC", lambda self, _: "QC1"),
    ("qfThreadInfo", lambda self, _: "m1"),
    ("qsThreadInfo", lambda self, _: "l"),
    ("qSymbol", GdbServer._ok),
    ("vKill", lambda self, _: _VKILL),
)
_COMMANDS = {
    "?": GdbServer._stop_reason,
    "g": GdbServer._read_registers, "G": GdbServer._write_registers,
    "p": GdbServer._read_register, "P": GdbServer._write_register,
    "m": GdbServer._read_memory, "M": GdbServer._write_memory,
    "Z": GdbServer._insert_breakpoint, "z": GdbServer._remove_breakpoint,
    "c": GdbServer._continue, "C": GdbServer._continue_signal,
    "s": GdbServer._step, "S": GdbServer._step_signal,
    "D": GdbServer._detach, "k": GdbServer._kill,
    "H": GdbServer._ok, "T": GdbServer._ok,
}
