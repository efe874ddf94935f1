"""`lgnet`: the command line, a face over lab.py and the two wings.

Rules of this file: parsing and printing only. Whatever a Python user of lgnet would need
lives in lab.py, fabric/ or guest/; user errors (LgnetError) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import lgnet
from lgnet import abi, wire
from lgnet.errors import USER_ERROR_EXIT, LgnetError


def cmd_broker(args) -> int:
    from lgnet.fabric.broker import run_broker
    path = args.socket or wire.default_socket_path()
    if args.die_with_parent:
        from lgnet.guest.launcher import die_with_parent
        die_with_parent()
    def say_listening() -> None:
        if not args.quiet:
            print("lgnet broker listening on %s (export LGNET_BROKER=%s)" % (path, path),
                  flush=True)
    try:
        run_broker(path, args.watch_fd, args.ready_fd, args.capture,
                   dict(parse_net_name(text) for text in args.net), args.owns_directory,
                   on_listening=say_listening,
                   first_guest_id=check_first_guest_id(args.first_guest_id))
    except OSError as exc:
        raise LgnetError("broker: %s" % (exc.strerror or exc)) from None
    return 0


def cmd_launch(args) -> int:
    from lgnet.guest.images import resolve_kernel
    from lgnet.guest.launcher import LaunchConfig, launch_main
    kernel = resolve_kernel(args.kernel)
    config = LaunchConfig(mem_mb=parse_mem(args.mem), kernel=kernel, args=args.args,
                          devices=args.devices, initrd=args.initrd, verbose=args.verbose,
                          broker=args.broker, console_input=not args.no_console_input,
                          gdb=parse_port(args.gdb) if args.gdb is not None else None)
    if not kernel.startswith("python:") and not os.path.exists(kernel):
        raise LgnetError("kernel image '%s': no such file" % kernel)
    return launch_main(config, args.die_with_parent)


class DeviceOption(argparse.Action):
    """--sharenet, --tunnet, --block: each may repeat, and all of them land in one list of
    (option name, argument) in command-line order, the order of the guest's devices (the
    names are LaunchConfig.devices' kinds)."""

    def __call__(self, parser, namespace, value, option_string=None):
        # A new list each time, as argparse's own "append" does: the default is shared.
        devices = list(getattr(namespace, self.dest) or [])
        devices.append((self.option_strings[0].lstrip("-"), value))
        setattr(namespace, self.dest, devices)


def check_first_guest_id(first: int) -> int:
    if not 0 <= first <= abi.GUEST_ID_LIMIT - abi.MAX_GUESTS:
        raise LgnetError("--first-guest-id must be from 0 to %d, got %d"
                         % (abi.GUEST_ID_LIMIT - abi.MAX_GUESTS, first))
    return first


def parse_net_name(text: str) -> tuple[str, str]:
    """--net NAME=PATH -> (PATH, NAME)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise LgnetError("--net wants NAME=PATH, got %r" % text)
    return path, name


def cmd_up(args) -> int:
    from lgnet.lab import run_up
    return run_up(args.scenario, duration=args.duration, out=sys.stdout, pcap=args.pcap,
                  uplink=args.uplink)


def cmd_test(args) -> int:
    from lgnet.lab import run_test
    return run_test(args.scenario, out=sys.stdout, pcap=args.pcap)


def cmd_dump(args) -> int:
    from lgnet.fabric import capture
    from lgnet.filters import FilterError, compile_filter
    from lgnet.packets import describe_frame
    path = args.target
    if not os.path.isfile(path):
        if args.pcap is None:
            raise LgnetError("no capture file %s: give a .pcapng or .pcap file, or a net name "
                             "with --pcap DIR (the directory of `lgnet up --pcap DIR`)" % path)
        path = os.path.join(args.pcap, args.target + capture.CAPTURE_SUFFIX)
        if not os.path.isfile(path):
            raise LgnetError("no capture of net %r in %s" % (args.target, args.pcap))
    if args.count is not None and args.count < 0:
        raise LgnetError("--count wants a number of frames, 0 or more, got %d" % args.count)
    try:
        keep = compile_filter(" ".join(args.filter)) if args.filter else None
    except FilterError as error:
        raise LgnetError(str(error)) from None
    kind = capture.capture_format(path)           # not a capture: exit 2, even with --count 0
    if args.follow:
        if kind != "pcapng":
            raise LgnetError("--follow reads the pcapng a broker is writing; %s is a classic "
                             "pcap: drop --follow" % path)
        frames = ((d.time, d.data, d.comment) for d in capture.follow(path))
    else:
        frames = ((r.ts_ns / abi.NSEC_PER_SEC, r.data, r.comments[0] if r.comments else "")
                  for r in capture.read_capture(path))
    if args.count == 0:
        return 0
    shown, first = 0, None
    try:
        for n, (ts, data, facts) in enumerate(frames, 1):
            first = ts if first is None else first
            if keep is not None and not keep(data):
                continue
            print("%5d %10.6f %s" % (n, ts - first, describe_frame(data, facts)), flush=True)
            shown += 1
            if shown == args.count:
                break
    except BrokenPipeError:
        pass
    return 0


def cmd_slots(args) -> int:
    from lgnet import netfile
    from lgnet.lab import BROKER_SOCKET, find_net, guest_names, running_labs
    from lgnet.uplink import holder
    path = args.net
    if args.lab is not None or not os.path.exists(path):
        path = find_net(args.net, args.lab)
    netfile.require_net_page(path)
    # The lab's broker sits beside its own net files and knows each launcher's guest name;
    # a net file elsewhere (a scenario's `file:`) may belong to any running lab.
    names = guest_names(os.path.join(args.lab or os.path.dirname(os.path.abspath(path)),
                                     BROKER_SOCKET))
    if not names and args.lab is None:
        for runtime in running_labs():
            names.update(guest_names(os.path.join(runtime, BROKER_SOCKET)))
    table = netfile.slot_table(path)
    print("%4s  %-17s  %-7s  %-6s  %-12s  %s" % ("slot", "mac", "promisc", "lock", "guest",
                                                 "holder pids"))
    for s in table:
        guest = ", ".join(sorted({names[pid] for pid in s.pids if pid in names})) or "-"
        what = holder(s.mac) if s.locked else None      # an uplink: its TAP, its bridge
        print("%4d  %-17s  %-7s  %-6s  %-12s  %s" % (
            s.slot, s.mac_text, "yes" if s.promisc else "no",
            "held" if s.locked else "stale" if s.stale else "free", guest,
            " ".join(map(str, s.pids)) or ("-" if not s.locked else "(not visible)"))
              + ("  (%s)" % what if what else ""))
    if not table:
        print("(no slot in use)")
    return 0


def cmd_bench(args) -> int:
    from lgnet import bench
    opts = bench.BenchOptions.make(sizes=args.sizes, seconds=args.seconds, rounds=args.rounds,
                                   guests=args.guests, quick=args.quick)
    unplottable = bench.plot_unavailable(args.plot) if args.plot else None
    if unplottable:
        raise LgnetError("--plot %s: %s" % (args.plot, unplottable))   # before a long run
    print("lgnet bench: %d round(s); progress below, the table at the end" % opts.rounds,
          flush=True)
    result = bench.run_bench(opts, progress=sys.stdout)
    print("\n" + bench.report(result))
    if args.json:
        bench.write_json(result, args.json)
        print("\nwrote %s" % args.json)
    if args.plot:
        skipped = bench.plot(result, args.plot)
        print("plot skipped: %s" % skipped if skipped else "wrote %s" % args.plot)
    return 0


def parse_sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("sizes are whole numbers of bytes, comma-separated, "
                                         "got %r" % text) from None


def parse_mem(text: str) -> int:
    try:
        mem = int(text)
    except ValueError:
        mem = 0
    if not 1 <= mem <= 1024:
        raise LgnetError("memory must be a whole number of megabytes from 1 to 1024, got %r"
                         % text)
    return mem


def parse_port(text: str) -> int:
    from lgnet.scenario import MAX_PORT
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= MAX_PORT:
        raise LgnetError("--gdb wants a TCP port from 0 (any free one) to %d, got %r"
                         % (MAX_PORT, text))
    return port


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lgnet", description="lguest's inter-guest networking "
                                "(Linux 2.6.23), rebuilt as a multi-process simulator.")
    p.add_argument("--version", action="version", version="lgnet %s" % lgnet.__version__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="bring a scenario up: broker + one launcher per guest")
    up.add_argument("scenario", help="a scenario YAML file (see scenarios/)")
    up.add_argument("--duration", type=float, default=None,
                    help="stop after this many seconds (default: when every guest halted)")
    up.add_argument("--pcap", metavar="DIR",
                    help="record every delivery: DIR/<net>.pcapng per net (read it live with "
                         "`lgnet dump`, tshark or scapy)")
    up.add_argument("--uplink", action="append", default=[],
                    metavar="NET=bridge:BR[,vxlan:ID,remote:IP,dev:IF]|NET=tap:NAME",
                    help="join NET to a kernel bridge (or a TAP) beyond this host; replaces "
                         "the scenario's uplink: of that net (needs CAP_NET_ADMIN)")
    up.set_defaults(func=cmd_up)

    test = sub.add_parser("test", help="run a scenario and check its expect: list "
                          "(exit 0 all held, 1 one failed, 2 the scenario is wrong)")
    test.add_argument("scenario", help="a scenario YAML file with an expect: list")
    test.add_argument("--pcap", metavar="DIR", help="keep the capture in DIR")
    test.set_defaults(func=cmd_test)

    dump = sub.add_parser("dump", help="one decoded line per delivered frame of a capture")
    dump.add_argument("target", metavar="PCAP|NET",
                      help="a capture file (pcapng or pcap), or a net name with --pcap DIR")
    dump.add_argument("filter", nargs="*", metavar="EXPRESSION",
                      help="only the frames this pcap-filter(7) expression keeps, as tcpdump "
                           "(e.g. 'udp port 7')")
    dump.add_argument("--pcap", metavar="DIR", help="where `lgnet up --pcap DIR` writes")
    dump.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new frames until the broker stops writing")
    dump.add_argument("-c", "--count", type=int, help="stop after this many frames")
    dump.set_defaults(func=cmd_dump)

    slots = sub.add_parser("slots", help="the live slot table of a net file")
    slots.add_argument("net", metavar="NETFILE|NET",
                       help="a net file, or the name of a running lab's net (lan0)")
    slots.add_argument("--lab", metavar="DIR",
                       help="the lab's runtime directory (`lgnet up` prints it)")
    slots.set_defaults(func=cmd_slots)

    bench = sub.add_parser("bench", help="throughput, latency and scale, with anchors "
                           "measured in the same run")
    bench.add_argument("--sizes", type=parse_sizes, metavar="B,B,...",
                       help="frame sizes (default 60,1514,65536)")
    bench.add_argument("--seconds", type=float, help="measuring time per run (default 1)")
    bench.add_argument("--rounds", type=int, help="rounds; figures are medians (default 3)")
    bench.add_argument("--guests", type=int, metavar="N",
                       help="also fan out to N guests: the scale run (bring-up, RSS)")
    bench.add_argument("--json", metavar="FILE", help="write every figure, the machine and "
                       "the method as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="throughput vs frame size "
                       "(needs matplotlib: pip install 'lgnet[bench]')")
    bench.add_argument("--quick", action="store_true",
                       help="one short round, fan-out to 2 and 8: a smoke test")
    bench.set_defaults(func=cmd_bench)

    broker = sub.add_parser("broker", help="run the Host: the broker launchers connect to")
    broker.add_argument("--socket", help="socket path (default: $LGNET_BROKER or per-user)")
    broker.add_argument("--quiet", action="store_true")
    broker.add_argument("--capture", metavar="DIR",
                        help="record every delivery: one pcapng per net file in DIR")
    broker.add_argument("--net", action="append", default=[], metavar="NAME=PATH",
                        help="name the capture of this net file (default: its file name)")
    broker.add_argument("--first-guest-id", type=int, default=0, metavar="N",
                        help="number guests from N (lguest_net's MAC is 02:00:<guest id>:00:00: "
                             "Hosts whose nets an uplink joins need ranges apart)")
    broker.add_argument("--watch-fd", type=int, help=argparse.SUPPRESS)
    broker.add_argument("--owns-directory", action="store_true", help=argparse.SUPPRESS)
    broker.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    broker.add_argument("--die-with-parent", action="store_true", help=argparse.SUPPRESS)
    broker.set_defaults(func=cmd_broker)

    launch = sub.add_parser("launch", help="run one guest (lguest's Launcher)")
    launch.add_argument("-v", "--verbose", action="store_true")
    launch.set_defaults(devices=[])
    launch.add_argument("--sharenet", action=DeviceOption, dest="devices", metavar="FILE",
                        help="join the network of this net file (created if missing); "
                        "devices are added in command-line order, at most %d and the "
                        "console" % (abi.MAX_DEVICES - 1))
    launch.add_argument("--tunnet", action=DeviceOption, dest="devices",
                        metavar="IP|bridge:NAME|tap:NAME",
                        help="a network to the host: a TAP with this address, in this bridge "
                             "(with ,vxlan:ID,remote:IP,dev:IF also a VXLAN port there), or "
                             "of this name")
    launch.add_argument("--block", action=DeviceOption, dest="devices", metavar="FILE",
                        help="a block device backed by FILE")
    launch.add_argument("--initrd", metavar="FILE", help="an initrd placed at the top of RAM")
    launch.add_argument("--broker", help="the broker's socket (default: $LGNET_BROKER)")
    launch.add_argument("--no-console-input", action="store_true",
                        help="do not read stdin into the guest's console")
    launch.add_argument("--gdb", metavar="PORT",
                        help="serve gdb on 127.0.0.1:PORT (0: any free port, printed); "
                        "then in gdb: target remote :PORT")
    launch.add_argument("--die-with-parent", action="store_true", help=argparse.SUPPRESS)
    launch.add_argument("mem", metavar="MEM_MB")
    launch.add_argument("kernel", metavar="KERNEL",
                        help="a vmlinux/bzImage, `bundled` for lgnet's own guest kernel, "
                        "or python:MODULE for a Python guest")
    launch.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="the guest kernel's command line")
    launch.set_defaults(func=cmd_launch)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command == "dump" and not any(word.startswith("-") for word in extra):
        args.filter += extra           # as tcpdump: options first, then the expression
    elif extra:
        p.error("unrecognized arguments: %s" % " ".join(extra))
    try:
        return args.func(args)
    except LgnetError as exc:
        print("lgnet: %s" % exc, file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
