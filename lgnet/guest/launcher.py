"""One guest's process: lgnet's Launcher.

Rules of this file: the launcher writes only its own guest's RAM and devices (rule 5); it can
only *ask* the Host. It follows the reference Launcher's order: devices from the command line
(in order; the console last), guest RAM, the kernel, descriptors just above RAM, boot header,
INITIALIZE, the Waker, then the run loop.

lgnet's differences, and why: guest RAM is a memfd the broker maps too (it has no name, so no
exit path can leave it in /dev/shm, and a full /dev/shm cannot touch it; it is sealed against
shrinking, which the broker insists on, so it cannot vanish under the broker); the Waker is a thread with its own
connection ATTACHed to the guest, as lguest's forked Waker shared the fd; and the guest's CPU
runs here, so "read() returned" is a hypercall reply (see guest/host.py). With --gdb, a gdb
server (guest/gdbstub.py) listens before the guest boots, and the Waker also watches its
requests to stop the guest: a gdb wanting a guest asleep in HALT is input like any other.

Its entry point is `python -m lgnet.guest.launcher` (what a lab starts, with its private
--die-with-parent); `lgnet launch` shares the user's options (add_arguments, config_from).
A guest's bad pointer is the guest's death, reported to the Host, never the user's error.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib
import mmap
import os
import signal
import sys
from dataclasses import dataclass, field

from lgnet import abi, netfile, process, timeline, wire
from lgnet.errors import USER_ERROR_EXIT, LgnetError
from lgnet.guest import devices as devs
from lgnet.guest import loader, script
from lgnet.guest.devices.console import ConsoleAbort
from lgnet.guest.images import resolve_kernel
from lgnet.guest.host import BrokerHost, GuestStopped
from lgnet.guest.physmem import InvalidAddress, PhysMap

PYTHON_KERNEL = "python:"
DEFAULT_PYTHON_KERNEL = "lgnet.guest.pvdriver"   # what a bare `python:` runs
GDB_LISTENING = "lgnet: gdb server on %s:%d (in gdb: target remote :%d)"
MAX_PORT = 65535                     # a TCP port; 0 asks for any free one
EXIT_KILLED = 1
DEVICE_KINDS = {abi.LGUEST_DEVICE_T_NET: "tun", abi.LGUEST_DEVICE_T_BLOCK: "block",
                abi.LGUEST_DEVICE_T_CONSOLE: "console"}     # a private page's name in a trace
MAX_MEM_MB = 1024

# The Launcher's device options; each adds one device, in the order given.
SHARENET = "sharenet"
TUNNET = "tunnet"
BLOCK = "block"
DEVICE_OPTIONS = (SHARENET, TUNNET, BLOCK)


@dataclass
class LaunchConfig:
    mem_mb: int
    kernel: str
    args: list[str] = field(default_factory=list)
    # (option, argument) in command-line order: ("sharenet", FILE), ("tunnet", IP|bridge:NAME|
    # fd:N), ("block", FILE). "The first network device on the command line is eth0."
    devices: list[tuple[str, str]] = field(default_factory=list)
    initrd: str | None = None
    verbose: bool = False
    broker: str | None = None
    console_input: bool = True
    gdb: int | None = None                # a gdb server's port (0: any free one)
    trace_stream: str | None = None       # where this guest's timeline events go
    trace: str | None = None              # `lgnet launch --trace FILE`: merged there at the end


class Launcher:
    def __init__(self, config: LaunchConfig, out=None):
        self.config = config
        self.out = out or sys.stdout.buffer
        self.mem = config.mem_mb * abi.MiB
        self.phys = PhysMap()
        self.devices = devs.DeviceList(self.mem)
        self.closers: list = []
        self.channel: wire.Channel | None = None
        self.waker: devs.Waker | None = None
        self.closing = False               # close() has begun: a late SIGTERM waits for it
        self.debugger = None                  # lgnet.guest.gdbstub.GdbServer, with --gdb
        self.trace = None                     # lgnet.guest.trace.GuestTrace, with --trace

    def verbose(self, text: str) -> None:
        if self.config.verbose:
            self.out.write(text.encode())
            self.out.flush()

    # --- set-up -------------------------------------------------------------------------

    def setup_devices(self) -> None:
        """One device per option, in command-line order, then the console."""
        cfg = self.config
        # The descriptor table holds LGUEST_MAX_DEVICES, the console included: refuse before
        # any net slot, TAP or file is taken.
        if len(cfg.devices) + 1 > abi.MAX_DEVICES:
            raise LgnetError(abi.MSG_TOO_MANY_DEVICES)
        for option, arg in cfg.devices:
            if option == SHARENET:
                net = netfile.NetFile.reserve(arg)
                self.closers.append(net.close)
                self.devices.add_net(net)
                self.verbose("device %d: net slot %d on %s\n" % (len(self.devices.list) - 1,
                                                                  net.slot, arg))
            elif option == TUNNET:
                self.devices.add_tun(arg, self.out, cfg.verbose)
            elif option == BLOCK:
                self.devices.add_block(arg)
            else:
                raise ValueError("unknown device option %r" % option)
        self.devices.add_console(self.out, cfg.console_input)

    def create_memory(self) -> tuple[mmap.mmap, int]:
        """Guest RAM + descriptor page + private device pages + control page, one memfd,
        sealed so it can never shrink: the broker maps it too, and a mapping whose file
        shrank under it would fault (SIGBUS) when the broker next copied a frame."""
        size = self.mem + abi.PAGE_SIZE * (2 + self.devices.private_pages())
        fd = os.memfd_create("lgnet-guest-%d" % os.getpid(),
                             os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.closers.append(lambda: os.close(fd))
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise LgnetError("cannot create %d bytes of guest RAM: %s"
                             % (size, exc.strerror)) from None
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        ram = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.closers.append(ram.close)
        return ram, fd

    def build(self) -> tuple[BrokerHost, object, int, int]:
        cfg = self.config
        if cfg.gdb is not None:
            self.start_gdb_server(cfg.gdb)
        if cfg.trace_stream is not None:
            self.start_trace(cfg.trace_stream)
        self.setup_devices()
        ram, ram_fd = self.create_memory()
        layout = self.devices.place(ram, ram_fd, self.phys)
        if self.trace is not None:
            self.trace.key_spaces = self.key_spaces()
        boot = load_guest(ram, self.mem, cfg.kernel, cfg.args, cfg.initrd)
        self.channel = self.connect()
        self.closers.append(self.channel.close)
        fds = [ram_fd] + self.devices.shared_fds()
        reply = self.channel.call(wire.OP_INITIALIZE, abi.GUEST_PFN_LIMIT, boot.pgdir,
                                  boot.start, boot.page_offset,
                                  wire.encode_layout(layout, 0, self.devices.control_offset),
                                  fds)
        if reply.result < 0:
            raise LgnetError("Writing to the broker (INITIALIZE): %s" % os.strerror(-reply.result))
        control = memoryview(ram)[self.devices.control_offset:
                                  self.devices.control_offset + wire.CONTROL_PAGE_SIZE]
        self.closers.insert(0, control.release)
        host = BrokerHost(self.channel, control, self.handle_output, self.handle_input,
                          self.phys)
        if self.devices.input_fds() or self.debugger is not None:
            self.waker = devs.Waker(self.broker_path(), reply.arg0, self.waker_fds)
            self.closers.insert(0, self.waker.stop)
        return host, boot, reply.arg0, self.mem

    def start_gdb_server(self, port: int) -> None:
        """Listen for gdb before the guest boots, so a port in use is the user's error."""
        if self.config.kernel.startswith(PYTHON_KERNEL):
            raise LgnetError("--gdb needs a kernel of real i386 code (Unicorn), not %s"
                             % self.config.kernel)
        from lgnet.guest.gdbstub import LISTEN_ADDRESS, GdbServer
        self.debugger = GdbServer(port, lambda text: self.say("lgnet: " + text))
        self.say(GDB_LISTENING % (LISTEN_ADDRESS, self.debugger.port, self.debugger.port))

    def start_trace(self, stream: str) -> None:
        """The guest's track: its hypercalls, interrupts and console lines (guest/trace.py)."""
        from lgnet.guest import trace
        kernel = self.config.kernel
        symbols = None if kernel.startswith(PYTHON_KERNEL) else trace.Symbols(kernel)
        self.trace = trace.GuestTrace(stream, trace.process_label(kernel), self.phys, [],
                                      symbols)
        self.out = trace.ConsoleTee(self.out, self.trace)

    def key_spaces(self) -> list[tuple[int, int, str]]:
        """Each device page's addresses and the name a key in it reads as: a net by its
        file's name (as the capture names it), the others by kind."""
        spaces = []
        for device in self.devices.list:
            if not device.num_pages:
                continue
            if isinstance(device, devs.SharedNet):
                name = device.name
            else:
                name = DEVICE_KINDS.get(device.type, "device")
            spaces.append((device.page, device.page + device.num_pages * abi.PAGE_SIZE, name))
        return spaces

    def say(self, text: str) -> None:
        """A line of the Launcher's own on its console."""
        self.out.write((text + "\n").encode())
        self.out.flush()

    def waker_fds(self) -> list[int]:
        """What the Waker watches: the devices' input, and a debugger's call to stop."""
        debugger = [self.debugger.wake_fd] if self.debugger is not None else []
        return self.devices.input_fds() + debugger

    def broker_path(self) -> str:
        return self.config.broker or wire.default_socket_path()

    def connect(self) -> wire.Channel:
        path = self.broker_path()
        try:
            return wire.Channel(path)
        except wire.BrokerRefuses as refused:
            raise LgnetError(refused.strerror) from None
        except OSError as exc:
            raise LgnetError("cannot reach the broker at %s (%s): start `lgnet broker` first"
                             % (path, exc.strerror)) from None

    # --- the run loop's device handling --------------------------------------------------

    def handle_output(self, dma: int, key: int) -> None:
        """The guest sent DMA to a private key: the device watching that key serves it."""
        used = self.devices.output(self.phys, self.channel, dma, key)
        if used is None:
            self.out.write(b"lgnet: Pending dma %#x, key %#x\n" % (dma, key))
            return
        self.phys.write_u32(dma + abi.DMA_USED_LEN_OFFSET, used)

    def handle_input(self) -> None:
        self.devices.input(self.phys, self.channel)

    # --- running ------------------------------------------------------------------------

    def run(self) -> int:
        """Run the guest to its end: 0 for a clean power-down, 1 when it was killed."""
        try:
            host, boot, _gid, mem = self.build()
            reason = run_guest(self.config.kernel, self.phys, mem, host, boot, self.debugger,
                               self.trace)
        except wire.BrokerGone:
            self.out.write(b"lgnet: the broker went away; stopping this guest\n")
            self.out.flush()
            return EXIT_KILLED
        except ConsoleAbort:
            return USER_ERROR_EXIT      # the reference Launcher's three-^C exit status
        finally:
            self.close()
        if reason == abi.MSG_CRASH % abi.MSG_POWER_DOWN:
            return 0
        self.out.write(("lgnet: guest died: %s\n" % reason).encode())
        self.out.flush()
        return EXIT_KILLED

    def close(self) -> None:
        self.closing = True
        self.devices.close()
        self.phys.release()
        for closer in reversed(self.closers):
            try:
                closer()
            except (OSError, ValueError, BufferError):
                pass
        self.closers.clear()
        if self.debugger is not None:
            self.debugger.close()             # last: the Waker watched its pipe
        if self.trace is not None:
            self.trace.close()
            self.trace = None
            if self.config.trace is not None:
                timeline.merge([self.config.trace_stream], self.config.trace)
                os.unlink(self.config.trace_stream)


def load_guest(ram, mem: int, kernel: str, args: list[str],
               initrd: str | None) -> loader.BootInfo:
    """A Python kernel needs only the boot header; a real one goes through the loader."""
    if not kernel.startswith(PYTHON_KERNEL):
        return loader.boot_guest(memoryview(ram)[:mem], mem, kernel, args, initrd)
    if initrd:
        raise LgnetError("--initrd needs a real kernel, not %s" % kernel)
    loader.write_boot_header(memoryview(ram)[:mem], mem, args)
    return loader.BootInfo(0, 0, 0, 0)


def run_guest(kernel: str, phys: PhysMap, mem: int, host: BrokerHost, boot,
              debugger=None, tracer=None) -> str:
    """Run a Python kernel or a real one (under the debugger, if any; traced, with a
    tracer); the reason it stopped."""
    try:
        if kernel.startswith(PYTHON_KERNEL):
            from lgnet.guest.pvmachine import Machine
            module = python_kernel(kernel)
            if tracer is not None:
                host = tracer.traced_host(host)
            module.main(Machine(phys, mem, host))
            return "the Python kernel returned without powering down"
        from lgnet.guest.cpu import GuestCpu
        cpu = GuestCpu(phys.regions_for_cpu(), boot.start, boot.pgdir, boot.page_offset, host,
                       debugger=debugger, tracer=tracer)
        return cpu.run()
    except GuestStopped as stopped:
        return stopped.reason
    except InvalidAddress as bad:
        # A Python kernel touched memory it does not have: its own death, as the Host hears.
        host.kill(str(bad))
        return str(bad)


def launch_main(config: LaunchConfig, parent_watch: bool = False) -> int:
    if parent_watch:
        process.die_with_parent()
    launcher = Launcher(config)

    def stop(*_) -> None:
        # A SIGTERM while already closing (say, the broker went away a moment before the lab
        # that told us to stop) must not cut the closing short: a device's undo, such as
        # removing an uplink's VXLAN port, would be skipped.
        if not launcher.closing:
            sys.exit(EXIT_KILLED)
    signal.signal(signal.SIGTERM, stop)
    return launcher.run()


# --- the command line: `lgnet launch` (the user's) and `python -m lgnet.guest.launcher` --------

def parse_mem(text: str) -> int:
    try:
        mem = int(text)
    except ValueError:
        mem = 0
    if not 1 <= mem <= MAX_MEM_MB:
        raise LgnetError("memory must be a whole number of megabytes from 1 to %d, got %r"
                         % (MAX_MEM_MB, text))
    return mem


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= MAX_PORT:
        raise LgnetError("--gdb wants a TCP port from 0 (any free one) to %d, got %r"
                         % (MAX_PORT, text))
    return port


class DeviceOption(argparse.Action):
    """--sharenet, --tunnet, --block: each may repeat, and all of them land in one list of
    (option name, argument) in command-line order, the order of the guest's devices (the
    names are LaunchConfig.devices' kinds)."""

    def __call__(self, parser, namespace, value, option_string=None):
        # A new list each time, as argparse's own "append" does: the default is shared.
        devices = list(getattr(namespace, self.dest) or [])
        devices.append((self.option_strings[0].lstrip("-"), value))
        setattr(namespace, self.dest, devices)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Launcher's user options, as lguest's took them (`lgnet launch` has these)."""
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.set_defaults(devices=[])
    parser.add_argument("--sharenet", action=DeviceOption, dest="devices", metavar="FILE",
                        help="join the network of this net file (created if missing); "
                        "devices are added in command-line order, at most %d and the "
                        "console" % (abi.MAX_DEVICES - 1))
    parser.add_argument("--tunnet", action=DeviceOption, dest="devices",
                        metavar="IP|bridge:NAME|tap:NAME",
                        help="a network to the host: a TAP with this address, in this bridge "
                             "(with ,vxlan:ID,remote:IP,dev:IF also a VXLAN port there), or "
                             "of this name")
    parser.add_argument("--block", action=DeviceOption, dest="devices", metavar="FILE",
                        help="a block device backed by FILE")
    parser.add_argument("--initrd", metavar="FILE", help="an initrd placed at the top of RAM")
    parser.add_argument("--broker", help="the broker's socket (default: $LGNET_BROKER)")
    parser.add_argument("--no-console-input", action="store_true",
                        help="do not read stdin into the guest's console")
    parser.add_argument("--trace", metavar="FILE",
                        help="write a timeline of this guest (Chrome JSON trace events: open "
                        "it in ui.perfetto.dev)")
    parser.add_argument("--gdb", metavar="PORT",
                        help="serve gdb on 127.0.0.1:PORT (0: any free port, printed); "
                        "then in gdb: target remote :PORT")
    parser.add_argument("mem", metavar="MEM_MB")
    parser.add_argument("kernel", metavar="KERNEL",
                        help="a vmlinux/bzImage, `bundled` for lgnet's own guest kernel, "
                        "or python:MODULE for a Python guest")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="the guest kernel's command line")


def python_kernel(kernel: str):
    """The module of `python:MODULE`, checked: it exists and has a main(machine)."""
    name = kernel[len(PYTHON_KERNEL):] or DEFAULT_PYTHON_KERNEL
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as missing:
        if missing.name is None or not (name == missing.name
                                        or name.startswith(missing.name + ".")):
            raise                     # the module is there; something it imports is not
        raise LgnetError("%s: no module named %r (a Python kernel is python:MODULE, "
                         "MODULE importable with a main(machine))" % (kernel, missing.name)) \
            from None
    if not callable(getattr(module, "main", None)):
        raise LgnetError("%s: module %s has no main(machine)" % (kernel, name))
    return module


def check_script(config: LaunchConfig) -> None:
    """A default Python guest's script= may only name the net devices it will have."""
    if config.kernel not in (PYTHON_KERNEL, PYTHON_KERNEL + DEFAULT_PYTHON_KERNEL):
        return
    nets = sum(1 for option, _ in config.devices if option in ("sharenet", "tunnet"))
    for arg in config.args:
        if not arg.startswith(script.ARG):
            continue
        for step in script.parse(arg[len(script.ARG):]):
            net = getattr(step, "net", None)
            if net is not None and not 0 <= net < nets:
                raise LgnetError("%s: step %r names net device eth%d, but this guest has "
                                 "%d (one per --sharenet and --tunnet)"
                                 % (script.ARG.rstrip("="), script.encode_step(step), net,
                                    nets))


def config_from(args: argparse.Namespace) -> LaunchConfig:
    """What the options ask for, checked: a user's mistake is an LgnetError."""
    kernel = resolve_kernel(args.kernel)
    config = LaunchConfig(mem_mb=parse_mem(args.mem), kernel=kernel, args=args.args,
                          devices=args.devices, initrd=args.initrd, verbose=args.verbose,
                          broker=args.broker, console_input=not args.no_console_input,
                          gdb=parse_port(args.gdb) if args.gdb is not None else None,
                          trace_stream=getattr(args, "trace_stream", None))
    if not kernel.startswith(PYTHON_KERNEL) and not os.path.exists(kernel):
        raise LgnetError("kernel image '%s': no such file" % kernel)
    if args.trace is not None:
        config.trace = args.trace
        config.trace_stream = trace_stream_beside(args.trace)
    if kernel.startswith(PYTHON_KERNEL):
        python_kernel(kernel)
        check_script(config)
    return config


def trace_stream_beside(path: str) -> str:
    """`lgnet launch --trace FILE`: the stream is written next to FILE, merged into it at
    the end. A directory that is not there is the user's mistake, said before the guest runs."""
    path = timeline.check_trace_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, ".%s.%d%s" % (os.path.basename(path), os.getpid(),
                                                 timeline.STREAM_SUFFIX))


def main(argv: list[str] | None = None) -> int:
    """`python -m lgnet.guest.launcher`: one guest as a lab starts it — the user options and
    the lab's own (die with the lab)."""
    parser = argparse.ArgumentParser(prog="python -m lgnet.guest.launcher")
    parser.add_argument("--die-with-parent", action="store_true")
    parser.add_argument("--trace-stream", metavar="FILE",
                        help="write this guest's timeline events here (the lab merges them)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return process.entry_main(lambda: launch_main(config_from(args), args.die_with_parent))


if __name__ == "__main__":
    sys.exit(main())
